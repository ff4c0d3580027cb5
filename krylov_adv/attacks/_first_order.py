"""First-order attacks: FGSM and PGD with random restarts.

* FGSM (Goodfellow et al. 2015; SOAE paper Sec. II): ``x_adv = Proj(x + eps * step(grad L(x)))``.
* PGD (Madry et al. 2018; SOAE paper Sec. II, S-O paper Eq. 2):
  ``x_{t+1} = Proj(x_t + a * step(grad L(x_t)))`` from a random point of the ball.

``step`` is :func:`krylov_adv.projections.normalize_step` (``sign`` for Linf, the unit L2 vector
for L2, the sparse sign step for L1) and ``Proj`` is :func:`krylov_adv.projections.project`
(the eps-ball intersected with the box ``bounds``, default ``[0, 1]``), so every result is inside the threat model; the update is
:func:`krylov_adv.attacks.toolkit.ascent_step`.

Examples never interact: the model is in inference mode, so the gradient of the summed loss
w.r.t. the batch holds every example's own gradient (block-diagonal assumption of
:mod:`krylov_adv.hvp`).

A randomized model (``attacks.stochastic``) is attacked with Expectation over Transformation:
``grad L`` above is the mean over ``eot_samples`` draws
(:func:`krylov_adv.attacks._eot.eot_grad`); draw ``s`` at iterate ``t`` of example ``i`` (its
position in the batch) has the key ``fold_in(fold_in(fold_in(fold_in(k, DRAW_STREAM), i), t), s)``
with ``k`` the attack's key (PGD: the restart's key), and PGD's choice between restarts judges
each restart's result at one more draw.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from krylov_adv import hvp, projections
from krylov_adv.attacks import _eot, checks, register, summaries, toolkit
from krylov_adv.attacks.toolkit import Array, LogitsFn, LossFn


# ----------------------------------------------------------------------------------------------
# FGSM.


def _draw_keys(key: Array, x: Array) -> Array:
  """Per-example keys of a randomized model's draws, ``fold_in(fold_in(key, DRAW_STREAM), i)``
  for the ``i``-th example of the batch ``x``: ``(B, ...)``."""
  return toolkit.example_keys(jax.random.fold_in(key, _eot.DRAW_STREAM),
                              jnp.arange(x.shape[0], dtype=jnp.int32))


def _gradient(logits_fn: LogitsFn, y: Array, loss: str, draw_keys: Array | None,
              eot_samples: int):
  """``(t, x_t) -> grad_x L(x_t)``: of a deterministic model, or the EoT mean over
  ``eot_samples`` draws of a randomized one (keys ``fold_in(draw_keys_i, t)``, then ``s``)."""
  if not _eot.is_stochastic(logits_fn):
    loss_fn = toolkit.make_loss_fn(logits_fn, y, loss)
    return lambda t, xt: hvp.input_grad(loss_fn, xt)
  return lambda t, xt: _eot.eot_grad(lambda m: toolkit.make_loss_fn(m, y, loss), logits_fn, xt,
                                     _eot.fold(draw_keys, t), eot_samples)


@functools.partial(jax.jit, static_argnames=("norm", "loss", "random_start", "eot_samples"))
def _fgsm_impl(logits_fn: LogitsFn, x: Array, y: Array, key: Array, eps, step_size, bounds, *,
               norm: str, loss: str, random_start: bool, eot_samples: int = 1) -> Array:
  eps = jnp.asarray(eps, x.dtype)
  step_size = jnp.asarray(step_size, x.dtype)
  x0 = toolkit.ball_start(key, x, eps, norm, bounds) if random_start else x
  draw_keys = _draw_keys(key, x) if _eot.is_stochastic(logits_fn) else None
  grad = _gradient(logits_fn, y, loss, draw_keys, eot_samples)(0, x0)
  return toolkit.ascent_step(x0, grad, x, eps, step_size, norm, bounds)


@register("fgsm")
@toolkit.attack_entry
@_eot.supports_randomized
def fgsm(logits_fn: LogitsFn, x, y, key, *, eps, norm: str, step_size=None,
         random_start: bool = False, loss: str = "ce", bounds=None,
         eot_samples: int = 1) -> Array:
  """Fast gradient (sign) method: one normalised gradient step, projected.

  ``x_adv = Proj(x0 + a * step(grad_x L(x0, y)))`` with ``x0 = x`` (``a = eps`` by default: the
  classic FGSM, ``x + eps * sign(g)`` for Linf) or, with ``random_start``, ``x0`` uniform in the
  ball (the "FGSM with random start" of fast adversarial training, where ``a = 1.25 eps`` is
  usual).

  Args:
    logits_fn: ``(B, H, W, C)`` in ``[0, 1]`` -> logits ``(B, K)``, inference mode; its arrays
      are traced (:func:`krylov_adv.attacks.toolkit.as_model`).
    x: ``(B, H, W, C)`` float images in ``[0, 1]``. y: ``(B,)`` int labels. key: PRNG key (used
      with ``random_start`` and for a randomized model's draws).
    eps: budget ``>= 0``. norm: ``"linf" | "l2" | "l1"`` (L1: the sparse sign step of
      :func:`krylov_adv.projections.l1_sparse_sign`, top 1% of ``|g|``).
    step_size: ``a`` (default ``eps``). random_start: start from a random point of the ball.
    loss: ``"ce" | "dlr"``. bounds: the input box ``(lo, hi)``, scalars or arrays broadcastable
      to ``x`` (default ``(0, 1)``; :func:`krylov_adv.attacks.checks.check_bounds`).
    eot_samples: for a randomized model (``attacks.stochastic``), draws the gradient is
      averaged over (EoT, module docstring); ``> 1`` needs a randomized model.

  Returns:
    ``x_adv`` of ``x``'s shape and dtype, ``||x_adv_i - x_i|| <= eps``, ``lo <= x_adv <= hi``.
  """
  x, y, _, _, bounds = toolkit.validate_inputs(logits_fn, x, y, eps, norm, loss=loss,
                                               bounds=bounds)
  if step_size is None:
    step_size = eps
  checks.check_nonnegative("step_size", step_size)
  checks.check_eot_samples(logits_fn, eot_samples)
  return _fgsm_impl(logits_fn, x, y, key, eps, step_size, bounds, norm=norm, loss=loss,
                    random_start=bool(random_start), eot_samples=int(eot_samples))


# ----------------------------------------------------------------------------------------------
# PGD.


def pgd_run(loss_fn: LossFn, x: Array, x0: Array, eps, step_size, *, norm: str, steps: int,
            record=None, bounds=projections.DEFAULT_BOUNDS):
  """``steps`` iterations of ``x_{t+1} = Proj(x_t + a * step(grad L(x_t)))`` from ``x0``
  (:func:`krylov_adv.attacks.toolkit.ascend` on the gradient).

  Traceable; call it under ``jit``. ``x``, ``x0``: ``(B, ...)``; ``eps``, ``step_size``: scalars;
  ``bounds``: the box ``(lo, hi)``.
  Returns the last iterate ``(B, ...)``, or ``(x_last, records)`` with ``record``.
  """
  return toolkit.ascend(lambda _, xt: hvp.input_grad(loss_fn, xt), x, x0, eps, step_size,
                        norm=norm, steps=steps, record=record, bounds=bounds)


class PGDReport(NamedTuple):
  """The trace of a PGD run: :class:`krylov_adv.attacks.toolkit.StepRecord` fields of shape
  ``(restarts, steps + 1, B)`` for every iterate ``x_t`` of every restart (``t = 0`` the start)."""
  trace: toolkit.StepRecord

  def summary(self) -> str:
    """A few lines: accuracy, loss and gradient norm at the start and the end, per restart."""
    return summaries.trace_summary(self)

  def __repr__(self) -> str:  # one line, not the arrays (krylov_adv.attacks.summaries)
    return summaries.trace_repr(self)


@functools.partial(jax.jit, static_argnames=("norm", "steps", "restarts",
                                             "random_start", "loss", "trace", "eot_samples"))
def _pgd_impl(logits_fn: LogitsFn, x: Array, y: Array, key: Array, eps, step_size, bounds, *,
              norm: str, steps: int, restarts: int, random_start: bool, loss: str,
              trace: bool, eot_samples: int = 1):
  eps = jnp.asarray(eps, x.dtype)
  step_size = jnp.asarray(step_size, x.dtype)
  loss_fn = toolkit.make_loss_fn(logits_fn, y, loss)
  record = toolkit.step_record(logits_fn, y, loss) if trace else None
  stochastic = _eot.is_stochastic(logits_fn)

  def one_restart(carry, restart_key):
    x_best, loss_best, fooled_best = carry
    x0 = toolkit.ball_start(restart_key, x, eps, norm, bounds) if random_start else x
    if stochastic:
      # EoT gradients at iterates t < steps; the trace and the choice between restarts at one
      # more draw (t = steps), fixed over the restart.
      draw_keys = _draw_keys(restart_key, x)
      judged = _eot.Drawn(logits_fn, _eot.fold(draw_keys, steps))
      out = toolkit.ascend(_gradient(logits_fn, y, loss, draw_keys, eot_samples), x, x0, eps,
                           step_size, norm=norm, steps=steps,
                           record=toolkit.step_record(judged, y, loss) if trace else None,
                           bounds=bounds)
    else:
      judged = logits_fn
      out = pgd_run(loss_fn, x, x0, eps, step_size, norm=norm, steps=steps, record=record,
                    bounds=bounds)
    x_r, recs = out if trace else (out, None)
    logits = judged(x_r)
    loss_r = toolkit.make_loss_fn(lambda _: logits, y, loss)(x_r)
    fooled_r = jnp.argmax(logits, axis=1) != y
    # Per example: the first restart that misclassifies wins; until one does, the highest loss.
    take = (fooled_r & ~fooled_best) | (~fooled_r & ~fooled_best & (loss_r > loss_best))
    return (toolkit.select(take, x_r, x_best), jnp.where(take, loss_r, loss_best),
            fooled_best | fooled_r), recs

  init = (x, jnp.full(y.shape, -jnp.inf, x.dtype), jnp.zeros(y.shape, bool))
  (x_adv, _, _), recs = lax.scan(one_restart, init, jax.random.split(key, restarts))
  return toolkit.WithReport(x_adv, PGDReport(recs) if trace else None)


def _pgd(logits_fn, x, y, key, *, eps, norm, steps, step_size, random_start, restarts, loss,
         trace, bounds, eot_samples=1):
  x, y, _, _, bounds = toolkit.validate_inputs(logits_fn, x, y, eps, norm, loss=loss,
                                               bounds=bounds)
  checks.check_at_least("steps", steps, 1)
  checks.check_at_least("restarts", restarts, 1)
  checks.check_eot_samples(logits_fn, eot_samples)
  if step_size is None:
    step_size = toolkit.default_step_size(eps, steps)
  checks.check_nonnegative("step_size", step_size)
  return _pgd_impl(logits_fn, x, y, key, eps, step_size, bounds, norm=norm, steps=int(steps),
                   restarts=int(restarts), random_start=bool(random_start), loss=loss,
                   trace=trace, eot_samples=int(eot_samples))


@register("pgd")
@toolkit.attack_entry
@_eot.supports_randomized
def pgd(logits_fn: LogitsFn, x, y, key, *, eps, norm: str, steps: int = 10, step_size=None,
        random_start: bool = True, restarts: int = 1, loss: str = "ce", bounds=None,
        eot_samples: int = 1) -> Array:
  """Projected gradient ascent (Madry et al. 2018) with random restarts.

  Each restart runs ``x_{t+1} = Proj(x_t + a * step(grad_x L(x_t, y)))`` for ``steps``
  iterations from ``x_0`` uniform in the ball (or ``x`` without ``random_start``) and keeps its
  last iterate. Across restarts (a ``lax.scan``) each example keeps the first restart whose
  result is misclassified, and otherwise the one with the highest loss.

  Args:
    logits_fn: ``(B, H, W, C)`` in ``[0, 1]`` -> logits ``(B, K)``, inference mode (arrays traced,
      :func:`toolkit.as_model`).
    x: ``(B, H, W, C)`` float images in ``[0, 1]``. y: ``(B,)`` int labels. key: PRNG key.
    eps: budget ``>= 0``. norm: ``"linf" | "l2" | "l1"`` (L1: the sparse sign step of
      :func:`krylov_adv.projections.l1_sparse_sign` and the exact projection onto the L1 ball
      intersected with the box).
    steps: iterations per restart (>= 1). step_size: ``a`` (default ``2.5 eps / steps``).
    random_start: start each restart at a uniform point of the ball. restarts: >= 1.
    loss: ``"ce" | "dlr"``. bounds: the input box ``(lo, hi)`` (default ``(0, 1)``).
    eot_samples: for a randomized model (``attacks.stochastic``), draws each gradient is
      averaged over (EoT, module docstring; ``steps * restarts * eot_samples`` gradients);
      ``> 1`` needs a randomized model.

  Returns:
    ``x_adv`` of ``x``'s shape and dtype, ``||x_adv_i - x_i|| <= eps``, ``lo <= x_adv <= hi``.
  """
  return _pgd(logits_fn, x, y, key, eps=eps, norm=norm, steps=steps, step_size=step_size,
              random_start=random_start, restarts=restarts, loss=loss, trace=False,
              bounds=bounds, eot_samples=eot_samples).x_adv


@toolkit.report_entry
@_eot.supports_randomized
def pgd_with_report(logits_fn: LogitsFn, x, y, key, **hyperparameters) -> toolkit.WithReport:
  """:func:`pgd` and its per-iterate trace: ``WithReport(x_adv, PGDReport)``, ``x_adv`` the same
  as :func:`pgd`'s; takes :func:`pgd`'s keyword arguments, with its defaults. The trace costs
  one extra gradient per iterate (the S-O paper's Fig. 1 is drawn from it,
  ``experiments/grad_norms.py``)."""
  return _pgd(logits_fn, x, y, key, trace=True,
              **toolkit.keyword_arguments(pgd, hyperparameters))
