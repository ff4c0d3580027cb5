"""Multi-host data parallelism: two processes on one machine, joined by ``jax.distributed``
through a localhost coordinator (gloo collectives on CPU), each with two simulated devices.

The real command line runs in the subprocesses (``python -m experiments.soat`` and
``python -m experiments.evaluate`` with ``--config.parallel.distributed=True``). The reference is
the same config run in this process on a 4-device mesh (the same split of every batch), so the
two must agree within float tolerance: training through each host feeding its slice of the
batch, PGD-AT's attack inside the step, evaluation with PGD, SOAE (GMRES) and AutoAttack on
batches sharded over both hosts, and checkpoints moved between 2x2 and 4 devices and 1 device.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 (simulated) devices")]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_PROCESSES = 2


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(module: str, workdir: str | list[str], *, via_env: bool = False,
            config: str = "configs/test_multihost.py",
            args: tuple[str, ...] = ()) -> list[subprocess.Popen]:
  """Starts ``python -m module`` once per process of a 2-host run; returns the processes.

  The coordinator, process count and process id go on the command line, or with ``via_env``
  in the standard environment variables ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``,
  ``JAX_PROCESS_ID``. ``workdir`` may be one folder per process (to see who writes what);
  ``args`` are more flags (config overrides).
  """
  workdirs = [workdir] * NUM_PROCESSES if isinstance(workdir, str) else list(workdir)
  port = _free_port()
  procs = []
  for pid in range(NUM_PROCESSES):
    # The compiler options of this process (tests/conftest.py) with two devices per process:
    # the reference run here and the two hosts must compile alike to agree exactly.
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
               XLA_FLAGS=" ".join(flags + ["--xla_force_host_platform_device_count=2"]))
    cmd = [sys.executable, "-m", module, "--config", config, "--workdir", workdirs[pid],
           "--config.parallel.distributed=True", *args]
    if via_env:
      env.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                 JAX_NUM_PROCESSES=str(NUM_PROCESSES), JAX_PROCESS_ID=str(pid))
    else:
      cmd += [f"--config.parallel.coordinator_address=localhost:{port}",
              f"--config.parallel.num_processes={NUM_PROCESSES}",
              f"--config.parallel.process_id={pid}"]
    procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
  return procs


def _wait(procs: list[subprocess.Popen], timeout: float = 600) -> list[str]:
  outs = []
  for p in procs:
    try:
      out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    outs.append(out)
  for pid, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, f"process {pid} failed:\n{out[-4000:]}"
  return outs


def _accuracies(path: str) -> dict[str, float]:
  with open(path) as f:
    (rows,) = json.load(f)["results"].values()
  return {f"{r['label']} {r['norm']}": r["accuracy"] for r in rows}


def _restore_on_one_device(config, workdir: str):
  from experiments import pipeline
  exp = pipeline.build(config)
  mngr = pipeline.checkpoint_manager(workdir)
  state, epochs = pipeline.restore_latest(mngr, pipeline.initial_state(exp))
  mngr.close()
  return state, epochs


def test_two_hosts_match_one_host_and_checkpoints_move(tmp_path):
  pytest.importorskip("sklearn")
  from configs import test_multihost
  from experiments import soat

  multi = str(tmp_path / "two_hosts")
  procs = _launch("experiments.soat", multi)
  # Meanwhile, the reference: one process, the same 4-way split of each batch.
  config = test_multihost.get_config()
  config.parallel.mesh_shape = (4,)
  single = str(tmp_path / "one_host")
  soat.train_and_evaluate(config, single, progress=False)
  outs = _wait(procs)

  # Files are written once, by process 0; process 1 prints no table.
  assert "| attack |" in outs[0] and "| attack |" not in outs[1]
  with open(os.path.join(multi, "metrics.jsonl")) as f:
    assert [json.loads(line)["epoch"] for line in f] == [1, 2, 3]

  want = _accuracies(os.path.join(single, "results.json"))
  got = _accuracies(os.path.join(multi, "results.json"))
  assert set(got) == {"clean linf", "PGD-3 linf", "SOAE linf", "AutoAttack linf"}
  assert got == want
  # The attacks really ran on a model that learnt something.
  assert want["clean linf"] > want["AutoAttack linf"]
  assert want["clean linf"] >= 0.2

  # The 2-host checkpoint restores on one device and equals the one-host run's.
  ref, ref_epochs = _restore_on_one_device(config, single)
  moved, epochs = _restore_on_one_device(config, multi)
  assert epochs == ref_epochs == 3
  assert len(jax.tree_util.tree_leaves(moved.params)[0].sharding.device_set) == 1
  for a, b in zip(jax.tree_util.tree_leaves(moved.params), jax.tree_util.tree_leaves(ref.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)

  # The one-host checkpoint (written on 4 devices) restores on the two hosts, started this
  # time from the environment variables, and their evaluation reproduces the one-host table.
  outs = _wait(_launch("experiments.evaluate", single, via_env=True))
  assert "| attack |" in outs[0] and "| attack |" not in outs[1]
  assert _accuracies(os.path.join(single, "evaluation.json")) == want


def test_analysis_experiment_on_two_hosts(tmp_path):
  """An analysis experiment (iterations: PGD and SOAE for N = 1, 2 on 64 digits) on two hosts: the
  model is trained data-parallel over both, the measurements run on each host, and only
  process 0 writes files. Each process gets its own workdir, so that a file written by
  process 1 would show."""
  pytest.importorskip("sklearn")
  from configs import iterations as iterations_config
  from experiments import iterations, trained_models

  # Float-level differences between the two runs (the order of the gradient sums) grow over
  # training, so train 3 epochs rather than 15. And the exact HVP: SOAE with float32 finite
  # differences inverts rounding noise, which would amplify them.
  dirs = [str(tmp_path / "host0"), str(tmp_path / "host1")]
  args = ("--config.train.epochs=3", "--config.experiment.num_examples=64",
          "--config.experiment.batch_size=32", "--config.experiment.attacks.soae.hvp=exact")
  procs = _launch("experiments.iterations", dirs, config="configs/iterations.py:tiny", args=args)
  config = iterations_config.get_config("tiny")
  config.train.epochs = 3
  config.experiment.num_examples = 64
  config.experiment.batch_size = 32
  config.experiment.attacks.soae.hvp = "exact"
  config.parallel.mesh_shape = (4,)  # 2 hosts x 2 devices
  single = str(tmp_path / "one_host")
  want = iterations.run(config, single, progress=False)
  outs = _wait(procs)

  assert "training standard" in outs[0] and "robust accuracy" in outs[0]
  assert "training" not in outs[1] and "robust accuracy" not in outs[1]
  assert not os.path.exists(dirs[1]), os.listdir(dirs[1])
  assert sorted(os.listdir(os.path.join(dirs[0], "iterations"))) == [
      "accuracy_vs_iterations.png", "report.md", "results.json"]
  (cached,) = os.listdir(os.path.join(dirs[0], "models"))
  assert cached.endswith(".npz") and cached in os.listdir(os.path.join(single, "models"))

  got_vars, _ = trained_models.load_variables(os.path.join(dirs[0], "models", cached))
  want_vars, _ = trained_models.load_variables(os.path.join(single, "models", cached))
  for a, b in zip(jax.tree_util.tree_leaves(got_vars), jax.tree_util.tree_leaves(want_vars),
                  strict=True):
    assert isinstance(a, np.ndarray)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)

  with open(os.path.join(dirs[0], "iterations", "results.json")) as f:
    got = json.load(f)["results"]
  fields = ("model", "attack", "iterations", "robust_accuracy", "clean_accuracy")
  assert ([{k: r[k] for k in fields} for r in got["rows"]]
          == [{k: r[k] for k in fields} for r in want["rows"]])
  assert got["models"] == want["models"] and got["conclusions"] == want["conclusions"]
  # A model that learnt something, and attacks that did something.
  assert want["models"]["standard"] >= 0.5
  assert min(r["robust_accuracy"] for r in want["rows"]) < want["models"]["standard"]

  # Again: now process 0 finds the cached model and process 1 does not (a disk of its own).
  # Training is collective, so both must train again; process 0 reading the cache alone would
  # leave process 1 in collectives that process 0 never joins (it fails, or hangs).
  outs = _wait(_launch("experiments.iterations", dirs, config="configs/iterations.py:tiny",
                       args=args), timeout=240)
  assert "training standard" in outs[0] and not os.path.exists(dirs[1])
  with open(os.path.join(dirs[0], "iterations", "results.json")) as f:
    assert json.load(f)["results"]["rows"][0]["robust_accuracy"] == want["rows"][0][
        "robust_accuracy"]
