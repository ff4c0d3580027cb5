"""Threat-model geometry shared by every attack: norm balls, the input box, step normalisation.

All functions act per example on batches of shape ``(B, ...)``; norms reduce over every axis
but the first.

The box ``[lo, hi]`` (``bounds``) is where admissible inputs live: ``[0, 1]`` for images, or the
image of ``[0, 1]`` under a model's input standardisation ``z = (x - mu) / s``, i.e.
``((0 - mu) / s, (1 - mu) / s)`` per channel. ``lo`` and ``hi`` are scalars or arrays that
broadcast against one example (``(C,)`` per channel, ``(H, W, C)``) or the whole batch; every
projection, clip and random start below keeps its output inside them. With ``lo < hi``
elementwise; a clean ``x`` must lie inside (``attacks.checks.check_attack_inputs``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

NORMS = ("linf", "l2", "l1")
# The training methods and their regularisers (SOAR's radius factor, SCORPIO's Frank-Wolfe
# oracle, SOAT's step) are defined for Linf and L2 only; L1 is an evaluation threat model.
TRAINING_NORMS = ("linf", "l2")
DEFAULT_BOUNDS = (0.0, 1.0)
_TINY = 1e-12
# The L1 steepest-ascent step moves the coordinates whose |g_i| lies in the top (1 - q) of the
# example's coordinates, q = L1_STEP_QUANTILE (Tramer and Boneh 2019, "SLIDE", q = 0.99).
L1_STEP_QUANTILE = 0.99


def check_norm(norm: str, norms=NORMS) -> None:
  """Raises ``ValueError`` unless ``norm`` is one of ``norms`` (default ``"linf"``, ``"l2"`` or
  ``"l1"``; :data:`TRAINING_NORMS` for the training methods)."""
  if norm not in norms:
    raise ValueError(f"unknown norm {norm!r}; use one of {tuple(norms)}")


def bcast(per_example: Array, like: Array) -> Array:
  """Reshapes a per-example ``(B,)`` array to ``(B, 1, ..., 1)`` so it broadcasts against
  ``like`` ``(B, ...)``."""
  return per_example.reshape((-1,) + (1,) * (like.ndim - 1))


def per_example_norm(x: Array, norm: str) -> Array:
  """``||x_i||`` for each example: ``max |x_i|`` (linf), ``sqrt(sum x_i^2)`` (l2) or
  ``sum |x_i|`` (l1). ``(B,)``."""
  check_norm(norm)
  flat = x.reshape(x.shape[0], -1)
  if norm == "linf":
    return jnp.max(jnp.abs(flat), axis=1)
  if norm == "l1":
    return jnp.sum(jnp.abs(flat), axis=1)
  return jnp.sqrt(jnp.sum(flat * flat, axis=1))


def clip_box(x: Array, bounds=DEFAULT_BOUNDS) -> Array:
  """``x`` clipped coordinate-wise to the box ``[lo, hi]`` (``bounds = (lo, hi)``)."""
  lo, hi = bounds
  return jnp.clip(x, jnp.asarray(lo, x.dtype), jnp.asarray(hi, x.dtype))


def box_width(bounds, like: Array) -> Array:
  """``hi - lo`` (1 where infinite), the unit of the random noise that attacks draw in absolute
  terms (APGD's L1 start, TRADES' start): in ``[0, 1]`` it is 1, so they match their references,
  and in a standardised box ``((0 - mu) / s, (1 - mu) / s)`` it is ``1 / s``, so that attacking
  ``f(z s + mu)`` there is attacking ``f`` in ``[0, 1]``."""
  lo, hi = bounds
  width = jnp.asarray(hi, like.dtype) - jnp.asarray(lo, like.dtype)
  return jnp.where(jnp.isfinite(width), width, 1.0)


def project_ball(delta: Array, eps, norm: str) -> Array:
  """Euclidean projection of each ``delta_i`` onto ``{d : ||d|| <= eps}`` (no box).

  linf: coordinate-wise clip to ``[-eps, eps]``; l2: ``delta_i * min(1, eps / ||delta_i||_2)``;
  l1: :func:`project_l1_box` with an unbounded box. ``eps`` is a scalar or a ``(B,)`` array.
  """
  eps = jnp.asarray(eps, delta.dtype)
  if norm == "linf":
    e = bcast(jnp.broadcast_to(eps, delta.shape[:1]), delta)
    return jnp.clip(delta, -e, e)
  if norm == "l1":
    return _l1_box_delta(delta, jnp.full_like(delta, jnp.inf), jnp.full_like(delta, jnp.inf), eps)
  nrm = per_example_norm(delta, norm)
  scale = jnp.minimum(1.0, eps / jnp.maximum(nrm, _TINY))
  return delta * bcast(scale, delta)


def bisect_nonneg(value, target: Array, top: Array) -> Array:
  """The largest float ``p`` in ``[0, top]`` (per example, ``(B,)``) with ``value(p) < target``
  for a nondecreasing ``value: (B,) -> (B,)``, up to adjacent floats: bisection on the IEEE bit
  pattern of nonnegative floats (monotone as integers), one pass per bit. Returns ``lo`` such
  that ``value(lo) < target <= value(next float above lo)``, given ``value(0) < target <=
  value(top)``."""
  dtype = top.dtype
  itype = {4: jnp.int32, 8: jnp.int64}[jnp.dtype(dtype).itemsize]
  as_bits = lambda p: jax.lax.bitcast_convert_type(p, itype)
  as_float = lambda i: jax.lax.bitcast_convert_type(i, dtype)

  def step(_, lohi):
    lo, hi = lohi
    mid = lo + (hi - lo) // 2  # no overflow: both are nonnegative bit patterns
    up = value(as_float(mid)) >= target
    return jnp.where(up, lo, mid), jnp.where(up, mid, hi)

  nbits = 8 * jnp.dtype(dtype).itemsize
  lo, _ = jax.lax.fori_loop(0, nbits - 1, step, (jnp.zeros_like(as_bits(top)), as_bits(top)))
  return as_float(lo)


def _l1_box_delta(y: Array, cap_pos: Array, cap_neg: Array, eps) -> Array:
  """Euclidean projection of ``y (B, ...)`` onto ``{d : ||d_i||_1 <= eps_i, -cap_neg <= d <=
  cap_pos}`` (caps ``>= 0``, ``inf`` allowed; ``eps`` scalar or ``(B,)``).

  By the KKT conditions the projection is ``d_i = sign(y_i) clip(|y_i| - lam, 0, u_i)``, ``u_i``
  the cap on ``y_i``'s side, with ``lam = 0`` when that is already inside the L1 ball and
  otherwise the root of ``G(lam) = sum_i clip(|y_i| - lam, 0, u_i) = eps`` (``G`` nonincreasing,
  piecewise linear, breakpoints ``|y_i|`` and ``|y_i| - u_i``). The root's segment is bracketed
  to adjacent floats by :func:`bisect_nonneg`; on it the set ``A`` of coordinates strictly
  between their bounds is fixed and the root is exact: ``lam = (sum_{sat} u_i + sum_A |y_i| -
  eps) / |A|``. Same solution as the reference AutoAttack's sort-based ``L1_projection``.
  """
  shape = y.shape
  bsz = shape[0]
  y = y.reshape(bsz, -1)
  a = jnp.abs(y)
  u = jnp.where(y >= 0, cap_pos.reshape(bsz, -1), cap_neg.reshape(bsz, -1))
  u = jnp.maximum(u, 0.0)
  eps = jnp.broadcast_to(jnp.asarray(eps, y.dtype), (bsz,))
  g = lambda lam: jnp.sum(jnp.clip(a - lam[:, None], 0.0, u), axis=1)
  inside = g(jnp.zeros((bsz,), y.dtype)) <= eps
  # G(lam) > eps  <=>  -G(lam) < -eps; -G is nondecreasing on [0, max|y|].
  top = jnp.max(a, axis=1)
  lam_lo = bisect_nonneg(lambda lam: -g(lam), -eps, jnp.maximum(top, 0.0))
  # On (lam_lo, next float) no breakpoint lies strictly inside: classify at lam_lo.
  # Saturated on the whole segment iff its breakpoint |y_i| - u_i lies at or above the next
  # float, i.e. strictly above lam_lo; active iff |y_i| lies strictly above lam_lo.
  sat = (a - u) > lam_lo[:, None]
  act = ~sat & (a > lam_lo[:, None])
  n_act = jnp.sum(act, axis=1)
  num = jnp.sum(jnp.where(sat, u, 0.0), axis=1) + jnp.sum(jnp.where(act, a, 0.0), axis=1) - eps
  lam = jnp.where(n_act > 0, num / jnp.maximum(n_act, 1).astype(y.dtype), lam_lo)
  lam = jnp.where(inside, 0.0, jnp.maximum(lam, 0.0))
  d = jnp.sign(y) * jnp.clip(a - lam[:, None], 0.0, u)
  return d.reshape(shape)


def project_l1_box(x_adv: Array, x: Array, eps, bounds=DEFAULT_BOUNDS) -> Array:
  """Euclidean projection of ``x_adv`` onto ``{z : ||z_i - x_i||_1 <= eps, lo <= z <= hi}``
  (the L1 ball intersected with the box), per example. ``x`` must lie in the box.

  See :func:`_l1_box_delta` (the cap of coordinate ``i`` is ``hi_i - x_i`` upwards and
  ``x_i - lo_i`` downwards). Unlike Linf and L2, clipping to the box after projecting onto the
  L1 ball is not the projection onto the intersection (it can leave L1 budget unused), so the
  box enters the projection itself, as in Croce and Hein's "Mind the box" (2021).
  """
  lo, hi = bounds
  lo = jnp.broadcast_to(jnp.asarray(lo, x.dtype), x.shape)
  hi = jnp.broadcast_to(jnp.asarray(hi, x.dtype), x.shape)
  d = _l1_box_delta(x_adv - x, hi - x, x - lo, eps)
  return clip_box(x + d, bounds)


def project(x_adv: Array, x: Array, eps, norm: str, bounds=DEFAULT_BOUNDS) -> Array:
  """``Proj``: onto the eps-ball around ``x`` intersected with the box ``[lo, hi]``.

  linf, l2: the ball projection then a clip to the box. Clipping after the ball projection never
  leaves the ball: ``x`` lies in the box, so clipping only moves each coordinate of ``x_adv``
  towards ``x``'s and shrinks every ``|x_adv - x|`` coordinate (for Linf this is the exact
  projection onto the intersection; for L2 it is the one the attacks' references use). l1: the
  exact projection onto the intersection, :func:`project_l1_box`.
  """
  if norm == "l1":
    return project_l1_box(x_adv, x, eps, bounds)
  x_adv = x + project_ball(x_adv - x, eps, norm)
  return clip_box(x_adv, bounds)


def l1_sparse_sign(g: Array, quantile=L1_STEP_QUANTILE) -> Array:
  """The L1 ascent direction of unit L1 norm: ``sign(g_i)`` on the coordinates where ``|g_i|``
  reaches the example's ``quantile`` of ``|g|`` (at least one), zero elsewhere, divided by the
  number of such coordinates (Tramer and Boneh 2019's SLIDE step; APGD's L1 step with
  ``quantile = 1 - topk``). ``quantile`` is a scalar or ``(B,)``."""
  bsz = g.shape[0]
  flat = jnp.abs(g.reshape(bsz, -1))
  n = flat.shape[1]
  srt = jnp.sort(flat, axis=1)
  q = jnp.broadcast_to(jnp.asarray(quantile, g.dtype), (bsz,))
  idx = jnp.clip(jnp.floor(q * n).astype(jnp.int32), 0, n - 1)
  thr = jnp.take_along_axis(srt, idx[:, None], axis=1)
  s = jnp.sign(g.reshape(bsz, -1)) * (flat >= thr)
  return (s / (jnp.sum(jnp.abs(s), axis=1, keepdims=True) + 1e-10)).reshape(g.shape)


def normalize_step(g: Array, norm: str) -> Array:
  """Steepest-ascent direction of unit size in the given norm.

  linf: ``sign(g)``; l2: ``g_i / ||g_i||_2`` (zero where ``g_i = 0``); l1: the sparse sign step
  :func:`l1_sparse_sign` (the exact L1 steepest ascent moves one coordinate, the largest
  ``|g_i|``, which stalls at the box; the top 1% of coordinates is the standard compromise).
  """
  check_norm(norm)
  if norm == "linf":
    return jnp.sign(g)
  if norm == "l1":
    return l1_sparse_sign(g)
  nrm = per_example_norm(g, "l2")
  return g / bcast(jnp.maximum(nrm, _TINY), g)


def random_start(key: Array, x: Array, eps, norm: str, bounds=DEFAULT_BOUNDS) -> Array:
  """A random point of the eps-ball around ``x``, inside the box ``[lo, hi]``.

  linf: uniform in the cube. l2: uniform in the ball (Gaussian direction, radius
  ``eps * u^(1/n)`` with ``n`` the input dimension). l1: uniform in the ball (Laplace-sign
  direction scaled by ``u^(1/n)``: exponential coordinates normalised to the simplex give a
  uniform point of the L1 sphere), then projected onto the ball and box. Linf and L2 are then
  clipped to the box.
  """
  check_norm(norm)
  eps = jnp.asarray(eps, x.dtype)
  if norm == "linf":
    delta = jax.random.uniform(key, x.shape, x.dtype, -1.0, 1.0) * eps
  else:
    k_dir, k_rad = jax.random.split(key)
    n = x[0].size
    radius = eps * jax.random.uniform(k_rad, x.shape[:1], x.dtype) ** (1.0 / n)
    if norm == "l2":
      direction = normalize_step(jax.random.normal(k_dir, x.shape, x.dtype), "l2")
    else:
      lap = jax.random.laplace(k_dir, x.shape, x.dtype)
      direction = lap / bcast(jnp.maximum(per_example_norm(lap, "l1"), _TINY), lap)
    delta = direction * bcast(radius, x)
    if norm == "l1":
      return project_l1_box(x + delta, x, eps, bounds)
  return clip_box(x + delta, bounds)
