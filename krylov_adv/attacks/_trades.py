"""The TRADES adversary (Zhang et al. 2019, Algorithm 1 lines 5-7): ascent on the KL divergence
between the model's clean and adversarial predictions.

``x'_0 = Proj(x + 0.001 N(0, I))``, ``x'_{k+1} = Proj(x'_k + a * step(grad_x' KL(f(x) ||
f(x'_k))))`` with ``step`` the sign (Linf) or the unit L2 vector and ``Proj`` the eps-ball around
``x`` then the box ``[0, 1]`` (:func:`krylov_adv.attacks.toolkit.ascend`). The labels are not
used: the attack moves the prediction away from the clean one, whatever the class. It is the
inner maximisation of TRADES training (``krylov_adv.training``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from krylov_adv import losses, projections
from krylov_adv.attacks import checks, register, toolkit
from krylov_adv.attacks.toolkit import Array, LogitsFn


@functools.partial(jax.jit, static_argnames=("norm", "steps"))
def _trades_impl(logits_fn: LogitsFn, x: Array, key: Array, eps, step_size, bounds, *,
                 norm: str, steps: int) -> Array:
  clean_logits = jax.lax.stop_gradient(logits_fn(x))

  def kl_sum(xa):
    return jnp.sum(losses.kl_divergence(clean_logits, logits_fn(xa)))

  # The start's noise in units of the box's width (1 in [0, 1], TRADES' 0.001 N(0, I)).
  noise = 0.001 * projections.box_width(bounds, x) * jax.random.normal(key, x.shape, x.dtype)
  x0 = projections.project(x + noise, x, eps, norm, bounds)
  return toolkit.ascend(lambda _, xa: jax.grad(kl_sum)(xa), x, x0, eps, step_size, norm=norm,
                        steps=steps, bounds=bounds)


@register("trades")
@toolkit.attack_entry
def trades(logits_fn: LogitsFn, x, y, key, *, eps, norm: str, steps: int = 10,
           step_size=None, bounds=None) -> Array:
  """TRADES' adversarial example (Zhang et al. 2019, Algorithm 1 lines 5-7).

  Args:
    logits_fn: ``(B, H, W, C)`` in ``[0, 1]`` -> logits ``(B, K)``, inference mode (arrays traced,
      :func:`toolkit.as_model`).
    x: ``(B, H, W, C)`` float images in ``[0, 1]``. y: ``(B,)`` int labels (checked, unused).
    key: PRNG key of the Gaussian start. eps: budget ``>= 0``. norm: ``"linf" | "l2" | "l1"``
      (L1: the sparse sign step, :func:`krylov_adv.projections.l1_sparse_sign`).
    steps: iterations ``K >= 1``. step_size: ``a`` (default ``2.5 eps / steps``).
    bounds: the input box ``(lo, hi)`` (default ``(0, 1)``).

  Returns:
    ``x_adv`` of ``x``'s shape and dtype, ``||x_adv_i - x_i|| <= eps``, ``lo <= x_adv <= hi``.
  """
  x, _, _, _, bounds = toolkit.validate_inputs(logits_fn, x, y, eps, norm, bounds=bounds)
  checks.check_at_least("steps", steps, 1)
  if step_size is None:
    step_size = toolkit.default_step_size(eps, steps)
  checks.check_nonnegative("step_size", step_size)
  return _trades_impl(logits_fn, x, key, eps, step_size, bounds, norm=norm, steps=int(steps))
