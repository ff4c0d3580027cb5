"""Auto-PGD (APGD): step-size-free PGD with momentum and checkpoints.

Croce and Hein, ICML 2020, "Reliable evaluation of adversarial robustness with an ensemble of
diverse parameter-free attacks", Algorithm 1 (APGD), Sec. 3.2 (checkpoints and the two step-size
conditions), Sec. 4 (the DLR loss, Eq. 6, and its targeted form, Eq. 7). Hyperparameters follow
the paper and its reference implementation (fra31/auto-attack): 100 iterations, momentum
``alpha = 0.75``, initial step ``2 * eps``, ``rho = 0.75``, checkpoint fractions
``p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``.

Registered attacks: ``"apgd_ce"`` (cross-entropy), ``"apgd_dlr"`` (untargeted DLR) and
``"apgd_t"`` (targeted DLR over the 9 highest non-true classes, AutoAttack's APGD-T).

Randomness is drawn per example from ``fold_in(key, example_index)``, so an example's trajectory
does not depend on the rest of the batch (the AutoAttack ensemble relies on this when it re-runs
a component on the still-robust subset). Examples never interact: the model is in inference
mode, so the gradient of the summed loss w.r.t. the batch holds every example's own gradient.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from krylov_adv import losses, projections
from krylov_adv.attacks import checks, register

Array = jax.Array
LogitsFn = Callable[[Array], Array]

LOSSES = ("ce", "dlr")


# ----------------------------------------------------------------------------------------------
# Helpers shared by the AutoAttack components (apgd, fab, square, autoattack).


def example_keys(key: Array, example_index: Array) -> Array:
  """One PRNG key per example, ``fold_in(key, example_index[i])``; ``(B,)`` ints -> ``(B, ...)``.

  Keying randomness by the example's index (not its position in the batch) makes every attack
  in this package give an example the same result whatever else is in the batch.
  """
  return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.asarray(example_index))


def fold_keys(keys: Array, data) -> Array:
  """``fold_in(keys[i], data)`` for every per-example key: ``(B, ...)`` -> ``(B, ...)``."""
  return jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, data)


def num_classes(logits_fn: LogitsFn, x: Array) -> int:
  """``K`` from the abstract output shape of ``logits_fn`` on ``x`` (no FLOPs spent)."""
  out = jax.eval_shape(logits_fn, jax.ShapeDtypeStruct(x.shape, x.dtype))
  if len(out.shape) != 2 or out.shape[0] != x.shape[0]:
    raise ValueError(f"logits_fn must map (B, ...) to logits (B, K), got shape {out.shape}")
  return int(out.shape[1])


def validate(logits_fn: LogitsFn, x, y, eps, norm: str,
             example_index=None) -> tuple[Array, Array, Array, int]:
  """Checks attack input and returns ``(x, y, example_index, K)`` as arrays.

  Raises ``ValueError`` for a bad norm, ``eps < 0``, shape or dtype mismatches, NaN or
  out-of-box ``x``, labels outside ``[0, K)``, or an ``example_index`` of the wrong shape.
  """
  x = jnp.asarray(x)
  y = jnp.asarray(y)
  checks.check_attack_inputs(x, y, eps, norm)
  k = num_classes(logits_fn, x)
  checks.check_attack_inputs(x, y, eps, norm, num_classes=k)
  if example_index is None:
    example_index = jnp.arange(x.shape[0], dtype=jnp.int32)
  example_index = jnp.asarray(example_index)
  if example_index.shape != (x.shape[0],):
    raise ValueError(f"example_index must have shape ({x.shape[0]},), got {example_index.shape}")
  return x, y, example_index, k


def bcast(per_example: Array, like: Array) -> Array:
  """Reshapes ``(B,)`` to ``(B, 1, ..., 1)`` so it broadcasts against ``like``."""
  return per_example.reshape((-1,) + (1,) * (like.ndim - 1))


def select(mask: Array, a: Array, b: Array) -> Array:
  """Per-example ``where``: ``mask (B,)`` picks rows of ``a`` over ``b``."""
  return jnp.where(bcast(mask, a), a, b)


def target_order(logits: Array, y: Array) -> Array:
  """Non-true classes sorted by decreasing logit, ``(B, K - 1)``: column ``j`` is the target of
  the ``j``-th targeted run. For a correctly classified point these are the 2nd, 3rd, ... highest
  logits, AutoAttack's choice of targets."""
  masked = jnp.where(jax.nn.one_hot(y, logits.shape[1], dtype=bool), -jnp.inf, logits)
  return jnp.argsort(-masked, axis=1)[:, :-1]


# ----------------------------------------------------------------------------------------------
# Checkpoints (Sec. 3.2).


def checkpoint_fractions() -> tuple[float, ...]:
  """``p_j`` for ``p_j < 1``: ``p_0 = 0``, ``p_1 = 0.22``, ``p_{j+1} = p_j + max(p_j - p_{j-1} -
  0.03, 0.06)`` (APGD, Sec. 3.2). Computed in exact hundredths, then divided."""
  return tuple(h / 100 for h in _fractions_in_hundredths())


def _fractions_in_hundredths() -> list[int]:
  # Every increment is a whole number of hundredths; integers avoid ceil(0.41 * 100) == 42.
  out = [0, 22]
  while True:
    nxt = out[-1] + max(out[-1] - out[-2] - 3, 6)
    if nxt >= 100:
      return out
    out.append(nxt)


def apgd_checkpoints(n_iter: int) -> tuple[int, ...]:
  """Checkpoint iterations ``w_j = ceil(p_j * n_iter)`` for ``j >= 1``, strictly inside
  ``(0, n_iter)`` and without repeats (for tiny ``n_iter`` two ``p_j`` can round together).

  ``n_iter = 100`` gives ``(22, 41, 57, 70, 80, 87, 93, 99)``.
  """
  out = []
  for h in _fractions_in_hundredths()[1:]:
    w = -(-h * n_iter // 100)
    if 0 < w < n_iter and (not out or w > out[-1]):
      out.append(w)
  return tuple(out)


# ----------------------------------------------------------------------------------------------
# One APGD run (Algorithm 1).


class APGDRun(NamedTuple):
  """Result of one APGD run on a batch (``B`` examples).

  x_best: ``(B, ...)`` the highest-loss iterate ``x_max``.
  loss_best: ``(B,)`` its loss ``f_max``.
  x_adv: ``(B, ...)`` the last misclassified iterate (meaningful where ``fooled``).
  fooled: ``(B,)`` bool, some iterate was misclassified.
  loss_history: ``(n_iter + 1, B)`` ``f(x^{(k)})`` of each computed iterate ``k = 0..n_iter``.
  step_history: ``(n_iter + 1, B)`` step size ``eta^{(k)}`` in force after iterate ``k``.
  """
  x_best: Array
  loss_best: Array
  x_adv: Array
  fooled: Array
  loss_history: Array
  step_history: Array


def _per_example_loss(loss: str, targeted: bool, logits: Array, y: Array, target: Array) -> Array:
  if loss == "ce":
    # Targeted CE ("ce-targeted" in the reference code): ascend -CE towards the target class.
    return -losses.cross_entropy(logits, target) if targeted else losses.cross_entropy(logits, y)
  if targeted:
    return losses.dlr_targeted_loss(logits, y, target)
  return losses.dlr_loss(logits, y)


def initial_point(keys: Array, x: Array, eps, norm: str) -> Array:
  """APGD's random start ``x^{(0)}``: a point on the sphere of radius ``eps`` around ``x``
  (linf: ``eps * t / ||t||_inf`` with ``t ~ U[-1, 1]``; l2: ``eps * t / ||t||_2``, ``t ~ N(0, I)``),
  clipped to ``[0, 1]``. ``keys`` is ``(B, ...)`` per-example keys."""
  shape = x.shape[1:]
  if norm == "linf":
    t = jax.vmap(lambda k: jax.random.uniform(k, shape, x.dtype, -1.0, 1.0))(keys)
  else:
    t = jax.vmap(lambda k: jax.random.normal(k, shape, x.dtype))(keys)
  nrm = projections.per_example_norm(t, norm)
  delta = t * bcast(jnp.asarray(eps, x.dtype) / jnp.maximum(nrm, 1e-12), t)
  return jnp.clip(x + delta, 0.0, 1.0)


def apgd_run(logits_fn: LogitsFn, x: Array, y: Array, target: Array, x_init: Array, eps, *,
             norm: str, loss: str, targeted: bool, n_iter: int, rho: float) -> APGDRun:
  """One run of APGD (Algorithm 1) from ``x_init``; traceable, call it under ``jit``.

  With ``P`` the projection onto the eps-ball and box, ``s(g)`` = sign(g) (linf) or ``g/||g||_2``
  (l2) and ``alpha = 0.75`` (``1`` at the first step):
    ``z^{(k+1)} = P(x^{(k)} + eta^{(k)} s(grad f(x^{(k)})))``
    ``x^{(k+1)} = P(x^{(k)} + alpha (z^{(k+1)} - x^{(k)}) + (1 - alpha)(x^{(k)} - x^{(k-1)}))``
  with ``eta^{(0)} = 2 eps``. At a checkpoint ``w_j`` (:func:`apgd_checkpoints`) the step is
  halved and the iterate (and gradient) reset to ``x_max`` when
    1. fewer than ``rho * (w_j - w_{j-1})`` of the steps since ``w_{j-1}`` increased ``f``, or
    2. ``eta^{(w_{j-1})} == eta^{(w_j)}`` and ``f_max^{(w_{j-1})} == f_max^{(w_j)}``.
  At ``w_0 = 0`` condition 2 compares with ``f(x^{(0)})`` (the paper's statement; the reference
  code skips it at the first checkpoint).

  Args:
    logits_fn: ``(B, ...) -> (B, K)``.
    x: ``(B, ...)`` clean points; ``y``: ``(B,)`` labels; ``target``: ``(B,)`` target classes
      (used only when ``targeted``).
    x_init: ``(B, ...)`` the starting point ``x^{(0)}`` (inside the ball and box).
    eps: scalar budget. norm: ``"linf" | "l2"``. loss: ``"ce" | "dlr"``.
    targeted: targeted DLR (Eq. 7) / targeted CE instead of the untargeted loss.
    n_iter: iterations ``N_iter``. rho: the fraction in condition 1.

  Returns:
    :class:`APGDRun`.
  """
  bsz = x.shape[0]
  eps = jnp.asarray(eps, x.dtype)

  def total_loss(xb):
    logits = logits_fn(xb)
    per_ex = _per_example_loss(loss, targeted, logits, y, target)
    return jnp.sum(per_ex), (per_ex, logits)

  value_and_grad = jax.value_and_grad(total_loss, has_aux=True)

  def proj(z):
    return projections.project(z, x, eps, norm)

  ckpts = apgd_checkpoints(n_iter)
  is_ckpt = np.zeros(n_iter + 1, bool)
  interval = np.ones(n_iter + 1, np.float32)
  prev = 0
  for w in ckpts:
    is_ckpt[w] = True
    interval[w] = w - prev
    prev = w
  is_ckpt = jnp.asarray(is_ckpt)
  interval = jnp.asarray(interval)

  (_, (loss0, logits0)), grad0 = value_and_grad(x_init)
  fooled0 = jnp.argmax(logits0, axis=1) != y
  step0 = jnp.full((bsz,), 2.0, x.dtype) * eps
  hist = jnp.zeros((n_iter + 1, bsz), x.dtype)
  init = dict(
      x=x_init, x_prev=x_init, grad=grad0, loss_cur=loss0,
      x_best=x_init, grad_best=grad0, loss_best=loss0,
      x_adv=x_init, fooled=fooled0, step=step0,
      n_increase=jnp.zeros((bsz,), jnp.int32),
      loss_best_last=loss0, reduced_last=jnp.zeros((bsz,), bool),
      loss_history=hist.at[0].set(loss0), step_history=hist.at[0].set(step0))

  def body(i, c):
    alpha = jnp.where(i == 0, 1.0, 0.75).astype(x.dtype)
    z = proj(c["x"] + bcast(c["step"], x) * projections.normalize_step(c["grad"], norm))
    x_new = proj(c["x"] + alpha * (z - c["x"]) + (1.0 - alpha) * (c["x"] - c["x_prev"]))
    (_, (loss_new, logits)), grad_new = value_and_grad(x_new)

    miscl = jnp.argmax(logits, axis=1) != y
    x_adv = select(miscl, x_new, c["x_adv"])
    fooled = c["fooled"] | miscl

    improved = loss_new > c["loss_best"]
    x_best = select(improved, x_new, c["x_best"])
    grad_best = select(improved, grad_new, c["grad_best"])
    loss_best = jnp.where(improved, loss_new, c["loss_best"])
    n_increase = c["n_increase"] + (loss_new > c["loss_cur"]).astype(jnp.int32)

    k = i + 1  # index of the iterate just computed
    at_ckpt = is_ckpt[k]
    too_few_increases = n_increase.astype(x.dtype) < rho * interval[k]
    stalled = ~c["reduced_last"] & (c["loss_best_last"] >= loss_best)
    reduce = at_ckpt & (too_few_increases | stalled)

    step = jnp.where(reduce, 0.5 * c["step"], c["step"])
    return dict(
        x=select(reduce, x_best, x_new), x_prev=c["x"],
        grad=select(reduce, grad_best, grad_new),
        loss_cur=jnp.where(reduce, loss_best, loss_new),
        x_best=x_best, grad_best=grad_best, loss_best=loss_best,
        x_adv=x_adv, fooled=fooled, step=step,
        n_increase=jnp.where(at_ckpt, 0, n_increase),
        loss_best_last=jnp.where(at_ckpt, loss_best, c["loss_best_last"]),
        reduced_last=jnp.where(at_ckpt, reduce, c["reduced_last"]),
        loss_history=c["loss_history"].at[k].set(loss_new),
        step_history=c["step_history"].at[k].set(step))

  c = jax.lax.fori_loop(0, n_iter, body, init)
  return APGDRun(x_best=c["x_best"], loss_best=c["loss_best"], x_adv=c["x_adv"],
                 fooled=c["fooled"], loss_history=c["loss_history"],
                 step_history=c["step_history"])


# ----------------------------------------------------------------------------------------------
# Restarts and target classes.


@functools.partial(jax.jit, static_argnames=("logits_fn", "norm", "loss", "targeted", "n_iter",
                                             "n_restarts", "n_target_classes", "rho"))
def apgd_batch(logits_fn: LogitsFn, x: Array, y: Array, keys: Array, eps, *, norm: str,
               loss: str, targeted: bool, n_iter: int, n_restarts: int, n_target_classes: int,
               rho: float) -> tuple[Array, Array]:
  """Jitted APGD over restarts (and, if ``targeted``, target classes) with per-example keys.

  Runs are ordered target-major as in AutoAttack: for the ``t``-th target (:func:`target_order`
  on the clean logits, ``t = 0..n_target_classes-1``) every restart ``r`` starts from
  :func:`initial_point` with keys ``fold_in(keys_i, t * n_restarts + r)``. An example keeps the
  first misclassified point found; an example never fooled gets the highest-loss point over the
  runs. The loop stops early once every example is fooled.

  Args:
    logits_fn: ``(B, ...) -> (B, K)`` (static; a hashable function).
    x: ``(B, ...)`` in ``[0, 1]``; y: ``(B,)`` int; keys: ``(B, ...)`` per-example PRNG keys.
    eps: scalar budget (traced: changing it does not recompile).

  Returns:
    ``(x_adv (B, ...), fooled (B,) bool)``.
  """
  n_runs = n_restarts * (n_target_classes if targeted else 1)
  order = target_order(logits_fn(x), y)

  def cond(s):
    return (s["run"] < n_runs) & ~jnp.all(s["fooled"])

  def body(s):
    run = s["run"]
    rank = run // n_restarts
    target = jax.lax.dynamic_index_in_dim(order, rank, axis=1, keepdims=False)
    x0 = initial_point(fold_keys(keys, run), x, eps, norm)
    res = apgd_run(logits_fn, x, y, target, x0, eps, norm=norm, loss=loss, targeted=targeted,
                   n_iter=n_iter, rho=rho)
    newly = res.fooled & ~s["fooled"]
    better = ~s["fooled"] & ~res.fooled & (res.loss_best > s["loss_best"])
    x_out = select(newly, res.x_adv, select(better, res.x_best, s["x_out"]))
    return dict(run=run + 1, fooled=s["fooled"] | res.fooled, x_out=x_out,
                loss_best=jnp.where(better, res.loss_best, s["loss_best"]))

  init = dict(run=jnp.asarray(0, jnp.int32), fooled=jnp.zeros(y.shape, bool), x_out=x,
              loss_best=jnp.full(y.shape, -jnp.inf, x.dtype))
  s = jax.lax.while_loop(cond, body, init)
  return s["x_out"], s["fooled"]


def apgd(logits_fn: LogitsFn, x, y, key, *, eps, norm: str, loss: str = "ce",
         targeted: bool = False, n_iter: int = 100, n_restarts: int = 1,
         n_target_classes: int = 9, rho: float = 0.75, example_index=None) -> Array:
  """Auto-PGD (Croce and Hein 2020, Algorithm 1) with CE or DLR loss, untargeted or targeted.

  Targeted runs use the ``min(n_target_classes, K - 1)`` non-true classes with the highest
  clean logits (AutoAttack's APGD-T); targeted DLR is Eq. 7 of the paper, targeted CE
  ascends ``-CE(z, t)``.

  Args:
    logits_fn: ``(B, H, W, C)`` in ``[0, 1]`` -> logits ``(B, K)``, model in inference mode.
    x: ``(B, H, W, C)`` float images in ``[0, 1]``; y: ``(B,)`` int labels; key: PRNG key.
    eps: budget ``>= 0``. norm: ``"linf" | "l2"``. loss: ``"ce" | "dlr"``.
    targeted: run over target classes. n_iter: iterations per run (paper: 100).
    n_restarts: random restarts (per target). n_target_classes: targets (paper: 9).
    rho: checkpoint condition-1 fraction (paper: 0.75).
    example_index: ``(B,)`` ints keying each example's randomness (default ``arange(B)``).

  Returns:
    ``x_adv`` ``(B, H, W, C)``: the first misclassified point found per example, else the
    highest-loss point; ``||x_adv - x|| <= eps`` and ``0 <= x_adv <= 1``.
  """
  x, y, example_index, k = validate(logits_fn, x, y, eps, norm, example_index)
  if loss not in LOSSES:
    raise ValueError(f"unknown APGD loss {loss!r}; use one of {LOSSES}")
  checks.check_at_least("n_iter", n_iter, 1)
  checks.check_at_least("n_restarts", n_restarts, 1)
  checks.check_at_least("n_target_classes", n_target_classes, 1)
  if not 0.0 < rho <= 1.0:
    raise ValueError(f"rho must lie in (0, 1], got {rho}")
  if loss == "dlr" and k < (4 if targeted else 3):
    raise ValueError(f"{'targeted ' if targeted else ''}DLR needs at least "
                     f"{4 if targeted else 3} classes, got K={k}")
  if targeted and k < 2:
    raise ValueError("targeted attacks need at least 2 classes")
  x_adv, _ = apgd_batch(logits_fn, x, y, example_keys(key, example_index), eps, norm=norm,
                        loss=loss, targeted=bool(targeted), n_iter=int(n_iter),
                        n_restarts=int(n_restarts),
                        n_target_classes=int(min(n_target_classes, k - 1)), rho=float(rho))
  return x_adv


@register("apgd_ce")
def apgd_ce(logits_fn: LogitsFn, x, y, key, *, eps, norm: str, n_iter: int = 100,
            n_restarts: int = 1, rho: float = 0.75, example_index=None) -> Array:
  """APGD on the cross-entropy loss (AutoAttack's APGD-CE); see :func:`apgd`."""
  return apgd(logits_fn, x, y, key, eps=eps, norm=norm, loss="ce", n_iter=n_iter,
              n_restarts=n_restarts, rho=rho, example_index=example_index)


@register("apgd_dlr")
def apgd_dlr(logits_fn: LogitsFn, x, y, key, *, eps, norm: str, n_iter: int = 100,
             n_restarts: int = 1, rho: float = 0.75, example_index=None) -> Array:
  """APGD on the untargeted DLR loss (Eq. 6; AutoAttack+'s APGD-DLR); see :func:`apgd`."""
  return apgd(logits_fn, x, y, key, eps=eps, norm=norm, loss="dlr", n_iter=n_iter,
              n_restarts=n_restarts, rho=rho, example_index=example_index)


@register("apgd_t")
def apgd_t(logits_fn: LogitsFn, x, y, key, *, eps, norm: str, n_iter: int = 100,
           n_restarts: int = 1, n_target_classes: int = 9, rho: float = 0.75,
           example_index=None) -> Array:
  """APGD on the targeted DLR loss (Eq. 7) over the ``min(9, K-1)`` highest non-true classes
  (AutoAttack's APGD-T); see :func:`apgd`."""
  return apgd(logits_fn, x, y, key, eps=eps, norm=norm, loss="dlr", targeted=True,
              n_iter=n_iter, n_restarts=n_restarts, n_target_classes=n_target_classes, rho=rho,
              example_index=example_index)
