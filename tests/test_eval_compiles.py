"""A batched AutoAttack evaluation compiles what one AutoAttack call compiles.

The evaluation runs AutoAttack component by component over all its batches
(``attacks.autoattack_batched``); these tests count XLA compilations with a ``jax.monitoring``
listener on the backend-compile event (one per compilation, what ``JAX_LOG_COMPILES=1`` logs)
and check the per-example randomness against batches attacked one by one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compile_events import count_compilations
from krylov_adv import attacks, evaluation

# Tiny iterations: the test is about shapes and compiles, not attack strength.
HYPER = {"apgd_ce": {"steps": 2}, "apgd_t": {"steps": 2, "n_target_classes": 2},
         "fab_t": {"steps": 2, "n_target_classes": 2}, "square": {"steps": 10}}
# The jitted function each component's iterations run in.
STEP_FUNCTIONS = ("_apgd_start", "_apgd_step", "_fab_start", "_fab_step", "square_batch")


def _logits_fn():
  """A fresh jitted linear classifier on 8x8x1 images (its own compile cache entries)."""
  w = jax.random.normal(jax.random.PRNGKey(3), (64, 10)) * 2.0
  return jax.jit(lambda x: x.reshape(x.shape[0], -1) @ w)


def _points(n: int, logits_fn):
  x = jax.random.uniform(jax.random.PRNGKey(4), (n, 8, 8, 1))
  # Labels = the model's own predictions: every point starts robust, so every component runs.
  return np.asarray(x), np.asarray(jnp.argmax(logits_fn(x), axis=1), np.int32)


def _suite(eps: float):
  return {"aa": dict(label="AutoAttack", name="autoattack", norm="linf", eps=eps,
                     version="standard", hyperparameters=HYPER)}


@pytest.mark.slow
def test_two_batches_compile_each_component_once_and_a_rerun_compiles_nothing():
  """16 points in two batches of 8: each component's step function compiles once (one shape,
  APGD once per loss: CE and targeted DLR), as for one AutoAttack call; the same evaluation
  again with the same logits_fn compiles nothing."""
  logits_fn = _logits_fn()
  x, y = _points(16, logits_fn)
  with count_compilations() as first:
    evaluation.evaluate_attacks(logits_fn, x, y, _suite(0.05), jax.random.PRNGKey(0),
                                batch_size=8, reports=evaluation.FREE_REPORTS)
  for name in STEP_FUNCTIONS:
    assert 1 <= first[name] <= (2 if name.startswith("_apgd") else 1), (name, dict(first))
  with count_compilations() as again:
    evaluation.evaluate_attacks(logits_fn, x, y, _suite(0.05), jax.random.PRNGKey(0),
                                batch_size=8, reports=evaluation.FREE_REPORTS)
  assert sum(again.values()) == 0, dict(again)


@pytest.mark.slow
def test_batched_autoattack_gives_each_batch_its_own_keys():
  """Every example's result equals AutoAttack on its own batch with the batch's key
  ``fold_in(key, b)`` (the per-batch scheme of run_attack), for 3 batches of 6 (the last one
  short); the report counts the real points only."""
  logits_fn = _logits_fn()
  x, y = _points(15, logits_fn)
  key, eps = jax.random.PRNGKey(7), 0.03
  kw = dict(eps=eps, norm="linf", version="standard", hyperparameters=HYPER)
  attack = attacks.from_config(dict(name="autoattack", **kw)).with_report()
  run = evaluation.run_attack(logits_fn, attack, x, y, key, eps=eps, norm="linf", batch_size=6,
                              keep_examples=True)
  expected, x_expected = [], []
  for b, lo in enumerate(range(0, 15, 6)):
    x_adv, report = attacks.autoattack_with_report(
        logits_fn, jnp.asarray(x[lo:lo + 6]), jnp.asarray(y[lo:lo + 6]),
        jax.random.fold_in(key, b), **kw)
    expected.append(report.robust)
    x_expected.append(np.asarray(x_adv))
  np.testing.assert_array_equal(run.correct, np.concatenate(expected))
  np.testing.assert_allclose(run.x_adv, np.concatenate(x_expected), atol=1e-6)
  assert 0 < run.correct.sum() < 15  # the comparison means something: some fooled, some not
  [(report, valid)] = run.extras
  assert valid == 15 and report.robust.shape == (15,)
  assert report.robust_accuracy == run.correct.mean()


def test_one_batch_is_autoattack_with_report_on_key_of_batch_0():
  """``len(x) <= batch_size``: the evaluation's AutoAttack is the API call on ``fold_in(key,
  0)``, bit for bit (quickstart's numbers do not move)."""
  logits_fn = _logits_fn()
  x, y = _points(12, logits_fn)
  key, kw = jax.random.PRNGKey(1), dict(eps=0.08, norm="linf", hyperparameters=HYPER)
  out = attacks.autoattack_batched(logits_fn, x, y, key, batch_size=12, **kw)
  ref = attacks.autoattack_with_report(logits_fn, x, y, jax.random.fold_in(key, 0), **kw)
  np.testing.assert_array_equal(np.asarray(out.x_adv), np.asarray(ref.x_adv))
  for field in ("components", "clean_accuracy", "robust_accuracy_after", "robust_accuracy"):
    assert getattr(out.report, field) == getattr(ref.report, field), field
  np.testing.assert_array_equal(out.report.robust, ref.report.robust)
