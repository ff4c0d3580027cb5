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

A randomized model (``attacks.stochastic``) is attacked with Expectation over Transformation as
in the reference (``eot_iter``): the gradient at each iterate is the mean over ``eot_samples``
draws, and the loss and logits of the last draw are the ones the step-size checkpoints and the
"misclassified" bookkeeping use (:func:`krylov_adv.attacks._eot.eot_value_and_grad`). Draw ``s``
at iterate ``k`` of run ``r`` of example ``i`` has the key
``fold_in(fold_in(fold_in(fold_in(k_i, DRAW_STREAM), r), k), s)`` with ``k_i`` the example's key;
APGD-T's target classes come from one draw of the clean logits (``CHECK_STREAM``), as the
reference's one forward pass.
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


def _per_example_loss(loss: str, targeted: bool, logits: Array, y: Array, target: Array) -> Array:
  if loss == "ce":
    # Targeted CE ("ce-targeted" in the reference code): ascend -CE towards the target class.
    return -losses.cross_entropy(logits, target) if targeted else losses.cross_entropy(logits, y)
  if targeted:
    return losses.dlr_targeted_loss(logits, y, target)
  return losses.dlr_loss(logits, y)


def initial_point(keys: Array, x: Array, eps, norm: str) -> Array:
  """APGD's random start ``x^{(0)}``: a point on the sphere of radius ``eps`` around ``x``
  (:func:`krylov_adv.attacks.toolkit.sphere_start`). ``keys`` is ``(B, ...)`` per-example keys."""
  return toolkit.sphere_start(keys, x, eps, norm)


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


def _initial_state(value_and_grad, x_init: Array, y: Array, eps, steps: int) -> APGDState:
  (_, (loss0, logits0)), grad0 = value_and_grad(x_init, 0)
  bsz = x_init.shape[0]
  step0 = jnp.full((bsz,), 2.0, x_init.dtype) * eps
  hist = jnp.zeros((steps + 1, bsz), x_init.dtype)
  return APGDState(
      x=x_init, x_prev=x_init, grad=grad0, loss_cur=loss0,
      x_best=x_init, grad_best=grad0, loss_best=loss0,
      x_adv=x_init, fooled=jnp.argmax(logits0, axis=1) != y, step=step0,
      n_increase=jnp.zeros((bsz,), jnp.int32),
      loss_best_last=loss0, reduced_last=jnp.zeros((bsz,), bool),
      loss_history=hist.at[0].set(loss0), step_history=hist.at[0].set(step0))


def _momentum_step(c: APGDState, i, x: Array, eps, norm: str) -> Array:
  """``z = P(x^(k) + eta s(g))``, ``x^(k+1) = P(x^(k) + a (z - x^(k)) + (1 - a)(x^(k) -
  x^(k-1)))`` with ``a = MOMENTUM`` (``1`` at the first step)."""
  alpha = jnp.where(i == 0, 1.0, MOMENTUM).astype(x.dtype)
  z = toolkit.ascent_step(c.x, c.grad, x, eps, c.step, norm)
  return projections.project(c.x + alpha * (z - c.x) + (1.0 - alpha) * (c.x - c.x_prev), x, eps,
                             norm)


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
               draw_keys: Array | None = None, eot_samples: int = 1):
  """``body(i, state) -> state``: iteration ``i`` of Algorithm 1 (one gradient evaluation;
  ``eot_samples`` of them, averaged, on a randomized model with per-run ``draw_keys``)."""
  value_and_grad = _value_and_grad_at(logits_fn, y, target, loss=loss, targeted=targeted,
                                      draw_keys=draw_keys, eot_samples=eot_samples)
  is_ckpt, interval = _checkpoint_tables(steps)

  def body(i, c: APGDState) -> APGDState:
    x_new = _momentum_step(c, i, x, eps, norm)
    (_, (loss_new, logits)), grad_new = value_and_grad(x_new, i + 1)
    miscl = jnp.argmax(logits, axis=1) != y
    improved = loss_new > c.loss_best
    loss_best = jnp.where(improved, loss_new, c.loss_best)
    x_best = select(improved, x_new, c.x_best)
    grad_best = select(improved, grad_new, c.grad_best)
    n_increase = c.n_increase + (loss_new > c.loss_cur).astype(jnp.int32)
    k = i + 1  # index of the iterate just computed
    at_ckpt = is_ckpt[k]
    reduce = _checkpoint_reduce(c, k, loss_best, n_increase, is_ckpt, interval, rho)
    step = jnp.where(reduce, 0.5 * c.step, c.step)
    return APGDState(
        x=select(reduce, x_best, x_new), x_prev=c.x,
        grad=select(reduce, grad_best, grad_new),
        loss_cur=jnp.where(reduce, loss_best, loss_new),
        x_best=x_best, grad_best=grad_best, loss_best=loss_best,
        x_adv=select(miscl, x_new, c.x_adv), fooled=c.fooled | miscl, step=step,
        n_increase=jnp.where(at_ckpt, 0, n_increase),
        loss_best_last=jnp.where(at_ckpt, loss_best, c.loss_best_last),
        reduced_last=jnp.where(at_ckpt, reduce, c.reduced_last),
        loss_history=c.loss_history.at[k].set(loss_new),
        step_history=c.step_history.at[k].set(step))

  return body


def _result(c: APGDState) -> APGDRun:
  return APGDRun(x_best=c.x_best, loss_best=c.loss_best, x_adv=c.x_adv, fooled=c.fooled,
                 loss_history=c.loss_history, step_history=c.step_history)


def apgd_run(logits_fn: LogitsFn, x: Array, y: Array, target: Array, x_init: Array, eps, *,
             norm: str, loss: str, targeted: bool, steps: int, rho: float,
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
  code skips it at the first checkpoint).

  :func:`apgd_batch` runs the same iteration (``_apgd_body``) from the host, one jitted call per
  iteration, instead of this ``fori_loop`` (see :func:`apgd_batch` for why).

  Args:
    logits_fn: ``(B, ...) -> (B, K)``.
    x: ``(B, ...)`` clean points; ``y``: ``(B,)`` labels; ``target``: ``(B,)`` target classes
      (used only when ``targeted``).
    x_init: ``(B, ...)`` the starting point ``x^{(0)}`` (inside the ball and box).
    eps: scalar budget. norm: ``"linf" | "l2"``. loss: ``"ce" | "dlr"``.
    targeted: targeted DLR (Eq. 7) / targeted CE instead of the untargeted loss.
    steps: iterations ``N_iter``. rho: the fraction in condition 1.
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
                    steps=steps, rho=rho, draw_keys=draw_keys, eot_samples=eot_samples)
  c = jax.lax.fori_loop(0, steps, body, _initial_state(value_and_grad, x_init, y, eps, steps))
  return _result(c)


# ----------------------------------------------------------------------------------------------
# Restarts and target classes.


_RUN_STATIC = ("norm", "loss", "targeted", "steps", "rho")


@functools.partial(jax.jit, static_argnames=("norm", "loss", "targeted", "steps",
                                             "restarts", "eot_samples"))
def _apgd_start(logits_fn: LogitsFn, x: Array, y: Array, keys: Array, order: Array, run: Array,
                eps, *, norm: str, loss: str, targeted: bool, steps: int,
                restarts: int, draw_keys: Array | None = None,
                eot_samples: int = 1) -> tuple[Array, APGDState]:
  """Run ``run``'s target ``(B,)`` and its state after iterate 0 (one gradient evaluation)."""
  target = jax.lax.dynamic_index_in_dim(order, run // restarts, axis=1, keepdims=False)
  x0 = initial_point(toolkit.fold_keys(keys, run), x, eps, norm)
  value_and_grad = _value_and_grad_at(logits_fn, y, target, loss=loss, targeted=targeted,
                                      draw_keys=draw_keys, eot_samples=eot_samples)
  return target, _initial_state(value_and_grad, x0, y, jnp.asarray(eps, x.dtype), steps)


@functools.partial(jax.jit, static_argnames=_RUN_STATIC + ("eot_samples",))
def _apgd_step(logits_fn: LogitsFn, c: APGDState, i: Array, x: Array, y: Array, target: Array,
               eps, *, norm: str, loss: str, targeted: bool, steps: int,
               rho: float, draw_keys: Array | None = None, eot_samples: int = 1) -> APGDState:
  """Iteration ``i`` of :func:`apgd_run` (one gradient evaluation), jitted on its own."""
  body = _apgd_body(logits_fn, x, y, target, jnp.asarray(eps, x.dtype), norm=norm, loss=loss,
                    targeted=targeted, steps=steps, rho=rho, draw_keys=draw_keys,
                    eot_samples=eot_samples)
  return body(i, c)


def _draw_keys(logits_fn: LogitsFn, keys: Array, run) -> Array | None:
  """Run ``run``'s per-example draw keys ``fold_in(fold_in(k_i, DRAW_STREAM), run)`` for a
  randomized model, ``None`` for a deterministic one (its jitted steps are unchanged)."""
  return _eot.fold(keys, _eot.DRAW_STREAM, run) if _eot.is_stochastic(logits_fn) else None


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
                         n_target_classes: int, rho: float,
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
    x0 = initial_point(toolkit.fold_keys(keys, run), x, eps, norm)
    res = apgd_run(logits_fn, x, y, target, x0, eps, norm=norm, loss=loss, targeted=targeted,
                   steps=steps, rho=rho, draw_keys=_draw_keys(logits_fn, keys, run),
                   eot_samples=eot_samples)
    fooled, x_out, loss_best = _fold_run(s["fooled"], s["x_out"], s["loss_best"], res)
    return dict(run=run + 1, fooled=fooled, x_out=x_out, loss_best=loss_best)

  init = dict(run=jnp.asarray(0, jnp.int32), fooled=jnp.zeros(y.shape, bool), x_out=x,
              loss_best=jnp.full(y.shape, -jnp.inf, x.dtype))
  s = jax.lax.while_loop(cond, body, init)
  return s["x_out"], s["fooled"]


def apgd_batch(logits_fn: LogitsFn, x: Array, y: Array, keys: Array, eps, *, norm: str,
               loss: str, targeted: bool, steps: int, restarts: int, n_target_classes: int,
               rho: float, eot_samples: int = 1) -> tuple[Array, Array]:
  """APGD over restarts (and, if ``targeted``, target classes) with per-example keys.

  Runs are ordered target-major as in AutoAttack: for the ``t``-th target (:func:`target_order`
  on the clean logits, ``t = 0..n_target_classes-1``) every restart ``r`` starts from
  :func:`initial_point` with keys ``fold_in(keys_i, t * restarts + r)``. An example keeps the
  first misclassified point found; an example never fooled gets the highest-loss point over the
  runs. The loop stops early once every example is fooled.

  The iterations of :func:`apgd_run` are driven from the host, one jitted call per iteration
  (compiled once per shape; every array stays on the device, and the host reads one bool per
  run for the early stop). Inside an XLA ``while`` loop the CPU backend leaves the input
  gradient's transposed convolutions in a kernel layout (``01oi``) that its Eigen convolution
  does not take and emits them as generic loop nests: a gradient costs about 4x a standalone
  one (measured on the AutoAttack benchmark's CNN, see benchmarks/bench_autoattack.py).

  Args:
    logits_fn: ``(B, ...) -> (B, K)``, a :class:`toolkit.TracedModel` (traced).
    x: ``(B, ...)`` in ``[0, 1]``; y: ``(B,)`` int; keys: ``(B, ...)`` per-example PRNG keys.
    eps: scalar budget (traced: changing it does not recompile).
    eot_samples: draws per gradient for a randomized model (module docstring).

  Returns:
    ``(x_adv (B, ...), fooled (B,) bool)``.
  """
  logits_fn = toolkit.as_model(logits_fn)
  if toolkit.is_traced(x, y, keys, eps, *jax.tree_util.tree_leaves(logits_fn)):
    # Inside a caller's jit / vmap the host cannot drive the loop: the in-graph loop runs.
    return _apgd_batch_in_graph(logits_fn, x, y, keys, eps, norm=norm, loss=loss,
                                targeted=targeted, steps=steps, restarts=restarts,
                                n_target_classes=n_target_classes, rho=rho,
                                eot_samples=eot_samples)
  n_runs = restarts * (n_target_classes if targeted else 1)
  order = toolkit.model_target_order(_order_model(logits_fn, keys), x, y)
  fooled = jnp.zeros(y.shape, bool)
  x_out = x
  loss_best = jnp.full(y.shape, -jnp.inf, x.dtype)
  static = dict(norm=norm, loss=loss, targeted=targeted, steps=steps)
  for run in range(n_runs):
    if bool(jnp.all(fooled)):
      break
    # A randomized model's draws: keyword arguments only then (a deterministic model's calls,
    # and so its compiled steps, are as without them).
    eot = {} if not _eot.is_stochastic(logits_fn) else dict(
        draw_keys=_draw_keys(logits_fn, keys, run), eot_samples=eot_samples)
    target, c = _apgd_start(logits_fn, x, y, keys, order, jnp.int32(run), eps, **static,
                            restarts=restarts, **eot)
    for i in range(steps):
      # i as a Python int: traced as a (weak) int32 scalar, so one compile serves every i.
      c = _apgd_step(logits_fn, c, i, x, y, target, eps, **static, rho=rho, **eot)
    fooled, x_out, loss_best = _keep_run(fooled, x_out, loss_best, c)
  return x_out, fooled


@toolkit.attack_entry
@_eot.supports_randomized
def apgd(logits_fn: LogitsFn, x, y, key, *, eps, norm: str, loss: str = "ce",
         targeted: bool = False, steps: int = 100, restarts: int = 1,
         n_target_classes: int = 9, rho: float = 0.75, example_index=None,
         eot_samples: int = 1) -> Array:
  """Auto-PGD (Croce and Hein 2020, Algorithm 1) with CE or DLR loss, untargeted or targeted.

  Targeted runs use the ``min(n_target_classes, K - 1)`` non-true classes with the highest
  clean logits (AutoAttack's APGD-T); targeted DLR is Eq. 7 of the paper, targeted CE
  ascends ``-CE(z, t)``.

  Args:
    logits_fn: ``(B, H, W, C)`` in ``[0, 1]`` -> logits ``(B, K)``, model in inference mode.
    x: ``(B, H, W, C)`` float images in ``[0, 1]``; y: ``(B,)`` int labels; key: PRNG key.
    eps: budget ``>= 0``. norm: ``"linf" | "l2"``. loss: ``"ce" | "dlr"``.
    targeted: run over target classes. steps: iterations per run (paper: 100).
    restarts: random restarts (per target). n_target_classes: targets (paper: 9).
    rho: checkpoint condition-1 fraction (paper: 0.75).
    example_index: ``(B,)`` ints (or ``(B, 2)`` pairs, :func:`toolkit.example_keys`) keying each
      example's randomness (default ``arange(B)``).
    eot_samples: for a randomized model (``attacks.stochastic``), draws averaged per gradient
      (Expectation over Transformation, the reference's ``eot_iter``; module docstring); the
      attack then costs ``eot_samples`` times the gradients. ``> 1`` needs a randomized model.

  Returns:
    ``x_adv`` ``(B, H, W, C)``: the first misclassified point found per example, else the
    highest-loss point; ``||x_adv - x|| <= eps`` and ``0 <= x_adv <= 1``. On a randomized model
    "misclassified" is at the draw of that iterate's last EoT sample.
  """
  x, y, k, example_index = toolkit.validate_inputs(logits_fn, x, y, eps, norm, loss=loss,
                                                   example_index=example_index)
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
  x_adv, _ = apgd_batch(logits_fn, x, y, toolkit.example_keys(key, example_index), eps, norm=norm,
                        loss=loss, targeted=bool(targeted), steps=int(steps),
                        restarts=int(restarts),
                        n_target_classes=int(min(n_target_classes, k - 1)), rho=float(rho),
                        eot_samples=int(eot_samples))
  return x_adv


@register("apgd_ce")
@toolkit.attack_entry
@_eot.supports_randomized
def apgd_ce(logits_fn: LogitsFn, x, y, key, *, eps, norm: str, steps: int = 100,
            restarts: int = 1, rho: float = 0.75, example_index=None,
            eot_samples: int = 1) -> Array:
  """APGD on the cross-entropy loss (AutoAttack's APGD-CE); see :func:`apgd`."""
  return apgd(logits_fn, x, y, key, eps=eps, norm=norm, loss="ce", steps=steps,
              restarts=restarts, rho=rho, example_index=example_index, eot_samples=eot_samples)


@register("apgd_dlr")
@toolkit.attack_entry
@_eot.supports_randomized
def apgd_dlr(logits_fn: LogitsFn, x, y, key, *, eps, norm: str, steps: int = 100,
             restarts: int = 1, rho: float = 0.75, example_index=None,
             eot_samples: int = 1) -> Array:
  """APGD on the untargeted DLR loss (Eq. 6; AutoAttack+'s APGD-DLR); see :func:`apgd`."""
  return apgd(logits_fn, x, y, key, eps=eps, norm=norm, loss="dlr", steps=steps,
              restarts=restarts, rho=rho, example_index=example_index, eot_samples=eot_samples)


@register("apgd_t")
@toolkit.attack_entry
@_eot.supports_randomized
def apgd_t(logits_fn: LogitsFn, x, y, key, *, eps, norm: str, steps: int = 100,
           restarts: int = 1, n_target_classes: int = 9, rho: float = 0.75,
           example_index=None, eot_samples: int = 1) -> Array:
  """APGD on the targeted DLR loss (Eq. 7) over the ``min(9, K-1)`` highest non-true classes
  (AutoAttack's APGD-T); see :func:`apgd`."""
  return apgd(logits_fn, x, y, key, eps=eps, norm=norm, loss="dlr", targeted=True,
              steps=steps, restarts=restarts, n_target_classes=n_target_classes, rho=rho,
              example_index=example_index, eot_samples=eot_samples)
