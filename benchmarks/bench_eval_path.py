"""Benchmark: AutoAttack through the evaluation command against the Python API (JSON out).

  python -m benchmarks.bench_eval_path --workdir /tmp/cliapi_wd [--config configs/quickstart.py]
      [--method pgd] [--points 200] [--batch-size 0] [--norm linf] [--aa reduced|standard]
      [--repeats 1] [--out benchmarks/results/eval_path.json]

The workdir holds a model trained by ``experiments.soat`` (e.g. ``python -m experiments.soat
--config configs/quickstart.py --workdir /tmp/cliapi_wd --config.train.method=pgd``). On the
first ``--points`` test points, with the same AutoAttack settings, eps and PRNG key, each path
runs in a fresh Python process (``--worker``), twice in a row (``first`` = compilation
included, ``warm`` = the same call again in that process):

* ``cli``: ``experiments.evaluate.evaluate_workdir``, the function ``python -m
  experiments.evaluate`` calls, with the suite reduced to the one AutoAttack entry
  (``eval.skip``) and ``eval.batch_size = --batch-size`` (``0``: all points in one batch, as the
  quickstart's ``eval.batch_size = 397`` does). Reported: the whole call (data, checkpoint
  restore, files) and, inside it, ``pipeline.evaluate`` (the attack table alone).
* ``api``: the checkpoint restored the same way (``pipeline.load_trained``), then
  ``attacks.autoattack_with_report(logits_fn, x, y, key, eps=..., norm=..., hyperparameters=...)``
  on the same points with ``logits_fn = jax.jit(training.inference_logits_fn(model, params,
  batch_stats))``, the README's way of calling an attack. With one batch its key is the
  evaluation's key of batch 0, so both paths must give the same robust accuracy (checked).

Compilations are counted programmatically: a ``jax.monitoring`` listener on the backend-compile
event (``/jax/core/compile/backend_compile_duration``, one per XLA compilation, the same
events ``JAX_LOG_COMPILES=1`` logs as "Finished XLA compilation of ...") and on the tracing
event (``/jax/core/compile/jaxpr_trace_duration``), per function name, with their seconds.

The JSON records each process's timings and counts (median over ``--repeats`` fresh processes
per path, the paths alternating so that a changing machine load hits both alike) and the ratios
``cli / api``: ``first`` and ``warm`` compare ``pipeline.evaluate`` with the API call;
``whole_first`` the whole ``evaluate_workdir`` with the checkpoint restore plus the API call;
``process_ratio`` the two worker processes' wall times (imports, both calls).

``--aa reduced`` (default) keeps a run to minutes on a 2-core CPU: APGD-CE 25 steps, APGD-T and
FAB-T 25 steps on 3 targets, Square 250 queries; ``--aa standard`` is the published setting.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time

REDUCED = {"apgd_ce": {"steps": 25}, "apgd_t": {"steps": 25, "n_target_classes": 3},
           "fab_t": {"steps": 25, "n_target_classes": 3}, "square": {"steps": 250}}

_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
_TRACE = "/jax/core/compile/jaxpr_trace_duration"


class CompileCounter:
  """Counts XLA compilations and jaxpr traces (``jax.monitoring`` duration events) per function
  name while ``active``; ``snapshot()`` returns the counts since the last ``reset()``."""

  def __init__(self):
    import jax  # pylint: disable=import-outside-toplevel
    self.reset()
    jax.monitoring.register_event_duration_secs_listener(self._listen)

  def reset(self):
    self.compiles = collections.Counter()
    self.seconds = collections.Counter()
    self.traces = collections.Counter()

  def _listen(self, event: str, duration: float, **kwargs):
    name = str(kwargs.get("fun_name", "?"))
    if event == _BACKEND_COMPILE:
      self.compiles[name] += 1
      self.seconds[name] += duration
    elif event == _TRACE:
      self.traces[name] += 1

  def snapshot(self) -> dict:
    return {"compilations": int(sum(self.compiles.values())),
            "compile_seconds": float(sum(self.seconds.values())),
            "traces": int(sum(self.traces.values())),
            "compilations_by_function": {
                name: [count, round(self.seconds[name], 3)]
                for name, count in self.compiles.most_common()}}


def load_config(path: str, method: str | None):
  """``get_config()`` of a config file (``path[:arg]``), reduced to one training method."""
  path, _, arg = path.partition(":")
  spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg) if arg else module.get_config()
  if method:
    config.train.method = method
  return config


def bench_config(args):
  """The config both paths run: one method, one AutoAttack entry on ``--points`` points."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  config = load_config(args.config, args.method)
  entry = f"autoattack_{args.norm}"
  if entry not in config.eval.table:
    raise SystemExit(f"{args.config} has no eval.table.{entry}")
  config.eval.skip = ",".join(e for e in config.eval.table.keys() if e != entry)
  config.eval.num_examples = args.points
  config.eval.batch_size = args.batch_size or args.points
  if args.eps is not None:
    config.eval[f"eps_{args.norm}"] = args.eps
  aa = config.eval.table[entry]
  aa.version = "standard"
  if args.aa == "reduced":
    aa.hyperparameters = ml_collections.ConfigDict(REDUCED)
  return config, entry


def _worker_cli(args, counter) -> dict:
  from experiments import evaluate, pipeline  # pylint: disable=import-outside-toplevel
  config, _ = bench_config(args)
  inner = []
  original = pipeline.evaluate

  def timed_evaluate(*a, **kw):
    # What pipeline.evaluate alone compiles (the attack table, without the checkpoint restore
    # and the model's initialisation around it).
    before = counter.snapshot()
    start = time.perf_counter()
    out = original(*a, **kw)
    inner.append((time.perf_counter() - start, before, counter.snapshot()))
    return out

  pipeline.evaluate = timed_evaluate
  out = {}
  for label in ("first", "warm"):
    counter.reset()
    start = time.perf_counter()
    results = evaluate.evaluate_workdir(config, args.workdir, progress=False)
    total = time.perf_counter() - start
    (method_results,) = results.values()
    (result,) = method_results
    seconds, before, after = inner[-1]
    out[label] = dict(
        seconds=total, evaluate_seconds=seconds, attack_seconds=result.seconds,
        robust_accuracy=result.accuracy,
        evaluate_compilations=after["compilations"] - before["compilations"],
        evaluate_compile_seconds=after["compile_seconds"] - before["compile_seconds"],
        **counter.snapshot())
  return out


def _worker_api(args, counter) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  from experiments import pipeline  # pylint: disable=import-outside-toplevel
  from krylov_adv import attacks, training  # pylint: disable=import-outside-toplevel
  config, entry = bench_config(args)
  ((_, cfg, sub),) = pipeline.method_runs(config, args.workdir)
  counter.reset()
  start = time.perf_counter()
  exp, state, _ = pipeline.load_trained(cfg, sub)
  load = dict(seconds=time.perf_counter() - start, **counter.snapshot())
  suite = pipeline.eval_suite(cfg, "table")[entry]
  n = min(args.points, len(exp.dataset.y_test))
  x, y = exp.dataset.x_test[:n], exp.dataset.y_test[:n]
  # The evaluation's key of this entry's batch 0 (evaluation.evaluate_attacks, run_attack).
  key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(cfg.seed + 2),
                                              pipeline.suite_key_indices(cfg, "table")[entry]),
                           0)
  logits_fn = jax.jit(training.inference_logits_fn(exp.model, state.params, state.batch_stats))
  hyper = suite.get("hyperparameters")
  out = {}
  for label in ("first", "warm"):
    counter.reset()
    start = time.perf_counter()
    x_adv, report = attacks.autoattack_with_report(
        logits_fn, jax.numpy.asarray(x), jax.numpy.asarray(y), key, eps=float(suite["eps"]),
        norm=args.norm, version=suite["version"], hyperparameters=hyper)
    jax.block_until_ready(x_adv)
    out[label] = dict(seconds=time.perf_counter() - start,
                      robust_accuracy=float(report.robust_accuracy),
                      component_seconds=dict(zip(report.components, report.seconds)),
                      **counter.snapshot())
  out["load"] = load
  return out


def worker(args) -> None:
  """One path in this process; prints its JSON as the last line of stdout."""
  counter = CompileCounter()
  start = time.perf_counter()
  out = (_worker_cli if args.worker == "cli" else _worker_api)(args, counter)
  out["process_seconds"] = time.perf_counter() - start
  print(json.dumps(out), flush=True)


def _spawn(args, path: str) -> dict:
  cmd = [sys.executable, "-m", "benchmarks.bench_eval_path", "--worker", path,
         "--workdir", args.workdir, "--config", args.config, "--points", str(args.points),
         "--batch-size", str(args.batch_size), "--norm", args.norm, "--aa", args.aa]
  if args.method:
    cmd += ["--method", args.method]
  if args.eps is not None:
    cmd += ["--eps", str(args.eps)]
  start = time.perf_counter()
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  wall = time.perf_counter() - start
  if proc.returncode:
    raise RuntimeError(f"{path} worker failed:\n{proc.stderr[-4000:]}")
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  out["wall_seconds"] = wall
  return out


def _median(runs: list[dict], *keys) -> float:
  vals = []
  for r in runs:
    v = r
    for k in keys:
      v = v[k]
    vals.append(v)
  return statistics.median(vals)


def run(args) -> dict:
  runs = {"cli": [], "api": []}
  for _ in range(args.repeats):
    for path in ("cli", "api"):
      out = _spawn(args, path)
      runs[path].append(out)
      print(json.dumps({path: out}), flush=True)
  summary = {}
  for label in ("first", "warm"):
    cli_s = _median(runs["cli"], label, "evaluate_seconds")
    api_s = _median(runs["api"], label, "seconds")
    summary[label] = {
        "cli_evaluate_seconds": cli_s, "api_seconds": api_s, "ratio": cli_s / api_s,
        "cli_compilations": _median(runs["cli"], label, "evaluate_compilations"),
        "cli_compile_seconds": _median(runs["cli"], label, "evaluate_compile_seconds"),
        "api_compile_seconds": _median(runs["api"], label, "compile_seconds"),
        "cli_process_compilations": _median(runs["cli"], label, "compilations"),
        "api_compilations": _median(runs["api"], label, "compilations"),
        "cli_robust_accuracy": runs["cli"][0][label]["robust_accuracy"],
        "api_robust_accuracy": runs["api"][0][label]["robust_accuracy"]}
  # The whole evaluation call (data, checkpoint, files) against the checkpoint restore and the
  # API call.
  cli_whole = _median(runs["cli"], "first", "seconds")
  api_whole = statistics.median(r["load"]["seconds"] + r["first"]["seconds"] for r in runs["api"])
  summary["whole_first"] = {"cli_evaluate_workdir_seconds": cli_whole,
                            "api_load_and_call_seconds": api_whole,
                            "ratio": cli_whole / api_whole}
  summary["process_ratio"] = (_median(runs["cli"], "wall_seconds")
                              / _median(runs["api"], "wall_seconds"))
  import jax  # pylint: disable=import-outside-toplevel
  config, entry = bench_config(args)
  return {
      "benchmark": "eval_path",
      "command": " ".join([os.path.basename(sys.executable), "-m",
                           "benchmarks.bench_eval_path"] + sys.argv[1:]),
      "device": str(jax.devices()[0]), "platform": platform.platform(), "jax": jax.__version__,
      "workdir": args.workdir, "config": args.config, "method": args.method,
      "points": args.points, "batch_size": int(config.eval.batch_size), "norm": args.norm,
      "eps": float(config.eval[f"eps_{args.norm}"]), "entry": entry,
      "autoattack": config.eval.table[entry].to_dict(), "repeats": args.repeats,
      "summary": summary, "runs": runs}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--workdir", required=True, help="an experiments.soat workdir")
  parser.add_argument("--config", default="configs/quickstart.py")
  parser.add_argument("--method", default=None,
                      help="train.method of the workdir (one method), e.g. pgd")
  parser.add_argument("--points", type=int, default=200)
  parser.add_argument("--batch-size", type=int, default=0,
                      help="eval.batch_size of the CLI path (0: all points in one batch)")
  parser.add_argument("--norm", default="linf", choices=("linf", "l2"))
  parser.add_argument("--eps", type=float, default=None, help="default: eval.eps_<norm>")
  parser.add_argument("--aa", default="reduced", choices=("reduced", "standard"))
  parser.add_argument("--repeats", type=int, default=1,
                      help="fresh processes per path (medians are reported)")
  parser.add_argument("--out", default="benchmarks/results/eval_path.json")
  parser.add_argument("--worker", choices=("cli", "api"), help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    worker(args)
    return
  result = run(args)
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  print(json.dumps(result["summary"], indent=2))


if __name__ == "__main__":
  main()
