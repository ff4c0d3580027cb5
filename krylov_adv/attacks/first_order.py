"""First-order attacks: FGSM and PGD with random restarts, and the helpers every attack in
``first_order``, ``soae`` and ``second_order`` shares (input validation, the attacked loss).

* FGSM (Goodfellow et al. 2015; SOAE paper Sec. II): ``x_adv = Proj(x + eps * step(grad L(x)))``.
* PGD (Madry et al. 2018; SOAE paper Sec. II, S-O paper Eq. 2):
  ``x_{t+1} = Proj(x_t + a * step(grad L(x_t)))`` from a random point of the ball.

``step`` is :func:`krylov_adv.projections.normalize_step` (``sign`` for Linf, the unit L2 vector
for L2) and ``Proj`` is :func:`krylov_adv.projections.project` (the eps-ball, then the box
``[0, 1]``), so every result is inside the threat model.

Examples never interact: the model is in inference mode, so the gradient of the summed loss
w.r.t. the batch holds every example's own gradient (block-diagonal assumption of
:mod:`krylov_adv.hvp`).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from krylov_adv import hvp, losses, projections
from krylov_adv.attacks import checks, register

Array = jax.Array
LogitsFn = Callable[[Array], Array]
LossFn = Callable[[Array], Array]

LOSSES = ("ce", "dlr")


# ----------------------------------------------------------------------------------------------
# Shared helpers.


def validate_inputs(logits_fn: LogitsFn, x, y, eps, norm: str, *,
                    loss: str = "ce") -> tuple[Array, Array, int]:
  """Checks an attack's input and returns ``(x, y, K)`` as arrays.

  Raises ``ValueError`` for an unknown norm or loss, ``eps < 0``, a non-float ``x``, mismatched
  batch sizes, labels outside ``[0, K)``, and ``x`` that is non-finite or outside ``[0, 1]``
  (value checks only when the arrays are concrete, see :mod:`krylov_adv.attacks.checks`).

  Args:
    logits_fn: ``(B, ...) -> (B, K)``; only its abstract output shape is evaluated.
    x: ``(B, H, W, C)`` float images. y: ``(B,)`` int labels. eps: budget. norm: ``"linf" |
      "l2"``. loss: ``"ce" | "dlr"`` (DLR needs ``K >= 3``).
  """
  x = jnp.asarray(x)
  y = jnp.asarray(y)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"x must be a floating-point array, got dtype {x.dtype}")
  if loss not in LOSSES:
    raise ValueError(f"unknown loss {loss!r}; use one of {LOSSES}")
  checks.check_attack_inputs(x, y, eps, norm)
  out = jax.eval_shape(logits_fn, jax.ShapeDtypeStruct(x.shape, x.dtype))
  if len(out.shape) != 2 or out.shape[0] != x.shape[0]:
    raise ValueError(f"logits_fn must map (B, ...) to logits (B, K), got shape {out.shape}")
  k = int(out.shape[1])
  checks.check_attack_inputs(x, y, eps, norm, num_classes=k)
  if loss == "dlr" and k < 3:
    raise ValueError(f"the DLR loss needs at least 3 classes, got K={k}")
  return x, y, k


def make_loss_fn(logits_fn: LogitsFn, y: Array, loss: str = "ce") -> LossFn:
  """The per-example loss the attacks ascend, as a function of the input batch.

  ``"ce"``: ``-log softmax(f(x))_y``; ``"dlr"``: the untargeted DLR loss (Croce and Hein 2020,
  Eq. 6). Returns ``loss_fn: (B, ...) -> (B,)``.
  """
  if loss == "ce":
    return lambda z: losses.cross_entropy(logits_fn(z), y)
  if loss == "dlr":
    return lambda z: losses.dlr_loss(logits_fn(z), y)
  raise ValueError(f"unknown loss {loss!r}; use one of {LOSSES}")


def check_nonnegative(name: str, value) -> None:
  """Raises ``ValueError`` unless the (concrete) hyperparameter ``value`` is a number >= 0."""
  if checks.is_concrete(value) and not float(np.asarray(value)) >= 0:
    raise ValueError(f"{name} must be >= 0, got {value}")


def pgd_step_size(eps, steps: int):
  """Madry et al.'s rule of thumb ``a = 2.5 eps / steps``: enough to cross the ball and still
  move along its boundary."""
  return 2.5 * eps / steps


# ----------------------------------------------------------------------------------------------
# FGSM.


@functools.partial(jax.jit, static_argnames=("logits_fn", "norm", "loss", "random_start"))
def _fgsm_impl(logits_fn: LogitsFn, x: Array, y: Array, key: Array, eps, step_size, *,
               norm: str, loss: str, random_start: bool) -> Array:
  eps = jnp.asarray(eps, x.dtype)
  step_size = jnp.asarray(step_size, x.dtype)
  loss_fn = make_loss_fn(logits_fn, y, loss)
  x0 = projections.random_start(key, x, eps, norm) if random_start else x
  g = hvp.input_grad(loss_fn, x0)
  return projections.project(x0 + step_size * projections.normalize_step(g, norm), x, eps, norm)


@register("fgsm")
def fgsm(logits_fn: LogitsFn, x, y, key, *, eps, norm: str, step_size=None,
         random_start: bool = False, loss: str = "ce") -> Array:
  """Fast gradient (sign) method: one normalised gradient step, projected.

  ``x_adv = Proj(x0 + a * step(grad_x L(x0, y)))`` with ``x0 = x`` (``a = eps`` by default: the
  classic FGSM, ``x + eps * sign(g)`` for Linf) or, with ``random_start``, ``x0`` uniform in the
  ball (the "FGSM with random start" of fast adversarial training, where ``a = 1.25 eps`` is
  usual).

  Args:
    logits_fn: ``(B, H, W, C)`` in ``[0, 1]`` -> logits ``(B, K)``, inference mode; hashable
      (it is a static argument of the jitted core).
    x: ``(B, H, W, C)`` float images in ``[0, 1]``. y: ``(B,)`` int labels. key: PRNG key (used
      only with ``random_start``).
    eps: budget ``>= 0``. norm: ``"linf" | "l2"``.
    step_size: ``a`` (default ``eps``). random_start: start from a random point of the ball.
    loss: ``"ce" | "dlr"``.

  Returns:
    ``x_adv`` of ``x``'s shape and dtype, ``||x_adv_i - x_i|| <= eps``, ``0 <= x_adv <= 1``.
  """
  x, y, _ = validate_inputs(logits_fn, x, y, eps, norm, loss=loss)
  if step_size is None:
    step_size = eps
  check_nonnegative("step_size", step_size)
  return _fgsm_impl(logits_fn, x, y, key, eps, step_size, norm=norm, loss=loss,
                    random_start=bool(random_start))


# ----------------------------------------------------------------------------------------------
# PGD.


def pgd_run(loss_fn: LossFn, x: Array, x0: Array, eps, step_size, *, norm: str,
            steps: int) -> Array:
  """``steps`` iterations of ``x_{t+1} = Proj(x_t + a * step(grad L(x_t)))`` from ``x0``.

  Traceable (a ``lax.fori_loop``); call it under ``jit``. ``x``, ``x0``: ``(B, ...)``; ``eps``,
  ``step_size``: scalars. Returns the last iterate ``(B, ...)``.
  """

  def body(_, xt):
    g = hvp.input_grad(loss_fn, xt)
    return projections.project(xt + step_size * projections.normalize_step(g, norm), x, eps,
                               norm)

  return lax.fori_loop(0, steps, body, x0)


@functools.partial(jax.jit, static_argnames=("logits_fn", "norm", "steps", "restarts",
                                             "random_start", "loss"))
def _pgd_impl(logits_fn: LogitsFn, x: Array, y: Array, key: Array, eps, step_size, *,
              norm: str, steps: int, restarts: int, random_start: bool, loss: str) -> Array:
  eps = jnp.asarray(eps, x.dtype)
  step_size = jnp.asarray(step_size, x.dtype)
  loss_fn = make_loss_fn(logits_fn, y, loss)
  bcast = lambda m, a: m.reshape((-1,) + (1,) * (a.ndim - 1))

  def one_restart(carry, restart_key):
    x_best, loss_best, fooled_best = carry
    x0 = projections.random_start(restart_key, x, eps, norm) if random_start else x
    x_r = pgd_run(loss_fn, x, x0, eps, step_size, norm=norm, steps=steps)
    logits = logits_fn(x_r)
    loss_r = make_loss_fn(lambda _: logits, y, loss)(x_r)
    fooled_r = jnp.argmax(logits, axis=1) != y
    # Per example: the first restart that misclassifies wins; until one does, the highest loss.
    take = (fooled_r & ~fooled_best) | (~fooled_r & ~fooled_best & (loss_r > loss_best))
    return (jnp.where(bcast(take, x), x_r, x_best), jnp.where(take, loss_r, loss_best),
            fooled_best | fooled_r), None

  init = (x, jnp.full(y.shape, -jnp.inf, x.dtype), jnp.zeros(y.shape, bool))
  (x_adv, _, _), _ = lax.scan(one_restart, init, jax.random.split(key, restarts))
  return x_adv


@register("pgd")
def pgd(logits_fn: LogitsFn, x, y, key, *, eps, norm: str, steps: int = 10, step_size=None,
        random_start: bool = True, restarts: int = 1, loss: str = "ce") -> Array:
  """Projected gradient ascent (Madry et al. 2018) with random restarts.

  Each restart runs ``x_{t+1} = Proj(x_t + a * step(grad_x L(x_t, y)))`` for ``steps``
  iterations from ``x_0`` uniform in the ball (or ``x`` without ``random_start``) and keeps its
  last iterate. Across restarts (a ``lax.scan``) each example keeps the first restart whose
  result is misclassified, and otherwise the one with the highest loss.

  Args:
    logits_fn: ``(B, H, W, C)`` in ``[0, 1]`` -> logits ``(B, K)``, inference mode; hashable.
    x: ``(B, H, W, C)`` float images in ``[0, 1]``. y: ``(B,)`` int labels. key: PRNG key.
    eps: budget ``>= 0``. norm: ``"linf" | "l2"``.
    steps: iterations per restart (>= 1). step_size: ``a`` (default ``2.5 eps / steps``).
    random_start: start each restart at a uniform point of the ball. restarts: >= 1.
    loss: ``"ce" | "dlr"``.

  Returns:
    ``x_adv`` of ``x``'s shape and dtype, ``||x_adv_i - x_i|| <= eps``, ``0 <= x_adv <= 1``.
  """
  x, y, _ = validate_inputs(logits_fn, x, y, eps, norm, loss=loss)
  checks.check_at_least("steps", steps, 1)
  checks.check_at_least("restarts", restarts, 1)
  if step_size is None:
    step_size = pgd_step_size(eps, steps)
  check_nonnegative("step_size", step_size)
  return _pgd_impl(logits_fn, x, y, key, eps, step_size, norm=norm, steps=int(steps),
                   restarts=int(restarts), random_start=bool(random_start), loss=loss)
