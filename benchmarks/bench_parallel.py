"""Benchmark: data-parallel training-step time of SOAT and PGD-AT, and of an AutoAttack
evaluation batch, on 1, 2, 4, 8 devices.

  python -m benchmarks.bench_parallel [--devices 1,2,4,8] [--batch 64] [--repeats 5]
                                      [--methods soat,pgd,autoattack]
                                      [--out benchmarks/results/parallel.json]

On a CPU the devices are simulated (``--xla_force_host_platform_device_count``, set here before
JAX is imported) and share the same cores, so the figures can only show that sharding adds no
extra copies (time stays roughly flat as devices are added), not a speed-up. On an accelerator
host the same script measures real scaling over the visible devices.

The step is the real one of ``experiments.soat`` (TinyCNN on 8x8 synthetic data; SOAT with
GMRES on FD HVPs, PGD-AT with PGD), the batch sharded over the ``"data"`` mesh axis and the
state replicated. The compiled HLO of each step is scanned for all-gather / all-to-all ops.
``autoattack`` times one call of the ensemble (APGD-CE then APGD-T, 10 iterations each, Linf
0.1) on a batch of real digits sharded the same way, against TinyCNN trained here for a few
seconds; its still-robust subsets are re-batched across devices between components, which the
training steps never do.
"""

from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402

from configs import test_tiny  # noqa: E402
from experiments import pipeline  # noqa: E402
from krylov_adv import parallel  # noqa: E402


def _config(method: str, batch: int):
  c = test_tiny.get_config(method)
  c.data.num_train = batch * 4
  c.train.batch_size = batch
  c.train.pgd.update(dict(steps=5, step_size=0.03))
  c.train.soat.update(dict(steps=2, m=5, tau=1e-3, hvp="fd_forward", eta=1e-3, alpha=0.1))
  return c


_TRAINED = {}


def _trained_digits_model():
  """TinyCNN trained for 10 epochs on scikit-learn's digits (seconds), once per run."""
  if not _TRAINED:
    import tempfile
    from configs import test_multihost
    config = test_multihost.get_config("standard")
    config.train.epochs = 10
    config.parallel.mesh_shape = (1,)
    with tempfile.TemporaryDirectory() as workdir:
      exp, state = pipeline.train(config, workdir, progress=False)
    _TRAINED.update(exp=exp, state=jax.device_get(state))
  return _TRAINED["exp"], _TRAINED["state"]


def time_autoattack(num_devices: int, batch: int, repeats: int) -> dict:
  from krylov_adv import attacks, training
  exp, state = _trained_digits_model()
  mesh = parallel.make_mesh((num_devices,))
  logits_fn = jax.jit(training.inference_logits_fn(exp.model, state.params, state.batch_stats))
  x, y = parallel.shard_batch((exp.dataset.x_test[:batch], exp.dataset.y_test[:batch]), mesh)
  hyper = dict(apgd_ce=dict(steps=10), apgd_t=dict(steps=10, n_target_classes=3))

  def run():
    x_adv, report = attacks.autoattack_with_report(
        logits_fn, x, y, jax.random.PRNGKey(0), eps=0.1, norm="linf", version="custom",
        attacks=("apgd_ce", "apgd_t"), hyperparameters=hyper)
    return jax.block_until_ready(x_adv), report

  _, report = run()  # compile + warm-up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    run()
    times.append(time.perf_counter() - t0)
  return {"median_seconds": statistics.median(times),
          "clean_accuracy": report.clean_accuracy,
          "robust_accuracy_after": list(report.robust_accuracy_after)}


def time_step(method: str, num_devices: int, batch: int, repeats: int) -> dict:
  if method == "autoattack":
    return time_autoattack(num_devices, batch, repeats)
  config = _config(method, batch)
  config.parallel.mesh_shape = (num_devices,)
  exp = pipeline.build(config)
  mesh = pipeline.make_mesh(config)
  state = parallel.replicate(pipeline.initial_state(exp), mesh)
  x, y = parallel.shard_batch((exp.dataset.x_train[:batch], exp.dataset.y_train[:batch]), mesh)
  key = jax.random.PRNGKey(0)
  hlo = exp.train_step.lower(state, x, y, key).compile().as_text()
  state, _ = jax.block_until_ready(exp.train_step(state, x, y, key))  # compile + warm-up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    state, _ = jax.block_until_ready(exp.train_step(state, x, y, key))
    times.append(time.perf_counter() - t0)
  return {"median_seconds": statistics.median(times),
          "all_gather_ops": hlo.count(" all-gather("),
          "all_to_all_ops": hlo.count(" all-to-all("),
          "all_reduce_ops": hlo.count(" all-reduce(")}


def main(argv=None):
  parser = argparse.ArgumentParser(description="Data-parallel step time (JSON out).")
  parser.add_argument("--devices", default="1,2,4,8")
  parser.add_argument("--methods", default="soat,pgd,autoattack")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--out", default="benchmarks/results/parallel.json")
  args = parser.parse_args(argv)
  counts = [n for n in (int(s) for s in args.devices.split(",")) if n <= jax.device_count()]
  result = {"benchmark": "parallel", "platform": jax.default_backend(),
            "device": str(jax.devices()[0]), "visible_devices": jax.device_count(),
            "batch": args.batch, "repeats": args.repeats, "steps": {}}
  for method in args.methods.split(","):
    rows = {n: time_step(method, n, args.batch, args.repeats) for n in counts}
    base = rows[counts[0]]["median_seconds"]
    for n in counts:
      rows[n]["relative_to_first"] = rows[n]["median_seconds"] / base
    result["steps"][method] = {str(n): r for n, r in rows.items()}
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  main()
