"""SOAE (SOAE paper, Algorithm 1) against independent references on a tiny smooth model.

The model is a tanh MLP on 4x4x1 inputs with 3 classes, small enough that every example's full
input Hessian comes from ``jax.hessian`` and the Newton system is solved by ``numpy.linalg.solve``
in float64. Its Hessians are indefinite: for 2 of the 16 test points ``g^T H^{-1} g < 0``, so the
gradient fallback is exercised too.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from krylov_adv import attacks, hvp, krylov, losses

B, N_IN, K = 16, 16, 3


def _mlp():
  rng = np.random.default_rng(0)
  w1 = rng.normal(size=(N_IN, 24)) / 2
  b1 = rng.normal(size=24) * 0.3
  w2 = rng.normal(size=(24, K))
  b2 = rng.normal(size=K) * 0.1

  def logits_fn(x):
    h = jnp.tanh(x.reshape(x.shape[0], -1) @ w1.astype(x.dtype) + b1.astype(x.dtype))
    return h @ w2.astype(x.dtype) + b2.astype(x.dtype)

  return logits_fn


LOGITS_FN = _mlp()


@pytest.fixture(scope="module")
def x64():
  with jax.enable_x64(True):
    yield


@pytest.fixture(scope="module")
def problem(x64):
  rng = np.random.default_rng(1)
  x = rng.uniform(size=(B, 4, 4, 1))
  y = rng.integers(0, K, B).astype(np.int32)
  return x, y


def _loss_fn(y):
  return lambda z: losses.cross_entropy(LOGITS_FN(z), y)


def _loss_one(xi, yi):
  return losses.cross_entropy(LOGITS_FN(xi[None]), yi[None])[0]


_GRADS = jax.jit(jax.vmap(jax.grad(_loss_one)))
_HESSIANS = jax.jit(jax.vmap(jax.hessian(_loss_one)))


def _grad_and_hessian(x: np.ndarray, y: np.ndarray):
  """Per-example ``g_i`` (B, n) and full ``H_i`` (B, n, n) with ``jax.hessian``, float64."""
  xj, yj = jnp.asarray(x), jnp.asarray(y)
  g = np.asarray(_GRADS(xj, yj)).reshape(len(y), -1)
  h = np.asarray(_HESSIANS(xj, yj)).reshape(len(y), g.shape[1], -1)
  return g, h


def _newton(x, y):
  g, h = _grad_and_hessian(x, y)
  return g, h, np.linalg.solve(h, g[..., None])[..., 0]


@functools.partial(jax.jit, static_argnames=("tau", "m", "hvp"))
def _direction_jit(x, y, eta, *, tau, m, hvp):
  # eta is traced so that the finite-difference sweep compiles once per scheme.
  return attacks.soae_direction(_loss_fn(y), x, tau=tau, m=m, hvp=hvp, eta=eta)


def _direction(x, y, *, eta=1e-5, **kw):
  return jax.device_get(_direction_jit(jnp.asarray(x), jnp.asarray(y), eta, **kw))


def _rel_err(a, b):
  a = np.asarray(a).reshape(len(b), -1)
  return np.max(np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1))


def test_fixture_hessians_are_indefinite_and_well_posed(problem):
  x, y = problem
  g, h, d = _newton(x, y)
  eig = np.linalg.eigvalsh(h)
  assert np.all(np.linalg.cond(h) < 1e6)
  assert np.any(eig[:, 0] < 0) and np.any(eig[:, -1] > 0)
  inner = np.einsum("bi,bi->b", g, d)
  assert 0 < np.sum(inner <= 0) < B  # the fallback test below needs both kinds


@pytest.mark.parametrize("hvp", ["exact", "exact_linearized"])
def test_direction_with_exact_hvp_equals_newton_solve(problem, hvp):
  x, y = problem
  g, _, d_ref = _newton(x, y)
  sol = _direction(x, y, tau=1e-12, m=N_IN, hvp=hvp)
  assert _rel_err(sol.direction, d_ref) < 1e-9
  np.testing.assert_allclose(np.asarray(sol.grad).reshape(B, -1), g, rtol=1e-12, atol=1e-14)
  assert np.all(sol.gmres.converged)
  assert np.all(sol.gmres.num_iters <= N_IN)


@pytest.mark.parametrize("hvp,order", [("fd_forward", 1), ("fd_central", 2)])
def test_direction_with_finite_differences_approaches_newton_solve(problem, hvp, order):
  # The error of the solve follows the truncation error of Eq. (22): O(eta) forward, O(eta^2)
  # central; in float64 rounding (~1e-16 / eta) is far below it at these eta.
  x, y = problem
  _, _, d_ref = _newton(x, y)
  etas = (1e-3, 1e-4, 1e-5)
  errs = [_rel_err(_direction(x, y, tau=1e-12, m=N_IN, hvp=hvp, eta=eta).direction, d_ref)
          for eta in etas]
  for coarse, fine in zip(errs, errs[1:]):
    assert fine < 3 * 10.0 ** -order * coarse, errs
  assert errs[-1] < (2e-2 if order == 1 else 1e-5), errs


def _reference_soae(x, y, *, eps, norm, iters, alpha, step, fallback):
  """Algorithm 1 with the exact Newton direction from ``numpy.linalg.solve`` and a NumPy
  projection; returns ``(x_adv, fallback mask (iters, B))``."""
  xn = np.array(x)
  fell = []
  for _ in range(iters):
    g, _, d = _newton(xn, y)
    down = np.einsum("bi,bi->b", g, d) <= 0
    mask = down if fallback else np.zeros_like(down)
    d = np.where(mask[:, None], g, d)
    fell.append(mask)
    if step == "raw":
      s = d
    elif norm == "linf":
      s = np.sign(d)
    else:
      s = d / np.linalg.norm(d, axis=1, keepdims=True)
    delta = xn.reshape(B, -1) + alpha / iters * s - x.reshape(B, -1)
    if norm == "linf":
      delta = np.clip(delta, -eps, eps)
    else:
      delta *= np.minimum(1.0, eps / np.linalg.norm(delta, axis=1, keepdims=True))
    xn = np.clip(x.reshape(B, -1) + delta, 0.0, 1.0).reshape(x.shape)
  return xn, np.stack(fell)


@pytest.mark.parametrize("norm,eps,step,fallback", [
    ("linf", 0.1, "normalized", True),
    ("l2", 0.5, "normalized", True),
    ("l2", 0.5, "raw", False),
])
def test_attack_follows_algorithm_1(problem, norm, eps, step, fallback):
  x, y = problem
  iters, alpha = 3, 1.5 * eps
  ref, ref_fell = _reference_soae(x, y, eps=eps, norm=norm, iters=iters, alpha=alpha, step=step,
                                  fallback=fallback)
  x_adv, diag = attacks.soae_with_report(LOGITS_FN, jnp.asarray(x), jnp.asarray(y),
                                    jax.random.PRNGKey(0), eps=eps, norm=norm, steps=iters,
                                    alpha=alpha, m=N_IN, tau=1e-12, hvp="exact", step=step,
                                    fallback=fallback)
  assert x_adv.dtype == jnp.float64
  np.testing.assert_allclose(np.asarray(x_adv), ref, atol=1e-9)
  np.testing.assert_array_equal(np.asarray(diag.fallback), ref_fell)
  np.testing.assert_array_equal(np.asarray(diag.fallback_count), ref_fell.sum(axis=0))
  if fallback:
    assert ref_fell[0].any()  # the fallback really changed something in this case


@pytest.mark.slow
def test_diagnostics_report_true_residuals_and_dimensions(problem):
  # A loose tau stops GMRES early; the reported residual must be the true ||g - H d||.
  x, y = problem
  g, h, _ = _newton(x, y)
  tau, m = 1e-2, 12
  sol = _direction(x, y, tau=tau, m=m, hvp="exact")
  d = np.asarray(sol.direction).reshape(B, -1)
  true_res = np.linalg.norm(g - np.einsum("bij,bj->bi", h, d), axis=1)
  r0 = np.linalg.norm(g - np.einsum("bij,bj->bi", h, g), axis=1)
  res = sol.gmres
  np.testing.assert_allclose(res.residual_norm, true_res, rtol=1e-6, atol=1e-12)
  np.testing.assert_allclose(res.initial_residual_norm, r0, rtol=1e-10)
  assert np.all(res.num_iters >= 1) and np.all(res.num_iters <= m)
  stopped_early = res.num_iters < m
  assert stopped_early.any()
  assert np.all(true_res[stopped_early] <= tau * r0[stopped_early] * (1 + 1e-6))

  _, diag = attacks.soae_with_report(LOGITS_FN, jnp.asarray(x), jnp.asarray(y),
                                     jax.random.PRNGKey(0), eps=0.1, norm="linf", steps=2, m=m,
                                     tau=tau, hvp="exact")
  assert diag.num_iters.shape == (2, B) and diag.num_iters.dtype == jnp.int32
  np.testing.assert_array_equal(diag.num_iters[0], res.num_iters)  # the first solve is at x
  np.testing.assert_allclose(diag.residual_norm[0], res.residual_norm, rtol=1e-9)
  np.testing.assert_array_equal(diag.num_iters_total, np.sum(diag.num_iters, axis=0))
  rel = np.asarray(diag.relative_residual)
  np.testing.assert_array_equal(rel <= tau * (1 + 1e-9), np.asarray(diag.converged))


def test_nonfinite_direction_never_reaches_x_adv():
  # A model whose loss overflows to inf: every gradient and direction is non-finite. The
  # attack must still return a finite point of the threat model (it does not move).
  def overflow_logits(x):
    z = jnp.sum(x.reshape(x.shape[0], -1), axis=1, keepdims=True) * 1e38
    return jnp.concatenate([z * z, -z * z, jnp.zeros_like(z)], axis=1)

  x = jnp.full((4, 4, 4, 1), 0.5, jnp.float32)
  y = jnp.asarray([1, 1, 2, 2], jnp.int32)
  x_adv, diag = attacks.soae_with_report(overflow_logits, x, y, jax.random.PRNGKey(0), eps=0.1,
                                         norm="l2", steps=2, m=3)
  assert np.all(np.isfinite(np.asarray(x_adv)))
  np.testing.assert_array_equal(np.asarray(x_adv), np.asarray(x))
  assert np.all(np.asarray(diag.fallback_count) == 2)


def test_diagnostics_report_gmres_status(problem):
  # The settings of test_diagnostics_report_true_residuals_and_dimensions (no recompilation):
  # each solve's krylov.Status, CONVERGED exactly where `converged`, else max_dim or breakdown.
  x, y = problem
  _, diag = attacks.soae_with_report(LOGITS_FN, jnp.asarray(x), jnp.asarray(y),
                                     jax.random.PRNGKey(0), eps=0.1, norm="linf", steps=2, m=12,
                                     tau=1e-2, hvp="exact")
  status = np.asarray(diag.status)
  assert status.shape == (2, B) and diag.status.dtype == jnp.int32
  np.testing.assert_array_equal(status == krylov.Status.CONVERGED, np.asarray(diag.converged))
  assert set(status.ravel()) <= {int(s) for s in krylov.Status} - {krylov.Status.NONFINITE}
  # With m = 1 and a tight tau most solves stop at the maximal dimension, and say so.
  _, diag1 = attacks.soae_with_report(LOGITS_FN, jnp.asarray(x), jnp.asarray(y),
                                      jax.random.PRNGKey(0), eps=0.1, norm="linf", steps=1, m=1,
                                      tau=1e-8, hvp="exact")
  s1 = np.asarray(diag1.status)
  assert np.any(s1 == krylov.Status.MAX_DIM_REACHED)
  np.testing.assert_array_equal(s1 == krylov.Status.CONVERGED, np.asarray(diag1.converged))


def test_nonfinite_solves_report_nonfinite_status():
  def overflow_logits(x):
    z = jnp.sum(x.reshape(x.shape[0], -1), axis=1, keepdims=True) * 1e38
    return jnp.concatenate([z * z, -z * z, jnp.zeros_like(z)], axis=1)

  x = jnp.full((4, 4, 4, 1), 0.5, jnp.float32)
  y = jnp.asarray([1, 1, 2, 2], jnp.int32)
  _, diag = attacks.soae_with_report(overflow_logits, x, y, jax.random.PRNGKey(0), eps=0.1,
                                     norm="l2", steps=2, m=3)
  np.testing.assert_array_equal(np.asarray(diag.status), int(krylov.Status.NONFINITE))
  assert not np.any(np.asarray(diag.converged))


# ---------------------------------------------------------------------------------------------
# The proposition of _soae's module docstring: on a ReLU network the Newton direction is H^+ g
# and moves the logits by -e_y / p_y + c 1.

N_RELU, K_RELU = 6, 3


def _relu_mlp():
  rng = np.random.default_rng(3)
  w1 = rng.normal(size=(N_RELU, 16))
  b1 = rng.normal(size=16) * 0.5
  w2 = rng.normal(size=(16, K_RELU)) / 4  # moderate probabilities: S well conditioned

  def logits_fn(x):
    return jax.nn.relu(x @ w1.astype(x.dtype) + b1.astype(x.dtype)) @ w2.astype(x.dtype)

  return logits_fn


RELU_FN = _relu_mlp()


@pytest.mark.slow
@pytest.mark.parametrize("start", ["newton", "zero"])
def test_newton_direction_closed_form_on_relu_network(x64, start):
  rng = np.random.default_rng(4)
  x = rng.normal(size=(5, N_RELU))
  y = np.array([0, 1, 2, 0, 1], np.int32)
  loss_fn = lambda z: losses.cross_entropy(RELU_FN(z), y)
  for i in range(len(y)):
    xi = jnp.asarray(x[i])
    jac = np.asarray(jax.jacobian(lambda v: RELU_FN(v[None])[0])(xi))      # (K, n)
    assert np.linalg.matrix_rank(jac) == K_RELU
    p = np.asarray(jax.nn.softmax(RELU_FN(xi[None])[0]))
    s = np.diag(p) - np.outer(p, p)
    # (a) the exact Hessian (jax.hessian, and hvp's products of the basis) is J^T S J.
    h_ref = jac.T @ s @ jac
    h = np.asarray(jax.hessian(lambda v: losses.cross_entropy(RELU_FN(v[None]), y[i:i + 1])[0])(
        xi))
    np.testing.assert_allclose(h, h_ref, atol=1e-12)
    op = hvp.make_hvp(lambda z: losses.cross_entropy(RELU_FN(z), np.repeat(y[i:i + 1], N_RELU)),
                      jnp.repeat(xi[None], N_RELU, 0), method="exact")
    np.testing.assert_allclose(np.asarray(op.matvec(jnp.eye(N_RELU))), h_ref, atol=1e-12)
  # (b) GMRES's solution is pinv(H) g, after at most K - 1 Krylov steps.
  if start == "newton":
    sol = attacks.soae_direction(loss_fn, jnp.asarray(x), tau=1e-10, m=N_RELU, hvp="exact")
    d, res = np.asarray(sol.direction), sol.gmres
  else:
    op = hvp.make_hvp(loss_fn, jnp.asarray(x), method="exact")
    res = krylov.gmres(op.matvec, op.grad, tol=1e-10, max_dim=N_RELU)
    d = np.asarray(res.x)
  assert np.all(np.asarray(res.num_iters) <= K_RELU - 1)
  assert np.all(np.asarray(res.converged))
  for i in range(len(y)):
    xi = jnp.asarray(x[i])
    jac = np.asarray(jax.jacobian(lambda v: RELU_FN(v[None])[0])(xi))
    p = np.asarray(jax.nn.softmax(RELU_FN(xi[None])[0]))
    s = np.diag(p) - np.outer(p, p)
    e_y = np.eye(K_RELU)[y[i]]
    g = jac.T @ (p - e_y)
    np.testing.assert_allclose(d[i], np.linalg.pinv(jac.T @ s @ jac) @ g, rtol=1e-8, atol=1e-10)
    # (c) J d + e_y / p_y is a constant vector (its value depends on J, not only on p).
    shift = jac @ d[i] + e_y / p[y[i]]
    np.testing.assert_allclose(shift, np.full(K_RELU, shift.mean()), rtol=0,
                               atol=1e-9 * np.abs(shift).max())


# ---------------------------------------------------------------------------------------------
# The trust-region direction against a dense solve (full Krylov dimension: the projected problem
# is the whole problem).


def _quadratic_problem(seed, psd):
  rng = np.random.default_rng(seed)
  n = 6
  a = rng.normal(size=(n, n))
  a = (a + a.T) / 2
  if psd:
    a = a @ a.T / n
  c = rng.normal(size=n)
  loss_fn = lambda z: jnp.sum(z * c, axis=1) + 0.5 * jnp.einsum("bi,ij,bj->b", z, a, z)
  x = rng.normal(size=(3, n))
  return loss_fn, x, a, c


def _dense_trust_region_l2(a, g, r):
  """max g^T d + 1/2 d^T A d on ||d|| = r: eigendecomposition and scipy's brentq on the secular
  equation (no hard case for random data)."""
  from scipy import optimize
  lam, q = np.linalg.eigh(a)
  gh = q.T @ g
  f = lambda mu: np.sum((gh / (mu - lam)) ** 2) - r ** 2
  mu = optimize.brentq(f, lam[-1] + 1e-12, lam[-1] + np.linalg.norm(g) / r + 1)
  return q @ (gh / (mu - lam))


def _dense_frank_wolfe_linf(a, g, r, steps):
  d = np.zeros_like(g)
  for _ in range(steps):
    grad = g + a @ d
    e = r * np.sign(grad) - d
    a_, b_ = grad @ e, e @ a @ e
    gamma = min(1.0, a_ / -b_) if b_ < 0 else 1.0
    d = d + max(gamma, 0.0) * e
  return d


@pytest.mark.slow
@pytest.mark.parametrize("psd", [True, False])
@pytest.mark.parametrize("radius", [0.1, 3.0])
def test_trust_region_l2_matches_dense_solve(x64, psd, radius):
  loss_fn, x, a, c = _quadratic_problem(5, psd)
  sol = attacks.soae_direction(loss_fn, jnp.asarray(x), tau=1e-12, m=6, hvp="exact",
                               direction="trust_region", radius=radius, norm="l2")
  assert np.all(np.asarray(sol.gmres.num_iters) == 6)
  for i in range(len(x)):
    g = c + a @ x[i]
    ref = _dense_trust_region_l2(a, g, radius)
    np.testing.assert_allclose(np.asarray(sol.direction[i]), ref, rtol=1e-7, atol=1e-9)
    assert abs(np.linalg.norm(np.asarray(sol.direction[i])) - radius) < 1e-9


@pytest.mark.parametrize("psd", [True, False])
def test_trust_region_linf_matches_dense_frank_wolfe(x64, psd):
  from krylov_adv.attacks import _soae
  loss_fn, x, a, c = _quadratic_problem(6, psd)
  r = 0.5
  sol = attacks.soae_direction(loss_fn, jnp.asarray(x), tau=1e-12, m=6, hvp="exact",
                               direction="trust_region", radius=r, norm="linf")
  for i in range(len(x)):
    g = c + a @ x[i]
    ref = _dense_frank_wolfe_linf(a, g, r, _soae._FRANK_WOLFE_STEPS)
    np.testing.assert_allclose(np.asarray(sol.direction[i]), ref, atol=1e-9)
    assert np.max(np.abs(ref)) <= r + 1e-12
    q = lambda d: g @ d + 0.5 * d @ a @ d
    assert q(ref) >= q(r * np.sign(g)) - 1e-12   # no worse than FGSM's vertex


def test_trust_region_l2_hard_case(x64):
  from krylov_adv.attacks import _soae
  # T = diag(1, 3), gradient only on the first eigenvector: the solution needs the second.
  t = jnp.asarray(np.diag([1.0, 3.0]))[None]
  y = np.asarray(_soae._trust_region_l2(t, jnp.asarray([1.0]), jnp.asarray([2.0])))[0]
  # mu = lambda_max = 3: y_1 = 1 / (3 - 1) = 0.5, y_2 = +-sqrt(4 - 0.25).
  np.testing.assert_allclose(abs(y), [0.5, np.sqrt(3.75)], atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_trust_region_attack_stays_in_threat_model_and_beats_newton_on_relu(x64, norm):
  rng = np.random.default_rng(7)
  x = rng.uniform(size=(32, N_RELU))
  logits = np.asarray(RELU_FN(jnp.asarray(x)))
  y = np.argmax(logits, 1).astype(np.int32)
  eps = 0.3 if norm == "linf" else 0.6
  loss = lambda xa: np.asarray(losses.cross_entropy(RELU_FN(jnp.asarray(xa)), y))
  out = {}
  for direction in ("newton", "trust_region"):
    xa = np.asarray(attacks.soae(RELU_FN, x, y, jax.random.PRNGKey(0), eps=eps, norm=norm,
                                 steps=1, m=K_RELU, direction=direction))
    dist = np.abs(xa - x).max(1) if norm == "linf" else np.linalg.norm(xa - x, axis=1)
    assert np.all(dist <= eps + 1e-9) and xa.min() >= 0 and xa.max() <= 1
    out[direction] = loss(xa).mean()
  assert out["trust_region"] >= out["newton"]


def test_unknown_direction_is_a_clear_error():
  with pytest.raises(ValueError, match="direction"):
    attacks.soae(LOGITS_FN, np.zeros((2, 4, 4, 1), np.float32), np.zeros(2, np.int32),
                 jax.random.PRNGKey(0), eps=0.1, norm="linf", direction="cauchy")
