"""experiments.workdir: config-checked resume, the workdir lock, checksummed checkpoints with
fallback, the tolerant metrics log and the one-line command-line errors. No model is trained:
the checkpoints hold a small TrainState-like pytree saved with orbax as experiments.soat saves
its state."""

from __future__ import annotations

import glob
import json
import os
import re
import signal
import subprocess
import sys
import textwrap

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import test_tiny
from experiments import workdir as wd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)


# ---------------------------------------------------------------------------------------------
# 1. Config fingerprint


def _fake_checkpoint(workdir, step=1):
  os.makedirs(os.path.join(workdir, "checkpoints", str(step)), exist_ok=True)


def test_changed_run_config_is_refused_with_one_line(tmp_path):
  w = str(tmp_path)
  c = test_tiny.get_config("pgd")
  c.train.learning_rate = 0.2
  assert wd.check_run_config(w, c) == []
  _fake_checkpoint(w)
  assert wd.check_run_config(w, c) == []  # the same config resumes
  c2 = ml_collections.ConfigDict(c.to_dict())
  c2.train.learning_rate, c2.model.activation = 0.01, "softplus"
  with pytest.raises(wd.ConfigError) as e:
    wd.check_run_config(w, c2)
  assert str(e.value) == (f"workdir {w} was trained with model.activation=relu, "
                          f"train.learning_rate=0.2; this config has softplus, 0.01: use a new "
                          f"workdir")
  # The refused run leaves the record alone.
  assert json.load(open(tmp_path / "run_config.json"))["config"]["train.learning_rate"] == 0.2


@pytest.mark.parametrize("field,value", [("seed", 1), ("train.pgd.steps", 5),
                                         ("data.num_train", 32), ("model.name", "madry_cnn"),
                                         ("train.epochs", 1)])
def test_each_run_defining_change_is_refused(tmp_path, field, value):
  c = test_tiny.get_config("pgd")
  wd.check_run_config(str(tmp_path), c)
  _fake_checkpoint(str(tmp_path))
  c2 = ml_collections.ConfigDict(c.to_dict())
  *parents, leaf = field.split(".")
  node = c2
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(wd.ConfigError, match=f"trained with {field}="):
    wd.check_run_config(str(tmp_path), c2)


def test_allowed_changes_resume_and_are_recorded(tmp_path):
  w = str(tmp_path)
  c = test_tiny.get_config("pgd")
  wd.check_run_config(w, c)
  _fake_checkpoint(w, 2)
  c2 = ml_collections.ConfigDict(c.to_dict())
  c2.train.epochs = 5  # train further
  c2.eval.num_examples = 8
  c2.eval.attacks = test_tiny.full_eval_attacks(include=("clean",))
  c2.parallel.mesh_shape = (2,)
  c2.checkpoint.max_to_keep = 4
  allowed = wd.check_run_config(w, c2)
  assert "train.epochs" in {a.field for a in allowed}
  record = json.load(open(tmp_path / "run_config.json"))
  assert record["config"]["train.epochs"] == 5
  assert record["history"] == [dict(field="train.epochs", was=2, now=5, after_epoch=2)]
  # The record now says 5 epochs: going back to 2 shrinks it.
  with pytest.raises(wd.ConfigError, match="train.epochs=5; this config has 2"):
    wd.check_run_config(w, c)
  # Readers (evaluate) check without writing.
  c3 = ml_collections.ConfigDict(c2.to_dict())
  c3.train.epochs = 9
  wd.check_run_config(w, c3, record=False)
  assert json.load(open(tmp_path / "run_config.json"))["config"]["train.epochs"] == 5


def test_new_or_removed_field_is_a_difference(tmp_path):
  c = test_tiny.get_config("standard")
  wd.check_run_config(str(tmp_path), c)
  _fake_checkpoint(str(tmp_path))
  c2 = ml_collections.ConfigDict(c.to_dict())
  c2.model.options.width = 8
  with pytest.raises(wd.ConfigError, match="model.options.width=<unset>; this config has 8"):
    wd.check_run_config(str(tmp_path), c2)


def test_without_checkpoints_the_record_is_replaced(tmp_path):
  c = test_tiny.get_config("standard")
  wd.check_run_config(str(tmp_path), c)
  c2 = ml_collections.ConfigDict(c.to_dict())
  c2.seed = 3
  wd.check_run_config(str(tmp_path), c2)  # nothing trained yet: a fixed typo is fine
  assert json.load(open(tmp_path / "run_config.json"))["config"]["seed"] == 3


def test_legacy_workdir_is_checked_against_config_json(tmp_path):
  c = test_tiny.get_config("standard")
  (tmp_path / "config.json").write_text(c.to_json(indent=2))
  _fake_checkpoint(str(tmp_path))
  c2 = ml_collections.ConfigDict(c.to_dict())
  c2.train.learning_rate = 0.5
  with pytest.raises(wd.ConfigError, match="train.learning_rate=0.05; this config has 0.5"):
    wd.check_run_config(str(tmp_path), c2)
  wd.check_run_config(str(tmp_path), c)
  assert (tmp_path / "run_config.json").exists()


def test_many_differences_are_capped():
  refused = [wd.ConfigChange(f"f{i}", i, i + 1) for i in range(9)]
  msg = wd.mismatch_message("W", refused)
  assert msg.count("=") == 6 and "(and 3 more)" in msg and "\n" not in msg


# ---------------------------------------------------------------------------------------------
# 2. Workdir lock


_HOLDER = textwrap.dedent("""
    import sys, time
    from experiments import workdir as wd
    with wd.workdir_lock(sys.argv[1]):
      print("locked", flush=True)
      time.sleep(600)
""")


def _start_holder(workdir):
  p = subprocess.Popen([sys.executable, "-c", _HOLDER, workdir], env=ENV, cwd=ROOT,
                       stdout=subprocess.PIPE, text=True)
  assert p.stdout.readline().strip() == "locked"
  return p


def test_lock_excludes_a_second_run_and_dies_with_its_holder(tmp_path):
  w = str(tmp_path / "w")
  holder = _start_holder(w)
  try:
    with pytest.raises(wd.WorkdirInUse, match=rf"workdir {w} is in use by pid {holder.pid} on "
                                              rf"host .* since .*; wait for it"):
      with wd.workdir_lock(w):
        pass
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  # SIGKILL gave no chance to clean up, yet the kernel dropped the flock.
  assert f"pid {holder.pid}" in wd.lock_holder(w)
  with wd.workdir_lock(w) as path:
    assert f"pid {os.getpid()} " in open(path).read()
  assert wd.lock_holder(w) == ""  # released on exit


def test_lock_is_exclusive_within_a_process_and_per_host(tmp_path):
  w = str(tmp_path)
  with wd.workdir_lock(w):
    with pytest.raises(wd.WorkdirInUse, match=f"pid {os.getpid()}"):
      with wd.workdir_lock(w):
        pass
    with wd.workdir_lock(w, process_index=1) as other:  # another host's lock file
      assert other.endswith("lock.1")
  with wd.workdir_lock(w):  # released after an exception too
    pass


# ---------------------------------------------------------------------------------------------
# 3. Checkpoints and the metrics log


def _state(k):
  """A TrainState-like pytree, distinct for each ``k``."""
  return {"step": jnp.asarray(k, jnp.int32),
          "params": {"dense": {"kernel": jnp.arange(600, dtype=jnp.float32).reshape(20, 30) * k,
                               "bias": jnp.full((30,), float(k))}},
          "batch_stats": {}, "opt_state": (jnp.ones((20, 30)) * k, jnp.zeros(()))}


def _manager(workdir, keep=3):
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")),
                               options=ocp.CheckpointManagerOptions(max_to_keep=keep,
                                                                    create=True))


def _saved(workdir, steps=(1, 2, 3), keep=3):
  m = _manager(workdir, keep)
  for k in steps:
    wd.save_checkpoint(m, k, _state(k), workdir)
  m.wait_until_finished()
  m.close()


def _restore(workdir, **kw):
  m = _manager(workdir)
  try:
    return wd.restore_newest(m, _state(0), workdir, **kw)
  finally:
    m.close()


def _data_file(workdir, step):
  """The largest array data file of a checkpoint (the kernels)."""
  files = glob.glob(os.path.join(workdir, "checkpoints", str(step), "**", "d", "*"),
                    recursive=True)
  return max(files, key=os.path.getsize)


def _flip_a_bit(path, offset=None):
  """Flips one bit of a checkpoint data file (by default early: OCDBT writes the array chunks
  first and its per-process index nodes after them, superseded by the merged index)."""
  raw = bytearray(open(path, "rb").read())
  raw[max(64, len(raw) // 8) if offset is None else offset] ^= 0x04
  open(path, "wb").write(bytes(raw))


def _assert_state(state, k):
  np.testing.assert_array_equal(state["params"]["dense"]["kernel"],
                                np.arange(600, dtype=np.float32).reshape(20, 30) * k)
  assert int(state["step"]) == k


def test_checksum_is_deterministic_and_sensitive():
  a = _state(2)
  assert wd.state_checksum(a) == wd.state_checksum(_state(2))
  reordered = {"opt_state": a["opt_state"], "batch_stats": {}, "params": a["params"],
               "step": a["step"]}
  assert wd.state_checksum(reordered) == wd.state_checksum(a)
  kernel = np.array(a["params"]["dense"]["kernel"])
  kernel.view(np.uint32)[7, 3] ^= 1  # one bit
  flipped = dict(a, params={"dense": dict(a["params"]["dense"], kernel=kernel)})
  assert wd.state_checksum(flipped) != wd.state_checksum(a)
  # Same bytes under another dtype or shape are another state.
  assert wd.state_checksum({"x": np.zeros(4, np.float32)}) != wd.state_checksum(
      {"x": np.zeros(4, np.int32)})
  assert wd.state_checksum({"x": np.zeros(4)}) != wd.state_checksum({"x": np.zeros((2, 2))})


def test_intact_checkpoints_restore_verified(tmp_path):
  w = str(tmp_path)
  _saved(w)
  assert sorted(json.load(open(tmp_path / "checksums.json"))) == ["1", "2", "3"]
  r = _restore(w)
  assert (r.step, r.skipped, r.verified) == (3, (), True) and r.messages(w) == []
  _assert_state(r.state, 3)


def test_checksums_follow_the_kept_checkpoints(tmp_path):
  _saved(str(tmp_path), steps=(1, 2, 3, 4), keep=2)
  assert sorted(json.load(open(tmp_path / "checksums.json"))) == ["2", "3", "4"]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_bit_flipped_checkpoint_is_skipped_and_quarantined(tmp_path):
  w = str(tmp_path)
  _saved(w)
  # A bit of an array chunk that orbax reads back without complaint: only the checksum tells.
  path, good = _data_file(w, 3), None
  original = open(path, "rb").read()
  for offset in range(64, len(original), max(len(original) // 16, 1)):
    _flip_a_bit(path, offset)
    m = _manager(w)
    try:
      silent = m.restore(3, args=ocp.args.StandardRestore(_state(0)))
      if wd.state_checksum(silent) != wd.state_checksum(_state(3)):
        good = offset
    except Exception:  # noqa: BLE001 - this bit broke the file's structure: try another
      pass
    finally:
      m.close()
    if good is not None:
      break
    open(path, "wb").write(original)
  assert good is not None
  r = _restore(w, quarantine=True)
  assert r.step == 2 and r.verified and r.skipped == ((3, "checksum mismatch"),)
  assert r.messages(w) == [f"{w}: checkpoint 3 unreadable (checksum mismatch); restored "
                           f"checkpoint 2"]
  _assert_state(r.state, 2)
  assert wd.saved_steps(w) == [1, 2]
  assert os.path.isdir(tmp_path / "damaged_checkpoints" / "3")
  # The resumed run saves epoch 3 again.
  _saved(w, steps=(3,))
  r = _restore(w)
  assert (r.step, r.skipped) == (3, ())


def test_truncated_checkpoint_falls_back(tmp_path):
  w = str(tmp_path)
  _saved(w)
  path = _data_file(w, 3)
  raw = open(path, "rb").read()
  open(path, "wb").write(raw[:len(raw) // 2])
  r = _restore(w)
  assert r.step == 2 and [s for s, _ in r.skipped] == [3]
  (line,) = r.messages(w)
  assert line.startswith(f"{w}: checkpoint 3 unreadable (") and line.endswith(
      "); restored checkpoint 2")
  assert wd.saved_steps(w) == [1, 2, 3]  # a reader moves nothing


# Orbax leaves un-awaited read coroutines behind when a data file is missing.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_missing_files_and_metadata_fall_back(tmp_path):
  w = str(tmp_path)
  _saved(w)
  os.remove(_data_file(w, 3))
  for f in glob.glob(os.path.join(w, "checkpoints", "2", "**", "_METADATA"), recursive=True):
    open(f, "w").write("{not json")
  r = _restore(w)
  assert r.step == 1 and [s for s, _ in r.skipped] == [3, 2]


def test_no_restorable_checkpoint_is_one_line(tmp_path):
  w = str(tmp_path)
  _saved(w, steps=(1, 2))
  (tmp_path / "checksums.json").write_text(json.dumps({"1": "0" * 64, "2": "0" * 64}))
  with pytest.raises(wd.CheckpointError) as e:
    _restore(w)
  assert "\n" not in str(e.value)
  assert "checkpoint 2: checksum mismatch; checkpoint 1: checksum mismatch" in str(e.value)
  empty = str(tmp_path / "empty")
  assert _restore(empty).step == 0
  with pytest.raises(wd.CheckpointError, match="no checkpoint in"):
    _restore(empty, allow_none=False)


def test_checkpoints_without_checksums_restore_unverified(tmp_path):
  w = str(tmp_path)
  _saved(w)
  os.remove(tmp_path / "checksums.json")  # written before checksums were kept
  r = _restore(w)
  assert r.step == 3 and not r.verified
  assert r.messages(w) == [f"{w}: checkpoint 3 has no recorded checksum (written before "
                           f"checksums were kept); restored unverified"]
  # A damaged checksums.json is not taken as "no checksums".
  (tmp_path / "checksums.json").write_text('{"3": "ab')
  with pytest.raises(wd.CheckpointError, match="checksums.json unreadable"):
    _restore(w)


def test_metrics_log_drops_a_cut_last_line_and_later_epochs(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  lines = [json.dumps(dict(epoch=e, train_loss=1.0 / e)) for e in (1, 2, 3)]
  open(path, "w").write("\n".join(lines) + "\n" + lines[2][:9])  # killed mid-write
  log = wd.truncate_metrics(path, 2)
  assert [r["epoch"] for r in log.records] == [1, 2] and log.dropped == 1
  assert open(path).read() == "\n".join(lines[:2]) + "\n"
  assert wd.truncate_metrics(str(tmp_path / "absent.jsonl"), 3) == wd.MetricsLog([], 0)


# ---------------------------------------------------------------------------------------------
# 4. Command line


_CLI = textwrap.dedent("""
    import sys
    from absl import app, flags
    from ml_collections import config_flags
    from experiments import workdir as wd
    config_flags.DEFINE_config_file("config", None, "config file", lock_config=True)
    flags.DEFINE_string("workdir", None, "workdir")
    flags.mark_flags_as_required(["config", "workdir"])

    def _main(argv):
      config = flags.FLAGS.config
      with wd.config_errors():  # the real up-front checks of experiments.soat
        from experiments import pipeline
        pipeline.validate_config(config)
        wd.check_data_root(config.data)
      wd.note_progress(0, config.train.method)
      for epoch in range(config.train.epochs):
        wd.note_progress(epoch + 1, config.train.method)
        if epoch + 1 == 3:
          raise KeyboardInterrupt
      print("trained", config.train.epochs)

    wd.run_cli(lambda: app.run(_main, flags_parser=wd.parse_flags), prog="soat")
""")


def _cli(*args):
  return subprocess.run([sys.executable, "-c", _CLI, *args], cwd=ROOT, env=ENV,
                        capture_output=True, text=True, timeout=120)


def _error_line(out):
  lines = [ln for ln in out.stderr.splitlines() if not ln.startswith(("WARNING", "I0", "W0"))]
  assert len(lines) == 1, out.stderr
  return lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("args,message", [
    (["--config.train.epochz=3"],
     "soat: error: unknown config field 'epochz' in --config.train.epochz=3 (did you mean "
     "epochs?)"),
    (["--config.trian.epochs=3"],
     "soat: error: unknown config field 'trian' in --config.trian.epochs=3 (did you mean "
     "train?)"),
    (["--config.train.epochs=many"],
     "soat: error: flag --config.train.epochs=many: invalid literal for int() with base 10: "
     "'many'"),
    (["--config.eval.attacks.pgd_linf.eps=-0.1"],
     "soat: error: eval.attacks.pgd_linf.eps must be >= 0, got -0.1"),
    (["--config.eval.eps_linf=-0.1"], "soat: error: eval.eps_linf must be >= 0, got -0.1"),
    (["--config.eval.table.pgd_linf.steps=0"],
     "soat: error: eval.table.pgd_linf.steps must be an integer >= 1, got 0"),
    (["--config.data.source=idx", "--config.data.root=/nonexistent/mnist"],
     "soat: error: data.root=/nonexistent/mnist: no such folder"),
])
def test_config_mistakes_are_one_line(args, message):
  out = _cli("--config", "configs/test_tiny.py", "--workdir", "/nonexistent/w", *args)
  assert out.returncode == 2 and _error_line(out) == message


@pytest.mark.slow
def test_missing_config_file_and_flag_are_one_line():
  out = _cli("--config", "configs/nope.py", "--workdir", "w", "--config.train.epochs=2")
  assert out.returncode == 2
  assert _error_line(out) == "soat: error: --config: config file not found: configs/nope.py"
  out = _cli("--config", "configs/test_tiny.py")
  assert out.returncode == 2 and "--workdir must have a value" in _error_line(out)


@pytest.mark.slow
def test_interrupt_is_one_line_naming_the_epoch():
  out = _cli("--config", "configs/test_tiny.py", "--workdir", "w", "--config.train.epochs=5")
  assert out.returncode == 130
  assert _error_line(out) == ("soat: interrupted after epoch 3 (standard); rerun the same "
                              "command to resume")
  ok = _cli("--config", "configs/test_tiny.py", "--workdir", "w")
  assert ok.returncode == 0 and ok.stdout.strip() == "trained 2", ok.stderr


def test_run_cli_in_process(capsys, monkeypatch):
  monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)  # run_cli silences it
  def stop():
    raise KeyboardInterrupt
  wd.reset_progress()
  with pytest.raises(SystemExit) as e:
    wd.run_cli(stop, prog="x")
  assert e.value.code == 130 and capsys.readouterr().err == "x: interrupted\n"
  wd.note_progress(0, None)
  with pytest.raises(SystemExit):
    wd.run_cli(stop, prog="x")
  assert capsys.readouterr().err == ("x: interrupted before the first epoch completed; rerun "
                                     "the same command\n")
  wd.reset_progress()

  def bad():
    raise wd.CheckpointError("no checkpoint in W restores (checkpoint 2: checksum mismatch)")
  with pytest.raises(SystemExit) as e:
    wd.run_cli(bad, prog="x")
  assert e.value.code == 2
  assert capsys.readouterr().err == ("x: error: no checkpoint in W restores (checkpoint 2: "
                                     "checksum mismatch)\n")

  def bug():
    raise ZeroDivisionError("a bug keeps its traceback")
  with pytest.raises(ZeroDivisionError):
    wd.run_cli(bug)


def test_interrupt_leaves_no_destructor_noise():
  # Ctrl-C inside a constructor (tqdm's, between epochs) leaves an object whose __del__ fails
  # at shutdown; the interrupt line stays the last word.
  code = textwrap.dedent("""
      from experiments import workdir as wd
      class Bar:
        def __init__(self):
          raise KeyboardInterrupt
        def __del__(self):
          self.pos
      def main():
        wd.note_progress(3, "pgd")
        global bar
        bar = Bar.__new__(Bar)
        bar.__init__()
      wd.run_cli(main, prog="soat")
  """)
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=120)
  assert out.returncode == 130
  assert out.stderr == "soat: interrupted after epoch 3 (pgd); rerun the same command to resume\n"


def test_config_errors_converts_only_user_errors():
  with pytest.raises(wd.ConfigError, match="^train.pgd.steps must be >= 1, got 0$"):
    with wd.config_errors():
      raise ValueError("train.pgd.steps must be >= 1, got 0")
  with pytest.raises(wd.ConfigError, match="IDX data folder not found"):
    with wd.config_errors():
      raise FileNotFoundError("IDX data folder not found: /x")
  with pytest.raises(TypeError):
    with wd.config_errors():
      raise TypeError("a bug")
  with pytest.raises(wd.ConfigError, match="data.root must name the folder"):
    wd.check_data_root(ml_collections.ConfigDict(dict(source="cifar10_python", root="")))
  wd.check_data_root(ml_collections.ConfigDict(dict(source="digits", root="")))


# ---------------------------------------------------------------------------------------------
# 5. Readers of a workdir


def test_require_trained_workdir_creates_nothing(tmp_path):
  missing = str(tmp_path / "typo" / "w")
  with pytest.raises(wd.ConfigError, match=f"workdir {missing} does not exist"):
    wd.require_trained_workdir(missing)
  assert not os.path.exists(tmp_path / "typo")
  with pytest.raises(wd.ConfigError, match="no checkpoint in"):
    wd.require_trained_workdir(str(tmp_path))
  assert os.listdir(tmp_path) == []
  _fake_checkpoint(str(tmp_path), 4)
  assert wd.require_trained_workdir(str(tmp_path)) == str(tmp_path)


def test_require_trained_workdir_points_at_the_workdir_to_train(tmp_path):
  # One method's folder of a multi-method run: the hint is the top workdir, which soat takes.
  top = str(tmp_path / "run")
  with pytest.raises(wd.ConfigError, match=re.escape(
      f"workdir {top}/soat does not exist; train first with python -m experiments.soat "
      f"--workdir {top}")):
    wd.require_trained_workdir(f"{top}/soat", top)


# ---------------------------------------------------------------------------------------------
# End to end: experiments.soat and experiments.evaluate on configs/test_tiny.py


def _entry(module, workdir, *overrides, **popen):
  cmd = [sys.executable, "-m", f"experiments.{module}", "--config",
         "configs/test_tiny.py:standard", "--workdir", str(workdir), *overrides]
  if popen:
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV, text=True, **popen)
  return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)


def _last_line(stderr):
  lines = [ln for ln in stderr.replace("\r", "\n").splitlines() if ln.strip()]
  assert not any(ln.startswith("Traceback") for ln in lines), stderr[-3000:]
  return lines[-1]


@pytest.mark.slow
def test_soat_refuses_a_changed_config_a_locked_workdir_and_evaluate_a_missing_one(tmp_path):
  from experiments import soat
  w = tmp_path / "w"
  c = test_tiny.get_config("standard")
  c.train.epochs = 1
  c.eval.attacks = test_tiny.full_eval_attacks(include=("clean",))
  soat.train_and_evaluate(c, str(w), progress=False)
  assert (w / "run_config.json").exists() and (w / "checksums.json").exists()
  assert wd.lock_holder(str(w)) == ""
  out = _entry("soat", w, "--config.train.epochs=1", "--config.train.learning_rate=0.2")
  assert out.returncode == 2
  assert _last_line(out.stderr) == (f"soat: error: workdir {w} was trained with "
                                    f"train.learning_rate=0.05; this config has 0.2: use a new "
                                    f"workdir")
  holder = _start_holder(str(w))
  try:
    out = _entry("soat", w, "--config.train.epochs=1")
    assert out.returncode == 2
    assert _last_line(out.stderr).startswith(f"soat: error: workdir {w} is in use by pid "
                                             f"{holder.pid} on host ")
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  missing = tmp_path / "typo"
  out = _entry("evaluate", missing)
  assert out.returncode == 2 and _last_line(out.stderr) == (
      f"evaluate: error: workdir {missing} does not exist; train first with python -m "
      f"experiments.soat --workdir {missing}")
  assert not missing.exists()


@pytest.mark.slow
def test_ctrl_c_is_one_line_and_the_rerun_resumes(tmp_path):
  from experiments import pipeline
  w = tmp_path / "w"
  epochs = 100_000  # stopped by Ctrl-C long before
  p = _entry("soat", w, f"--config.train.epochs={epochs}", stdout=subprocess.PIPE,
             stderr=subprocess.PIPE)
  try:
    for line in p.stdout:
      if "epoch 2:" in line:
        break
    p.send_signal(signal.SIGINT)
    _, stderr = p.communicate(timeout=120)
  finally:
    if p.poll() is None:
      p.kill()
  assert p.returncode == 130, stderr[-3000:]
  done = int(re.fullmatch(r"soat: interrupted after epoch (\d+) \(standard\); rerun the same "
                          r"command to resume", _last_line(stderr)).group(1))
  # The epoch named is on disk (one more when Ctrl-C lands inside the next save call).
  saved = wd.saved_steps(str(w))[-1]
  assert done >= 2 and saved in (done, done + 1)
  # The same command resumes after that epoch (stopped here one epoch later).
  c = test_tiny.get_config("standard")
  c.train.epochs = epochs
  pipeline.train(c, str(w), stop_after_epoch=saved + 1, progress=False)
  assert wd.saved_steps(str(w))[-1] == saved + 1
  metrics = [json.loads(ln) for ln in open(w / "metrics.jsonl")]
  assert [m["epoch"] for m in metrics] == list(range(1, saved + 2))


@pytest.mark.slow
def test_soat_resumes_past_a_bit_flipped_checkpoint_and_a_cut_metrics_line(tmp_path, capsys):
  from experiments import pipeline
  w = str(tmp_path / "w")
  c = test_tiny.get_config("standard")
  c.train.epochs = 3
  c.checkpoint.max_to_keep = 3
  pipeline.train(c, w, stop_after_epoch=2, progress=False)
  recorded = json.load(open(os.path.join(w, "checksums.json")))
  assert sorted(recorded) == ["1", "2"]
  _flip_a_bit(_data_file(w, 2))
  with open(os.path.join(w, "metrics.jsonl"), "a") as f:
    f.write('{"epoch": 3, "step": 1')  # killed mid-write
  # evaluate reads around the damage and moves nothing.
  # (Where the bit lands decides between a checksum mismatch and a tensorstore read error.)
  _, state, epochs = pipeline.load_trained(c, w)
  assert epochs == 1 and wd.saved_steps(w) == [1, 2]
  assert re.fullmatch(rf"{re.escape(w)}: checkpoint 2 unreadable \((checksum mismatch|"
                      rf"\w+: .+)\); restored checkpoint 1\n", capsys.readouterr().err)
  # Training falls back to epoch 1, moves checkpoint 2 aside and trains epoch 2 again: the
  # same state as before the damage, bit for bit.
  pipeline.train(c, w, stop_after_epoch=2, progress=False)
  assert "restored checkpoint 1" in capsys.readouterr().err
  assert os.path.isdir(os.path.join(w, "damaged_checkpoints", "2"))
  assert json.load(open(os.path.join(w, "checksums.json")))["2"] == recorded["2"]
  assert [json.loads(ln)["epoch"] for ln in open(os.path.join(w, "metrics.jsonl"))] == [1, 2]
  _, state, epochs = pipeline.load_trained(c, w)
  assert epochs == 2 and capsys.readouterr().err == ""


def test_other_methods_blocks_do_not_define_the_run(tmp_path):
  # A PGD workdir resumes when only another method's block differs (e.g. a field added to
  # train.soar by a newer version), and is still refused when its own block differs.
  w = str(tmp_path)
  c = test_tiny.get_config("pgd")
  wd.check_run_config(w, c)
  _fake_checkpoint(w)
  record = json.load(open(tmp_path / "run_config.json"))
  del record["config"]["train.soar.grad_clip"]  # as written before the field existed
  record["config"]["train.trades.beta"] = 1.0
  (tmp_path / "run_config.json").write_text(json.dumps(record))
  assert wd.check_run_config(w, c) == []
  c2 = ml_collections.ConfigDict(c.to_dict())
  c2.train.pgd.step_size = 0.5
  with pytest.raises(wd.ConfigError, match="train.pgd.step_size="):
    wd.check_run_config(w, c2)
  assert "train.soar." in wd.other_method_blocks(c) and "train.pgd." not in \
      wd.other_method_blocks(c)
