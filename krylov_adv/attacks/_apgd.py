"""Auto-PGD (APGD): step-size-free PGD with momentum and checkpoints.

Croce and Hein, ICML 2020, "Reliable evaluation of adversarial robustness with an ensemble of
diverse parameter-free attacks", Algorithm 1 (APGD), Sec. 3.2 (checkpoints and the two step-size
conditions), Sec. 4 (the DLR loss, Eq. 6, and its targeted form, Eq. 7). Hyperparameters follow
the paper and its reference implementation (fra31/auto-attack): 100 iterations, momentum
``alpha = 0.75``, initial step ``2 * eps``, ``rho = 0.75``, checkpoint fractions
``p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``.

L1 (Croce and Hein, ICCV 2021, "Mind the box: l1-APGD for sparse adversarial attacks on image
classifiers", as in the reference code): the step ``x + eta sign(g_S) / |S|`` on the set ``S`` of
the ``topk`` fraction of coordinates with the largest ``|g_i|``, projected exactly onto the L1
ball intersected with the box (:func:`krylov_adv.projections.project_l1_box`), no momentum,
initial step ``eta = eps``, and every ``max(int(0.04 steps), 1)`` iterations the sparsity
adaptation: with ``sp`` the number of nonzero coordinates of ``x_max - x``, ``topk <- sp / n /
1.5``; where ``sp`` fell below 0.95 of its value at the last check the step resets to ``eps`` and
the iterate to ``x_max``, elsewhere the step is divided by 1.5 (kept in ``[eps / 10, eps]``).
The start is a Gaussian point projected onto the ball and box (``topk = 0.2``). With
``use_largereps`` (AutoAttack's L1 setting) each run is three stages at ``3 eps, 2 eps, eps``
over 30%, 30% and 40% of the iterations, each starting from the previous stage's ``x_max``
projected onto the next ball (the first from a Gaussian point projected onto the ``3 eps`` ball),
with ``topk`` from the start's sparsity; only the last stage (radius ``eps``) decides which
points are fooled.

Registered attacks: ``"apgd_ce"`` (cross-entropy), ``"apgd_dlr"`` (untargeted DLR) and
``"apgd_t"`` (targeted DLR over the 9 highest non-true classes, AutoAttack's APGD-T).

Randomness is drawn per example from ``fold_in(key, example_index)``, so an example's trajectory
does not depend on the rest of the batch (the AutoAttack ensemble relies on this when it re-runs
a component on the still-robust subset). Examples never interact: the model is in inference
mode, so the gradient of the summed loss w.r.t. the batch holds every example's own gradient.

A randomized model (``attacks.stochastic``) is attacked with Expectation over Transformation as
in the reference (``eot_iter``): the gradient at each iterate is the mean over ``eot_samples``
draws, and the loss and logits of the last draw are the ones the step-size checkpoints and the
"misclassified" bookkeeping use (:func:`krylov_adv.attacks._eot.eot_value_and_grad`). Draw ``s``
at iterate ``k`` of run ``r`` of example ``i`` has the key
``fold_in(fold_in(fold_in(fold_in(k_i, DRAW_STREAM), r), k), s)`` with ``k_i`` the example's key;
APGD-T's target classes come from one draw of the clean logits (``CHECK_STREAM``), as the
reference's one forward pass. L1 takes the EoT gradient like the other norms (its sparse step is
on the averaged gradient; its sparsity checks read ``x_max``, not the draws); with
``use_largereps`` stage ``g > 0`` of a run draws from
``fold_in(fold_in(draw_keys_r, LARGEREPS_STAGE_STREAM), g)`` instead of the run's keys
``draw_keys_r``, since its iterate numbers restart at 0.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from krylov_adv import losses, projections
from krylov_adv.attacks import _eot, checks, register, toolkit
from krylov_adv.attacks.toolkit import Array, LogitsFn, select

MOMENTUM = 0.75  # the paper's alpha (Algorithm 1), 1 at the first step
# L1 (reference code): initial step eps (2 eps for Linf / L2), step divided by 1.5 at a check
# without sparsity reduction, kept in [eps / 10, eps]; a check every 4% of the iterations.
L1_STEP_FACTOR = 1.0
L1_STEP_DECAY = 1.5
L1_MIN_STEP_DIVISOR = 10.0
L1_CHECK_FRACTION = 0.04
L1_INITIAL_TOPK = 0.2
# use_largereps: radii 3 eps, 2 eps, eps over 30%, 30% and the rest of the iterations.
LARGEREPS_FACTORS = (3.0, 2.0, 1.0)
# fold_in tag of a use_largereps stage's draw keys (a randomized model, _stage_draw_keys);
# larger than any iterate number folded into the same keys.
LARGEREPS_STAGE_STREAM = 0x53_54_47  # "STG"


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


def apgd_checkpoints(steps: int) -> tuple[int, ...]:
  """Checkpoint iterations ``w_j = ceil(p_j * steps)`` for ``j >= 1``, strictly inside
  ``(0, steps)`` and without repeats (for tiny ``steps`` two ``p_j`` can round together).

  ``steps = 100`` gives ``(22, 41, 57, 70, 80, 87, 93, 99)``.
  """
  out = []
  for h in _fractions_in_hundredths()[1:]:
    w = -(-h * steps // 100)
    if 0 < w < steps and (not out or w > out[-1]):
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
  loss_history: ``(steps + 1, B)`` ``f(x^{(k)})`` of each computed iterate ``k = 0..steps``.
  step_history: ``(steps + 1, B)`` step size ``eta^{(k)}`` in force after iterate ``k``.
  """
  x_best: Array
  loss_best: Array
  x_adv: Array
  fooled: Array
  loss_history: Array
  step_history: Array


class APGDState(NamedTuple):
  """The loop state of :func:`apgd_run` after iterate ``k`` (all per example, ``B`` rows).

  x, x_prev: ``x^{(k)}``, ``x^{(k-1)}``; grad, loss_cur: gradient and loss at ``x``.
  x_best, grad_best, loss_best: ``x_max``, its gradient and ``f_max``.
  x_adv, fooled: the last misclassified iterate and whether there is one.
  step: ``eta^{(k)}``. n_increase: steps since the last checkpoint that increased ``f``.
  loss_best_last, reduced_last: ``f_max`` and whether the step was halved, at the last
  checkpoint. loss_history, step_history: ``(steps + 1, B)`` records.
  topk, sparsity_last: L1 only (unused otherwise): the fraction of coordinates of the sparse
  step, and the nonzero count of ``x_max - x`` at the last sparsity check, ``(B,)``.
  """
  x: Array
  x_prev: Array
  grad: Array
  loss_cur: Array
  x_best: Array
  grad_best: Array
  loss_best: Array
  x_adv: Array
  fooled: Array
  step: Array
  n_increase: Array
  loss_best_last: Array
  reduced_last: Array
  loss_history: Array
  step_history: Array
  topk: Array
  sparsity_last: Array


def _per_example_loss(loss: str, targeted: bool, logits: Array, y: Array, target: Array) -> Array:
  if loss == "ce":
    # Targeted CE ("ce-targeted" in the reference code): ascend -CE towards the target class.
    return -losses.cross_entropy(logits, target) if targeted else losses.cross_entropy(logits, y)
  if targeted:
    return losses.dlr_targeted_loss(logits, y, target)
  return losses.dlr_loss(logits, y)


def initial_point(keys: Array, x: Array, eps, norm: str,
                  bounds=projections.DEFAULT_BOUNDS) -> Array:
  """APGD's random start ``x^{(0)}``: a point on the sphere of radius ``eps`` around ``x``
  (:func:`krylov_adv.attacks.toolkit.sphere_start`), clipped to the box; for L1, ``x + t``
  with ``t ~ N(0, I)`` projected onto the L1 ball and box (reference code; ``t`` in units of the
  box's width, :func:`krylov_adv.projections.box_width`, 1 in ``[0, 1]``). ``keys`` is
  ``(B, ...)`` per-example keys."""
  if norm == "l1":
    t = jax.vmap(lambda k: jax.random.normal(k, x.shape[1:], x.dtype))(keys)
    t = t * projections.box_width(bounds, x)
    return projections.project_l1_box(x + t, x, eps, bounds)
  return toolkit.sphere_start(keys, x, eps, norm, bounds)


def _nonzero_count(d: Array) -> Array:
  """``(B,)`` the number of nonzero coordinates of each example of ``d`` (its L0 norm), float."""
  return jnp.sum(d.reshape(d.shape[0], -1) != 0, axis=1).astype(d.dtype)


def _l1_check_every(steps: int) -> int:
  return max(int(L1_CHECK_FRACTION * steps), 1)


def largereps_stages(steps: int) -> tuple[tuple[float, int], ...]:
  """``use_largereps``' stages ``((factor, iterations), ...)``: radii ``3, 2, 1`` times ``eps``
  over ``ceil(0.3 steps)``, ``ceil(0.3 steps)`` and the remaining iterations (reference
  ``perturb``); the last stage may have 0 iterations for ``steps < 4``."""
  first = -(-3 * steps // 10)
  iters = (first, first, steps - 2 * first)
  return tuple(zip(LARGEREPS_FACTORS, (max(i, 0) for i in iters)))


def _checkpoint_tables(steps: int) -> tuple[Array, Array]:
  """``is_ckpt (steps + 1,)`` bool and ``interval (steps + 1,)``: ``w_j - w_{j-1}`` at ``w_j``."""
  is_ckpt = np.zeros(steps + 1, bool)
  interval = np.ones(steps + 1, np.float32)
  prev = 0
  for w in apgd_checkpoints(steps):
    is_ckpt[w] = True
    interval[w] = w - prev
    prev = w
  return jnp.asarray(is_ckpt), jnp.asarray(interval)


def _initial_state(value_and_grad, x_init: Array, y: Array, eps, steps: int, *,
                   norm: str = "linf", x: Array | None = None,
                   sparse_init: bool = False) -> APGDState:
  """The state after iterate 0 (one gradient evaluation, ``value_and_grad(x_init, 0)``: see
  :func:`_value_and_grad_at`). L1: ``topk`` is 0.2 after a random start, or, with
  ``sparse_init`` (a stage of ``use_largereps``), the sparsity of ``x_init - x`` over ``1.5 n``."""
  (_, (loss0, logits0)), grad0 = value_and_grad(x_init, 0)
  bsz = x_init.shape[0]
  factor = L1_STEP_FACTOR if norm == "l1" else 2.0
  step0 = jnp.full((bsz,), factor, x_init.dtype) * eps
  n = x_init[0].size
  if norm == "l1" and sparse_init:
    sparsity = _nonzero_count(x_init - x)
    topk = sparsity / n / 1.5
  else:
    sparsity = jnp.full((bsz,), n, x_init.dtype)
    topk = jnp.full((bsz,), L1_INITIAL_TOPK, x_init.dtype)
  hist = jnp.zeros((steps + 1, bsz), x_init.dtype)
  return APGDState(
      x=x_init, x_prev=x_init, grad=grad0, loss_cur=loss0,
      x_best=x_init, grad_best=grad0, loss_best=loss0,
      x_adv=x_init, fooled=jnp.argmax(logits0, axis=1) != y, step=step0,
      n_increase=jnp.zeros((bsz,), jnp.int32),
      loss_best_last=loss0, reduced_last=jnp.zeros((bsz,), bool),
      loss_history=hist.at[0].set(loss0), step_history=hist.at[0].set(step0),
      topk=topk, sparsity_last=sparsity)


def _momentum_step(c: APGDState, i, x: Array, eps, norm: str,
                   bounds=projections.DEFAULT_BOUNDS) -> Array:
  """``z = P(x^(k) + eta s(g))``, ``x^(k+1) = P(x^(k) + a (z - x^(k)) + (1 - a)(x^(k) -
  x^(k-1)))`` with ``a = MOMENTUM`` (``1`` at the first step). L1: ``P(x^(k) + eta
  sign(g_S) / |S|)`` with ``S`` the top ``topk`` coordinates of ``|g|``, no momentum."""
  if norm == "l1":
    direction = projections.l1_sparse_sign(c.grad, 1.0 - c.topk)
    x_new = projections.project_l1_box(c.x + toolkit.bcast(c.step, c.x) * direction, x, eps,
                                       bounds)
    return toolkit.finite_or(x_new, c.x)
  alpha = jnp.where(i == 0, 1.0, MOMENTUM).astype(x.dtype)
  z = toolkit.ascent_step(c.x, c.grad, x, eps, c.step, norm, bounds)
  return projections.project(c.x + alpha * (z - c.x) + (1.0 - alpha) * (c.x - c.x_prev), x, eps,
                             norm, bounds)


def _checkpoint_reduce(c: APGDState, k, loss_best: Array, n_increase: Array, is_ckpt: Array,
                       interval: Array, rho: float) -> Array:
  """Whether iterate ``k`` is a checkpoint at which the step is halved (conditions 1 or 2)."""
  too_few_increases = n_increase.astype(loss_best.dtype) < rho * interval[k]
  stalled = ~c.reduced_last & (c.loss_best_last >= loss_best)
  return is_ckpt[k] & (too_few_increases | stalled)


def _value_and_grad(logits_fn: LogitsFn, y: Array, target: Array, *, loss: str, targeted: bool):
  """``x -> ((sum f, (f (B,), logits (B, K))), grad_x sum f)`` for the attacked loss ``f``."""

  def total_loss(xb):
    logits = logits_fn(xb)
    per_ex = _per_example_loss(loss, targeted, logits, y, target)
    return jnp.sum(per_ex), (per_ex, logits)

  return jax.value_and_grad(total_loss, has_aux=True)


def _value_and_grad_at(logits_fn: LogitsFn, y: Array, target: Array, *, loss: str,
                       targeted: bool, draw_keys: Array | None, eot_samples: int):
  """``(x, k) -> ((sum f, (f, logits)), grad)`` at iterate ``k``: :func:`_value_and_grad` of a
  deterministic model (``k`` unused); for a randomized one the EoT gradient over
  ``eot_samples`` draws keyed ``fold_in(draw_keys_i, k)`` and the last draw's loss and logits
  (the reference's ``eot_iter`` loop)."""
  if not _eot.is_stochastic(logits_fn):
    value_and_grad = _value_and_grad(logits_fn, y, target, loss=loss, targeted=targeted)
    return lambda xb, k: value_and_grad(xb)

  def value_and_grad_of(m):
    return _value_and_grad(m, y, target, loss=loss, targeted=targeted)

  return lambda xb, k: _eot.eot_value_and_grad(value_and_grad_of, logits_fn, xb,
                                               _eot.fold(draw_keys, k), eot_samples)


def _apgd_body(logits_fn: LogitsFn, x: Array, y: Array, target: Array, eps: Array, *, norm: str,
               loss: str, targeted: bool, steps: int, rho: float,
               bounds=projections.DEFAULT_BOUNDS, draw_keys: Array | None = None,
               eot_samples: int = 1):
  """``body(i, state) -> state``: iteration ``i`` of Algorithm 1 (one gradient evaluation;
  ``eot_samples`` of them, averaged, on a randomized model with per-run ``draw_keys``)."""
  value_and_grad = _value_and_grad_at(logits_fn, y, target, loss=loss, targeted=targeted,
                                      draw_keys=draw_keys, eot_samples=eot_samples)
  is_ckpt, interval = _checkpoint_tables(steps)
  n = x[0].size
  check_every = _l1_check_every(steps)
  top_step = L1_STEP_FACTOR * eps

  def l1_adapt(c: APGDState, k, x_best, x_new, grad_best, grad_new, loss_best, loss_new):
    """The L1 sparsity check (module docstring) after iterate ``k``."""
    at = (k % check_every) == 0
    sparsity = _nonzero_count(x_best - x)
    reduced = at & (sparsity < 0.95 * c.sparsity_last)
    step = jnp.where(reduced, top_step, c.step / L1_STEP_DECAY)
    step = jnp.where(at, jnp.clip(step, top_step / L1_MIN_STEP_DIVISOR, top_step), c.step)
    return dict(x=select(reduced, x_best, x_new), grad=select(reduced, grad_best, grad_new),
                loss_cur=jnp.where(reduced, loss_best, loss_new), step=step,
                topk=jnp.where(at, sparsity / n / 1.5, c.topk),
                sparsity_last=jnp.where(at, sparsity, c.sparsity_last))

  def body(i, c: APGDState) -> APGDState:
    x_new = _momentum_step(c, i, x, eps, norm, bounds)
    (_, (loss_new, logits)), grad_new = value_and_grad(x_new, i + 1)
    miscl = jnp.argmax(logits, axis=1) != y
    improved = loss_new > c.loss_best
    loss_best = jnp.where(improved, loss_new, c.loss_best)
    x_best = select(improved, x_new, c.x_best)
    grad_best = select(improved, grad_new, c.grad_best)
    n_increase = c.n_increase + (loss_new > c.loss_cur).astype(jnp.int32)
    k = i + 1  # index of the iterate just computed
    common = dict(x_prev=c.x, x_best=x_best, grad_best=grad_best, loss_best=loss_best,
                  x_adv=select(miscl, x_new, c.x_adv), fooled=c.fooled | miscl,
                  loss_history=c.loss_history.at[k].set(loss_new))
    if norm == "l1":
      upd = l1_adapt(c, k, x_best, x_new, grad_best, grad_new, loss_best, loss_new)
      return APGDState(**common, **upd, n_increase=n_increase,
                       loss_best_last=c.loss_best_last, reduced_last=c.reduced_last,
                       step_history=c.step_history.at[k].set(upd["step"]))
    at_ckpt = is_ckpt[k]
    reduce = _checkpoint_reduce(c, k, loss_best, n_increase, is_ckpt, interval, rho)
    step = jnp.where(reduce, 0.5 * c.step, c.step)
    return APGDState(
        **common, x=select(reduce, x_best, x_new),
        grad=select(reduce, grad_best, grad_new),
        loss_cur=jnp.where(reduce, loss_best, loss_new), step=step,
        n_increase=jnp.where(at_ckpt, 0, n_increase),
        loss_best_last=jnp.where(at_ckpt, loss_best, c.loss_best_last),
        reduced_last=jnp.where(at_ckpt, reduce, c.reduced_last),
        step_history=c.step_history.at[k].set(step), topk=c.topk,
        sparsity_last=c.sparsity_last)

  return body


def _result(c: APGDState) -> APGDRun:
  return APGDRun(x_best=c.x_best, loss_best=c.loss_best, x_adv=c.x_adv, fooled=c.fooled,
                 loss_history=c.loss_history, step_history=c.step_history)


def apgd_run(logits_fn: LogitsFn, x: Array, y: Array, target: Array, x_init: Array, eps, *,
             norm: str, loss: str, targeted: bool, steps: int, rho: float,
             bounds=projections.DEFAULT_BOUNDS, sparse_init: bool = False,
             draw_keys: Array | None = None, eot_samples: int = 1) -> APGDRun:
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
  code skips it at the first checkpoint). L1: the sparse step and sparsity checks of the module
  docstring instead (``rho`` unused).

  :func:`apgd_batch` runs the same iteration (``_apgd_body``) from the host, one jitted call per
  iteration, instead of this ``fori_loop`` (see :func:`apgd_batch` for why).

  Args:
    logits_fn: ``(B, ...) -> (B, K)``.
    x: ``(B, ...)`` clean points; ``y``: ``(B,)`` labels; ``target``: ``(B,)`` target classes
      (used only when ``targeted``).
    x_init: ``(B, ...)`` the starting point ``x^{(0)}`` (inside the ball and box).
    eps: scalar budget. norm: ``"linf" | "l2" | "l1"``. loss: ``"ce" | "dlr"``.
    targeted: targeted DLR (Eq. 7) / targeted CE instead of the untargeted loss.
    steps: iterations ``N_iter``. rho: the fraction in condition 1.
    bounds: the box ``(lo, hi)``. sparse_init: L1 only, ``topk`` from ``x_init``'s sparsity
      (a ``use_largereps`` stage) instead of 0.2.
    draw_keys: ``(B, ...)`` per-example keys of this run's draws, for a randomized model
      (iterate ``k``'s draw ``s``: ``fold_in(fold_in(draw_keys_i, k), s)``); else ``None``.
    eot_samples: draws averaged per gradient (module docstring; 1 for a deterministic model).

  Returns:
    :class:`APGDRun`.
  """
  eps = jnp.asarray(eps, x.dtype)
  value_and_grad = _value_and_grad_at(logits_fn, y, target, loss=loss, targeted=targeted,
                                      draw_keys=draw_keys, eot_samples=eot_samples)
  body = _apgd_body(logits_fn, x, y, target, eps, norm=norm, loss=loss, targeted=targeted,
                    steps=steps, rho=rho, bounds=bounds, draw_keys=draw_keys,
                    eot_samples=eot_samples)
  init = _initial_state(value_and_grad, x_init, y, eps, steps, norm=norm, x=x,
                        sparse_init=sparse_init)
  c = jax.lax.fori_loop(0, steps, body, init)
  return _result(c)


def apgd_run_from_keys(logits_fn: LogitsFn, x: Array, y: Array, target: Array, keys: Array, eps,
                       *, norm: str, loss: str, targeted: bool, steps: int, rho: float,
                       bounds=projections.DEFAULT_BOUNDS, use_largereps: bool = False,
                       draw_keys: Array | None = None, eot_samples: int = 1) -> APGDRun:
  """One run from a random start drawn with the per-example ``keys``: :func:`apgd_run` from
  :func:`initial_point`, or with ``use_largereps`` (L1) the three stages of the module
  docstring (the first from :func:`initial_point` at ``3 eps``; a randomized model's stage
  ``s`` draws with :func:`_stage_draw_keys` of the run's ``draw_keys``); traceable."""
  eot = dict(eot_samples=eot_samples)
  if not use_largereps:
    x0 = initial_point(keys, x, eps, norm, bounds)
    return apgd_run(logits_fn, x, y, target, x0, eps, norm=norm, loss=loss, targeted=targeted,
                    steps=steps, rho=rho, bounds=bounds, draw_keys=draw_keys, **eot)
  eps = jnp.asarray(eps, x.dtype)
  x_init = initial_point(keys, x, LARGEREPS_FACTORS[0] * eps, norm, bounds)
  for stage, (factor, iters) in enumerate(largereps_stages(steps)):
    if stage:  # the start is already in the first stage's ball (as in the host-driven loop)
      x_init = projections.project(x_init, x, factor * eps, norm, bounds)
    res = apgd_run(logits_fn, x, y, target, x_init, factor * eps, norm=norm, loss=loss,
                   targeted=targeted, steps=iters, rho=rho, bounds=bounds, sparse_init=True,
                   draw_keys=_stage_draw_keys(draw_keys, stage), **eot)
    x_init = res.x_best
  return res


# ----------------------------------------------------------------------------------------------
# Restarts and target classes.


_RUN_STATIC = ("norm", "loss", "targeted", "steps", "rho")


@functools.partial(jax.jit, static_argnames=("norm", "loss", "targeted", "steps",
                                             "restarts", "factor", "eot_samples"))
def _apgd_start(logits_fn: LogitsFn, x: Array, y: Array, keys: Array, order: Array, run: Array,
                eps, bounds=projections.DEFAULT_BOUNDS, *, norm: str, loss: str,
                targeted: bool, steps: int, restarts: int, factor: float | None = None,
                draw_keys: Array | None = None,
                eot_samples: int = 1) -> tuple[Array, APGDState]:
  """Run ``run``'s target ``(B,)`` and its state after iterate 0 (one gradient evaluation).
  With ``factor`` (the first ``use_largereps`` stage) the start is drawn at ``factor * eps``
  and ``topk`` read from its sparsity."""
  target = jax.lax.dynamic_index_in_dim(order, run // restarts, axis=1, keepdims=False)
  eps = jnp.asarray(eps, x.dtype) * (1.0 if factor is None else factor)
  x0 = initial_point(toolkit.fold_keys(keys, run), x, eps, norm, bounds)
  value_and_grad = _value_and_grad_at(logits_fn, y, target, loss=loss, targeted=targeted,
                                      draw_keys=draw_keys, eot_samples=eot_samples)
  return target, _initial_state(value_and_grad, x0, y, eps, steps, norm=norm, x=x,
                                sparse_init=factor is not None)


@functools.partial(jax.jit, static_argnames=("norm", "loss", "targeted", "steps", "factor",
                                             "eot_samples"))
def _apgd_next_stage(logits_fn: LogitsFn, c: APGDState, x: Array, y: Array, target: Array, eps,
                     bounds, *, norm: str, loss: str, targeted: bool, steps: int,
                     factor: float, draw_keys: Array | None = None,
                     eot_samples: int = 1) -> APGDState:
  """The state after iterate 0 of a ``use_largereps`` stage at ``factor * eps``, started from
  the previous stage's ``x_max`` projected onto the stage's ball and box."""
  eps = jnp.asarray(eps, x.dtype) * factor
  x0 = projections.project(c.x_best, x, eps, norm, bounds)
  value_and_grad = _value_and_grad_at(logits_fn, y, target, loss=loss, targeted=targeted,
                                      draw_keys=draw_keys, eot_samples=eot_samples)
  return _initial_state(value_and_grad, x0, y, eps, steps, norm=norm, x=x, sparse_init=True)


@functools.partial(jax.jit, static_argnames=_RUN_STATIC + ("factor", "eot_samples"))
def _apgd_step(logits_fn: LogitsFn, c: APGDState, i: Array, x: Array, y: Array, target: Array,
               eps, bounds=projections.DEFAULT_BOUNDS, *, norm: str, loss: str, targeted: bool,
               steps: int, rho: float, factor: float = 1.0, draw_keys: Array | None = None,
               eot_samples: int = 1) -> APGDState:
  """Iteration ``i`` of :func:`apgd_run` (one gradient evaluation), jitted on its own, at radius
  ``factor * eps``."""
  body = _apgd_body(logits_fn, x, y, target, jnp.asarray(eps, x.dtype) * factor, norm=norm,
                    loss=loss, targeted=targeted, steps=steps, rho=rho, bounds=bounds,
                    draw_keys=draw_keys, eot_samples=eot_samples)
  return body(i, c)


def _draw_keys(logits_fn: LogitsFn, keys: Array, run) -> Array | None:
  """Run ``run``'s per-example draw keys ``fold_in(fold_in(k_i, DRAW_STREAM), run)`` for a
  randomized model, ``None`` for a deterministic one (its jitted steps are unchanged)."""
  return _eot.fold(keys, _eot.DRAW_STREAM, run) if _eot.is_stochastic(logits_fn) else None


def _stage_draw_keys(draw_keys: Array | None, stage: int) -> Array | None:
  """A ``use_largereps`` stage's draw keys: the run's ``draw_keys`` for the first stage (and
  for a run without stages), ``fold_in(fold_in(draw_keys_i, LARGEREPS_STAGE_STREAM), stage)``
  for the later ones, so each stage's iterates draw afresh (their iterate numbers restart at
  0); ``None`` for a deterministic model."""
  if draw_keys is None or stage == 0:
    return draw_keys
  return _eot.fold(draw_keys, LARGEREPS_STAGE_STREAM, stage)


def _order_model(logits_fn: LogitsFn, keys: Array) -> LogitsFn:
  """The model APGD-T's target classes are read from: ``logits_fn``, or one draw of a
  randomized one (keys ``fold_in(fold_in(k_i, CHECK_STREAM), 0)``)."""
  if not _eot.is_stochastic(logits_fn):
    return logits_fn
  return _eot.Drawn(logits_fn, _eot.fold(keys, _eot.CHECK_STREAM, 0))


def _fold_run(fooled: Array, x_out: Array, loss_best: Array,
              res: APGDRun) -> tuple[Array, Array, Array]:
  """Folds one finished run into the per-example result: the first misclassified point, else
  the highest-loss point over the runs (both loops, host-driven and in-graph)."""
  newly = res.fooled & ~fooled
  better = ~fooled & ~res.fooled & (res.loss_best > loss_best)
  x_out = select(newly, res.x_adv, select(better, res.x_best, x_out))
  return fooled | res.fooled, x_out, jnp.where(better, res.loss_best, loss_best)


@jax.jit
def _keep_run(fooled: Array, x_out: Array, loss_best: Array,
              c: APGDState) -> tuple[Array, Array, Array]:
  """:func:`_fold_run` of the host-driven loop's finished state ``c``."""
  return _fold_run(fooled, x_out, loss_best, _result(c))


def _apgd_batch_in_graph(logits_fn: LogitsFn, x: Array, y: Array, keys: Array, eps, *,
                         norm: str, loss: str, targeted: bool, steps: int, restarts: int,
                         n_target_classes: int, rho: float, bounds=projections.DEFAULT_BOUNDS,
                         use_largereps: bool = False,
                         eot_samples: int = 1) -> tuple[Array, Array]:
  """:func:`apgd_batch` as one traceable ``while`` loop over runs of :func:`apgd_run` (the same
  runs, keys and selection), for calls under the caller's ``jit`` or ``vmap``. Bit-identical
  to the host-driven loop (``tests/test_autoattack_loops.py``), slower on the CPU backend."""
  n_runs = restarts * (n_target_classes if targeted else 1)
  order = toolkit.target_order(_order_model(logits_fn, keys)(x), y)

  def cond(s):
    return (s["run"] < n_runs) & ~jnp.all(s["fooled"])

  def body(s):
    run = s["run"]
    target = jax.lax.dynamic_index_in_dim(order, run // restarts, axis=1, keepdims=False)
    res = apgd_run_from_keys(logits_fn, x, y, target, toolkit.fold_keys(keys, run), eps,
                             norm=norm, loss=loss, targeted=targeted, steps=steps, rho=rho,
                             bounds=bounds, use_largereps=use_largereps,
                             draw_keys=_draw_keys(logits_fn, keys, run),
                             eot_samples=eot_samples)
    fooled, x_out, loss_best = _fold_run(s["fooled"], s["x_out"], s["loss_best"], res)
    return dict(run=run + 1, fooled=fooled, x_out=x_out, loss_best=loss_best)

  init = dict(run=jnp.asarray(0, jnp.int32), fooled=jnp.zeros(y.shape, bool), x_out=x,
              loss_best=jnp.full(y.shape, -jnp.inf, x.dtype))
  s = jax.lax.while_loop(cond, body, init)
  return s["x_out"], s["fooled"]


def apgd_batch(logits_fn: LogitsFn, x: Array, y: Array, keys: Array, eps, *, norm: str,
               loss: str, targeted: bool, steps: int, restarts: int, n_target_classes: int,
               rho: float, bounds=projections.DEFAULT_BOUNDS,
               use_largereps: bool = False, eot_samples: int = 1) -> tuple[Array, Array]:
  """APGD over restarts (and, if ``targeted``, target classes) with per-example keys.

  Runs are ordered target-major as in AutoAttack: for the ``t``-th target (:func:`target_order`
  on the clean logits, ``t = 0..n_target_classes-1``) every restart ``r`` starts from
  :func:`initial_point` with keys ``fold_in(keys_i, t * restarts + r)``. An example keeps the
  first misclassified point found; an example never fooled gets the highest-loss point over the
  runs. The loop stops early once every example is fooled. With ``use_largereps`` (L1) every
  run is the three stages of the module docstring.

  The iterations of :func:`apgd_run` are driven from the host, one jitted call per iteration
  (compiled once per shape; every array stays on the device, and the host reads one bool per
  run for the early stop). Inside an XLA ``while`` loop the CPU backend leaves the input
  gradient's transposed convolutions in a kernel layout (``01oi``) that its Eigen convolution
  does not take and emits them as generic loop nests: a gradient costs about 4x a standalone
  one (measured on the AutoAttack benchmark's CNN, see benchmarks/bench_autoattack.py).

  Args:
    logits_fn: ``(B, ...) -> (B, K)``, a :class:`toolkit.TracedModel` (traced).
    x: ``(B, ...)`` in the box; y: ``(B,)`` int; keys: ``(B, ...)`` per-example PRNG keys.
    eps: scalar budget (traced: changing it does not recompile). bounds: the box ``(lo, hi)``
      (traced too).
    eot_samples: draws per gradient for a randomized model (module docstring).

  Returns:
    ``(x_adv (B, ...), fooled (B,) bool)``.
  """
  logits_fn = toolkit.as_model(logits_fn)
  if toolkit.is_traced(x, y, keys, eps, *bounds, *jax.tree_util.tree_leaves(logits_fn)):
    # Inside a caller's jit / vmap the host cannot drive the loop: the in-graph loop runs.
    return _apgd_batch_in_graph(logits_fn, x, y, keys, eps, norm=norm, loss=loss,
                                targeted=targeted, steps=steps, restarts=restarts,
                                n_target_classes=n_target_classes, rho=rho, bounds=bounds,
                                use_largereps=use_largereps, eot_samples=eot_samples)
  n_runs = restarts * (n_target_classes if targeted else 1)
  order = toolkit.model_target_order(_order_model(logits_fn, keys), x, y)
  fooled = jnp.zeros(y.shape, bool)
  x_out = x
  loss_best = jnp.full(y.shape, -jnp.inf, x.dtype)
  static = dict(norm=norm, loss=loss, targeted=targeted)
  stages = largereps_stages(steps) if use_largereps else ((None, steps),)
  for run in range(n_runs):
    if bool(jnp.all(fooled)):
      break
    run_draw_keys = _draw_keys(logits_fn, keys, run)
    for stage, (factor, iters) in enumerate(stages):
      # A randomized model's draws: keyword arguments only then (a deterministic model's calls,
      # and so its compiled steps, are as without them).
      eot = {} if run_draw_keys is None else dict(
          draw_keys=_stage_draw_keys(run_draw_keys, stage), eot_samples=eot_samples)
      if stage == 0:
        target, c = _apgd_start(logits_fn, x, y, keys, order, jnp.int32(run), eps, bounds,
                                **static, steps=iters, restarts=restarts, factor=factor, **eot)
      else:
        c = _apgd_next_stage(logits_fn, c, x, y, target, eps, bounds, **static, steps=iters,
                             factor=factor, **eot)
      for i in range(iters):
        # i as a Python int: traced as a (weak) int32 scalar, so one compile serves every i.
        c = _apgd_step(logits_fn, c, i, x, y, target, eps, bounds, **static, steps=iters,
                       rho=rho, factor=1.0 if factor is None else factor, **eot)
    fooled, x_out, loss_best = _keep_run(fooled, x_out, loss_best, c)
  return x_out, fooled


@toolkit.attack_entry
@_eot.supports_randomized
def apgd(logits_fn: LogitsFn, x, y, key, *, eps, norm: str, loss: str = "ce",
         targeted: bool = False, steps: int = 100, restarts: int = 1,
         n_target_classes: int = 9, rho: float = 0.75, use_largereps: bool = False,
         example_index=None, bounds=None, eot_samples: int = 1) -> Array:
  """Auto-PGD (Croce and Hein 2020, Algorithm 1) with CE or DLR loss, untargeted or targeted.

  Targeted runs use the ``min(n_target_classes, K - 1)`` non-true classes with the highest
  clean logits (AutoAttack's APGD-T); targeted DLR is Eq. 7 of the paper, targeted CE
  ascends ``-CE(z, t)``. L1 is l1-APGD ("Mind the box", module docstring).

  Args:
    logits_fn: ``(B, H, W, C)`` -> logits ``(B, K)``, model in inference mode.
    x: ``(B, H, W, C)`` float images in the box; y: ``(B,)`` int labels; key: PRNG key.
    eps: budget ``>= 0``. norm: ``"linf" | "l2" | "l1"``. loss: ``"ce" | "dlr"``.
    targeted: run over target classes. steps: iterations per run (paper: 100).
    restarts: random restarts (per target). n_target_classes: targets (paper: 9).
    rho: checkpoint condition-1 fraction (paper: 0.75; unused by L1).
    use_largereps: L1 only: each run in three stages at ``3 eps, 2 eps, eps`` (AutoAttack's L1
      setting; module docstring).
    example_index: ``(B,)`` ints (or ``(B, 2)`` pairs, :func:`toolkit.example_keys`) keying each
      example's randomness (default ``arange(B)``).
    bounds: the input box ``(lo, hi)``, scalars or arrays broadcastable to ``x`` (default
      ``(0, 1)``).
    eot_samples: for a randomized model (``attacks.stochastic``), draws averaged per gradient
      (Expectation over Transformation, the reference's ``eot_iter``; module docstring); the
      attack then costs ``eot_samples`` times the gradients. ``> 1`` needs a randomized model.

  Returns:
    ``x_adv`` ``(B, H, W, C)``: the first misclassified point found per example, else the
    highest-loss point; ``||x_adv - x|| <= eps`` and ``lo <= x_adv <= hi``. On a randomized
    model "misclassified" is at the draw of that iterate's last EoT sample.
  """
  x, y, k, example_index, bounds = toolkit.validate_inputs(
      logits_fn, x, y, eps, norm, loss=loss, example_index=example_index, bounds=bounds)
  checks.check_at_least("steps", steps, 1)
  checks.check_at_least("restarts", restarts, 1)
  checks.check_at_least("n_target_classes", n_target_classes, 1)
  checks.check_eot_samples(logits_fn, eot_samples)
  if targeted:
    checks.warn_target_classes(int(n_target_classes), k)
  if not 0.0 < rho <= 1.0:
    raise ValueError(f"rho must lie in (0, 1], got {rho}")
  if loss == "dlr" and targeted and k < 4:
    raise ValueError(f"targeted DLR needs at least 4 classes, got K={k}")
  if targeted and k < 2:
    raise ValueError("targeted attacks need at least 2 classes")
  if use_largereps and norm != "l1":
    raise ValueError(f"use_largereps is APGD's L1 schedule (3 eps, 2 eps, eps); got "
                     f"norm={norm!r}")
  x_adv, _ = apgd_batch(logits_fn, x, y, toolkit.example_keys(key, example_index), eps, norm=norm,
                        loss=loss, targeted=bool(targeted), steps=int(steps),
                        restarts=int(restarts),
                        n_target_classes=int(min(n_target_classes, k - 1)), rho=float(rho),
                        bounds=bounds, use_largereps=bool(use_largereps),
                        eot_samples=int(eot_samples))
  return x_adv


@register("apgd_ce")
@toolkit.attack_entry
@_eot.supports_randomized
def apgd_ce(logits_fn: LogitsFn, x, y, key, *, eps, norm: str, steps: int = 100,
            restarts: int = 1, rho: float = 0.75, use_largereps: bool = False,
            example_index=None, bounds=None, eot_samples: int = 1) -> Array:
  """APGD on the cross-entropy loss (AutoAttack's APGD-CE); see :func:`apgd`."""
  return apgd(logits_fn, x, y, key, eps=eps, norm=norm, loss="ce", steps=steps,
              restarts=restarts, rho=rho, use_largereps=use_largereps,
              example_index=example_index, bounds=bounds, eot_samples=eot_samples)


@register("apgd_dlr")
@toolkit.attack_entry
@_eot.supports_randomized
def apgd_dlr(logits_fn: LogitsFn, x, y, key, *, eps, norm: str, steps: int = 100,
             restarts: int = 1, rho: float = 0.75, use_largereps: bool = False,
             example_index=None, bounds=None, eot_samples: int = 1) -> Array:
  """APGD on the untargeted DLR loss (Eq. 6; AutoAttack+'s APGD-DLR); see :func:`apgd`."""
  return apgd(logits_fn, x, y, key, eps=eps, norm=norm, loss="dlr", steps=steps,
              restarts=restarts, rho=rho, use_largereps=use_largereps,
              example_index=example_index, bounds=bounds, eot_samples=eot_samples)


@register("apgd_t")
@toolkit.attack_entry
@_eot.supports_randomized
def apgd_t(logits_fn: LogitsFn, x, y, key, *, eps, norm: str, steps: int = 100,
           restarts: int = 1, n_target_classes: int = 9, rho: float = 0.75,
           use_largereps: bool = False, example_index=None, bounds=None,
           eot_samples: int = 1) -> Array:
  """APGD on the targeted DLR loss (Eq. 7) over the ``min(9, K-1)`` highest non-true classes
  (AutoAttack's APGD-T); see :func:`apgd`."""
  return apgd(logits_fn, x, y, key, eps=eps, norm=norm, loss="dlr", targeted=True,
              steps=steps, restarts=restarts, n_target_classes=n_target_classes, rho=rho,
              use_largereps=use_largereps, example_index=example_index, bounds=bounds,
              eot_samples=eot_samples)
