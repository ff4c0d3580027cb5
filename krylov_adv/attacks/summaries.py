"""What ``print(report)`` and ``report.summary()`` show for the attacks' reports.

A report (:class:`SOAEDiagnostics`, :class:`PGDReport`, :class:`SecondOrderReport`,
:class:`AutoAttackReport`) holds per-example arrays; the default ``repr`` of a NamedTuple would
print every one of them in full. Each report class delegates to this module instead:
``repr(report)`` is one line (the sizes and the headline numbers) and ``report.summary()`` a few
lines of plain statistics, the same ones the results files of ``experiments`` show.

Both read the arrays on the host (``jax.device_get``). Inside ``jit`` (tracer leaves), or for a
multi-host array this process cannot read whole, they show the shapes alone, so printing a
report never fails. The statistics of SOAE's solves are :func:`soae_stats`, also used by
``krylov_adv.evaluation.summarize_reports`` for a whole test set.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from krylov_adv import krylov


def _readable(tree) -> bool:
  """True when every array leaf of ``tree`` is a concrete value this process can read whole."""
  for leaf in jax.tree_util.tree_leaves(tree):
    if isinstance(leaf, jax.core.Tracer):
      return False
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      return False
  return True


def _host(a) -> np.ndarray:
  return np.asarray(jax.device_get(a))


def _shapes(report) -> str:
  """``Name(field=dtype[shape], ...)``: the fallback when the values cannot be read."""
  def show(v):
    if hasattr(v, "shape") and hasattr(v, "dtype"):
      return f"{np.dtype(v.dtype).name}{list(v.shape)}"
    if hasattr(v, "_fields"):  # a nested NamedTuple (PGDReport's trace)
      return _shapes(v)
    return type(v).__name__
  fields = ", ".join(f"{k}={show(v)}" for k, v in zip(report._fields, report))
  return f"{type(report).__name__}({fields})"


def _pct(v: float) -> str:
  return f"{100 * v:.1f}%"


# ---------------------------------------------------------------------------------------------
# SOAE


def soae_stats(num_iters, fallback, converged, status) -> dict[str, Any]:
  """Statistics over a set of SOAE's GMRES solves (any equal shapes, e.g. ``(N, B)``).

  Returns ``krylov_dim_mean`` / ``krylov_dim_max`` (Krylov dimension per solve),
  ``fallback_rate`` (share of solves whose Newton direction was replaced by the gradient),
  ``converged_rate`` (share meeting tau), ``solves`` (how many) and ``status_counts``
  (``{name: count}`` per :class:`krylov_adv.krylov.Status`, zero counts included, summing to
  ``solves``). With no solve the rates and the mean are ``nan`` and the max 0.
  """
  dims, fallback, converged, status = (np.asarray(a).reshape(-1) for a in
                                       (num_iters, fallback, converged, status))
  empty = dims.size == 0
  return dict(krylov_dim_mean=float("nan") if empty else float(dims.mean()),
              krylov_dim_max=0 if empty else int(dims.max()),
              fallback_rate=float("nan") if empty else float(fallback.mean()),
              converged_rate=float("nan") if empty else float(converged.mean()),
              solves=int(dims.size),
              status_counts={s.name: int(np.sum(status == s.value)) for s in krylov.Status})


def _soae_host_stats(diag) -> tuple[tuple[int, int], dict[str, Any]]:
  shape = tuple(np.shape(diag.num_iters))
  return shape, soae_stats(*(_host(a) for a in (diag.num_iters, diag.fallback, diag.converged,
                                                diag.status)))


def soae_repr(diag) -> str:
  """One line: ``SOAEDiagnostics(4 steps x 64 examples: Krylov dim mean 3.1, max 6;
  converged 85.2%; fallback 0.0%)``."""
  if not _readable(diag) or len(np.shape(diag.num_iters)) != 2:
    return _shapes(diag)
  (n, b), s = _soae_host_stats(diag)
  if not s["solves"]:
    return f"SOAEDiagnostics({n} steps x {b} examples: no solves)"
  return (f"SOAEDiagnostics({n} steps x {b} examples: Krylov dim mean "
          f"{s['krylov_dim_mean']:.1f}, max {s['krylov_dim_max']}; converged "
          f"{_pct(s['converged_rate'])}; fallback {_pct(s['fallback_rate'])})")


def soae_summary(diag) -> str:
  """A few lines: the solves, their Krylov dimension, convergence and fallback rates, the count
  per GMRES exit status and the relative residual's median and max."""
  if not _readable(diag) or len(np.shape(diag.num_iters)) != 2:
    return _shapes(diag)
  (n, b), s = _soae_host_stats(diag)
  lines = [f"SOAE diagnostics: {n} outer iterations x {b} examples = {s['solves']} GMRES solves"]
  if s["solves"]:
    rel = _host(diag.relative_residual).reshape(-1)
    lines += [
        f"  Krylov dimension per solve: mean {s['krylov_dim_mean']:.2f}, max "
        f"{s['krylov_dim_max']}",
        f"  converged (residual <= tau * initial): {_pct(s['converged_rate'])}; Newton "
        f"direction replaced by the gradient (fallback): {_pct(s['fallback_rate'])}",
        "  exit status: " + ", ".join(f"{k} {v}" for k, v in s["status_counts"].items()),
        f"  relative residual: median {np.median(rel):.3g}, max {np.max(rel):.3g}"]
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Per-iterate traces (PGD, S-O)


def _trace_arrays(report) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The trace's ``(correct, loss, grad_norm)`` as ``(restarts, steps + 1, B)`` host arrays
  (an S-O trace, ``(steps + 1, B)``, gets a restart axis of 1)."""
  t = report.trace
  arrays = [_host(a) for a in (t.correct, t.loss, t.grad_norm)]
  if arrays[0].ndim == 2:
    arrays = [a[None] for a in arrays]
  return tuple(arrays)


def _trace_ok(report) -> bool:
  return _readable(report) and np.ndim(report.trace.correct) in (2, 3)


def trace_repr(report) -> str:
  """One line: ``PGDReport(1 restart x 10 steps x 64 examples: accuracy 95.3% at the start ->
  42.2% at the end; mean loss 0.12 -> 2.31)``; with several restarts the end accuracy counts
  an example correct only when every restart's last iterate is."""
  if not _trace_ok(report):
    return _shapes(report)
  correct, loss, _ = _trace_arrays(report)
  r, t, b = correct.shape
  name = type(report).__name__
  if b == 0:
    return f"{name}({r} restart(s) x {t - 1} steps x 0 examples)"
  end = correct[:, -1, :].all(axis=0).mean()
  return (f"{name}({r} restart{'s' if r != 1 else ''} x {t - 1} steps x {b} examples: accuracy "
          f"{_pct(correct[0, 0].mean())} at the start -> {_pct(end)} at the end; mean loss "
          f"{loss[:, 0].mean():.3g} -> {loss[:, -1].mean():.3g})")


def trace_summary(report) -> str:
  """A few lines: per restart, the accuracy, mean loss and mean input-gradient L2 norm at the
  start and after the last step; then the accuracy left after all restarts."""
  if not _trace_ok(report):
    return _shapes(report)
  correct, loss, gnorm = _trace_arrays(report)
  r, t, b = correct.shape
  lines = [f"{type(report).__name__}: {r} restart(s) x {t - 1} steps x {b} examples "
           f"(iterate 0 is the start)"]
  if b:
    for i in range(r):
      lines.append(f"  restart {i + 1}: accuracy {_pct(correct[i, 0].mean())} -> "
                   f"{_pct(correct[i, -1].mean())}, mean loss {loss[i, 0].mean():.4g} -> "
                   f"{loss[i, -1].mean():.4g}, mean gradient norm {gnorm[i, 0].mean():.3g} -> "
                   f"{gnorm[i, -1].mean():.3g}")
    lines.append(f"  accuracy after all restarts (correct at every restart's last iterate): "
                 f"{_pct(correct[:, -1, :].all(axis=0).mean())}")
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# AutoAttack


def autoattack_repr(report) -> str:
  """One line: ``AutoAttackReport(100 points: clean 91.0% -> apgd-ce 70.0% -> apgd-t 68.0%;
  robust 68.0%)``."""
  b = int(np.size(report.robust))
  steps = "".join(f" -> {c} {_pct(a)}" for c, a in zip(report.components,
                                                          report.robust_accuracy_after))
  return (f"AutoAttackReport({b} points: clean {_pct(report.clean_accuracy)}{steps}; robust "
          f"{_pct(report.robust_accuracy)})")


def autoattack_summary(report) -> str:
  """A few lines: clean accuracy, the robust accuracy after each component with its wall time,
  the final robust accuracy."""
  b = int(np.size(report.robust))
  lines = [f"AutoAttack on {b} points: clean accuracy {_pct(report.clean_accuracy)}"]
  for c, a, s in zip(report.components, report.robust_accuracy_after, report.seconds):
    lines.append(f"  after {c}: {_pct(a)} ({s:.1f} s)")
  lines.append(f"  robust accuracy: {_pct(report.robust_accuracy)}")
  return "\n".join(lines)
