"""Benchmark: AutoAttack components on a small undefended digits CNN, linf and l2 (JSON out).

  python -m benchmarks.bench_autoattack [--points 256] [--steps 300]
                                        [--out benchmarks/results/autoattack.json]

A TinyCNN is trained for ``--steps`` Adam steps on scikit-learn digits (8x8, no defence); the
attacks run on the first ``--points`` test images it classifies correctly, with the published
hyperparameters (APGD 100 iterations, APGD-T/FAB-T 9 targets, FAB 100 iterations, Square 5000
queries). For each budget the JSON records:

* ``alone``: each component by itself on all points: robust accuracy, ``compile_seconds`` (first
  call minus a warm call) and ``seconds`` (a warm call).
* ``standard``: the AutoAttack ensemble's report: robust accuracy after each component and the
  time of each, cold (compilation included) and warm.
* ``random_noise``: accuracy under a uniform random point of the ball, the no-attack baseline.

Budgets: linf 0.3 (MNIST standard) and l2 1.5 (see tests/test_autoattack.py for the scaling to
8x8), plus the smaller 0.1 / 0.5, where the undefended model is not broken by every component
and the components differ.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from krylov_adv import attacks, data, projections
from krylov_adv.attacks import _autoattack as aa
from krylov_adv.models.cnn import TinyCNN

BUDGETS = (("linf", 0.3), ("linf", 0.1), ("l2", 1.5), ("l2", 0.5))


def train_digits_model(steps: int, seed: int = 0):
  """TinyCNN trained with Adam(3e-3), batch 64, on digits; returns (logits_fn, dataset, acc)."""
  ds = data.load_digits(seed=seed)
  model = TinyCNN(num_classes=10)
  params = model.init(jax.random.PRNGKey(seed), ds.x_train[:1])
  opt = optax.adam(3e-3)
  opt_state = opt.init(params)

  @jax.jit
  def step(params, opt_state, xb, yb):
    grads = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
        model.apply(p, xb), yb).mean())(params)
    updates, opt_state = opt.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state

  rng = np.random.default_rng(seed)
  for _ in range(steps):
    idx = rng.integers(0, len(ds.y_train), 64)
    params, opt_state = step(params, opt_state, ds.x_train[idx], ds.y_train[idx])
  logits_fn = jax.jit(lambda x: model.apply(params, x))
  acc = float(np.mean(np.asarray(jnp.argmax(logits_fn(ds.x_test), 1)) == ds.y_test))
  return logits_fn, ds, acc


def _accuracy(logits_fn, x, y) -> float:
  return float(np.mean(np.asarray(jnp.argmax(logits_fn(x), axis=1)) == np.asarray(y)))


def _timed(fn):
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn())
  return out, time.perf_counter() - t0


def run(points: int = 256, steps: int = 300, seed: int = 0) -> dict:
  logits_fn, ds, clean_accuracy = train_digits_model(steps, seed)
  correct = np.asarray(jnp.argmax(logits_fn(ds.x_test), 1)) == ds.y_test
  x = jnp.asarray(ds.x_test[correct][:points])
  y = jnp.asarray(ds.y_test[correct][:points])
  key = jax.random.PRNGKey(seed)
  results = []
  for norm, eps in BUDGETS:
    entry = {"norm": norm, "eps": eps,
             "random_noise": _accuracy(logits_fn, projections.random_start(key, x, eps, norm), y),
             "alone": {}}
    for name in ("apgd_ce", "apgd_dlr", "apgd_t", "fab_t", "fab", "square"):
      call = lambda name=name: attacks.get(name)(logits_fn, x, y, key, eps=eps, norm=norm)
      _, cold = _timed(call)
      x_adv, warm = _timed(call)
      dist = float(jnp.max(projections.per_example_norm(x_adv - x, norm)))
      entry["alone"][name] = {"robust_accuracy": _accuracy(logits_fn, x_adv, y),
                              "seconds": warm, "compile_seconds": max(cold - warm, 0.0),
                              "max_perturbation": dist}
    for label in ("cold", "warm"):
      _, report = attacks.autoattack_with_report(logits_fn, x, y, key, eps=eps, norm=norm)
      entry[f"standard_{label}"] = {
          "components": list(report.components),
          "clean_accuracy": report.clean_accuracy,
          "robust_accuracy_after": dict(zip(report.components, report.robust_accuracy_after)),
          "seconds": dict(zip(report.components, report.seconds)),
          "robust_accuracy": report.robust_accuracy,
      }
    results.append(entry)
    print(json.dumps(entry), flush=True)
  return {
      "benchmark": "autoattack",
      "device": str(jax.devices()[0]),
      "platform": platform.platform(),
      "jax": jax.__version__,
      "model": f"TinyCNN(relu), {steps} Adam steps on sklearn digits, no defence",
      "test_clean_accuracy": clean_accuracy,
      "points": int(x.shape[0]),
      "hyperparameters": {name: dict(kw) for name, kw in aa.version_components("standard")},
      "budgets": results,
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description="AutoAttack per-component accuracy and time.")
  parser.add_argument("--points", type=int, default=256)
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default="benchmarks/results/autoattack.json")
  args = parser.parse_args(argv)
  result = run(args.points, args.steps, args.seed)
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  main()
