"""FAB: the Fast Adaptive Boundary attack, untargeted and targeted (FAB-T).

Croce and Hein, ICML 2020, "Minimally distorted adversarial examples with a fast adaptive
boundary attack", Algorithm 1; its targeted version is AutoAttack's FAB-T (Croce and Hein, ICML
2020, "Reliable evaluation of adversarial robustness ..."). FAB linearises the decision boundary
at the current iterate, projects both the iterate and the clean point onto that hyperplane
intersected with the box ``[lo, hi]`` (``bounds``, default ``[0, 1]^n``; Eq. 5), takes a biased convex combination of the two
projections with overshoot ``overshoot`` (the paper's ``eta``, Eq. 6-7) and, once adversarial,
steps back towards the clean point by ``beta`` (Sec. 3.2). Hyperparameters are the reference
implementation's (fra31/auto-attack): 100 iterations (``steps``), ``alpha_max = 0.1``,
``overshoot = 1.05``, ``beta = 0.9``, 9 target classes for FAB-T, restarts from
``x + 0.5 * eps * u / ||u||``.

FAB minimises the perturbation norm; as in AutoAttack a point counts as fooled only when the
smallest adversarial perturbation found has norm ``<= eps``. The returned batch holds that point
where fooled and the clean point elsewhere.

Registered attacks: ``"fab_t"`` (targeted) and ``"fab"`` (untargeted, used by AutoAttack+).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from krylov_adv import projections
from krylov_adv.attacks import checks, register, toolkit
from krylov_adv.attacks.toolkit import select

Array = jax.Array
LogitsFn = Callable[[Array], Array]

_BIG = 1e30


def hyperplane_box_projection(t: Array, w: Array, b: Array, norm: str,
                              bounds=(0.0, 1.0)) -> Array:
  """Minimal-norm step onto a hyperplane inside the box (FAB paper, Eq. 5), exact.

  Solves per example ``d* = argmin ||d||_p  s.t.  <w, t + d> = b,  lo <= t + d <= hi`` for
  ``p = inf``, ``2`` (by bisection, below) or ``1`` (greedy: with ``c`` and the caps below, the
  L1 cost of a unit of ``<w, d>`` on coordinate ``i`` is ``1 / |w_i|``, so the optimum fills the
  coordinates in order of decreasing ``|w_i|`` up to their caps until ``<w, d> = c``, the last
  one partly; one sort per example, as the reference's ``projection_l1``). With ``c = b - <w, t>`` and, after flipping signs so that ``c >= 0``,
  each coordinate moving in the direction ``sign(w_i)`` by at most ``cap_i`` (its distance to the
  box face on that side), the optimum is
    linf: ``d_i = sign(w_i) min(delta, cap_i)`` with ``h(delta) = sum_i |w_i| min(delta, cap_i)
    = c``;
    l2:   ``d_i = sign(w_i) min(lambda |w_i|, cap_i)`` with ``g(lambda) = sum_i |w_i|
    min(lambda |w_i|, cap_i) = c`` (KKT of the box-constrained least-norm problem).
  ``h`` and ``g`` (``F`` below) are nondecreasing and piecewise linear with one breakpoint per
  coordinate (``beta_i = cap_i`` resp. ``cap_i / |w_i|``). The root's segment is found by
  bisection on the IEEE bit pattern of the nonnegative float parameter (the integer view of
  nonnegative floats is monotone): ``lo, hi`` start at ``0`` and the largest breakpoint and keep
  ``F(lo) < c <= F(hi)`` until they are adjacent floats, one ``(B, n)`` elementwise-and-reduce
  pass per bit (31 for float32, 63 for float64). No breakpoint then lies strictly between
  ``lo`` and ``hi``, so ``S = {i: beta_i <= lo}`` is the set of coordinates saturated at the
  root (up to the rounding of ``F``; a breakpoint at ``hi`` counted either way moves the root by
  at most one ulp), and on that linear segment the root is exact:
  ``param = (c - sum_{i in S} |w_i| cap_i) / sum_{i not in S} slope_i`` (slope ``|w_i|`` resp.
  ``|w_i|^2``), clamped at ``>= 0``, as the former solver computed it after sorting the
  breakpoints and taking cumulative sums. The sort is gone because XLA:CPU's sort of the
  ``(2B, n)`` breakpoints was 7x slower than torch's (149 ms vs 20 ms at ``(1000, 784)``) and
  dominated FAB's iteration; the fused passes take a small fraction of that. ``c = 0`` gives
  ``d = 0``. When no point of the box lies on the hyperplane
  (``F(max beta) = sum_i |w_i| cap_i < c``), ``d`` moves every coordinate to its box face
  (``d_i = sign(w_i) cap_i``), the box point closest to the hyperplane, as in the paper.

  Args:
    t: ``(B, n)`` points in the box; w: ``(B, n)`` normals; b: ``(B,)`` offsets; one float
      dtype (float32 or float64).
    norm: ``"linf" | "l2" | "l1"``. bounds: the box ``(lo, hi)``, each broadcastable to
      ``(B, n)`` (flattened like ``t``).

  Returns:
    ``d`` ``(B, n)``, ``t``'s dtype.
  """
  c = b - jnp.sum(w * t, axis=1)
  sgn = jnp.where(c >= 0, 1.0, -1.0).astype(t.dtype)
  w = w * sgn[:, None]
  c = jnp.abs(c)
  aw = jnp.abs(w)
  lo, hi = bounds
  cap = jnp.maximum(jnp.where(w > 0, hi - t, jnp.where(w < 0, t - lo, 0.0)), 0.0)
  if norm == "l1":
    return jnp.sign(w) * _l1_fill(aw, cap, c)
  if norm == "linf":
    breaks, slope = cap, aw
  else:
    breaks = jnp.where(aw > 0, cap / jnp.where(aw > 0, aw, 1.0), _BIG)
    slope = aw * aw
  saturated = aw * cap  # w_i d_i once coordinate i sits on its box face

  def value(p):
    """``F(p)`` ``(B,)`` at ``p`` ``(B, 1)``."""
    return jnp.sum(aw * jnp.minimum(p if norm == "linf" else p * aw, cap), axis=1)

  top = jnp.maximum(jnp.max(breaks, axis=1), 0.0)
  feasible = value(top[:, None]) >= c  # F(max beta) is the largest <w, d> over the box
  # F(lo) < c <= F(next float above lo) (for c > 0; F(0) = 0): the bisection on float bit
  # patterns that the L1-ball projection also uses.
  lo = projections.bisect_nonneg(lambda p: value(p[:, None]), c, top)
  in_s = breaks <= lo[:, None]
  sat_s = jnp.sum(jnp.where(in_s, saturated, 0.0), axis=1)
  slope_rest = jnp.sum(jnp.where(in_s, 0.0, slope), axis=1)
  param = jnp.maximum((c - sat_s) / jnp.maximum(slope_rest, 1e-30), 0.0)[:, None]
  amount = jnp.minimum(param, cap) if norm == "linf" else jnp.minimum(param * aw, cap)
  amount = jnp.where(feasible[:, None], amount, cap)
  return jnp.sign(w) * amount


def _l1_fill(aw: Array, cap: Array, c: Array) -> Array:
  """The L1 case of :func:`hyperplane_box_projection`: amounts ``a (B, n) >= 0`` with
  ``sum_i aw_i a_i = c`` (or every ``a_i = cap_i`` when the caps cannot reach ``c``), filled in
  order of decreasing ``aw_i``."""
  order = jnp.argsort(-aw, axis=1)
  aw_s = jnp.take_along_axis(aw, order, 1)
  cap_s = jnp.take_along_axis(cap, order, 1)
  full = aw_s * cap_s
  before = jnp.cumsum(full, axis=1) - full  # progress of the coordinates ahead in the order
  rest = jnp.maximum(c[:, None] - before, 0.0)
  amount_s = jnp.minimum(cap_s, rest / jnp.where(aw_s > 0, aw_s, 1.0))
  amount_s = jnp.where(aw_s > 0, amount_s, 0.0)
  inverse = jnp.argsort(order, axis=1)
  return jnp.take_along_axis(amount_s, inverse, 1)


def _flat_bounds(bounds, x: Array):
  """The box ``(lo, hi)`` broadcast to ``x (B, ...)`` and flattened to ``(B, n)``."""
  return tuple(jnp.broadcast_to(jnp.asarray(b, x.dtype), x.shape).reshape(x.shape[0], -1)
               for b in bounds)


def _fab_body(logits_fn: LogitsFn, x: Array, y: Array, target: Array, bounds, *, norm: str,
              targeted: bool, alpha_max: float, overshoot: float, beta: float):
  """``body(i, (x1, adv, dist)) -> (x1, adv, dist)``: one FAB iteration (one gradient, or the
  ``K`` gradients of the untargeted boundary, and one forward pass); flat ``(B, n)`` points."""
  bsz = x.shape[0]
  x0 = x.reshape(bsz, -1)
  lo, hi = _flat_bounds(bounds, x)

  def boundary(x1):
    """``(f (B,), grad f (B, n))`` of the boundary to cross."""
    if targeted:
      def f(xb):
        z = logits_fn(xb)
        diff = (jnp.take_along_axis(z, target[:, None], 1) -
                jnp.take_along_axis(z, y[:, None], 1))[:, 0]
        return jnp.sum(diff), diff
      g, diff = jax.grad(f, has_aux=True)(x1)
      return diff, g.reshape(bsz, -1)
    z, vjp = jax.vjp(logits_fn, x1)
    n_cls = z.shape[1]
    cot = jnp.broadcast_to(jnp.eye(n_cls, dtype=z.dtype)[:, None, :], (n_cls, bsz, n_cls))
    jac = jnp.moveaxis(jax.vmap(lambda ct: vjp(ct)[0])(cot), 0, 1).reshape(bsz, n_cls, -1)
    df = z - jnp.take_along_axis(z, y[:, None], 1)
    dg = jac - jnp.take_along_axis(jac, y[:, None, None], 1)
    if norm == "linf":
      dual = jnp.sum(jnp.abs(dg), -1)
    elif norm == "l1":
      dual = jnp.max(jnp.abs(dg), -1)
    else:
      dual = jnp.sqrt(jnp.sum(dg * dg, -1))
    dist = jnp.abs(df) / (dual + 1e-12)
    dist = jnp.where(jax.nn.one_hot(y, n_cls, dtype=bool), jnp.inf, dist)
    s = jnp.argmin(dist, axis=1)
    return (jnp.take_along_axis(df, s[:, None], 1)[:, 0],
            jnp.take_along_axis(dg, s[:, None, None], 1)[:, 0])

  def body(_, c):
    x1, adv, res = c
    df, w = boundary(x1.reshape(x.shape))
    b = jnp.sum(w * x1, axis=1) - df
    d = hyperplane_box_projection(jnp.concatenate([x1, x0]), jnp.concatenate([w, w]),
                                  jnp.concatenate([b, b]), norm,
                                  (jnp.concatenate([lo, lo]), jnp.concatenate([hi, hi])))
    d1, d2 = d[:bsz], d[bsz:]
    a1 = jnp.maximum(projections.per_example_norm(d1, norm), 1e-8)
    a2 = jnp.maximum(projections.per_example_norm(d2, norm), 1e-8)
    alpha = jnp.clip(a1 / (a1 + a2), 0.0, alpha_max)[:, None]
    x1 = jnp.clip((x1 + overshoot * d1) * (1.0 - alpha) + (x0 + overshoot * d2) * alpha, lo, hi)
    is_adv = jnp.argmax(logits_fn(x1.reshape(x.shape)), axis=1) != y
    dist = projections.per_example_norm(x1 - x0, norm)
    better = is_adv & (dist < res)
    adv = select(better, x1, adv)
    res = jnp.where(better, dist, res)
    x1 = select(is_adv, x0 + beta * (x1 - x0), x1)
    return x1, adv, res

  return body


def fab_run(logits_fn: LogitsFn, x: Array, y: Array, target: Array, x_start: Array, *,
            norm: str, targeted: bool, steps: int, alpha_max: float, overshoot: float,
            beta: float, bounds=(0.0, 1.0)) -> tuple[Array, Array]:
  """One FAB run (FAB paper, Algorithm 1) from ``x_start``; traceable.

  Per iteration, at ``x1`` with the linearised boundary ``f(x1) + <grad f(x1), z - x1> = 0``
  (``f = z_t - z_y`` for FAB-T; untargeted: the class ``s != y`` minimising
  ``|f_s| / ||grad f_s||_q``, ``q`` the dual norm, Eq. 4):
    ``d1 = proj(x1)``, ``d2 = proj(x)`` (:func:`hyperplane_box_projection`),
    ``alpha = min(||d1|| / (||d1|| + ||d2||), alpha_max)``,
    ``x1 <- clip((1 - alpha)(x1 + overshoot d1) + alpha (x + overshoot d2), lo, hi)``;
  if ``x1`` is misclassified it is recorded when closer to ``x`` than the best so far, and
  ``x1 <- x + beta (x1 - x)``.

  :func:`fab_batch` runs the same iteration (``_fab_body``) from the host, one jitted call per
  iteration (see :func:`krylov_adv.attacks._apgd.apgd_batch` for why).

  Returns:
    ``(x_adv (B, ...), dist (B,))``: the closest misclassified iterate and its distance to ``x``
    (``inf`` where none was found).
  """
  bsz = x.shape[0]
  body = _fab_body(logits_fn, x, y, target, bounds, norm=norm, targeted=targeted,
                   alpha_max=alpha_max, overshoot=overshoot, beta=beta)
  init = (x_start.reshape(bsz, -1), x.reshape(bsz, -1), jnp.full((bsz,), jnp.inf, x.dtype))
  _, adv, res = jax.lax.fori_loop(0, steps, body, init)
  return adv.reshape(x.shape), res


def random_start(keys: Array, x: Array, eps, norm: str, bounds=(0.0, 1.0)) -> Array:
  """FAB's restart point ``clip(x + 0.5 eps u / ||u||, lo, hi)`` (linf: ``u ~ U[-1, 1]``;
  l2, l1: ``u ~ N(0, I)``; :func:`krylov_adv.attacks.toolkit.sphere_start`), per-example keys."""
  return toolkit.sphere_start(keys, x, 0.5 * jnp.asarray(eps, x.dtype), norm, bounds)


@functools.partial(jax.jit, static_argnames=("norm", "restarts"))
def _fab_start(x: Array, keys: Array, order: Array, run: Array, eps, bounds, *, norm: str,
               restarts: int) -> tuple[Array, tuple[Array, Array, Array]]:
  """Run ``run``'s target ``(B,)`` and the loop state ``(x1, adv, dist)`` before iteration 0."""
  bsz = x.shape[0]
  eps = jnp.asarray(eps, x.dtype)
  target = jax.lax.dynamic_index_in_dim(order, run // restarts, axis=1, keepdims=False)
  start = jnp.where(run % restarts == 0, x,
                    random_start(toolkit.fold_keys(keys, run), x, eps, norm, bounds))
  return target, (start.reshape(bsz, -1), x.reshape(bsz, -1), jnp.full((bsz,), jnp.inf, x.dtype))


@functools.partial(jax.jit, static_argnames=("norm", "targeted", "alpha_max",
                                             "overshoot", "beta"))
def _fab_step(logits_fn: LogitsFn, c: tuple[Array, Array, Array], x: Array, y: Array,
              target: Array, bounds, *, norm: str, targeted: bool, alpha_max: float, overshoot: float,
              beta: float) -> tuple[Array, Array, Array]:
  """One iteration of :func:`fab_run`, jitted on its own."""
  return _fab_body(logits_fn, x, y, target, bounds, norm=norm, targeted=targeted,
                   alpha_max=alpha_max, overshoot=overshoot, beta=beta)(0, c)


def _fold_run(fooled: Array, x_out: Array, adv: Array, dist: Array, eps) -> tuple[Array, Array]:
  """Folds one finished run in (both loops, host-driven and in-graph): an example not yet
  fooled is fooled when the run's closest adversarial point ``adv`` lies within ``eps``."""
  newly = (dist <= jnp.asarray(eps, adv.dtype)) & ~fooled
  return fooled | newly, select(newly, adv, x_out)


@jax.jit
def _keep_run(fooled: Array, x_out: Array, c: tuple[Array, Array, Array], x: Array,
              eps) -> tuple[Array, Array]:
  """:func:`_fold_run` of the host-driven loop's finished state ``c = (x1, adv, dist)``."""
  return _fold_run(fooled, x_out, c[1].reshape(x.shape), c[2], eps)


@functools.partial(jax.jit, static_argnames="norm")
def _finish(x_out: Array, x: Array, eps, bounds, *, norm: str) -> Array:
  # A no-op for the recorded points (their distance is <= eps); absorbs float rounding.
  return projections.project(x_out, x, jnp.asarray(eps, x.dtype), norm, bounds)


def _fab_batch_in_graph(logits_fn: LogitsFn, x: Array, y: Array, keys: Array, eps, bounds, *,
                        norm: str, targeted: bool, steps: int, restarts: int,
                        n_target_classes: int, alpha_max: float, overshoot: float,
                        beta: float) -> tuple[Array, Array]:
  """:func:`fab_batch` as one traceable ``while`` loop over runs of :func:`fab_run` (the same
  runs, keys and selection), for calls under the caller's ``jit`` or ``vmap``."""
  n_runs = restarts * (n_target_classes if targeted else 1)
  order = toolkit.target_order(logits_fn(x), y)
  eps = jnp.asarray(eps, x.dtype)

  def cond(s):
    return (s["run"] < n_runs) & ~jnp.all(s["fooled"])

  def body(s):
    run = s["run"]
    target = jax.lax.dynamic_index_in_dim(order, run // restarts, axis=1, keepdims=False)
    start = jnp.where(run % restarts == 0, x,
                      random_start(toolkit.fold_keys(keys, run), x, eps, norm, bounds))
    adv, dist = fab_run(logits_fn, x, y, target, start, norm=norm, targeted=targeted,
                        steps=steps, alpha_max=alpha_max, overshoot=overshoot, beta=beta,
                        bounds=bounds)
    fooled, x_out = _fold_run(s["fooled"], s["x_out"], adv, dist, eps)
    return dict(run=run + 1, fooled=fooled, x_out=x_out)

  s = jax.lax.while_loop(cond, body, dict(run=jnp.asarray(0, jnp.int32),
                                          fooled=jnp.zeros(y.shape, bool), x_out=x))
  return projections.project(s["x_out"], x, eps, norm, bounds), s["fooled"]


def fab_batch(logits_fn: LogitsFn, x: Array, y: Array, keys: Array, eps, *, norm: str,
              targeted: bool, steps: int, restarts: int, n_target_classes: int,
              alpha_max: float, overshoot: float, beta: float,
              bounds=(0.0, 1.0)) -> tuple[Array, Array]:
  """FAB over targets (if ``targeted``) and restarts with per-example keys.

  Run ``t * restarts + r`` attacks target :func:`target_order` column ``t`` and starts from
  ``x`` when ``r = 0``, else from :func:`random_start` with keys ``fold_in(keys_i, run)``. An
  example is fooled by the first run whose closest adversarial point is within ``eps``; the
  loop stops once every example is fooled.

  The iterations are driven from the host, one jitted call each (compiled once per shape; the
  arrays stay on the device, the host reads one bool per run): inside an XLA ``while`` loop the
  CPU backend runs the input gradient's transposed convolutions several times slower (see
  :func:`krylov_adv.attacks._apgd.apgd_batch`).

  Returns:
    ``(x_adv (B, ...), fooled (B,) bool)``; ``x_adv = x`` where not fooled.
  """
  logits_fn = toolkit.as_model(logits_fn)
  if toolkit.is_traced(x, y, keys, eps, *jax.tree_util.tree_leaves(logits_fn)):
    # Inside a caller's jit / vmap the host cannot drive the loop: the in-graph loop runs.
    return _fab_batch_in_graph(logits_fn, x, y, keys, eps, bounds, norm=norm, targeted=targeted,
                               steps=steps, restarts=restarts,
                               n_target_classes=n_target_classes, alpha_max=alpha_max,
                               overshoot=overshoot, beta=beta)
  n_runs = restarts * (n_target_classes if targeted else 1)
  order = toolkit.model_target_order(logits_fn, x, y)
  fooled = jnp.zeros(y.shape, bool)
  x_out = x
  for run in range(n_runs):
    if bool(jnp.all(fooled)):
      break
    target, c = _fab_start(x, keys, order, jnp.int32(run), eps, bounds, norm=norm,
                           restarts=restarts)
    for _ in range(steps):
      c = _fab_step(logits_fn, c, x, y, target, bounds, norm=norm, targeted=targeted,
                    alpha_max=alpha_max, overshoot=overshoot, beta=beta)
    fooled, x_out = _keep_run(fooled, x_out, c, x, eps)
  return _finish(x_out, x, eps, bounds, norm=norm), fooled


def fab_attack(logits_fn: LogitsFn, x, y, key, *, eps, norm: str, targeted: bool,
               steps: int = 100, restarts: int = 1, n_target_classes: int = 9,
               alpha_max: float = 0.1, overshoot: float = 1.05, beta: float = 0.9,
               example_index=None, bounds=None) -> Array:
  """FAB (untargeted or targeted) with the attack API; see :func:`fab_batch`.

  Args:
    logits_fn: ``(B, H, W, C)`` in ``[0, 1]`` -> logits ``(B, K)``, model in inference mode.
    x: ``(B, H, W, C)`` in ``[0, 1]``; y: ``(B,)`` int; key: PRNG key (used by restarts > 0).
    eps: budget ``>= 0`` (a point counts as fooled when its FAB distance is ``<= eps``).
    norm: ``"linf" | "l2" | "l1"``. targeted: FAB-T over ``min(n_target_classes, K - 1)`` targets.
    steps, restarts, alpha_max, overshoot, beta: FAB hyperparameters (paper/reference defaults).
    example_index: ``(B,)`` ints (or ``(B, 2)`` pairs, :func:`toolkit.example_keys`) keying each
      example's randomness (default ``arange(B)``).
    bounds: the input box ``(lo, hi)`` (default ``(0, 1)``).

  Returns:
    ``x_adv`` ``(B, H, W, C)`` within the eps-ball and box.
  """
  x, y, k, example_index, bounds = toolkit.validate_inputs(logits_fn, x, y, eps, norm,
                                                           example_index=example_index,
                                                           bounds=bounds)
  checks.check_at_least("steps", steps, 1)
  checks.check_at_least("restarts", restarts, 1)
  checks.check_at_least("n_target_classes", n_target_classes, 1)
  if targeted:
    checks.warn_target_classes(int(n_target_classes), k)
  if not 0.0 <= alpha_max <= 1.0:
    raise ValueError(f"alpha_max must lie in [0, 1], got {alpha_max}")
  checks.check_positive("overshoot", overshoot)
  if not 0.0 < beta <= 1.0:
    raise ValueError(f"beta must lie in (0, 1], got {beta}")
  if k < 2:
    raise ValueError(f"FAB needs at least 2 classes, got K={k}")
  x_adv, _ = fab_batch(logits_fn, x, y, toolkit.example_keys(key, example_index), eps, norm=norm,
                       targeted=bool(targeted), steps=int(steps), restarts=int(restarts),
                       n_target_classes=int(min(n_target_classes, k - 1)),
                       alpha_max=float(alpha_max), overshoot=float(overshoot), beta=float(beta),
                       bounds=bounds)
  return x_adv


@register("fab_t")
@toolkit.attack_entry
def fab_t(logits_fn: LogitsFn, x, y, key, *, eps, norm: str, steps: int = 100,
          restarts: int = 1, n_target_classes: int = 9, alpha_max: float = 0.1,
          overshoot: float = 1.05, beta: float = 0.9, example_index=None,
          bounds=None) -> Array:
  """Targeted FAB over the ``min(9, K-1)`` highest non-true classes (AutoAttack's FAB-T);
  see :func:`fab_attack`."""
  return fab_attack(logits_fn, x, y, key, eps=eps, norm=norm, targeted=True, steps=steps,
                    restarts=restarts, n_target_classes=n_target_classes,
                    alpha_max=alpha_max, overshoot=overshoot, beta=beta,
                    example_index=example_index, bounds=bounds)


@register("fab")
@toolkit.attack_entry
def fab(logits_fn: LogitsFn, x, y, key, *, eps, norm: str, steps: int = 100,
        restarts: int = 1, alpha_max: float = 0.1, overshoot: float = 1.05, beta: float = 0.9,
        example_index=None, bounds=None) -> Array:
  """Untargeted FAB (closest linearised boundary over all classes, FAB paper Eq. 4); AutoAttack+
  runs it with 5 restarts. See :func:`fab_attack`."""
  return fab_attack(logits_fn, x, y, key, eps=eps, norm=norm, targeted=False, steps=steps,
                    restarts=restarts, alpha_max=alpha_max, overshoot=overshoot, beta=beta,
                    example_index=example_index, bounds=bounds)
