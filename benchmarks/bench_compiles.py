"""Benchmark: XLA compilations per parameter set, for attacks called from a user's code (JSON out).

  python -m benchmarks.bench_compiles [--points 64] [--sets 3]
      [--out benchmarks/results/bench_compiles.json]

The models-are-data measurement: a two-layer MLP on scikit-learn's 8x8 digits (the first
``--points`` images), ``--sets`` parameter sets of the same architecture (seeds 0, 1, ...), each
passed as ``jax.tree_util.Partial(apply, params)``, attacked with PGD (10 steps), SOAE (defaults)
and AutoAttack (standard, reduced iterations: APGD-CE 25, APGD-T / FAB-T 25 on 3 targets, Square
250) at Linf 0.1, labels the model's own predictions. Per attack and parameter set: XLA
compilations (a ``jax.monitoring`` listener on the backend-compile event) and wall seconds.
Run it on two commits to compare (see ``benchmarks/bench_checkpoints.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time



def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--points", type=int, default=64)
  p.add_argument("--sets", type=int, default=3)
  p.add_argument("--out", default="benchmarks/results/bench_compiles.json")
  args = p.parse_args(argv)
  sys.path.insert(0, os.getcwd())
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  from benchmarks.bench_eval_path import (  # pylint: disable=import-outside-toplevel
      REDUCED, CompileCounter)
  from krylov_adv import attacks  # pylint: disable=import-outside-toplevel

  counter = CompileCounter()
  digits = load_digits()
  x = jnp.asarray((digits.images[:args.points] / 16.0)[..., None], jnp.float32)

  def apply(params, z):
    h = jax.nn.relu(z.reshape(z.shape[0], -1) @ params["w1"] + params["b1"])
    return h @ params["w2"] + params["b2"]

  def init(seed):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    return {"w1": jax.random.normal(k1, (64, 32)) / 8.0, "b1": jnp.zeros(32),
            "w2": jax.random.normal(k2, (32, 10)) / 5.6, "b2": jnp.zeros(10)}

  runs = {"pgd": lambda f, y: attacks.pgd(f, x, y, jax.random.PRNGKey(0), eps=0.1, norm="linf"),
          "soae": lambda f, y: attacks.soae(f, x, y, jax.random.PRNGKey(0), eps=0.1,
                                            norm="linf"),
          "autoattack": lambda f, y: attacks.autoattack(f, x, y, jax.random.PRNGKey(0), eps=0.1,
                                                        norm="linf", hyperparameters=REDUCED)}
  table = {}
  for name, run in runs.items():
    table[name] = []
    for seed in range(args.sets):
      params = init(seed)
      y = jnp.argmax(apply(params, x), axis=1)
      counter.reset()
      start = time.perf_counter()
      np.asarray(run(jax.tree_util.Partial(apply, params), y))
      table[name].append(dict(compilations=counter.snapshot()["compilations"],
                              seconds=time.perf_counter() - start))
    print(name, [r["compilations"] for r in table[name]],
          [round(r["seconds"], 2) for r in table[name]], flush=True)
  commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, check=False).stdout.strip()
  out = dict(commit=commit, points=args.points, load_average=os.getloadavg(), attacks=table)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(out, f, indent=2)
  return out


if __name__ == "__main__":
  main()
