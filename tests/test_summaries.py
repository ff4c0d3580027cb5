"""krylov_adv.attacks.summaries: the reports print a short digest, not their arrays.

Reports are built by hand from known arrays (no attack runs, nothing compiles but one trivial
jit), and every number in the text is checked against a count done here with NumPy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from krylov_adv import attacks, evaluation, krylov
from krylov_adv.attacks import summaries, toolkit
from krylov_adv.attacks._first_order import PGDReport
from krylov_adv.attacks._second_order import SecondOrderReport

B = 500  # large enough that NumPy's own repr of the arrays would run to thousands of characters


def _soae_diag(n=4, b=B, seed=0):
  rng = np.random.default_rng(seed)
  num_iters = rng.integers(1, 16, (n, b)).astype(np.int32)
  converged = rng.random((n, b)) < 0.7
  fallback = rng.random((n, b)) < 0.1
  status = np.where(converged, int(krylov.Status.CONVERGED),
                    np.where(num_iters == 15, int(krylov.Status.MAX_DIM_REACHED),
                             int(krylov.Status.BREAKDOWN))).astype(np.int32)
  r0 = rng.random((n, b)).astype(np.float32) + 0.5
  res = (r0 * rng.random((n, b)) * 1e-2).astype(np.float32)
  diag = attacks.SOAEDiagnostics(
      num_iters=jnp.asarray(num_iters), residual_norm=jnp.asarray(res),
      initial_residual_norm=jnp.asarray(r0), converged=jnp.asarray(converged),
      status=jnp.asarray(status), fallback=jnp.asarray(fallback),
      num_iters_total=jnp.asarray(num_iters.sum(0)), fallback_count=jnp.asarray(fallback.sum(0)))
  return diag, num_iters, converged, fallback, status


def test_soae_diagnostics_repr_is_one_line_with_the_headline_numbers():
  diag, num_iters, converged, fallback, _ = _soae_diag()
  text = repr(diag)
  assert "\n" not in text and len(text) < 200, text
  assert text == (f"SOAEDiagnostics(4 steps x {B} examples: Krylov dim mean "
                  f"{num_iters.mean():.1f}, max {num_iters.max()}; converged "
                  f"{100 * converged.mean():.1f}%; fallback {100 * fallback.mean():.1f}%)")
  assert str(diag) == text  # print() shows the same line
  # The arrays are still there, whole.
  assert diag.num_iters.shape == (4, B)


def test_soae_summary_counts_every_solve():
  diag, num_iters, converged, fallback, status = _soae_diag()
  lines = diag.summary().splitlines()
  assert lines[0] == f"SOAE diagnostics: 4 outer iterations x {B} examples = {4 * B} GMRES solves"
  assert f"mean {num_iters.mean():.2f}, max {num_iters.max()}" in lines[1]
  assert f"converged (residual <= tau * initial): {100 * converged.mean():.1f}%" in lines[2]
  counts = {s.name: int(np.sum(status == s.value)) for s in krylov.Status}
  assert lines[3] == "  exit status: " + ", ".join(f"{k} {v}" for k, v in counts.items())
  assert sum(counts.values()) == 4 * B
  rel = np.asarray(diag.residual_norm) / np.asarray(diag.initial_residual_norm)
  assert f"median {np.median(rel):.3g}, max {np.max(rel):.3g}" in lines[4]
  assert len(diag.summary()) < 600


def test_evaluation_summary_and_report_summary_agree():
  """One set of SOAE statistics: evaluation.summarize_reports over batches (the last padded)
  equals soae_stats over the real examples, which the report's summary prints."""
  diag, num_iters, converged, fallback, status = _soae_diag(b=10)
  valid = 7  # columns 7..9 are padding and must not count
  got = evaluation.summarize_reports([(diag, valid)])
  want = summaries.soae_stats(num_iters[:, :valid], fallback[:, :valid], converged[:, :valid],
                              status[:, :valid])
  assert got == want
  assert want["solves"] == 4 * valid
  assert want["krylov_dim_mean"] == float(num_iters[:, :valid].mean())


def _trace(shape, seed=1):
  rng = np.random.default_rng(seed)
  return toolkit.StepRecord(loss=jnp.asarray(rng.random(shape), jnp.float32),
                            grad_norm=jnp.asarray(rng.random(shape), jnp.float32),
                            correct=jnp.asarray(rng.random(shape) < 0.5))


def test_pgd_report_repr_and_summary():
  trace = _trace((2, 11, B))
  report = PGDReport(trace)
  correct, loss = np.asarray(trace.correct), np.asarray(trace.loss)
  end = correct[:, -1, :].all(axis=0).mean()
  text = repr(report)
  assert "\n" not in text and len(text) < 200
  assert text == (f"PGDReport(2 restarts x 10 steps x {B} examples: accuracy "
                  f"{100 * correct[0, 0].mean():.1f}% at the start -> {100 * end:.1f}% at the "
                  f"end; mean loss {loss[:, 0].mean():.3g} -> {loss[:, -1].mean():.3g})")
  lines = report.summary().splitlines()
  assert len(lines) == 4  # title, one line per restart, accuracy after all restarts
  assert f"restart 2: accuracy {100 * correct[1, 0].mean():.1f}% -> " \
      f"{100 * correct[1, -1].mean():.1f}%" in lines[2]
  assert lines[3].endswith(f"{100 * end:.1f}%")


def test_second_order_report_has_no_restart_axis():
  trace = _trace((6, B))
  report = SecondOrderReport(trace)
  correct = np.asarray(trace.correct)
  assert repr(report).startswith(f"SecondOrderReport(1 restart x 5 steps x {B} examples: "
                                 f"accuracy {100 * correct[0].mean():.1f}% at the start -> "
                                 f"{100 * correct[-1].mean():.1f}% at the end")
  assert len(report.summary().splitlines()) == 3


def test_autoattack_report_repr_and_summary():
  robust = np.zeros(B, bool)
  robust[:150] = True
  report = attacks.AutoAttackReport(components=("apgd_ce", "apgd_t"), clean_accuracy=0.9,
                                    robust_accuracy_after=(0.5, 0.3), robust_accuracy=0.3,
                                    seconds=(1.25, 4.0), robust=robust)
  assert repr(report) == (f"AutoAttackReport({B} points: clean 90.0% -> apgd_ce 50.0% -> "
                          f"apgd_t 30.0%; robust 30.0%)")
  assert report.summary().splitlines() == [
      f"AutoAttack on {B} points: clean accuracy 90.0%", "  after apgd_ce: 50.0% (1.2 s)",
      "  after apgd_t: 30.0% (4.0 s)", "  robust accuracy: 30.0%"]


def test_with_report_shows_the_batch_shape_not_its_values():
  diag = _soae_diag()[0]
  out = attacks.WithReport(jnp.zeros((B, 8, 8, 1)), diag)
  assert repr(out) == f"WithReport(x_adv=float32[{B}, 8, 8, 1], report={diag!r})"


def test_inside_jit_a_report_prints_its_shapes():
  seen = []

  @jax.jit
  def f(a):
    seen.append(repr(attacks.SOAEDiagnostics(*([a] * 6 + [a[0]] * 2))))
    seen.append(attacks.SOAEDiagnostics(*([a] * 6 + [a[0]] * 2)).summary())
    seen.append(repr(PGDReport(toolkit.StepRecord(a, a, a))))
    return a

  f(jnp.zeros((2, 3), jnp.int32))
  assert seen[0] == seen[1] == (
      "SOAEDiagnostics(num_iters=int32[2, 3], residual_norm=int32[2, 3], "
      "initial_residual_norm=int32[2, 3], converged=int32[2, 3], status=int32[2, 3], "
      "fallback=int32[2, 3], num_iters_total=int32[3], fallback_count=int32[3])")
  assert seen[2] == ("PGDReport(trace=StepRecord(loss=int32[2, 3], grad_norm=int32[2, 3], "
                     "correct=int32[2, 3]))")
