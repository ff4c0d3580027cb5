"""The S-O ("second order") attack of the S-O paper (Sec. 4, Eqs. 3-4 and Appendix A).

Adversarially trained models tend to have a flat loss around the data (the gradient nearly
vanishes), so ``L(x + r) - L(x) ~ r^T H r / 2`` and the best direction is the dominant
eigenvector of the input Hessian ``H``. One power iteration with a finite difference
(Miyato et al. 2017; paper Appendix A) approximates it by the gradient at a randomly displaced
point, and the paper averages it over Gaussian displacements:

* ``form="expectation"`` (Eq. 4): ``g_t = mean_{s=1..S} grad L(x_t + d_s)``,
  ``d_s ~ N(0, sigma^2 I)``;
* ``form="power"`` (Eq. 3): ``g_t = grad L(x_t + xi d)`` with a single unit ``d``
  (``d = u / ||u||_2``, ``u ~ N(0, I)``).

The update is PGD on ``g_t`` (Eq. 4): ``x_{t+1} = Proj(x_t + a g_t / ||g_t||_2)`` for L2, and
the sign step ``Proj(x_t + a sign(g_t))`` for Linf (for L1, not in the paper, the sparse sign
step of :func:`krylov_adv.projections.l1_sparse_sign`). Fresh noise is drawn at every iteration.
The displaced points ``x_t + d`` are not clipped to the box ``bounds`` (default ``[0, 1]``): they
only probe the loss surface (the paper does not clip either); the iterates themselves always
are.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from krylov_adv import hvp, projections
from krylov_adv.attacks import checks, register, summaries, toolkit
from krylov_adv.attacks.toolkit import Array, LogitsFn, LossFn

FORMS = ("expectation", "power")


def smoothed_gradient(loss_fn: LossFn, x: Array, key: Array, *, form: str = "expectation",
                      samples: int = 8, sigma=0.05, xi=None) -> Array:
  """The S-O attack's ascent direction before normalisation (S-O paper Eqs. 3-4).

  ``form="expectation"``: ``mean_s grad L(x + d_s)`` over ``samples`` draws
  ``d_s ~ N(0, sigma^2 I)`` (one draw per example and sample); the draws are evaluated as one
  ``vmap``-ed batch, so memory grows with ``samples``. ``form="power"``: ``grad L(x + xi d)``
  with one unit-L2 Gaussian direction ``d`` per example (``samples`` is ignored); ``xi``
  defaults to ``sigma * sqrt(n)`` (``n`` the input size per example), the typical length of a
  ``N(0, sigma^2 I)`` draw, so both forms probe the loss at the same distance (the paper notes
  that choosing ``sigma`` is choosing ``xi``).

  Traceable; call it under ``jit``.

  Args:
    loss_fn: ``(B, ...) -> (B,)`` per-example loss, model in inference mode.
    x: ``(B, ...)`` float. key: PRNG key.
    form: ``"expectation" | "power"``. samples: ``S >= 1``. sigma: noise standard deviation
      ``>= 0`` (per coordinate). xi: power-form displacement ``> 0`` or ``None``.

  Returns:
    ``(B, ...)`` array of ``x``'s dtype.
  """
  if form == "expectation":
    def grad_at_noise(k):
      d = sigma * jax.random.normal(k, x.shape, x.dtype)
      return hvp.input_grad(loss_fn, x + d)

    return jnp.mean(jax.vmap(grad_at_noise)(jax.random.split(key, samples)), axis=0)
  if form == "power":
    if xi is None:
      xi = sigma * jnp.sqrt(jnp.asarray(x[0].size, x.dtype))
    d = projections.normalize_step(jax.random.normal(key, x.shape, x.dtype), "l2")
    return hvp.input_grad(loss_fn, x + jnp.asarray(xi, x.dtype) * d)
  raise ValueError(f"unknown S-O form {form!r}; use one of {FORMS}")


class SecondOrderReport(NamedTuple):
  """The trace of an S-O run: :class:`krylov_adv.attacks.toolkit.StepRecord` fields of shape
  ``(steps + 1, B)`` for every iterate ``x_t`` (``t = 0`` the start)."""
  trace: toolkit.StepRecord

  def summary(self) -> str:
    """A few lines: accuracy, loss and gradient norm at the start and after the last step."""
    return summaries.trace_summary(self)

  def __repr__(self) -> str:  # one line, not the arrays (krylov_adv.attacks.summaries)
    return summaries.trace_repr(self)


@functools.partial(jax.jit, static_argnames=("norm", "steps", "samples", "form",
                                             "random_start", "loss", "trace"))
def _second_order_impl(logits_fn: LogitsFn, x: Array, y: Array, key: Array, eps, step_size,
                       sigma, xi, bounds, *, norm: str, steps: int, samples: int, form: str,
                       random_start: bool, loss: str, trace: bool):
  eps = jnp.asarray(eps, x.dtype)
  step_size = jnp.asarray(step_size, x.dtype)
  sigma = jnp.asarray(sigma, x.dtype)
  loss_fn = toolkit.make_loss_fn(logits_fn, y, loss)
  start_key, noise_key = jax.random.split(key)
  x0 = toolkit.ball_start(start_key, x, eps, norm, bounds) if random_start else x

  def direction(t, xt):
    return smoothed_gradient(loss_fn, xt, jax.random.fold_in(noise_key, t), form=form,
                             samples=samples, sigma=sigma, xi=xi)

  record = toolkit.step_record(logits_fn, y, loss) if trace else None
  out = toolkit.ascend(direction, x, x0, eps, step_size, norm=norm, steps=steps, record=record,
                       bounds=bounds)
  if trace:
    return toolkit.WithReport(out[0], SecondOrderReport(out[1]))
  return toolkit.WithReport(out, None)


def _second_order(logits_fn, x, y, key, *, eps, norm, steps, step_size, samples, sigma, form,
                  xi, random_start, loss, trace, bounds):
  x, y, _, _, bounds = toolkit.validate_inputs(logits_fn, x, y, eps, norm, loss=loss,
                                               bounds=bounds)
  checks.check_at_least("steps", steps, 1)
  checks.check_at_least("samples", samples, 1)
  checks.check_nonnegative("sigma", sigma)
  checks.check_choice("S-O form", form, FORMS)
  if xi is not None:
    checks.check_positive("xi", xi)
  if step_size is None:
    step_size = toolkit.default_step_size(eps, steps)
  checks.check_nonnegative("step_size", step_size)
  return _second_order_impl(logits_fn, x, y, key, eps, step_size, sigma, xi, bounds, norm=norm,
                            steps=int(steps), samples=int(samples), form=form,
                            random_start=bool(random_start), loss=loss, trace=trace)


@register("second_order")
@toolkit.attack_entry
def second_order(logits_fn: LogitsFn, x, y, key, *, eps, norm: str, steps: int = 20,
                 step_size=None, samples: int = 8, sigma=0.05, form: str = "expectation",
                 xi=None, random_start: bool = False, loss: str = "ce", bounds=None) -> Array:
  """The S-O attack (S-O paper Eq. 4): PGD on the Gaussian-smoothed gradient.

  ``x_{t+1} = Proj(x_t + a * step(g_t))``, ``t = 0..steps-1``, ``x_0 = x``, with ``g_t`` from
  :func:`smoothed_gradient` (``form="expectation"``: Eq. 4's average over ``samples`` draws of
  ``N(0, sigma^2 I)``; ``form="power"``: Eq. 3, the gradient at ``x_t + xi d`` for one random
  unit ``d``), and ``step`` the unit-L2 vector (Eq. 4) or, for Linf, the sign. The paper gives
  no values for ``sigma``, ``samples`` or the step; the defaults here are ours (the configs set
  them explicitly). With ``samples=1`` and ``sigma=0`` this is PGD without random start.

  Args:
    logits_fn: ``(B, H, W, C)`` in ``[0, 1]`` -> logits ``(B, K)``, inference mode (arrays traced,
      :func:`toolkit.as_model`).
    x: ``(B, H, W, C)`` float images in ``[0, 1]``. y: ``(B,)`` int labels. key: PRNG key.
    eps: budget ``>= 0``. norm: ``"linf" | "l2" | "l1"``.
    steps: iterations ``>= 1``. step_size: ``a`` (default ``2.5 eps / steps``).
    samples: Gaussian draws per iteration ``>= 1`` (expectation form). sigma: their standard
      deviation ``>= 0``. form: ``"expectation" | "power"``. xi: the power form's displacement
      ``> 0`` (default ``sigma * sqrt(n)``). random_start: start at a uniform point of the ball
      (not in the paper). loss: ``"ce" | "dlr"``. bounds: the input box ``(lo, hi)`` (default
      ``(0, 1)``).

  Returns:
    ``x_adv`` of ``x``'s shape and dtype, ``||x_adv_i - x_i|| <= eps``, ``lo <= x_adv <= hi``.
  """
  return _second_order(logits_fn, x, y, key, eps=eps, norm=norm, steps=steps,
                       step_size=step_size, samples=samples, sigma=sigma, form=form, xi=xi,
                       random_start=random_start, loss=loss, trace=False, bounds=bounds).x_adv


@toolkit.report_entry
def second_order_with_report(logits_fn: LogitsFn, x, y, key,
                             **hyperparameters) -> toolkit.WithReport:
  """:func:`second_order` and its per-iterate trace: ``WithReport(x_adv, SecondOrderReport)``,
  ``x_adv`` the same as :func:`second_order`'s; takes :func:`second_order`'s keyword arguments,
  with its defaults (one extra gradient per iterate)."""
  return _second_order(logits_fn, x, y, key, trace=True,
                       **toolkit.keyword_arguments(second_order, hyperparameters))
