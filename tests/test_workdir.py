"""experiments.workdir: config-checked resume, the workdir lock, checksummed checkpoints with
fallback, the tolerant metrics log and the one-line command-line errors. No model is trained:
the checkpoints hold a small TrainState-like pytree saved with orbax as experiments.soat saves
its state."""

from __future__ import annotations

import contextlib
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


def test_record_leaves_out_the_data_fields_the_source_does_not_read(tmp_path):
  """The quickstart trains on digits (1,400 images); its record must not say data.num_train=256
  (the schema's synthetic-source default), nor any other field digits ignores. A synthetic run
  reads num_train, so its record keeps it (and a change is refused, see above)."""
  from configs import quickstart
  digits_dir, synthetic_dir = str(tmp_path / "digits"), str(tmp_path / "synthetic")
  c = quickstart.get_config()
  assert c.data.num_train == 256  # the schema still has the field (overrides for synthetic)
  wd.check_run_config(digits_dir, c)
  record = json.load(open(os.path.join(digits_dir, "run_config.json")))["config"]
  for field in ("data.num_train", "data.shape", "data.num_classes", "data.name", "data.root"):
    assert field not in record
  assert record["data.source"] == "digits" and record["data.num_test"] == 397
  assert record["data.max_train"] == 0  # read by data.load for every source: all 1,400 images
  t = test_tiny.get_config("pgd")
  wd.check_run_config(synthetic_dir, t)
  assert json.load(open(os.path.join(synthetic_dir, "run_config.json")))["config"][
      "data.num_train"] == t.data.num_train


def test_record_written_with_unread_fields_still_resumes(tmp_path):
  """A digits workdir whose record predates the fix (it holds data.num_train=256) resumes with
  the same config, and changing an unread field does not refuse it (it changes nothing)."""
  from configs import quickstart
  w = str(tmp_path)
  c = quickstart.get_config()
  old = wd.flatten_config(c)
  assert old["data.num_train"] == 256
  with open(os.path.join(w, "run_config.json"), "w") as f:
    json.dump({"config": old, "history": []}, f)
  _fake_checkpoint(w)
  assert wd.check_run_config(w, c) == []
  c2 = ml_collections.ConfigDict(c.to_dict())
  c2.data.num_train = 32
  assert wd.check_run_config(w, c2) == []
  c2.data.num_test = 100  # read by digits: refused
  with pytest.raises(wd.ConfigError, match="trained with data.num_test=397"):
    wd.check_run_config(w, c2)


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


def _train_past_epoch_2(workdir, *overrides, stderr=subprocess.PIPE):
  """Starts ``soat`` on ``test_tiny`` for 100,000 epochs (endless) and returns the process
  once its progress line for epoch 2 (``experiments.pipeline.epoch_progress_line``) is out."""
  p = _entry("soat", workdir, "--config.train.epochs=100000", *overrides,
             stdout=subprocess.PIPE, stderr=stderr)
  for line in p.stdout:
    if "] epoch 2/" in line:
      return p
  p.kill()
  raise AssertionError(f"soat ended (status {p.wait()}) before printing epoch 2's line")


def _signal_after_epoch_2(workdir, sig) -> tuple[int, str]:
  """``(exit status, stderr)`` of a :func:`_train_past_epoch_2` run sent ``sig`` after epoch 2's
  progress line."""
  p = _train_past_epoch_2(workdir)
  try:
    p.send_signal(sig)
    _, stderr = p.communicate(timeout=120)
  finally:
    if p.poll() is None:
      p.kill()
  return p.returncode, stderr


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
  status, stderr = _signal_after_epoch_2(w, signal.SIGINT)  # long before its last epoch
  assert status == 130, stderr[-3000:]
  done = int(re.fullmatch(r"soat: interrupted after epoch (\d+) \(standard\); rerun the same "
                          r"command to resume", _last_line(stderr)).group(1))
  # The epoch named is the newest finished on disk (issue 28: it once named one more).
  saved = wd.saved_steps(str(w))[-1]
  assert done >= 2 and saved == done and done in wd.read_checksums(str(w))
  # The same command resumes after that epoch (stopped here one epoch later).
  c = test_tiny.get_config("standard")
  c.train.epochs = 100_000  # the command's (a changed epoch count would be another run)
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


# ---------------------------------------------------------------------------------------------
# Issue 28: crashes, readers beside writers, signals, full disks, planted symlinks, headers


_KILLED_AFTER_RECORD = textwrap.dedent("""
    import os, signal, sys
    from configs import test_tiny
    from experiments import pipeline
    from experiments import workdir as wd
    c = test_tiny.get_config("standard")
    c.train.epochs, c.checkpoint.max_to_keep = 5, 1
    record = wd.record_checksum
    def record_then_die(workdir, step, checksum, keep=None):
      record(workdir, step, checksum, keep)
      if step == 3:  # killed the moment epoch 3's checksum is on disk, before its save
        os.kill(os.getpid(), signal.SIGKILL)
    wd.record_checksum = record_then_die
    pipeline.train(c, sys.argv[1], progress=False)
""")


@pytest.mark.slow
def test_kill_9_with_max_to_keep_1_leaves_a_restorable_checkpoint(tmp_path):
  # Issue 28, item 2: the next save's checksum record dropped the checksum of the newest
  # finished checkpoint (orbax stops listing a step it will delete when the next save starts),
  # so a run killed then had one finished checkpoint and no checksum for it.
  from experiments import pipeline
  w = str(tmp_path / "w")
  out = subprocess.run([sys.executable, "-c", _KILLED_AFTER_RECORD, w], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
  # Epoch 2 is complete and recorded before epoch 3's checksum is written.
  assert wd.saved_steps(w) == [2] and sorted(wd.read_checksums(w)) == [2, 3]
  c = test_tiny.get_config("standard")
  c.train.epochs, c.checkpoint.max_to_keep = 5, 1
  _, _, epochs = pipeline.load_trained(c, w)
  assert epochs == 2
  pipeline.train(c, w, stop_after_epoch=3, progress=False)  # resumes after epoch 2
  assert wd.saved_steps(w) == [3]
  assert [json.loads(ln)["epoch"] for ln in open(os.path.join(w, "metrics.jsonl"))] == [1, 2, 3]


def test_checksums_of_finished_checkpoints_on_disk_are_kept(tmp_path):
  # A step orbax no longer lists but has not deleted (the next save is not complete) keeps its
  # checksum: it may be the only finished checkpoint.
  w = str(tmp_path)
  _saved(w, steps=(1,), keep=1)
  wd.record_checksum(w, 2, "ab" * 32, keep=[2])
  assert sorted(wd.read_checksums(w)) == [1, 2]
  wd.record_checksum(w, 3, "cd" * 32, keep=[3])  # 2 was never finished: dropped
  assert sorted(wd.read_checksums(w)) == [1, 3]


def test_reader_restores_the_newest_finished_checkpoint_beside_a_writer(tmp_path):
  # Issue 28, item 3: evaluate lists checkpoint 2; the run training in the workdir
  # (max_to_keep=1) finishes 3 and deletes 2 before the reader gets to it. The reader restores
  # 3 and reports nothing; it never advises moving away a workdir in use.
  from experiments import pipeline
  w = str(tmp_path)
  _saved(w, steps=(1, 2), keep=1)
  reader, writer = pipeline.checkpoint_manager(w), _manager(w, keep=1)
  assert reader.all_steps() == [2]
  real = reader.restore

  def restore_while_the_writer_saves(step, args):
    if step == 2 and wd.saved_steps(w) == [2]:
      wd.save_checkpoint(writer, 3, _state(3), w)
      writer.wait_until_finished()
      assert wd.saved_steps(w) == [3]
    return real(step, args=args)

  reader.restore = restore_while_the_writer_saves
  try:
    with wd.workdir_lock(w):  # held by "the writer's run"
      r = wd.restore_newest(reader, _state(0), w, allow_none=False)
      assert (r.step, r.verified, r.skipped, r.messages(w)) == (3, True, (), [])
      _assert_state(r.state, 3)
      # Nothing restores while the run trains here: the advice is to wait, not to move it.
      (tmp_path / "checksums.json").write_text(json.dumps({"3": "0" * 64}))
      with pytest.raises(wd.CheckpointError) as e:
        wd.restore_newest(reader, _state(0), w, allow_none=False)
      assert "move the folder away" not in str(e.value)
      assert re.search(rf"checkpoint 3: checksum mismatch\); workdir {re.escape(w)} in use by "
                       rf"pid {os.getpid()} .*: rerun once it has saved its next checkpoint$",
                       str(e.value))
  finally:
    reader.close()
    writer.close()


def test_a_methods_folder_of_a_busy_workdir_is_locked(tmp_path):
  # Issue 28, item 3: soat --workdir W/pgd while soat --workdir W (pgd,standard) trains, and the
  # other way round, are refused before anything is built.
  from experiments import soat
  top = tmp_path / "W"
  holder = _start_holder(str(top))
  try:
    c = test_tiny.get_config("pgd")
    with pytest.raises(wd.WorkdirInUse, match=rf"^workdir {top}/pgd lies inside workdir {top} "
                                              rf"in use by pid {holder.pid} on host "):
      soat.train_and_evaluate(c, str(top / "pgd"), progress=False)
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  holder = _start_holder(str(top / "pgd"))
  try:
    c = test_tiny.get_config("pgd,standard")
    with pytest.raises(wd.WorkdirInUse, match=rf"^workdir {top}/pgd is in use by pid "
                                              rf"{holder.pid} "):
      soat.train_and_evaluate(c, str(top), progress=False)
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  assert not (top / "pgd" / "checkpoints").exists() and not (top / "checkpoints").exists()
  with wd.workdir_lock(str(top), subfolders=("pgd", "standard")):  # all free again
    pass


def test_symlinks_planted_in_a_workdir_are_never_written_through(tmp_path):
  # Issue 28, item 5: lock, results and the metrics log.
  from experiments import outputs
  w = tmp_path / "w"
  w.mkdir()
  victim = tmp_path / "victim.txt"
  victim.write_text("precious\n")
  for name in ("lock", "results.md", "results.json", "metrics.jsonl"):
    os.symlink(victim, w / name)
  with pytest.raises(wd.ConfigError, match=r"lock is a symbolic link; refusing to write "
                                           r"through it"):
    with wd.workdir_lock(str(w)):
      pass
  with pytest.raises(wd.ConfigError, match="metrics.jsonl is a symbolic link"):
    wd.append_line(str(w / "metrics.jsonl"), "{}")
  outputs.write_results(str(w), {"a": 1}, "# table\n", json_name="results.json",
                        markdown_name="results.md")
  assert victim.read_text() == "precious\n"
  assert not os.path.islink(w / "results.md") and (w / "results.md").read_text() == "# table\n"
  assert json.load(open(w / "results.json")) == {"a": 1}
  wd.atomic_write_text(str(w / "metrics.jsonl"), "x")  # replaces the link, not its target
  assert victim.read_text() == "precious\n"
  assert [p for p in os.listdir(w) if "tmp" in p] == []  # no temporary file left behind


@contextlib.contextmanager
def _tmpfs(path, size="256k"):
  """A small tmpfs at ``path`` (root only); skips the test with the reason otherwise."""
  os.makedirs(path, exist_ok=True)
  if os.geteuid() != 0:
    pytest.skip("a full disk needs a tmpfs, which only root can mount")
  out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       capture_output=True, text=True)
  if out.returncode != 0:
    pytest.skip(f"cannot mount a tmpfs: {out.stderr.strip()}")
  try:
    yield path
  finally:
    subprocess.run(["umount", "-l", str(path)], check=False)  # (lazy: a file may be open)


def _fill(path, leave_kib):
  """Fills the file system of ``path`` up to ``leave_kib`` KiB."""
  st = os.statvfs(path)
  free = st.f_bavail * st.f_frsize
  with open(os.path.join(path, "filler"), "wb") as f:
    f.write(b"\0" * max(0, free - leave_kib * 1024))


def test_results_survive_a_full_disk(tmp_path):
  # Issue 28, item 5: with the disk full, writing new results must leave the old ones whole.
  from experiments import outputs
  with _tmpfs(tmp_path / "disk") as disk:
    w = str(disk)
    outputs.write_results(w, {"accuracy": 0.5}, "# old\n", json_name="evaluation.json",
                          markdown_name="evaluation.md")
    _fill(w, 0)
    with pytest.raises(OSError):
      outputs.write_results(w, {"accuracy": [0.25] * 10_000}, "# new\n" * 1000,
                            json_name="evaluation.json", markdown_name="evaluation.md")
    assert json.load(open(os.path.join(w, "evaluation.json"))) == {"accuracy": 0.5}
    assert open(os.path.join(w, "evaluation.md")).read() == "# old\n"
    assert sorted(os.listdir(w)) == ["evaluation.json", "evaluation.md", "filler"]


def test_the_interrupt_line_names_an_epoch_finished_on_disk(tmp_path):
  # Issue 28, item 4: noted after epoch 3's save started, but only epoch 2 is finished (epoch
  # 3's folder is still orbax's temporary one): the line names 2.
  w = str(tmp_path)
  _saved(w, steps=(1, 2))
  os.makedirs(os.path.join(w, "checkpoints", "3.orbax-checkpoint-tmp"))
  wd.record_checksum(w, 3, "ab" * 32)
  wd.note_progress(3, "pgd", workdir=w)
  try:
    assert wd.interrupted_message() == ("interrupted after epoch 2 (pgd); rerun the same "
                                        "command to resume")
    assert wd.interrupted_message("terminated (SIGTERM)").startswith(
        "terminated (SIGTERM) after epoch 2 (pgd)")
  finally:
    wd.reset_progress()


def test_nothing_prints_after_the_interrupt_line():
  # Issue 28, item 4: orbax's saver threads printed tracebacks after the line at shutdown.
  code = textwrap.dedent("""
      import sys, threading, time
      from experiments import workdir as wd
      def saver():
        time.sleep(1)
        print("Traceback (most recent call last): a saver thread", file=sys.stderr, flush=True)
      def main():
        wd.note_progress(3, "pgd")
        threading.Thread(target=saver).start()
        raise KeyboardInterrupt
      wd.run_cli(main, prog="soat", hard_exit=True)
  """)
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=120)
  assert out.returncode == 130
  assert out.stderr == "soat: interrupted after epoch 3 (pgd); rerun the same command to resume\n"


def _stderr_lines(stderr):
  """stderr without the progress bars (``leave=False`` tqdm lines) and blank lines."""
  return [ln for ln in stderr.replace("\r", "\n").splitlines()
          if ln.strip() and not re.search(r"\d+%\|", ln)]


@pytest.mark.slow
def test_sigterm_stops_like_ctrl_c(tmp_path):
  # Issue 28, item 4: SIGTERM (a scheduler's notice) ended the run with status 143 and no word.
  w = tmp_path / "w"
  status, stderr = _signal_after_epoch_2(w, signal.SIGTERM)
  assert status == 143, stderr[-3000:]
  lines = _stderr_lines(stderr)
  done = int(re.fullmatch(r"soat: terminated \(SIGTERM\) after epoch (\d+) \(standard\); rerun "
                          r"the same command to resume", lines[-1]).group(1))
  assert len(lines) == 1, stderr[-3000:]
  # The epoch named is the newest finished on disk, with its checksum.
  assert done >= 2 and wd.saved_steps(str(w))[-1] == done and done in wd.read_checksums(str(w))
  assert wd.lock_holder(str(w)) == ""


@pytest.mark.slow
def test_a_full_disk_during_training_is_one_line(tmp_path):
  # Issue 28, item 4: a long orbax traceback before; the finished checkpoint stays intact.
  from experiments import pipeline
  c = test_tiny.get_config("standard")
  c.train.epochs = 1
  with _tmpfs(tmp_path / "disk", size="1m") as disk:
    w = str(disk / "w")
    pipeline.train(c, w, progress=False)
    _fill(str(disk), 64)  # room for the small files, not for a checkpoint
    out = _entry("soat", w, "--config.train.epochs=3")
    assert out.returncode == 1, out.stderr[-3000:]
    assert _stderr_lines(out.stderr) == [
        f"soat: error: no space left on device in {w}; stopped after epoch 1 (standard): free "
        f"space, then rerun the same command to resume"]
    os.remove(disk / "filler")
    c.train.epochs = 3
    _, _, epochs = pipeline.load_trained(c, w)
    assert epochs == 1 and wd.saved_steps(w) == [1]


def _clean_only(c):
  """``eval.table`` reduced to the clean Linf entry (the header's content, not the attacks, is
  under test)."""
  c.eval.skip = "fgsm,pgd,second_order,soae,autoattack,l2"
  return c


@pytest.fixture(scope="module")
def trained_once(tmp_path_factory):
  """A 1-epoch test_tiny standard workdir (copy it before changing it)."""
  from experiments import pipeline
  w = str(tmp_path_factory.mktemp("trained") / "w")
  c = test_tiny.get_config("standard")
  c.train.epochs = 1
  pipeline.train(c, w, progress=False)
  return w


def test_results_name_the_checkpoint_they_measured(trained_once, tmp_path, capsys):
  # Issue 28, item 6: evaluate --config.train.epochs=7 on a 1-epoch workdir wrote "7 epochs"
  # and named no checkpoint.
  import shutil
  from experiments import evaluate
  w = str(tmp_path / "w")
  shutil.copytree(trained_once, w)
  c = _clean_only(test_tiny.get_config("standard"))
  c.train.epochs = 7
  evaluate.evaluate_workdir(c, w, progress=True)
  assert "[standard] checkpoint after epoch 1; attacking" in capsys.readouterr().out
  meta = json.load(open(os.path.join(w, "evaluation.json")))["metadata"]["training"]["standard"]
  checksum = wd.read_checksums(w)[1]
  assert meta["epochs"] == 1 and meta["checkpoint"] == dict(step=1, checksum=checksum)
  md = open(os.path.join(w, "evaluation.md")).read()
  assert f"; 1 epochs, batch 16" in md and "7 epochs" not in md
  assert f"checkpoint 1 (sha256 {checksum[:16]})" in md


@contextlib.contextmanager
def _read_only(path):
  """``path`` made read-only: a read-only bind mount as root (root ignores permission bits),
  ``chmod 555`` otherwise; skips the test with the reason when neither works."""
  path = str(path)
  if os.geteuid() == 0:
    ok = subprocess.run(["mount", "--bind", path, path], capture_output=True, text=True)
    if ok.returncode != 0:
      pytest.skip(f"cannot bind-mount a read-only workdir: {ok.stderr.strip()}")
    try:
      ro = subprocess.run(["mount", "-o", "remount,bind,ro", path], capture_output=True,
                          text=True)
      if ro.returncode != 0:
        pytest.skip(f"cannot remount read-only: {ro.stderr.strip()}")
      yield path
    finally:
      subprocess.run(["umount", "-l", path], check=False)
  else:
    os.chmod(path, 0o555)
    try:
      yield path
    finally:
      os.chmod(path, 0o755)


def test_evaluate_checks_writability_before_attacking(trained_once, tmp_path, monkeypatch):
  # Issue 28, item 5: evaluate on a read-only workdir spent the whole attack time, then died in
  # a traceback.
  import shutil
  from experiments import evaluate
  from krylov_adv import evaluation
  w = str(tmp_path / "w")
  shutil.copytree(trained_once, w)

  def refuse(*args, **kwargs):
    raise AssertionError("attacked a workdir whose results cannot be written")

  monkeypatch.setattr(evaluation, "evaluate_attacks", refuse)
  with _read_only(w):
    with pytest.raises(wd.ConfigError, match=rf"^workdir {re.escape(w)} is not writable "
                                             rf"\((Read-only file system|Permission denied)\); "
                                             rf"evaluation.json is written there"):
      evaluate.evaluate_workdir(_clean_only(test_tiny.get_config("standard")), w,
                                progress=False)


@pytest.mark.slow
# Orbax leaves read coroutines behind when a checkpoint is deleted while it is read.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_evaluate_restores_beside_a_training_run(tmp_path, capsys):
  # Issue 28, item 3: with max_to_keep=1, restores beside a training run failed in 2 of 3 tries
  # (orbax's "Must provide args of type Composite" or a FileNotFoundError for a checkpoint
  # deleted meanwhile), then advised moving the workdir away.
  from experiments import pipeline
  w = tmp_path / "w"
  p = _train_past_epoch_2(w, "--config.checkpoint.max_to_keep=1", stderr=subprocess.DEVNULL)
  seen = []
  try:
    c = test_tiny.get_config("standard")
    c.train.epochs, c.checkpoint.max_to_keep = 100000, 1
    for _ in range(6):
      seen.append(pipeline.load_trained(c, str(w))[2])
  finally:
    p.send_signal(signal.SIGINT)
    p.communicate(timeout=120)
  # (the newest finished: epoch 2 may still be saving when its line is printed)
  assert seen[0] >= 1 and seen == sorted(seen) and seen[-1] > seen[0]
  err = capsys.readouterr().err  # (orbax's asyncio may log the reads it abandoned)
  assert "unreadable" not in err and "checksum" not in err  # nothing called damaged
