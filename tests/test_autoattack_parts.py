"""AutoAttack building blocks against hand computations and independent references.

DLR losses on fixed logits, APGD's checkpoint sequence and step-size rule, FAB's hyperplane-box
projection against SciPy's LP/QP solvers, FAB on a linear model against the closed-form distance
to the decision boundary, Square's p schedule and eta pattern.
"""

from __future__ import annotations

import fractions
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from krylov_adv import losses
from krylov_adv.attacks import _apgd as apgd
from krylov_adv.attacks import _fab as fab
from krylov_adv.attacks import _square as square
from krylov_adv.attacks import toolkit

scipy_optimize = pytest.importorskip("scipy.optimize")


# ----------------------------------------------------------------------------------------------
# DLR (APGD paper, Eq. 6 and 7), by hand.

LOGITS = np.array([[3.0, 1.0, 2.0, 0.0, -1.0],
                   [0.5, 4.0, 1.0, 2.0, 3.0]], np.float32)


def test_dlr_against_hand_computed_values():
  # Row 0 sorted: 3 > 2 > 1 > 0 > -1, so z_pi1 - z_pi3 = 3 - 1 = 2.
  #   y = 0: -(3 - 2) / 2 = -0.5;   y = 2: -(2 - 3) / 2 = 0.5.
  # Row 1 sorted: 4 > 3 > 2 > 1 > 0.5, so z_pi1 - z_pi3 = 2.
  #   y = 1: -(4 - 3) / 2 = -0.5;   y = 0: -(0.5 - 4) / 2 = 1.75.
  got = losses.dlr_loss(jnp.asarray(LOGITS), jnp.array([0, 1]))
  np.testing.assert_allclose(got, [-0.5, -0.5], rtol=1e-6)
  got = losses.dlr_loss(jnp.asarray(LOGITS), jnp.array([2, 0]))
  np.testing.assert_allclose(got, [0.5, 1.75], rtol=1e-6)


def test_targeted_dlr_against_hand_computed_values():
  # Row 0: z_pi1 - (z_pi3 + z_pi4) / 2 = 3 - (1 + 0) / 2 = 2.5; y = 0, t = 3: -(3 - 0) / 2.5.
  # Row 1: 4 - (2 + 1) / 2 = 2.5; y = 1, t = 4: -(4 - 3) / 2.5 = -0.4.
  got = losses.dlr_targeted_loss(jnp.asarray(LOGITS), jnp.array([0, 1]), jnp.array([3, 4]))
  np.testing.assert_allclose(got, [-1.2, -0.4], rtol=1e-6)
  # Reaching the target flips the sign: y = 2 (z = 2), t = 0 (z = 3): -(2 - 3) / 2.5 = 0.4.
  got = losses.dlr_targeted_loss(jnp.asarray(LOGITS[:1]), jnp.array([2]), jnp.array([0]))
  np.testing.assert_allclose(got, [0.4], rtol=1e-6)


def test_dlr_is_invariant_to_shift_and_positive_scale():
  # The property the paper designs DLR for (Sec. 4): invariance to z -> a z + b, a > 0.
  z = jnp.asarray(np.random.default_rng(0).normal(size=(6, 10)), jnp.float32)
  y = jnp.arange(6)
  np.testing.assert_allclose(losses.dlr_loss(3.0 * z + 7.0, y), losses.dlr_loss(z, y),
                             rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# APGD checkpoints and step-size rule (Sec. 3.2).


def _fraction_recurrence():
  """``p_j`` from the paper's recurrence in exact rational arithmetic, while ``p_j < 1``."""
  p = [fractions.Fraction(0), fractions.Fraction(22, 100)]
  while True:
    nxt = p[-1] + max(p[-1] - p[-2] - fractions.Fraction(3, 100), fractions.Fraction(6, 100))
    if nxt >= 1:
      return p
    p.append(nxt)


def test_checkpoint_fractions_follow_the_recurrence():
  want = _fraction_recurrence()
  assert [fractions.Fraction(v).limit_denominator(100) for v in apgd.checkpoint_fractions()] == want
  # Hand-expanded: 0, .22, .41, .57, .70, .80, .87, .93, .99.
  np.testing.assert_allclose(apgd.checkpoint_fractions(),
                             [0, .22, .41, .57, .70, .80, .87, .93, .99])


@pytest.mark.parametrize("steps", [10, 20, 37, 100, 250])
def test_checkpoints_are_ceil_of_fractions(steps):
  want = sorted({math.ceil(p * steps) for p in _fraction_recurrence()[1:]} - {0, steps})
  want = [w for w in want if w < steps]
  assert list(apgd.apgd_checkpoints(steps)) == want


def test_checkpoints_for_100_iterations_match_the_reference_intervals():
  # The reference code's integer form: first interval int(0.22 N), then shrinking by
  # int(0.03 N) down to int(0.06 N): 22, 19, 16, 13, 10, 7, 6, 6.
  assert apgd.apgd_checkpoints(100) == (22, 41, 57, 70, 80, 87, 93, 99)
  assert list(np.cumsum([22, 19, 16, 13, 10, 7, 6, 6])) == list(apgd.apgd_checkpoints(100))


def _expected_steps(loss_history, eta0, ckpts, rho):
  """The paper's step-size rule replayed in NumPy on one example's loss trajectory."""
  n = len(loss_history) - 1
  steps = np.empty(n + 1)
  steps[0] = step = eta0
  prev = f_max = loss_history[0]
  n_inc, last_ckpt, f_max_last, reduced_last = 0, 0, f_max, False
  for k in range(1, n + 1):
    n_inc += loss_history[k] > prev
    prev = loss_history[k]
    f_max = max(f_max, loss_history[k])
    if k in ckpts:
      reduce = n_inc < rho * (k - last_ckpt) or (not reduced_last and f_max_last >= f_max)
      if reduce:
        step /= 2
        prev = f_max  # the next step starts from x_max
      n_inc, last_ckpt, f_max_last, reduced_last = 0, k, f_max, reduce
    steps[k] = step
  return steps


@pytest.mark.parametrize("norm,eps", [("linf", 0.05), ("l2", 0.5)])
def test_apgd_step_size_rule_matches_replay(digits_model, norm, eps):
  m = digits_model
  x, y = jnp.asarray(m.x_test[:16]), jnp.asarray(m.y_test[:16])
  steps = 40
  run = jax.jit(functools.partial(apgd.apgd_run, m.logits_fn, norm=norm, loss="ce",
                                  targeted=False, steps=steps, rho=0.75))
  x0 = apgd.initial_point(toolkit.example_keys(jax.random.PRNGKey(1), jnp.arange(16)), x, eps,
                          norm)
  res = run(x, y, y, x0, eps)
  lh, sh = np.asarray(res.loss_history), np.asarray(res.step_history)
  ckpts = set(apgd.apgd_checkpoints(steps))
  n_reduced = 0
  for i in range(x.shape[0]):
    want = _expected_steps(lh[:, i], 2 * eps, ckpts, 0.75)
    np.testing.assert_allclose(sh[:, i], want, rtol=1e-6)
    n_reduced += np.sum(np.diff(want) < 0)
  assert n_reduced > 0
  if norm == "l2":
    # Both branches of the rule were exercised: some checkpoints halved, some did not. (linf
    # sign steps soon stall on a vertex of the cube, where the loss stops increasing, so almost
    # every linf checkpoint halves.)
    assert n_reduced <= 0.9 * len(ckpts) * x.shape[0]
  # The step changes only at checkpoints, and only by halving.
  changed = np.nonzero(np.any(np.diff(sh, axis=0) != 0, axis=1))[0] + 1
  assert set(changed.tolist()) <= ckpts
  # loss_best is the running max of the loss history.
  np.testing.assert_allclose(res.loss_best, lh.max(axis=0), rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# FAB's projection onto {<w, z> = b} intersected with the box (FAB paper, Eq. 5).


def _random_problem(rng, n, feasible=True):
  t = rng.uniform(size=n)
  w = rng.normal(size=n)
  w[rng.uniform(size=n) < 0.2] = 0.0  # zero normals must stay put
  z = rng.uniform(size=n)
  b = w @ z if feasible else w @ np.where(w > 0, 1.0, 0.0) + 1.0  # beyond max over the box
  return t, w, b


def _linf_reference(t, w, b):
  """``min ||d||_inf`` by linprog on (d, s): min s, -s <= d <= s, w.d = b - w.t, box."""
  n = len(t)
  cost = np.r_[np.zeros(n), 1.0]
  a_ub = np.block([[np.eye(n), -np.ones((n, 1))], [-np.eye(n), -np.ones((n, 1))]])
  bounds = [(-ti, 1 - ti) for ti in t] + [(0, None)]
  res = scipy_optimize.linprog(cost, A_ub=a_ub, b_ub=np.zeros(2 * n),
                               A_eq=np.r_[w, 0.0][None], b_eq=[b - w @ t], bounds=bounds)
  assert res.status == 0
  return res.fun


def _l2_reference(t, w, b):
  """``argmin ||d||_2^2`` by SLSQP with the hyperplane constraint and box bounds."""
  res = scipy_optimize.minimize(
      lambda d: d @ d, np.zeros(len(t)), jac=lambda d: 2 * d, method="SLSQP",
      constraints=[{"type": "eq", "fun": lambda d: w @ d - (b - w @ t), "jac": lambda d: w}],
      bounds=[(-ti, 1 - ti) for ti in t], options={"ftol": 1e-14, "maxiter": 500})
  assert res.success
  return res.x


def _project(t, w, b, norm):
  return np.asarray(fab.hyperplane_box_projection(
      jnp.asarray(t[None], jnp.float32), jnp.asarray(w[None], jnp.float32),
      jnp.asarray([b], jnp.float32), norm))[0]


@pytest.mark.parametrize("seed", range(6))
def test_linf_projection_matches_linprog(seed):
  rng = np.random.default_rng(seed)
  t, w, b = _random_problem(rng, 7)
  d = _project(t, w, b, "linf")
  np.testing.assert_allclose(w @ (t + d), b, atol=1e-5)
  assert np.all(t + d >= -1e-6) and np.all(t + d <= 1 + 1e-6)
  np.testing.assert_allclose(np.abs(d).max(), _linf_reference(t, w, b), rtol=1e-4, atol=1e-6)
  assert np.all(d[w == 0] == 0)


@pytest.mark.parametrize("seed", range(6))
def test_l2_projection_matches_slsqp(seed):
  rng = np.random.default_rng(100 + seed)
  t, w, b = _random_problem(rng, 7)
  d = _project(t, w, b, "l2")
  np.testing.assert_allclose(w @ (t + d), b, atol=1e-5)
  np.testing.assert_allclose(d, _l2_reference(t, w, b), atol=1e-4)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_projection_without_box_is_the_closed_form(norm):
  # Far from the box faces the constraint set is the hyperplane, and the minimiser is
  # c * sign(w) / ||w||_1 (linf) or c * w / ||w||_2^2 (l2), c = b - <w, t>.
  rng = np.random.default_rng(7)
  t = rng.uniform(0.4, 0.6, size=12)
  w = rng.normal(size=12)
  c = 0.01 * np.sum(np.abs(w))
  want = c * np.sign(w) / np.sum(np.abs(w)) if norm == "linf" else c * w / (w @ w)
  np.testing.assert_allclose(_project(t, w, w @ t + c, norm), want, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(_project(t, w, w @ t - c, norm), -want, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_infeasible_projection_goes_to_the_closest_box_corner(norm):
  rng = np.random.default_rng(3)
  t, w, b = _random_problem(rng, 8, feasible=False)
  d = _project(t, w, b, norm)
  corner = np.where(w > 0, 1.0, np.where(w < 0, 0.0, t))  # maximises <w, z> over the box
  np.testing.assert_allclose(t + d, corner, atol=1e-6)


def _sorted_projection(t, w, b, norm):
  """The former sort-based solver of FAB's Eq. 5, kept as an independent reference: sort the
  breakpoints, take ``F`` at each by cumulative sums, interpolate in the first segment reaching
  ``c``."""
  c = b - jnp.sum(w * t, axis=1)
  sgn = jnp.where(c >= 0, 1.0, -1.0).astype(t.dtype)
  w = w * sgn[:, None]
  c = jnp.abs(c)
  aw = jnp.abs(w)
  cap = jnp.where(w > 0, 1.0 - t, jnp.where(w < 0, t, 0.0))
  if norm == "linf":
    breaks, slope = cap, aw
  else:
    breaks = jnp.where(aw > 0, cap / jnp.where(aw > 0, aw, 1.0), 1e30)
    slope = aw * aw
  saturated = aw * cap
  order = jnp.argsort(breaks, axis=1)
  br = jnp.take_along_axis(breaks, order, axis=1)
  sat = jnp.take_along_axis(saturated, order, axis=1)
  sl = jnp.take_along_axis(slope, order, axis=1)
  sat_upto = jnp.cumsum(sat, axis=1)
  slope_after = jnp.flip(jnp.cumsum(jnp.flip(sl, 1), axis=1), 1) - sl
  reaches = sat_upto + br * slope_after >= c[:, None]
  feasible = jnp.any(reaches, axis=1)
  k = jnp.argmax(reaches, axis=1)[:, None]
  sat_before = jnp.take_along_axis(sat_upto - sat, k, axis=1)[:, 0]
  slope_from = jnp.take_along_axis(slope_after + sl, k, axis=1)[:, 0]
  param = jnp.maximum((c - sat_before) / jnp.maximum(slope_from, 1e-30), 0.0)[:, None]
  amount = jnp.minimum(param, cap) if norm == "linf" else jnp.minimum(param * aw, cap)
  amount = jnp.where(feasible[:, None], amount, cap)
  return jnp.sign(w) * amount


def _hard_batch(rng, rows, n):
  """Rows that stress the segment search: the first half on a dyadic grid (``t`` in multiples of
  1/8, ``|w|`` in {1/2, 1, 2}), so breakpoints repeat within a row, ``<w, t>`` is exact and the
  root often falls exactly on a breakpoint; the rest continuous. A fifth of ``w`` is zero; per
  row type, some rows have ``c = 0`` (``b = <w, t>``, exact on the grid; or ``w = 0``), some have
  no box point on the hyperplane, the rest ``b = <w, z>`` for a random box point ``z``."""
  grid = np.arange(rows) < rows // 2
  t = np.where(grid[:, None], rng.integers(0, 9, (rows, n)) / 8, rng.uniform(size=(rows, n)))
  w = np.where(grid[:, None], rng.choice([-2.0, -1.0, -0.5, 0.5, 1.0, 2.0], (rows, n)),
               rng.normal(size=(rows, n)))
  w[rng.uniform(size=(rows, n)) < 0.2] = 0.0
  z = np.where(grid[:, None], rng.integers(0, 9, (rows, n)) / 8, rng.uniform(size=(rows, n)))
  b = np.sum(w * z, axis=1)
  kind = rng.integers(0, 5, rows)
  b = np.where(kind == 0, np.sum(w * t, axis=1), b)                         # c = 0 on the grid
  top = np.sum(np.maximum(w, 0.0), axis=1)                                  # max <w, z> on box
  b = np.where(kind == 1, top + 0.5 + rng.uniform(size=rows), b)            # infeasible
  w[kind == 2] = 0.0                                                        # c = b = 0
  b = np.where(kind == 2, 0.0, b)
  return t, w, b, kind, grid


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_projection_matches_the_sort_based_solver(norm, dtype):
  rng = np.random.default_rng(11)
  t, w, b, kind, grid = _hard_batch(rng, 200, 60)
  with jax.enable_x64(dtype == "float64"):
    args = [jnp.asarray(a, dtype) for a in (t, w, b)]
    got = np.asarray(jax.jit(fab.hyperplane_box_projection, static_argnums=3)(*args, norm))
    want = np.asarray(jax.jit(_sorted_projection, static_argnums=3)(*args, norm))
  assert got.dtype == np.dtype(dtype)
  assert np.all(got[w == 0] == 0)
  assert np.all(got[kind == 2] == 0)
  # c = 0 on the grid: the point already lies on the hyperplane.
  assert np.all(got[(kind == 0) & grid] == 0) and np.all(want[(kind == 0) & grid] == 0)
  # Infeasible: every coordinate to the face maximising <w, z>.
  corner = np.where(w > 0, 1.0, np.where(w < 0, 0.0, t))
  np.testing.assert_allclose((t + got)[kind == 1], corner[kind == 1], atol=1e-6)
  scale = np.abs(want).max(axis=1, keepdims=True)
  tol = 1e-5 if dtype == "float32" else 1e-12
  assert np.all(np.abs(got - want) <= tol * scale), np.max(np.abs(got - want) / scale)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_projection_resolves_a_root_just_above_a_cluster_of_breakpoints(norm):
  # 100 coordinates of slope ~1 with breakpoints in [r (1 - 1e-7), r], many tied, and 2 of slope
  # 0.01 with breakpoints far above; the root is r (1 + 1e-9). Counting a cluster coordinate as
  # active moves the root by ~r 1e-9, so the bisection must resolve the root to that precision
  # (about 40 of its 63 float64 passes). float64: in float32 the cancellation in c - sum_S is
  # larger than the effect.
  rng = np.random.default_rng(5)
  rows, r = 32, 0.3
  root = r * (1 + 1e-9)
  aw = np.concatenate([rng.uniform(0.5, 2.0, (rows, 100)), np.full((rows, 2), 0.1)], 1)
  if norm == "linf":
    aw[:, 100:] = 0.01
  w = aw * rng.choice([-1.0, 1.0], aw.shape)
  breaks = np.concatenate([r * (1 - 1e-9 * rng.integers(0, 100, (rows, 100))),
                           np.full((rows, 2), 0.9 if norm == "linf" else 5.0)], 1)
  cap = breaks if norm == "linf" else breaks * aw
  t = np.where(w > 0, 1.0 - cap, cap)
  amount = np.minimum(root if norm == "linf" else root * aw, cap)
  b = np.sum(w * t, axis=1) + np.sum(aw * amount, axis=1)  # F(root) = c
  with jax.enable_x64(True):
    args = [jnp.asarray(a, jnp.float64) for a in (t, w, b)]
    got = np.asarray(jax.jit(fab.hyperplane_box_projection, static_argnums=3)(*args, norm))
    want = np.asarray(jax.jit(_sorted_projection, static_argnums=3)(*args, norm))
  exact = np.sign(w) * amount
  np.testing.assert_allclose(want, exact, rtol=1e-10)
  np.testing.assert_allclose(got, exact, rtol=1e-10)


# ----------------------------------------------------------------------------------------------
# FAB on a linear model: the minimal distance to the decision boundary has a closed form.


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("targeted", [False, True])
def test_fab_finds_the_minimal_distance_on_a_linear_model(norm, targeted):
  rng = np.random.default_rng(0)
  n_cls, n = 4, 30
  wmat = jnp.asarray(rng.normal(size=(n, n_cls)) * 0.1, jnp.float32)
  x = jnp.asarray(rng.uniform(0.45, 0.55, size=(8, n)), jnp.float32)
  logits_fn = lambda z: z @ wmat
  y = jnp.argmax(logits_fn(x), axis=1)
  z = np.asarray(logits_fn(x))
  wd = np.asarray(wmat)[:, None, :] - np.asarray(wmat)[:, :, None]  # (n, y, s): w_s - w_y
  dual = (np.abs(wd).sum(0) if norm == "linf" else np.sqrt((wd ** 2).sum(0)))  # (K, K)
  yn = np.asarray(y)
  gap = z[np.arange(8), yn][:, None] - z                       # (B, K): z_y - z_s
  dist = gap / np.maximum(dual[yn], 1e-12)
  dist[np.arange(8), yn] = np.inf
  order = np.asarray(toolkit.target_order(logits_fn(x), y))
  if targeted:  # FAB-T on the first target only: distance to that pairwise boundary
    exact = dist[np.arange(8), order[:, 0]]
  else:
    exact = dist.min(axis=1)
  # Every coordinate moves by at most the distance (times the overshoot), so starting in
  # [0.45, 0.55] the box never binds and the closed form applies.
  assert np.all(exact * 1.05 < 0.4)
  _, res = jax.jit(functools.partial(
      fab.fab_run, logits_fn, norm=norm, targeted=targeted, steps=30, alpha_max=0.1,
      overshoot=1.05, beta=0.9))(x, y, jnp.asarray(order[:, 0]), x)
  res = np.asarray(res)
  # Never closer than the true boundary, and within 2% of it (overshoot = 1.05, then the
  # beta back-steps and biased combinations close the gap).
  assert np.all(res >= np.minimum(exact, dist.min(axis=1)) * (1 - 1e-4))
  np.testing.assert_array_less(res, exact * 1.02)


# ----------------------------------------------------------------------------------------------
# Square Attack schedule and patterns.


def test_p_schedule_matches_the_published_table():
  p0 = 0.8
  table = {0: p0, 10: p0, 11: p0 / 2, 50: p0 / 2, 51: p0 / 4, 200: p0 / 4, 201: p0 / 8,
           500: p0 / 8, 501: p0 / 16, 1000: p0 / 16, 1001: p0 / 32, 2000: p0 / 32,
           2001: p0 / 64, 4000: p0 / 64, 4001: p0 / 128, 6000: p0 / 128, 6001: p0 / 256,
           8000: p0 / 256, 8001: p0 / 512, 9999: p0 / 512}
  for i, p in table.items():
    assert square.p_schedule(i, 10000, p0, False) == pytest.approx(p)
  # Rescaled to a 500-query budget: iteration 1 is "iteration 20" of the 10000-query schedule.
  assert square.p_schedule(1, 500, p0, True) == pytest.approx(p0 / 2)
  assert square.p_schedule(0, 500, p0, True) == pytest.approx(p0)


@pytest.mark.parametrize("rescale", [False, True])
def test_jitted_stage_agrees_with_p_schedule(rescale):
  i = jnp.arange(0, 9000)
  stage = np.asarray(jax.jit(lambda i: jax.vmap(
      lambda j: square._stage(j, 5000, rescale))(i))(i))
  want = [round(math.log2(0.8 / square.p_schedule(int(j), 5000, 0.8, rescale)))
          for j in np.asarray(i)]
  np.testing.assert_array_equal(stage, want)


def test_eta_pattern_by_hand_for_s_3():
  # Upper 1x3 rectangle: centre 1 + 1/4, ring 1/4 -> [.25, 1.25, .25]; lower 2x3 rectangle:
  # centre (row 1, col 1) 1 + 1/4, the rest 1/4; each normalised, lower negated, renormalised.
  up = np.array([[.25, 1.25, .25]])
  lo = np.array([[.25, .25, .25], [.25, 1.25, .25]])
  want = np.concatenate([up / np.linalg.norm(up), -lo / np.linalg.norm(lo)])
  want /= np.linalg.norm(want)
  np.testing.assert_allclose(square.eta_pattern(3), want, rtol=1e-12)


@pytest.mark.parametrize("s", [3, 5, 7, 8])
def test_eta_pattern_structure(s):
  eta = square.eta_pattern(s)
  assert eta.shape == (s, s)
  np.testing.assert_allclose(np.linalg.norm(eta), 1.0, rtol=1e-12)
  assert np.all(eta[: s // 2] > 0) and np.all(eta[s // 2:] < 0)
  if s % 2:  # odd sides (the only ones the l2 attack uses) have a centre column
    np.testing.assert_allclose(eta, eta[:, ::-1], rtol=1e-12)
