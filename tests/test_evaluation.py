"""krylov_adv.evaluation: accuracies against direct counts, and the threat-model check that
refuses an accuracy measured on inadmissible points."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from krylov_adv import attacks, evaluation


def _shifted(delta):
  """An 'attack' that adds ``delta`` to every pixel (no clipping)."""
  return lambda logits_fn, x, y, key: x + delta


def test_robust_accuracy_counts_what_the_attack_returns(digits_model):
  m = digits_model
  x, y = m.x_test[:10], m.y_test[:10]
  # Points with an odd label become the all-zeros image; the others stay clean (and correct:
  # x_test holds correctly classified points).
  attack = lambda logits_fn, xb, yb, key: jnp.where((yb % 2 == 0)[:, None, None, None], xb, 0.0)
  zeros_pred = np.asarray(jnp.argmax(m.logits_fn(jnp.zeros_like(x)), axis=1))
  want = np.mean(np.where(y % 2 == 0, True, zeros_pred == y))
  assert 0.0 < want < 1.0
  # One batch, and batches of 4 (the last one padded with example 0, excluded from the count).
  for batch_size in (10, 4):
    got = evaluation.robust_accuracy(m.logits_fn, attack, x, y, jax.random.PRNGKey(0), eps=1.0,
                                     norm="linf", batch_size=batch_size)
    assert got == pytest.approx(want)


@pytest.mark.parametrize("delta,norm,eps", [
    (0.2, "linf", 0.1),     # outside the Linf ball
    (0.05, "l2", 0.1),      # 0.05 * sqrt(64) = 0.4 > 0.1: outside the L2 ball
    (-2.0, "linf", 3.0),    # inside the ball, outside the box [0, 1]
    (np.nan, "linf", 0.1),  # NaN is never admissible
])
def test_inadmissible_points_are_refused(digits_model, delta, norm, eps):
  m = digits_model
  with pytest.raises(ValueError, match="outside"):
    evaluation.robust_accuracy(m.logits_fn, _shifted(delta), m.x_test[:8], m.y_test[:8],
                               jax.random.PRNGKey(0), eps=eps, norm=norm, batch_size=8)


def test_run_attack_keeps_examples_and_each_batch_aux(digits_model):
  """The one batched runner: 10 points in batches of 4 (the last padded with example 0): the
  examples come back in order without the padding, and each batch's aux with its real count."""
  m = digits_model
  x, y = m.x_test[:10], m.y_test[:10]

  def attack(logits_fn, xb, yb, key):
    return attacks.WithReport(jnp.clip(xb + 0.01, 0.0, 1.0),
                              jnp.full((3, xb.shape[0]), xb.shape[0]))

  run = evaluation.run_attack(m.logits_fn, attack, x, y, jax.random.PRNGKey(0), eps=0.02,
                              norm="linf", batch_size=4, keep_examples=True)
  np.testing.assert_allclose(run.x_adv, np.clip(x + 0.01, 0.0, 1.0), atol=1e-7)
  pred = np.asarray(jnp.argmax(m.logits_fn(jnp.asarray(run.x_adv)), axis=1))
  np.testing.assert_array_equal(run.correct, pred == y)
  assert [v for _, v in run.extras] == [4, 4, 2]
  assert all(aux.shape == (3, 4) for aux, _ in run.extras)
  assert evaluation.robust_accuracy(m.logits_fn, attack, x, y, jax.random.PRNGKey(0),
                                    eps=0.02, norm="linf", batch_size=4) == run.correct.mean()


def _linear_or_nan(x):
  """Linear logits (3 classes) on 2x2x1 images, NaN for images whose first pixel is > 0.5."""
  flat = x.reshape(x.shape[0], -1)
  z = flat @ jnp.asarray(np.arange(12, dtype=np.float32).reshape(4, 3) - 5.0)
  return jnp.where(flat[:, :1] > 0.5, jnp.nan, z)


def test_nonfinite_predictions_are_wrong_and_counted():
  # Today a NaN row is argmax'ed to class 0: with every label 0 the NaN model scored 1.0.
  rng = np.random.default_rng(0)
  x = rng.uniform(size=(10, 2, 2, 1)).astype(np.float32)
  nan_rows = x[:, 0, 0, 0] > 0.5
  assert 0 < nan_rows.sum() < 10
  pred = evaluation.predictions(_linear_or_nan, x, batch_size=4)
  finite_pred = np.argmax(np.asarray(_linear_or_nan(jnp.asarray(x))), axis=1)
  np.testing.assert_array_equal(pred, np.where(nan_rows, -1, finite_pred))
  y = np.zeros(10, np.int32)
  report = evaluation.accuracy_report(_linear_or_nan, x, y, batch_size=4)
  assert report.nonfinite == int(nan_rows.sum()) and report.num_examples == 10
  want = np.mean(~nan_rows & (finite_pred == 0))
  assert report.accuracy == pytest.approx(want)
  assert evaluation.accuracy(_linear_or_nan, x, y, batch_size=4) == pytest.approx(want)
  all_nan = lambda z: _linear_or_nan(z) * jnp.nan
  assert evaluation.accuracy(all_nan, x, y) == 0.0
  assert evaluation.accuracy_report(all_nan, x, y).nonfinite == 10
  # Robust accuracy too: an attack that leaves x as it is, on the NaN model, scores every NaN
  # row as wrong (it used to be argmax'ed to class 0, i.e. right when the label is 0).
  identity = lambda f, xb, yb, key: xb
  robust = evaluation.robust_accuracy(_linear_or_nan, identity, x, y, jax.random.PRNGKey(0),
                                      eps=0.1, norm="linf", batch_size=4)
  assert robust == pytest.approx(want)


def test_soae_summary_counts_gmres_statuses_over_real_examples():
  """summarize_reports on a hand-made SOAE report: per-status counts over every outer iteration
  and the real examples only (the last batch's padding columns carry a status that must not be
  counted), and the same counts in the diagnostics block under the table."""
  from experiments import outputs
  from krylov_adv import krylov
  S = krylov.Status

  def report(status, num_iters):
    status = np.asarray(status, np.int32)
    converged = status == S.CONVERGED
    zeros = np.zeros(status.shape[1], np.int32)
    return attacks.SOAEDiagnostics(
        num_iters=np.asarray(num_iters, np.int32), residual_norm=np.ones(status.shape),
        initial_residual_norm=np.ones(status.shape), converged=converged, status=status,
        fallback=np.zeros(status.shape, bool), num_iters_total=zeros, fallback_count=zeros)

  # Batch 1: N = 2 outer iterations, 3 real examples. Batch 2: 2 real + 2 padding columns,
  # whose NONFINITE / BREAKDOWN codes would change the counts if they were read.
  b1 = report([[S.CONVERGED, S.MAX_DIM_REACHED, S.CONVERGED],
               [S.BREAKDOWN, S.CONVERGED, S.MAX_DIM_REACHED]], [[2, 5, 3], [4, 1, 5]])
  b2 = report([[S.MAX_DIM_REACHED, S.CONVERGED, S.NONFINITE, S.NONFINITE],
               [S.MAX_DIM_REACHED, S.MAX_DIM_REACHED, S.BREAKDOWN, S.NONFINITE]],
              [[5, 2, 9, 9], [5, 5, 9, 9]])
  s = evaluation.summarize_reports([(b1, 3), (b2, 2)])
  assert s["solves"] == 10
  assert s["status_counts"] == dict(CONVERGED=4, MAX_DIM_REACHED=5, BREAKDOWN=1, NONFINITE=0)
  assert sum(s["status_counts"].values()) == s["solves"]
  assert s["converged_rate"] == pytest.approx(0.4)
  assert s["krylov_dim_max"] == 5  # the padding's 9 is not read either
  md = outputs.diagnostics_markdown(
      {"soat": [dict(label="SOAE", norm="linf", eps=0.1, attack="soae", **s)]})
  header = next(l for l in md.splitlines() if l.startswith("| model / attack"))
  row = next(l for l in md.splitlines() if l.startswith("| attack Linf eps=0.1 |"))
  cells = dict(zip([c.strip() for c in header.strip("|").split("|")],
                   [c.strip() for c in row.strip("|").split("|")]))
  assert (cells["CONVERGED"], cells["MAX_DIM_REACHED"], cells["BREAKDOWN"],
          cells["NONFINITE"]) == ("4", "5", "1", "0")
  assert cells["solves"] == "10" and cells["converged"] == "40.0%"
