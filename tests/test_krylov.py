"""Batched GMRES against NumPy/SciPy references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import scipy.sparse.linalg as sla

from krylov_adv import krylov
from krylov_adv.krylov import Status, gmres


@pytest.fixture(autouse=True)
def _x64():
  with jax.enable_x64(True):
    yield


def _batched_matvec(a):
  a = jnp.asarray(a)
  return lambda v: jnp.einsum("bij,bj->bi", a, v)


def _nonsymmetric(rng, bsz, n, shift=3.0):
  return rng.normal(size=(bsz, n, n)) + shift * np.eye(n)


def _symmetric_indefinite(rng, bsz, n):
  mats = []
  for _ in range(bsz):
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    lam = rng.uniform(1.0, 5.0, size=n) * rng.choice([-1.0, 1.0], size=n)
    mats.append(q @ np.diag(lam) @ q.T)
  return np.stack(mats)


def _scipy_gmres(a, b, tol, max_dim):
  """SciPy reference: one cycle of restarted GMRES, counting inner iterations."""
  residuals = []
  x, _ = sla.gmres(a, b, rtol=tol, atol=0.0, restart=max_dim, maxiter=1,
                   callback=residuals.append, callback_type="pr_norm")
  return x, len(residuals)


_solve = jax.jit(gmres, static_argnames=("matvec", "tol", "max_dim"))


@pytest.mark.parametrize("orth", ["mgs", "cgs2"])
def test_exact_solution_at_full_dimension_nonsymmetric(orth):
  rng = np.random.default_rng(0)
  a, b = _nonsymmetric(rng, 5, 10), rng.normal(size=(5, 10))
  res = jax.jit(lambda b: gmres(_batched_matvec(a), b, tol=1e-12, max_dim=10,
                                orthogonalization=orth))(b)
  np.testing.assert_allclose(res.x, np.linalg.solve(a, b[..., None])[..., 0], atol=1e-10)
  assert np.all(res.converged)
  assert np.all(res.num_iters <= 10)


@pytest.mark.parametrize("orth", ["mgs", "cgs2"])
@pytest.mark.parametrize("kind", ["nonsymmetric", "symmetric_indefinite"])
def test_matches_scipy_gmres(kind, orth):
  rng = np.random.default_rng(1)
  bsz, n, tol, max_dim = 6, 30, 1e-4, 20
  a = _nonsymmetric(rng, bsz, n, shift=6.0) if kind == "nonsymmetric" else \
      _symmetric_indefinite(rng, bsz, n)
  b = rng.normal(size=(bsz, n))
  res = jax.jit(lambda b: gmres(_batched_matvec(a), b, tol=tol, max_dim=max_dim,
                                orthogonalization=orth))(b)
  for i in range(bsz):
    x_ref, iters_ref = _scipy_gmres(a[i], b[i], tol, max_dim)
    assert abs(int(res.num_iters[i]) - iters_ref) <= 1, (i, int(res.num_iters[i]), iters_ref)
    if int(res.num_iters[i]) == iters_ref:
      np.testing.assert_allclose(res.x[i], x_ref, rtol=1e-6, atol=1e-8)
    true_res = np.linalg.norm(b[i] - a[i] @ np.asarray(res.x[i]))
    ref_res = np.linalg.norm(b[i] - a[i] @ x_ref)
    np.testing.assert_allclose(res.residual_norm[i], true_res, rtol=1e-6, atol=1e-12)
    # Same Krylov space size -> same minimal residual; otherwise both meet the tolerance.
    if int(res.num_iters[i]) == iters_ref:
      np.testing.assert_allclose(true_res, ref_res, rtol=1e-6)
    assert bool(res.converged[i]) == (true_res <= tol * np.linalg.norm(b[i]) * (1 + 1e-6))


@pytest.mark.slow
def test_estimated_residual_is_last_history_entry():
  rng = np.random.default_rng(15)
  a, b = _nonsymmetric(rng, 4, 30, shift=15.0), rng.normal(size=(4, 30))
  res = gmres(_batched_matvec(a), b, tol=1e-4, max_dim=20)
  assert np.all(res.num_iters < 20)
  hist = np.asarray(res.residual_history)
  k = np.asarray(res.num_iters)
  np.testing.assert_allclose(res.estimated_residual_norm, hist[np.arange(4), k - 1])
  np.testing.assert_allclose(res.estimated_residual_norm, res.residual_norm, rtol=1e-6)
  np.testing.assert_array_equal(res.status, Status.CONVERGED)


@pytest.mark.slow
def test_reported_residual_is_true_residual_and_history_decreases():
  rng = np.random.default_rng(2)
  a, b = _nonsymmetric(rng, 4, 25, shift=2.0), rng.normal(size=(4, 25))
  for max_dim in (1, 3, 7):
    res = gmres(_batched_matvec(a), b, tol=1e-12, max_dim=max_dim)
    true_res = np.linalg.norm(b - np.einsum("bij,bj->bi", a, np.asarray(res.x)), axis=1)
    np.testing.assert_allclose(res.residual_norm, true_res, rtol=1e-8)
    np.testing.assert_array_equal(res.num_iters, max_dim)
    hist = np.asarray(res.residual_history)
    assert np.all(np.diff(hist, axis=1) <= 1e-12)  # GMRES residuals never increase
    assert not np.any(res.converged)


@pytest.mark.slow
def test_initial_guess_and_relative_tolerance():
  rng = np.random.default_rng(3)
  a, b = _nonsymmetric(rng, 3, 12, shift=4.0), rng.normal(size=(3, 12))
  x_true = np.linalg.solve(a, b[..., None])[..., 0]
  x0 = x_true + 1e-3 * rng.normal(size=b.shape)
  r0 = np.linalg.norm(b - np.einsum("bij,bj->bi", a, x0), axis=1)
  res = gmres(_batched_matvec(a), b, jnp.asarray(x0), tol=1e-2, max_dim=12)
  true_res = np.linalg.norm(b - np.einsum("bij,bj->bi", a, np.asarray(res.x)), axis=1)
  assert np.all(res.converged)
  assert np.all(true_res <= 1e-2 * r0 * (1 + 1e-8))  # relative to ||r_0||, not ||b||
  assert np.all(res.num_iters < 12)


@pytest.mark.slow
def test_zero_right_hand_side_in_batch():
  rng = np.random.default_rng(4)
  a, b = _nonsymmetric(rng, 3, 8), rng.normal(size=(3, 8))
  b[1] = 0.0
  res = gmres(_batched_matvec(a), b, tol=1e-10, max_dim=8)
  assert np.all(np.isfinite(res.x))
  np.testing.assert_array_equal(res.x[1], 0.0)
  assert int(res.num_iters[1]) == 0 and bool(res.converged[1])
  np.testing.assert_allclose(res.x[0], np.linalg.solve(a[0], b[0]), atol=1e-9)


@pytest.mark.slow
def test_happy_breakdown_is_exact_and_finite():
  # b lies in a 2-dimensional invariant subspace of a diagonal A: Krylov space stops growing.
  a = np.broadcast_to(np.diag(np.arange(1.0, 9.0)), (2, 8, 8)).copy()
  b = np.zeros((2, 8))
  b[0, :2] = 1.0
  b[1, :3] = [1.0, -2.0, 0.5]
  res = gmres(_batched_matvec(a), b, tol=1e-300, max_dim=8)
  assert np.all(np.isfinite(res.x)) and np.all(np.isfinite(res.residual_norm))
  np.testing.assert_array_equal(res.num_iters, [2, 3])
  np.testing.assert_allclose(res.x, b / np.arange(1.0, 9.0), atol=1e-12)
  # Exact to rounding; tol = 1e-300 is below what float64 can reach unless x is exact to the
  # bit, and where it is not the recurrence stopped before max_dim: breakdown, not converged.
  true_res = np.linalg.norm(b - np.einsum("bij,bj->bi", a, np.asarray(res.x)), axis=1)
  np.testing.assert_array_equal(res.converged, true_res <= 1e-300 * np.linalg.norm(b, axis=1))
  np.testing.assert_array_equal(res.status, np.where(res.converged, Status.CONVERGED,
                                                     Status.BREAKDOWN))


def test_lucky_breakdown_with_reachable_tolerance_is_converged():
  a = np.broadcast_to(np.diag(np.arange(1.0, 9.0)), (2, 8, 8)).copy()
  b = np.zeros((2, 8))
  b[0, :2] = 1.0
  b[1, :3] = [1.0, -2.0, 0.5]
  res = jax.jit(lambda b: gmres(_batched_matvec(a), b, tol=1e-10, max_dim=8))(b)
  np.testing.assert_array_equal(res.num_iters, [2, 3])
  np.testing.assert_array_equal(res.status, Status.CONVERGED)
  assert np.all(res.converged)
  np.testing.assert_allclose(res.x, b / np.arange(1.0, 9.0), atol=1e-12)


def test_singular_breakdown_reports_failure_not_nan():
  # A e1 = 0: the first Krylov step produces nothing; the residual cannot be reduced.
  a = np.diag([0.0, 1.0, 2.0])[None]
  b = np.array([[1.0, 0.0, 0.0]])
  res = gmres(_batched_matvec(a), b, tol=1e-6, max_dim=3)
  assert np.all(np.isfinite(res.x))
  assert not bool(res.converged[0])
  np.testing.assert_allclose(res.residual_norm[0], 1.0)
  assert int(res.status[0]) == Status.BREAKDOWN and int(res.num_iters[0]) < 3


def test_nan_input_and_nan_operator_are_reported():
  rng = np.random.default_rng(5)
  a, b = _nonsymmetric(rng, 3, 6), rng.normal(size=(3, 6))
  b_nan = b.copy()
  b_nan[0, 2] = np.nan
  res = gmres(_batched_matvec(a), b_nan, tol=1e-8, max_dim=6)
  assert not bool(res.converged[0]) and not np.isfinite(res.residual_norm[0])
  assert np.all(np.isnan(res.x[0]))
  np.testing.assert_array_equal(res.status, [Status.NONFINITE, Status.CONVERGED,
                                             Status.CONVERGED])
  np.testing.assert_allclose(res.x[1:], np.linalg.solve(a[1:], b[1:, :, None])[..., 0],
                             atol=1e-9)

  a_nan = a.copy()
  a_nan[2, 3, 3] = np.inf
  res = gmres(_batched_matvec(a_nan), b, tol=1e-8, max_dim=6)
  assert not bool(res.converged[2]) and not np.isfinite(res.residual_norm[2])
  assert not np.any(np.isfinite(res.x[2]))
  assert np.all(res.converged[:2])
  np.testing.assert_array_equal(res.status, [Status.CONVERGED, Status.CONVERGED,
                                             Status.NONFINITE])


def test_nonfinite_matvec_output_is_status_nonfinite():
  # The operator itself returns NaN for one example (a model whose HVP overflows).
  rng = np.random.default_rng(11)
  a, b = _nonsymmetric(rng, 3, 6), rng.normal(size=(3, 6))
  bad = jnp.asarray([False, True, False])

  def matvec(v):
    return jnp.where(bad[:, None], jnp.nan, _batched_matvec(a)(v))

  for x0 in (None, jnp.zeros_like(b)):
    res = jax.jit(lambda b, x0: gmres(matvec, b, x0, tol=1e-8, max_dim=6))(b, x0)
    np.testing.assert_array_equal(res.status, [Status.CONVERGED, Status.NONFINITE,
                                               Status.CONVERGED])
    np.testing.assert_array_equal(res.converged, [True, False, True])
    assert not np.isfinite(res.residual_norm[1])
    assert np.isnan(res.x[1]).all() and np.isfinite(np.asarray(res.x)[[0, 2]]).all()


def test_status_names_and_max_dim_reached():
  assert [s.name for s in Status] == ["CONVERGED", "MAX_DIM_REACHED", "BREAKDOWN", "NONFINITE"]
  assert krylov.Status(1).name == "MAX_DIM_REACHED"
  rng = np.random.default_rng(12)
  a, b = _nonsymmetric(rng, 3, 20, shift=1.0), rng.normal(size=(3, 20))
  res = gmres(_batched_matvec(a), b, tol=1e-10, max_dim=3)
  assert res.status.dtype == jnp.int32
  np.testing.assert_array_equal(res.status, Status.MAX_DIM_REACHED)
  np.testing.assert_array_equal(res.converged, False)


@pytest.mark.slow
@pytest.mark.parametrize("n", [8, 9, 10, 11, 12])
def test_hilbert_float32_converged_means_true_residual(n):
  # Hilbert matrices in float32: the Givens estimate drifts to 0 after loss of orthogonality
  # while ||b - A x|| / ||b|| is 0.1 to 10. `converged` must follow the true residual, which is
  # computed here by NumPy in float64 from the returned x.
  with jax.enable_x64(False):
    h = scipy.linalg.hilbert(n)
    rng = np.random.default_rng(n)
    b = np.stack([np.ones(n), rng.normal(size=n), rng.uniform(size=n)]).astype(np.float32)
    a = np.broadcast_to(h, (3, n, n)).astype(np.float32)
    for tol in (1e-3, 1e-6):
      for max_dim in (n, n + 4):
        res = jax.jit(lambda b: gmres(_batched_matvec(a), b, tol=tol, max_dim=max_dim))(b)
        x = np.asarray(res.x, np.float64)
        true_rel = np.linalg.norm(b - x @ h.T, axis=1) / np.linalg.norm(b, axis=1)
        conv = np.asarray(res.converged)
        # float32 residuals of x carry rounding of order eps * ||A|| ||x||: a margin of 2x.
        assert np.all(true_rel[conv] <= 2 * tol), (n, tol, max_dim, true_rel, conv)
        assert not np.any(conv[true_rel > 2 * tol]), (n, tol, max_dim, true_rel, conv)
        np.testing.assert_array_equal(conv, np.asarray(res.status) == Status.CONVERGED)
        assert set(np.asarray(res.status).tolist()) <= {Status.CONVERGED,
                                                        Status.MAX_DIM_REACHED, Status.BREAKDOWN}
        # The float32 residual itself carries rounding of order n eps ||A|| ||x||.
        rounding = (n * np.finfo(np.float32).eps * np.linalg.norm(h, 2)
                    * np.linalg.norm(x, axis=1) / np.linalg.norm(b, axis=1))
        got_rel = np.asarray(res.residual_norm) / np.linalg.norm(b, axis=1)
        assert np.all(np.abs(got_rel - true_rel) <= 0.1 * true_rel + 10 * rounding)
    assert not conv[1] and true_rel[1] > 0.1  # the case that used to report converged


@pytest.mark.slow
def test_rolled_and_unrolled_givens_loops_agree(monkeypatch):
  rng = np.random.default_rng(13)
  a, b = _nonsymmetric(rng, 4, 30, shift=2.0), rng.normal(size=(4, 30))
  b[2] = 0.0
  solve = lambda: jax.jit(lambda b: gmres(_batched_matvec(a), b, tol=1e-9, max_dim=24))(b)
  monkeypatch.setattr(krylov, "_UNROLL_MAX_DIM", 10**6)
  unrolled = solve()
  monkeypatch.setattr(krylov, "_UNROLL_MAX_DIM", 0)
  rolled = solve()
  assert 10 < int(np.max(rolled.num_iters)) <= 24
  for got, want in zip(rolled, unrolled, strict=True):
    if want is None:   # basis and hessenberg without return_basis
      assert got is None
      continue
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)


def test_large_max_dim_compiles_and_runs():
  # The Givens loop is rolled past a small max_dim, so a Krylov dimension of 200 compiles in
  # about the time of 16 (the unrolled loop took minutes). Not timed: it must just finish.
  rng = np.random.default_rng(14)
  n = 220
  d = rng.uniform(1.0, 100.0, size=(2, n))
  b = rng.normal(size=(2, n))
  res = jax.jit(lambda b: gmres(lambda v: jnp.asarray(d) * v, b, tol=1e-300, max_dim=200))(b)
  np.testing.assert_array_equal(res.num_iters, 200)
  np.testing.assert_array_equal(res.status, Status.MAX_DIM_REACHED)
  true_res = np.linalg.norm(b - d * np.asarray(res.x), axis=1)
  np.testing.assert_allclose(res.residual_norm, true_res, rtol=1e-6, atol=1e-12)


@pytest.mark.slow
def test_jit_and_vmap_agree_with_eager():
  rng = np.random.default_rng(6)
  a, b = _nonsymmetric(rng, 4, 9), rng.normal(size=(3, 4, 9))  # 3 independent batches

  def solve(b):
    r = gmres(_batched_matvec(a), b, tol=1e-5, max_dim=6)
    return (r.x, r.num_iters, r.residual_norm, r.status, r.converged,
            r.estimated_residual_norm)

  eager = [solve(b[p]) for p in range(3)]
  vmapped = jax.jit(jax.vmap(solve))(b)
  for p in range(3):
    for got, want in zip(vmapped, eager[p]):
      np.testing.assert_allclose(got[p], want, rtol=1e-10, atol=1e-12)


def test_float32_and_image_shaped_batches():
  with jax.enable_x64(False):
    rng = np.random.default_rng(7)
    a = (rng.normal(size=(4, 16, 16)) + 8.0 * np.eye(16)).astype(np.float32)
    b = rng.normal(size=(4, 4, 4, 1)).astype(np.float32)
    matvec = lambda v: _batched_matvec(a)(v.reshape(4, 16)).reshape(v.shape)
    res = jax.jit(lambda b: gmres(matvec, b, tol=1e-5, max_dim=16))(jnp.asarray(b))
    assert res.x.dtype == jnp.float32 and res.x.shape == b.shape
    assert res.num_iters.dtype == jnp.int32
    np.testing.assert_allclose(res.x.reshape(4, 16),
                               np.linalg.solve(a.astype(np.float64), b.reshape(4, 16, 1))[..., 0],
                               rtol=1e-3, atol=1e-4)
    assert np.all(res.converged)


def test_matvec_called_once_per_krylov_step_for_whole_batch():
  rng = np.random.default_rng(8)
  a, b = _nonsymmetric(rng, 5, 10), rng.normal(size=(5, 10))
  calls = []

  def matvec(v):
    jax.debug.callback(lambda: calls.append(1))
    return _batched_matvec(a)(v)

  res = jax.jit(lambda b, x0: gmres(matvec, b, x0, tol=1e-3, max_dim=10))(b, jnp.zeros_like(b))
  jax.effects_barrier()
  # + the r_0 product for a given x0, + the true residual at exit.
  assert len(calls) == int(np.max(res.num_iters)) + 2


def test_auto_orthogonalization_is_mgs_on_cpu_and_cgs2_elsewhere():
  rng = np.random.default_rng(9)
  a, b = _nonsymmetric(rng, 3, 10), rng.normal(size=(3, 10))
  auto = gmres(_batched_matvec(a), b, tol=1e-6, max_dim=8)
  want = "mgs" if jax.default_backend() == "cpu" else "cgs2"
  explicit = gmres(_batched_matvec(a), b, tol=1e-6, max_dim=8, orthogonalization=want)
  np.testing.assert_array_equal(auto.x, explicit.x)
  np.testing.assert_array_equal(auto.num_iters, explicit.num_iters)


@pytest.mark.parametrize("kwargs", [dict(tol=0.0, max_dim=3), dict(tol=-1.0, max_dim=3),
                                    dict(tol=1e-3, max_dim=0), dict(tol=1e-3, max_dim=2.5),
                                    dict(tol=1e-3, max_dim=3, orthogonalization="householder"),
                                    dict(tol=float("inf"), max_dim=3),
                                    dict(tol=float("nan"), max_dim=3)])
def test_invalid_hyperparameters(kwargs):
  with pytest.raises(ValueError):
    gmres(lambda v: v, jnp.ones((2, 3)), **kwargs)


@pytest.mark.parametrize("orth", ["mgs", "cgs2"])
def test_return_basis_gives_the_arnoldi_relation(orth):
  """``A V_k = V_{k+1} Hbar_k`` with ``V`` orthonormal, per example, at each example's own
  Krylov dimension; the solution and the other fields are unchanged by the flag."""
  rng = np.random.default_rng(11)
  a, b = _nonsymmetric(rng, 4, 8), rng.normal(size=(4, 8))
  tols = dict(tol=1e-6, max_dim=5, orthogonalization=orth)
  plain = jax.jit(lambda b: gmres(_batched_matvec(a), b, **tols))(b)
  res = jax.jit(lambda b: gmres(_batched_matvec(a), b, return_basis=True, **tols))(b)
  assert plain.basis is None and plain.hessenberg is None
  np.testing.assert_array_equal(res.x, plain.x)
  np.testing.assert_array_equal(res.num_iters, plain.num_iters)
  assert res.basis.shape == (4, 6, 8) and res.hessenberg.shape == (4, 6, 5)
  for i in range(4):
    k = int(res.num_iters[i])
    v, h = np.asarray(res.basis[i]), np.asarray(res.hessenberg[i])
    np.testing.assert_allclose(v[:k + 1] @ v[:k + 1].T, np.eye(k + 1), atol=1e-12)
    np.testing.assert_allclose(a[i] @ v[:k].T, v[:k + 1].T @ h[:k + 1, :k], atol=1e-12)
    np.testing.assert_allclose(v[0], b[i] / np.linalg.norm(b[i]), atol=1e-14)
    assert np.all(h[:, k:] == 0) and np.all(v[k + 1:] == 0)


# ----------------------------------------------------------------------------------------------
# Edges (issue 28, item 8): extreme scales, a Krylov iterate worse than its start, batch-mates,
# empty batches.


def _rowwise_matvec(a):
  """``A_i v_i`` as an elementwise product and a row sum: each row's arithmetic is the same
  whatever the batch size (a batched dot may pick another kernel for another batch size)."""
  a = jnp.asarray(a)
  return lambda v: jnp.sum(a * v[:, None, :], axis=-1)


@pytest.mark.parametrize("orth", ["mgs", "cgs2"])
@pytest.mark.parametrize("b_scale,a_scale", [(1e-20, 1.0), (1e-30, 1.0), (1e25, 1.0),
                                             (1.0, 1e-25), (1e-20, 1e-20)])
def test_extreme_scales_float32_are_solved_not_underflowed(b_scale, a_scale, orth):
  # In float32, ||b||^2 underflows to 0 at ||b|| ~ 1e-20 (and overflows at 1e20): A = 2I with
  # b ~ 1e-20 used to report CONVERGED with x = 0, residual 0 and initial residual 0 while the
  # true relative residual was 1. GMRES is scale-invariant in b and A; so must its answer be.
  with jax.enable_x64(False):
    rng = np.random.default_rng(21)
    m = np.stack([2.0 * np.eye(6), rng.normal(size=(6, 6)) + 5.0 * np.eye(6)])
    b = rng.normal(size=(2, 6))
    a32 = (a_scale * m).astype(np.float32)
    b32 = (b_scale * b).astype(np.float32)
    res = gmres(_rowwise_matvec(a32), jnp.asarray(b32), tol=1e-5, max_dim=6,
                orthogonalization=orth)
    x_ref = np.linalg.solve(a32.astype(np.float64), b32.astype(np.float64)[..., None])[..., 0]
    x = np.asarray(res.x, np.float64)
    err = np.linalg.norm(x - x_ref, axis=1) / np.linalg.norm(x_ref, axis=1)
    assert np.all(err <= 1e-4), err
    b_norm = np.linalg.norm(b32.astype(np.float64), axis=1)
    np.testing.assert_allclose(res.initial_residual_norm, b_norm, rtol=1e-6)
    true_res = np.linalg.norm(b32 - np.einsum("bij,bj->bi", a32.astype(np.float64), x), axis=1)
    assert np.all(true_res <= 1e-5 * b_norm)
    np.testing.assert_array_equal(res.status, Status.CONVERGED)
    # The reported norms are at the problem's scale, not flushed to 0 or blown up to inf.
    assert np.all(np.asarray(res.residual_norm) <= 1e-5 * b_norm)
    hist = np.asarray(res.residual_history)
    assert np.all(np.isfinite(hist[:, 0])) and np.all(hist[:, 0] <= b_norm * (1 + 1e-6))
    assert hist[1, 0] > 0  # the dense system is not solved in one step (2I is, exactly)


@pytest.mark.parametrize("orth", ["mgs", "cgs2"])
def test_returned_x_is_never_worse_than_x0(orth):
  # Float32 Hilbert systems: the Krylov iterate's true residual reached 2.5 to 11 ||b|| (x = 0
  # gives ||b||). The solver returns whichever of the iterate and x0 has the smaller true
  # residual, and reports that residual.
  with jax.enable_x64(False):
    worst = 0.0
    for n in (8, 10, 12):
      h = scipy.linalg.hilbert(n)
      rng = np.random.default_rng(n)
      b = np.stack([np.ones(n), rng.normal(size=n), rng.uniform(size=n)]).astype(np.float32)
      a = np.broadcast_to(h, (3, n, n)).astype(np.float32)
      x0 = (0.1 * rng.normal(size=(3, n))).astype(np.float32)
      for start in (None, x0):
        res = gmres(_rowwise_matvec(a), jnp.asarray(b), None if start is None else
                    jnp.asarray(start), tol=1e-6, max_dim=n, orthogonalization=orth)
        x = np.asarray(res.x, np.float64)
        start64 = np.zeros((3, n)) if start is None else start.astype(np.float64)
        true_res = np.linalg.norm(b - x @ h.T, axis=1)
        start_res = np.linalg.norm(b - start64 @ h.T, axis=1)
        # float32 rounding of the residuals compared inside the solver: a margin of 1e-5.
        assert np.all(true_res <= start_res * (1 + 1e-5)), (n, start is None, true_res,
                                                            start_res)
        # The float32 residual carries rounding of order n eps ||A|| ||x|| (x is large here).
        rounding = n * np.finfo(np.float32).eps * np.linalg.norm(h, 2) * np.linalg.norm(x, axis=1)
        assert np.all(np.abs(np.asarray(res.residual_norm) - true_res)
                      <= 1e-3 * true_res + 10 * rounding)
        worst = max(worst, float(np.max(true_res / start_res)))
    assert worst > 0.99  # some iterate was worse than its start here (the cases that failed)


def test_mgs_reorthogonalisation_is_decided_per_example():
  # MGS re-orthogonalised the whole batch when any example needed it, so an ill-conditioned
  # system's solution depended on its batch-mates (residual 38 alone vs 15 inside a batch).
  with jax.enable_x64(False):
    n = 10
    rng = np.random.default_rng(0)
    h = scipy.linalg.hilbert(n)
    a = np.stack([h, rng.normal(size=(n, n)) + 6 * np.eye(n), np.diag(np.arange(1.0, n + 1)),
                  h]).astype(np.float32)
    b = rng.normal(size=(4, n)).astype(np.float32)

    def solve(a, b):
      return jax.jit(lambda b: gmres(_rowwise_matvec(a), b, tol=1e-7, max_dim=n,
                                     orthogonalization="mgs"))(jnp.asarray(b))

    batch = solve(a, b)
    for i in range(4):
      alone = solve(a[i:i + 1], b[i:i + 1])
      for field in ("x", "residual_norm", "num_iters", "status", "residual_history"):
        np.testing.assert_array_equal(getattr(alone, field)[0], getattr(batch, field)[i],
                                      err_msg=f"example {i}, {field}")


@pytest.mark.parametrize("return_basis", [False, True])
def test_empty_batch_returns_empty_result(return_basis):
  def matvec(v):
    raise AssertionError("no product is needed for an empty batch")

  b = jnp.zeros((0, 3, 2))
  for x0 in (None, jnp.zeros((0, 3, 2))):
    res = gmres(matvec, b, x0, tol=1e-6, max_dim=4, return_basis=return_basis)
    assert res.x.shape == (0, 3, 2) and res.x.dtype == b.dtype
    for field in ("residual_norm", "num_iters", "converged", "initial_residual_norm", "status",
                  "estimated_residual_norm"):
      assert getattr(res, field).shape == (0,), field
    assert res.num_iters.dtype == jnp.int32 and res.status.dtype == jnp.int32
    assert res.converged.dtype == jnp.bool_
    assert res.residual_history.shape == (0, 4)
    if return_basis:
      assert res.basis.shape == (0, 5, 6) and res.hessenberg.shape == (0, 5, 4)
    else:
      assert res.basis is None and res.hessenberg is None
  jitted = jax.jit(lambda b: gmres(matvec, b, tol=1e-6, max_dim=4))(b)
  assert jitted.x.shape == (0, 3, 2)
