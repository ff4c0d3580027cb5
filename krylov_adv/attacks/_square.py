"""Square Attack: score-based random search with square-shaped updates (no gradients).

Andriushchenko, Croce, Flammarion and Hein, ECCV 2020, "Square Attack: a query-efficient
black-box adversarial attack via random search", Algorithm 1 (random search on the margin loss),
Algorithm 2 (linf updates: a random ``s x s`` window set to ``+-eps`` per channel, vertical-stripe
initialisation) and Algorithm 3 (l2 updates: the window pair of Sec. 3.2 with the ``eta^(s)``
"double square" pattern, Eq. 3-4, moving perturbation mass between two windows, grid
initialisation) and its L1 version of the reference AutoAttack code (``square.py``, norm ``L1``:
the same windows with ring weights ``1 / (k + 1)^4`` normalised in L1, the L1 mass of the two
windows moved into the first one per channel, and every candidate projected onto the L1 ball
intersected with the box, radius ``eps (1 - 1e-6)``). AutoAttack's settings: 5000 queries, ``p_init = 0.8``, the piecewise-constant
``p`` schedule halving ``p`` after iterations ``[10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000]``
(:func:`p_schedule`), window side ``s = round(sqrt(p * H * W))``.

Every example draws its own windows and signs from ``fold_in(fold_in(key, example_index), i)``
(the reference AutoAttack code shares one window per iteration across the batch; the paper's
algorithm is per image). A candidate replaces the current point when it lowers the margin
``z_y - max_{j != y} z_j`` or misclassifies; an example stops once misclassified.

Registered attack: ``"square"``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from krylov_adv import projections
from krylov_adv.attacks import checks, register, toolkit
from krylov_adv.attacks.toolkit import Array, LogitsFn, bcast, fold_keys, select

P_THRESHOLDS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def p_schedule(i: int, steps: int, p_init: float, rescale_schedule: bool) -> float:
  """Fraction ``p`` of pixels changed at iteration ``i`` (Square Attack, Sec. 3, reference code).

  ``p = p_init / 2^m`` where ``m`` counts the thresholds ``P_THRESHOLDS`` strictly below ``it``;
  ``it = i``, or ``floor(i / steps * 10000)`` when ``rescale_schedule`` (so that a short
  budget still sweeps the whole schedule; AutoAttack uses ``False``).
  """
  it = int(i / steps * 10000) if rescale_schedule else i
  return p_init / 2 ** sum(it > t for t in P_THRESHOLDS)


def _stage(i: Array, steps: int, rescale_schedule: bool) -> Array:
  it = (i * 10000) // steps if rescale_schedule else i
  return jnp.sum(it > jnp.asarray(P_THRESHOLDS)).astype(jnp.int32)


def _side_linf(p: float, h: int, w: int) -> int:
  return min(max(int(round(math.sqrt(p * h * w))), 1), h, w)


def _side_l2(p: float, h: int, w: int) -> int:
  s = max(int(round(math.sqrt(p * h * w))), 3)
  s += 1 - s % 2  # odd, so the double-square pattern has a centre row
  return min(s, h, w)


def _unit(a: np.ndarray, norm: str) -> np.ndarray:
  return a / (np.sum(np.abs(a)) if norm == "l1" else np.sqrt(np.sum(a ** 2)))


def _eta_rectangle(rows: int, cols: int, norm: str = "l2") -> np.ndarray:
  """Square Attack Eq. 3: concentric rectangles around the centre, ring ``k`` weighted by
  ``1 / (k + 1)^2``, unit l2 norm (``norm="l1"``: ``1 / (k + 1)^4``, unit l1 norm, the reference
  code's L1 version). ``(rows, cols)``."""
  out = np.zeros((rows, cols))
  if rows == 0 or cols == 0:
    return out
  power = 4 if norm == "l1" else 2
  r0, c0 = rows // 2, cols // 2
  for k in range(max(rows // 2 + 1, cols // 2 + 1)):
    out[max(r0 - k, 0):min(r0 + k + 1, rows), max(c0 - k, 0):min(c0 + k + 1, cols)] += (
        1.0 / (k + 1) ** power)
  return _unit(out, norm)


def eta_pattern(s: int, norm: str = "l2") -> np.ndarray:
  """Square Attack Eq. 4, ``eta^(s)``: the upper ``s//2`` rows are :func:`_eta_rectangle` with a
  plus sign, the lower ``s - s//2`` rows with a minus sign; unit l2 norm (``norm="l1"``: the L1
  rectangles, unit l1 norm). ``(s, s)``."""
  out = np.concatenate([_eta_rectangle(s // 2, s, norm), -_eta_rectangle(s - s // 2, s, norm)],
                       axis=0)
  return _unit(out, norm)


def _l2_init_layout(h: int, w: int, norm: str = "l2") -> tuple[np.ndarray, np.ndarray,
                                                               np.ndarray]:
  """Static layout of the l2 (and l1) initialisation (Algorithm 3): a grid of ``s x s`` tiles,
  ``s = max(h // 5, 1)``, offset by ``(h - 5 s) // 2``, each holding ``eta^(s)`` (the norm's
  :func:`eta_pattern`).

  Returns ``tile_id (h, w)`` (``-1`` outside tiles), and ``eta^(s)`` and its transpose laid out
  on the grid, ``(h, w)`` each.
  """
  s = max(h // 5, 1)
  off_h, off_w = max((h - 5 * s) // 2, 0), max((w - 5 * s) // 2, 0)
  tile_id = -np.ones((h, w), np.int32)
  pat = np.zeros((2, h, w))
  eta = eta_pattern(s, norm)
  tid = 0
  for th in range(h // s):
    for tw in range(w // s):
      r, c = off_h + th * s, off_w + tw * s
      if r < h and c < w:
        rr, cc = min(r + s, h), min(c + s, w)
        tile_id[r:rr, c:cc] = tid
        pat[0, r:rr, c:cc] = eta[:rr - r, :cc - c]
        pat[1, r:rr, c:cc] = eta.T[:rr - r, :cc - c]
      tid += 1
  return tile_id, pat[0], pat[1]


def _margin(logits_fn: LogitsFn, x: Array, y: Array) -> Array:
  """``z_y - max_{j != y} z_j`` per example ``(B,)``; ``<= 0`` means misclassified."""
  z = logits_fn(x)
  z_y = jnp.take_along_axis(z, y[:, None], 1)[:, 0]
  others = jnp.where(jax.nn.one_hot(y, z.shape[1], dtype=bool), -jnp.inf, z)
  return z_y - jnp.max(others, axis=1)


def _window(lo: Array, s: Array, n: int) -> Array:
  """``(B, n)`` bool, ``lo_b <= i < lo_b + s``."""
  i = jnp.arange(n)[None, :]
  return (i >= lo[:, None]) & (i < lo[:, None] + s)


def _corner(u: Array, s: Array, n: int) -> Array:
  # Uniform in {0, ..., n - s - 1} like the reference (and 0 when s == n).
  return jnp.floor(u * (n - s)).astype(jnp.int32)


def _window_tables(norm: str, p_init: float, h: int, w: int, dtype):
  """Window side ``s`` per schedule stage ``(stages,)`` int32 and the ``eta^(s)`` pattern of each
  stage zero-padded to the largest side, ``(stages, smax, smax)``."""
  ps = [p_init / 2 ** m for m in range(len(P_THRESHOLDS) + 1)]
  side = _side_linf if norm == "linf" else _side_l2
  sides_np = [side(p, h, w) for p in ps]
  smax = max(sides_np)
  etas = np.zeros((len(ps), smax, smax))
  for m, s in enumerate(sides_np):
    etas[m, :s, :s] = eta_pattern(s, "l1" if norm == "l1" else "l2")
  return jnp.asarray(sides_np, jnp.int32), jnp.asarray(etas, dtype)


def _l1_candidate_radius(eps):
  # The reference projects every L1 candidate onto the ball of radius eps (1 - 1e-6), so that
  # rounding never puts it outside the eps ball.
  return eps * (1.0 - 1e-6)


def _initial_point(keys: Array, x: Array, eps, norm: str, bounds) -> Array:
  """linf: vertical stripes of ``+-eps`` (Algorithm 2); l2: the grid of ``eta^(s)`` tiles with
  random signs and orientations, scaled to norm ``eps`` (Algorithm 3); both clipped to the box.
  l1: the grid of L1 ``eta^(s)`` tiles with random signs, projected onto the L1 ball (radius
  ``eps (1 - 1e-6)``) intersected with the box (reference code)."""
  _, h, w, n_ch = x.shape
  if norm == "linf":
    stripes = jax.vmap(lambda k: jax.random.rademacher(k, (1, w, n_ch), x.dtype))(keys)
    return projections.clip_box(x + eps * stripes, bounds)
  tile_id, pat0, pat1 = _l2_init_layout(h, w, norm)
  n_tiles = int(tile_id.max()) + 1
  k_sign, k_flip = jax.vmap(lambda k: jax.random.split(k), out_axes=1)(keys)
  signs = jax.vmap(lambda k: jax.random.rademacher(k, (n_tiles, n_ch), x.dtype))(k_sign)
  flips = jax.vmap(lambda k: jax.random.bernoulli(k, 0.5, (n_tiles,)))(k_flip)
  tid = jnp.asarray(np.maximum(tile_id, 0))
  inside = jnp.asarray(tile_id >= 0)[None, :, :, None]
  pattern = jnp.where(flips[:, tid], jnp.asarray(pat1, x.dtype), jnp.asarray(pat0, x.dtype))
  delta0 = jnp.where(inside, pattern[..., None] * signs[:, tid, :], 0.0)
  if norm == "l1":
    return projections.project_l1_box(x + delta0, x, _l1_candidate_radius(eps), bounds)
  return projections.clip_box(x + projections.normalize_step(delta0, "l2") * eps, bounds)


def _candidate_linf(k: Array, s: Array, x_cur: Array, x: Array, eps, bounds) -> Array:
  """Algorithm 2's update: one random ``s x s`` window set to ``+-eps`` per channel."""
  _, h, w, n_ch = x.shape

  def draw(kk):
    k_pos, k_sign = jax.random.split(kk)
    return jax.random.uniform(k_pos, (2,)), jax.random.rademacher(k_sign, (n_ch,), x.dtype)

  u, sign = jax.vmap(draw)(k)
  win = (_window(_corner(u[:, 0], s, h), s, h)[:, :, None] &
         _window(_corner(u[:, 1], s, w), s, w)[:, None, :])[..., None]
  x_new = x_cur + jnp.where(win, 2.0 * eps * sign[:, None, None, :], 0.0)
  return projections.clip_box(jnp.clip(x_new, x - eps, x + eps), bounds)


def _candidate_l2(k: Array, s: Array, eta_s: Array, x_cur: Array, x: Array, eps, bounds,
                  norm: str = "l2") -> Array:
  """Algorithm 3's update: ``eta^(s)`` in window 1 (perturbation mass of windows 1 and 2 moved
  into it), window 2 zeroed, the whole perturbation rescaled to norm ``eps`` and clipped to the
  box. ``norm="l1"``: the reference code's L1 update, the same windows with L1 masses per
  channel (``new / ||new||_1 * (max(eps - ||delta||_1, 0) / C + ||delta_{w1 u w2}||_1) * C``)
  and the result projected onto the L1 ball (radius ``eps (1 - 1e-6)``) and box."""
  _, h, w, n_ch = x.shape
  smax = eta_s.shape[0]

  def draw(kk):
    k_pos, k_sign, k_flip = jax.random.split(kk, 3)
    return (jax.random.uniform(k_pos, (4,)), jax.random.rademacher(k_sign, (n_ch,), x.dtype),
            jax.random.bernoulli(k_flip, 0.5))

  u, sign, flip = jax.vmap(draw)(k)
  vh, vw = _corner(u[:, 0], s, h), _corner(u[:, 1], s, w)
  m1 = (_window(vh, s, h)[:, :, None] & _window(vw, s, w)[:, None, :])[..., None]
  m2 = (_window(_corner(u[:, 2], s, h), s, h)[:, :, None] &
        _window(_corner(u[:, 3], s, w), s, w)[:, None, :])[..., None]
  delta = x_cur - x
  if norm == "l1":  # per (example, channel) window norms; the image's norm per example
    window_norm = lambda a: jnp.sum(jnp.abs(a), axis=(1, 2), keepdims=True)
    norm_wins = window_norm(jnp.where(m1 | m2, delta, 0.0))
  else:
    window_norm = lambda a: jnp.sqrt(jnp.sum(a * a, axis=(1, 2), keepdims=True))
    norm_wins = bcast(projections.per_example_norm(jnp.where(m1 | m2, delta, 0.0), "l2"), x)
  norm_win1 = window_norm(jnp.where(m1, delta, 0.0))
  norm_img = bcast(projections.per_example_norm(delta, norm), x)
  # eta^(s) placed with its corner at (vh, vw), transposed for half the examples.
  lr = jnp.clip(jnp.arange(h)[None, :] - vh[:, None], 0, smax - 1)[:, :, None]
  lc = jnp.clip(jnp.arange(w)[None, :] - vw[:, None], 0, smax - 1)[:, None, :]
  patch = jnp.where(flip[:, None, None], eta_s[lc, lr], eta_s[lr, lc])[..., None]
  new = jnp.where(m1, patch * sign[:, None, None, :] + delta / (1e-12 + norm_win1), 0.0)
  if norm == "l1":
    budget = (jnp.maximum(eps - norm_img, 0.0) / n_ch + norm_wins) * n_ch
  else:
    budget = jnp.sqrt(jnp.maximum(eps ** 2 - norm_img ** 2, 0.0) / n_ch + norm_wins ** 2)
  new = new / (1e-12 + window_norm(new)) * budget
  delta = jnp.where(m1, new, jnp.where(m2, 0.0, delta))
  if norm == "l1":
    return projections.project_l1_box(x + delta, x, _l1_candidate_radius(eps), bounds)
  return projections.clip_box(x + projections.normalize_step(delta, "l2") * eps, bounds)


@functools.partial(jax.jit, static_argnames=("norm", "steps", "p_init",
                                             "rescale_schedule"))
def square_batch(logits_fn: LogitsFn, x: Array, y: Array, keys: Array, eps,
                 bounds=projections.DEFAULT_BOUNDS, *, norm: str, steps: int, p_init: float,
                 rescale_schedule: bool) -> tuple[Array, Array]:
  """Jitted Square Attack on NHWC images with per-example keys ``(B, ...)``, inside the box
  ``bounds = (lo, hi)``.

  Returns:
    ``(x_adv (B, H, W, C), fooled (B,) bool)``: the point of lowest margin found (the first
    misclassified one where fooled), within the eps-ball and box. The loop stops after
    ``steps`` iterations or once every example is misclassified.
  """
  _, h, w, _ = x.shape
  eps = jnp.asarray(eps, x.dtype)
  sides, etas = _window_tables(norm, p_init, h, w, x.dtype)
  # iterations use keys 0..steps-1
  x_best = _initial_point(fold_keys(keys, steps), x, eps, norm, bounds)

  def cond(c):
    i, _, margin = c
    return (i < steps) & jnp.any(margin > 0)

  def body(c):
    i, x_cur, margin_cur = c
    stage = _stage(i, steps, rescale_schedule)
    k = fold_keys(keys, i)
    if norm == "linf":
      x_new = _candidate_linf(k, sides[stage], x_cur, x, eps, bounds)
    else:
      x_new = _candidate_l2(k, sides[stage], etas[stage], x_cur, x, eps, bounds, norm)
    margin = _margin(logits_fn, x_new, y)
    accept = (margin_cur > 0) & ((margin < margin_cur) | (margin <= 0))
    return i + 1, select(accept, x_new, x_cur), jnp.where(accept, margin, margin_cur)

  _, x_adv, margin = jax.lax.while_loop(
      cond, body, (jnp.asarray(0, jnp.int32), x_best, _margin(logits_fn, x_best, y)))
  return x_adv, margin <= 0


@register("square")
@toolkit.attack_entry
def square(logits_fn: LogitsFn, x, y, key, *, eps, norm: str, steps: int = 5000,
           p_init: float = 0.8, rescale_schedule: bool = False, example_index=None,
           bounds=None) -> Array:
  """Square Attack (Andriushchenko et al. 2020), untargeted margin loss; see :func:`square_batch`.

  Args:
    logits_fn: ``(B, H, W, C)`` in ``[0, 1]`` -> logits ``(B, K)``; only its values are used.
    x: ``(B, H, W, C)`` images in ``[0, 1]``; y: ``(B,)`` int; key: PRNG key.
    eps: budget ``>= 0``. norm: ``"linf" | "l2" | "l1"``.
    steps: iterations (one model query each after the initial one; AutoAttack: 5000).
    p_init: initial fraction of pixels per window (0.8). rescale_schedule: stretch the
      :func:`p_schedule` to ``steps`` (``False`` in AutoAttack).
    example_index: ``(B,)`` ints (or ``(B, 2)`` pairs, :func:`toolkit.example_keys`) keying each
      example's randomness (default ``arange(B)``).
    bounds: the input box ``(lo, hi)`` (default ``(0, 1)``).

  Returns:
    ``x_adv`` ``(B, H, W, C)`` within the eps-ball and the box.
  """
  x, y, _, example_index, bounds = toolkit.validate_inputs(logits_fn, x, y, eps, norm,
                                                           example_index=example_index,
                                                           bounds=bounds)
  if x.ndim != 4:
    raise ValueError(f"Square Attack needs NHWC images (B, H, W, C), got shape {x.shape}")
  checks.check_at_least("steps", steps, 1)
  if not 0.0 < p_init <= 1.0:
    raise ValueError(f"p_init must lie in (0, 1], got {p_init}")
  x_adv, _ = square_batch(logits_fn, x, y, toolkit.example_keys(key, example_index), eps,
                          bounds, norm=norm, steps=int(steps), p_init=float(p_init),
                          rescale_schedule=bool(rescale_schedule))
  return x_adv
