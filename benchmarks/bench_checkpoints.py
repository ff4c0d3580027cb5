"""Benchmark: the full table suite on five checkpoints of one architecture (JSON out).

  python -m benchmarks.bench_checkpoints [--config configs/quickstart.py] [--checkpoints 5]
      [--points 64] [--aa reduced|standard] [--out benchmarks/results/bench_checkpoints.json]

Trains the config's ``standard`` method in memory for ``--checkpoints`` epochs (the quickstart's
TinyCNN on digits: seconds) and keeps the state after every epoch: five parameter sets of one
architecture, as a series of checkpoints gives them. Then evaluates each with
``pipeline.evaluate(..., suite="table")``, the call ``experiments.evaluate`` and
``experiments.table`` make (clean, FGSM, PGD-20, S-O, SOAE, AutoAttack, both norms), on the first
``--points`` test points, in one process, and records per checkpoint its wall time and its XLA
compilations (a ``jax.monitoring`` listener on the backend-compile event, as in
``benchmarks/bench_eval_path.py``).

Run it on two commits to compare them (e.g. before and after attacks traced the parameters):
``git worktree add /tmp/old OLD && cd /tmp/old && python /path/to/benchmarks/bench_checkpoints.py``
imports the old commit's library. ``--aa reduced`` (default) shortens AutoAttack's iterations
(APGD-CE 25, APGD-T / FAB-T 25 on 3 targets, Square 250) so that a run takes minutes on a
2-core CPU; the compilations do not depend on the iteration counts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time



def _commit() -> str:
  try:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="configs/quickstart.py")
  p.add_argument("--checkpoints", type=int, default=5)
  p.add_argument("--points", type=int, default=64)
  p.add_argument("--aa", choices=("reduced", "standard"), default="reduced")
  p.add_argument("--out", default="benchmarks/results/bench_checkpoints.json")
  args = p.parse_args(argv)

  sys.path.insert(0, os.getcwd())  # the checkout we run in, not this file's
  # pylint: disable=import-outside-toplevel
  from benchmarks.bench_eval_path import REDUCED, CompileCounter, load_config
  from experiments import pipeline
  from krylov_adv import data as data_lib

  counter = CompileCounter()
  config = pipeline.with_method(load_config(args.config, None), "standard")
  config.eval.num_examples = args.points
  config.eval.batch_size = args.points
  if args.aa == "reduced":
    for entry in config.eval.table.values():
      if entry.name == "autoattack":
        entry.hyperparameters = REDUCED
  dataset = data_lib.load(config.data)
  exp = pipeline.build(config, dataset)
  mesh = pipeline.make_mesh(config)
  state = pipeline.initial_state(exp)
  states = []
  for epoch in range(args.checkpoints):
    for state, _ in pipeline.epoch_steps(exp, state, mesh, epoch):
      pass
    states.append(state)

  rows = []
  for i, st in enumerate(states):
    counter.reset()
    start = time.perf_counter()
    results = pipeline.evaluate(exp, st, config, suite="table")
    seconds = time.perf_counter() - start
    snap = counter.snapshot()
    rows.append(dict(checkpoint=i + 1, seconds=seconds, compilations=snap["compilations"],
                     by_function=snap["compilations_by_function"],
                     accuracy={r.label + " " + r.norm: r.accuracy for r in results}))
    print(f"checkpoint {i + 1}: {seconds:.1f} s, {snap['compilations']} compilations",
          flush=True)
  others = rows[1:]
  out = dict(
      commit=_commit(), config=args.config, points=args.points, aa=args.aa,
      entries=list(pipeline.eval_suite(config, "table")), machine=platform.machine(),
      cpu_count=os.cpu_count(), load_average=os.getloadavg(), rows=rows,
      first=dict(seconds=rows[0]["seconds"], compilations=rows[0]["compilations"]),
      others_mean=dict(
          seconds=sum(r["seconds"] for r in others) / max(1, len(others)),
          compilations=sum(r["compilations"] for r in others) / max(1, len(others))))
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(out, f, indent=2)
  print(json.dumps({k: out[k] for k in ("commit", "first", "others_mean", "load_average")}))
  return out


if __name__ == "__main__":
  main()
