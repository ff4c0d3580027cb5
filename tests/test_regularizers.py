"""SOAR and SCORPIO against independent computations on a tiny softplus MLP in float64.

References: the dense input Hessian by ``jax.hessian`` (the augmented matrix ``H~`` of SOAR is
assembled from it), the trust-region subproblem solved by eigendecomposition and bisection on
the secular equation (L2), and the global maximum of the quadratic over the box found by
enumerating every face and solving its stationarity system (Linf, 4-dimensional input).
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from krylov_adv import losses, regularizers as reg


def _jit(fn, *static, **kwargs):
  """``fn`` with its leading non-array arguments and keywords bound, jitted (eager dispatch of
  these small graphs costs more than compiling them once)."""
  return jax.jit(functools.partial(fn, *static, **kwargs))


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def _params(d, k=3, width=8, seed=0, dtype=jnp.float64):
  rng = np.random.default_rng(seed)
  return {"w1": jnp.asarray(rng.normal(size=(d, width)) / np.sqrt(d) * 3.0, dtype),
          "b1": jnp.asarray(rng.normal(size=width), dtype),
          "w2": jnp.asarray(rng.normal(size=(width, k)) * 1.5, dtype)}


def _logits_fn(params):
  def f(x):
    hid = jax.nn.softplus(x.reshape(x.shape[0], -1) @ params["w1"] + params["b1"])
    return hid @ params["w2"]
  return f


def _problem(side=4, bsz=3, seed=0, dtype=jnp.float64):
  """Params, images (B, side, side, 1) in [0, 1], labels, and the per-example CE loss_fn."""
  d = side * side
  params = _params(d, seed=seed, dtype=dtype)
  rng = np.random.default_rng(seed + 1)
  x = jnp.asarray(rng.uniform(0.2, 0.8, size=(bsz, side, side, 1)), dtype)
  y = jnp.asarray(rng.integers(0, 3, bsz), jnp.int32)
  logits_fn = _logits_fn(params)
  return params, x, y, lambda z: losses.cross_entropy(logits_fn(z), y)


def _dense(loss_fn, x):
  """Per-example gradient (B, d) and Hessian (B, d, d) by jax.grad / jax.hessian of each
  example's own loss (the other rows held fixed), independent of the block-diagonal batching
  that the code under test relies on."""
  bsz = x.shape[0]
  flat = x.reshape(bsz, -1)

  def li(v, i):
    return loss_fn(x.at[i].set(v.reshape(x.shape[1:])))[i]

  idx = jnp.arange(bsz)
  g = jax.jit(jax.vmap(jax.grad(li)))(flat, idx)
  h = jax.jit(jax.vmap(jax.hessian(li)))(flat, idx)
  return np.asarray(g), np.asarray(h)


def _augmented(g, h):
  d = g.shape[0]
  out = np.zeros((d + 1, d + 1))
  out[:d, :d], out[:d, d], out[d, :d], out[d, d] = h, g, g, 1.0
  return out


def _trust_region_max(g, h, eps):
  """Global max of g.d + 1/2 d.H d over ||d||_2 <= eps (dense, eigendecomposition)."""
  lam, v = np.linalg.eigh(h)
  gt = v.T @ g
  if lam.max() < 0:
    inner = -gt / lam
    if np.linalg.norm(inner) <= eps:
      d = v @ inner
      return g @ d + 0.5 * d @ h @ d
  lo, hi = max(lam.max(), 0.0), max(lam.max(), 0.0) + np.linalg.norm(g) / eps + 1.0
  for _ in range(200):  # ||(mu - lam)^-1 gt|| decreases in mu on (lam_max, inf)
    mu = 0.5 * (lo + hi)
    if np.linalg.norm(gt / (mu - lam)) > eps:
      lo = mu
    else:
      hi = mu
  d = v @ (gt / (hi - lam))
  return g @ d + 0.5 * d @ h @ d


def _box_max(g, h, eps):
  """Global max of g.d + 1/2 d.H d over ||d||_inf <= eps: every face (each coordinate at -eps,
  +eps or free), free coordinates at their stationary point when it is unique and feasible."""
  n = g.shape[0]
  best = -np.inf
  for pattern in itertools.product((-1, 0, 1), repeat=n):
    p = np.array(pattern)
    d = eps * p.astype(float)
    free = p == 0
    if free.any():
      hff = h[np.ix_(free, free)]
      rhs = -(g[free] + h[np.ix_(free, ~free)] @ d[~free])
      if abs(np.linalg.det(hff)) < 1e-12:
        continue
      d[free] = np.linalg.solve(hff, rhs)
      if np.abs(d[free]).max() > eps:
        continue
    best = max(best, g @ d + 0.5 * d @ h @ d)
  return best


# ---------------------------------------------------------------------------------------------
# SOAR


def test_augmented_product_exact_matches_dense_hessian(x64):
  _, x, _, loss_fn = _problem()
  g, h = _dense(loss_fn, x)
  rng = np.random.default_rng(3)
  z_x = jnp.asarray(rng.normal(size=x.shape))
  z_t = jnp.asarray(rng.normal(size=x.shape[0]))
  top, bottom = _jit(reg.augmented_hessian_product, loss_fn, method="exact")(x, z_x, z_t)
  for i in range(x.shape[0]):
    z = np.concatenate([np.asarray(z_x[i]).ravel(), [float(z_t[i])]])
    ref = _augmented(g[i], h[i]) @ z
    np.testing.assert_allclose(np.asarray(top[i]).ravel(), ref[:-1], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(float(bottom[i]), ref[-1], rtol=1e-10, atol=1e-12)


def test_augmented_product_finite_difference_converges_as_h_shrinks(x64):
  _, x, _, loss_fn = _problem()
  g, h = _dense(loss_fn, x)
  rng = np.random.default_rng(4)
  z_x = jnp.asarray(rng.normal(size=x.shape))
  z_t = jnp.asarray(rng.normal(size=x.shape[0]))
  refs = [_augmented(g[i], h[i]) @ np.concatenate([np.asarray(z_x[i]).ravel(), [float(z_t[i])]])
          for i in range(x.shape[0])]
  errors = []
  for step in (1e-1, 1e-2, 1e-3, 1e-4):
    fd = _jit(reg.augmented_hessian_product, loss_fn, method="fd", h=step)
    top, bottom = fd(x, z_x, z_t)
    approx = np.concatenate([np.asarray(top).reshape(x.shape[0], -1),
                             np.asarray(bottom)[:, None]], axis=1)
    errors.append(max(np.linalg.norm(approx[i] - refs[i]) / np.linalg.norm(refs[i])
                      for i in range(x.shape[0])))
  # Forward difference: first-order truncation error, each 10x smaller h gives ~10x less error.
  for coarse, fine in zip(errors, errors[1:]):
    assert fine < coarse / 5, errors
  assert errors[-1] < 1e-4, errors


def test_soar_regularizer_estimates_frobenius_bound(x64):
  # E ||H~ z||^2 = ||H~||_F^2: many probes recover the dense Frobenius norm.
  _, x, _, loss_fn = _problem()
  g, h = _dense(loss_fn, x)
  eps = 0.1
  value = _jit(reg.soar_regularizer, loss_fn, eps=eps, norm="l2", method="exact",
                num_samples=3000)(x, jax.random.PRNGKey(0))
  fro = np.array([np.linalg.norm(_augmented(g[i], h[i])) for i in range(x.shape[0])])
  np.testing.assert_allclose(np.asarray(value), 0.5 * (eps**2 + 1) * fro, rtol=0.08)
  # The FD regulariser with a small step agrees with the exact one for the same probes.
  key = jax.random.PRNGKey(1)
  exact = _jit(reg.soar_regularizer, loss_fn, eps=eps, norm="linf", method="exact")(x, key)
  fd = _jit(reg.soar_regularizer, loss_fn, eps=eps, norm="linf", method="fd", h=1e-5)(x, key)
  np.testing.assert_allclose(np.asarray(fd), np.asarray(exact), rtol=1e-4)
  assert np.all(np.asarray(exact) > 0)


def test_soar_norm_clip_clamps_each_examples_norm_estimate(x64):
  """norm_clip = (lo, hi): R = 1/2 (q eps^2 + 1) clip(||H~ z||_2, lo, hi) per example; ()
  leaves R unchanged (the same key, so the same probes)."""
  _, x, _, loss_fn = _problem(bsz=6)
  key = jax.random.PRNGKey(1)
  value = lambda clip: np.asarray(reg.soar_regularizer(
      loss_fn, x, key, eps=0.1, norm="l2", method="exact", norm_clip=clip))
  free = value(())
  scale = 0.5 * (0.1**2 + 1)
  norms = free / scale
  lo, hi = float(np.sort(norms)[1]), float(np.sort(norms)[-2])
  assert np.sum((norms < lo) | (norms > hi)) == 2
  np.testing.assert_allclose(value((lo, hi)), scale * np.clip(norms, lo, hi), rtol=1e-12)
  with pytest.raises(ValueError, match="norm_clip"):
    value((2.0, 1.0))


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_soar_bound_dominates_the_worst_case_quadratic(x64, norm):
  # SOAR's inequality: max_{||d|| <= eps} Q(d) <= 1/2 (q eps^2 + 1) ||H~||_2 - 1/2, q = d (linf)
  # or 1 (l2); the maximum from the dense references.
  side = 2 if norm == "linf" else 4
  _, x, _, loss_fn = _problem(side=side)
  g, h = _dense(loss_fn, x)
  for eps in (0.05, 0.5):
    scale = float(reg.soar_scale(x, eps, norm))
    assert scale == pytest.approx(0.5 * ((side * side if norm == "linf" else 1) * eps**2 + 1))
    for i in range(x.shape[0]):
      qmax = (_trust_region_max if norm == "l2" else _box_max)(g[i], h[i], eps)
      bound = scale * np.linalg.norm(_augmented(g[i], h[i]), 2) - 0.5
      assert qmax <= bound + 1e-12


# ---------------------------------------------------------------------------------------------
# SCORPIO


def test_frank_wolfe_l2_reaches_the_trust_region_solution(x64):
  _, x, _, loss_fn = _problem(side=4, bsz=4)
  g, h = _dense(loss_fn, x)
  for eps in (0.1, 1.0, 3.0):
    out = _jit(reg.scorpio_maximizer, loss_fn, eps=eps, norm="l2", steps=400)(x)
    ref = np.array([_trust_region_max(g[i], h[i], eps) for i in range(x.shape[0])])
    np.testing.assert_allclose(np.asarray(out.value), ref, rtol=1e-6)
    norms = np.linalg.norm(np.asarray(out.delta).reshape(x.shape[0], -1), axis=1)
    assert np.all(norms <= eps * (1 + 1e-12))
    assert np.all(np.asarray(out.gap) < 1e-6 * eps * (1 + np.linalg.norm(g, axis=1)))


def test_frank_wolfe_linf_reaches_the_box_maximum(x64):
  _, x, _, loss_fn = _problem(side=2, bsz=4)
  g, h = _dense(loss_fn, x)
  for eps in (0.05, 0.5, 2.0):
    out = _jit(reg.scorpio_maximizer, loss_fn, eps=eps, norm="linf", steps=200)(x)
    ref = np.array([_box_max(g[i], h[i], eps) for i in range(x.shape[0])])
    np.testing.assert_allclose(np.asarray(out.value), ref, rtol=1e-6, atol=1e-12)
    assert np.abs(np.asarray(out.delta)).max() <= eps * (1 + 1e-12)


def test_frank_wolfe_steps_first_iterate_and_monotone_line_search(x64):
  _, x, _, loss_fn = _problem()
  g, h = _dense(loss_fn, x)
  eps = 0.3
  # classic rule: gamma_0 = 1, so one iteration is the FGSM point eps sign(g)
  one = _jit(reg.scorpio_maximizer, loss_fn, eps=eps, norm="linf", steps=1,
             step_rule="classic")(x)
  np.testing.assert_allclose(np.asarray(one.delta), eps * np.sign(np.asarray(g)).reshape(x.shape))
  ref = np.array([eps * np.abs(g[i]).sum() + 0.5 * eps**2 * np.sign(g[i]) @ h[i] @
                  np.sign(g[i]) for i in range(x.shape[0])])
  np.testing.assert_allclose(np.asarray(one.value), ref, rtol=1e-10)
  values = [np.asarray(_jit(reg.scorpio_maximizer, loss_fn, eps=eps, norm="linf",
                            steps=k)(x).value) for k in (1, 2, 3, 5, 8)]
  for a, b in zip(values, values[1:]):
    assert np.all(b >= a - 1e-12)
  # the regulariser is the model's value at the maximiser
  r = _jit(reg.scorpio_regularizer, loss_fn, eps=eps, norm="linf", steps=8)(x)
  np.testing.assert_allclose(np.asarray(r), values[-1], rtol=1e-10)


def test_clip_gradient_norm_clips_only_the_routed_term():
  params = {"a": jnp.array([3.0, 4.0]), "b": jnp.array(0.0)}

  def loss(p, max_norm):
    clipped = reg.clip_gradient_norm(p, max_norm)
    return 10.0 * jnp.sum(clipped["a"] ** 2) + jnp.sum(p["a"])

  np.testing.assert_allclose(float(loss(params, 1.0)), 10.0 * 25 + 7)
  # the routed term's gradient (60, 80) is clipped to norm 1: (0.6, 0.8); the other term adds 1
  np.testing.assert_allclose(np.asarray(jax.grad(loss)(params, 1.0)["a"]), [1.6, 1.8],
                             rtol=1e-6)
  np.testing.assert_allclose(np.asarray(jax.grad(loss)(params, 1e3)["a"]), [61.0, 81.0],
                             rtol=1e-6)


@pytest.mark.parametrize("max_norm", [0.5, 100.0])
def test_clip_gradient_norm_backward_is_the_clipped_cotangent(x64, max_norm):
  """Below ``max_norm`` the backward pass is the identity; above it, the cotangent pytree keeps
  its direction and has global L2 norm exactly ``max_norm``."""
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  params = {"w": jax.random.normal(k1, (3, 4), jnp.float64),
            "b": jax.random.normal(k2, (4,), jnp.float64)}
  f = lambda p: jnp.sum(jnp.sin(p["w"]) * p["b"]) + jnp.sum(p["b"] ** 3)
  assert float(f(reg.clip_gradient_norm(params, max_norm))) == float(f(params))
  plain = jax.grad(f)(params)
  clipped = jax.grad(lambda p: f(reg.clip_gradient_norm(p, max_norm)))(params)
  norm = float(optax.global_norm(plain))
  assert 0.5 < norm < 100.0  # one case of each
  if norm <= max_norm:
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12), clipped,
                           plain)
  else:
    np.testing.assert_allclose(float(optax.global_norm(clipped)), max_norm, rtol=1e-10)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(
        np.asarray(a), np.asarray(b) * max_norm / norm, rtol=1e-10), clipped, plain)


# ---------------------------------------------------------------------------------------------
# Losses: differentiable in the parameters, jit-compatible, and they train.


def _losses(name):
  if name == "soar":
    return lambda p, x, y, key: reg.soar_loss(_logits_fn(p), x, y, key, eps=0.1, norm="linf",
                                              lam=0.5, h=1e-2)
  return lambda p, x, y, key: reg.scorpio_loss(_logits_fn(p), x, y, key, eps=0.1, norm="linf",
                                               steps=3)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["soar", "scorpio"])
def test_loss_parameter_gradients_finite_nonzero_and_jitted(name):
  params, x, y, _ = _problem(dtype=jnp.float32)
  loss = _losses(name)
  key = jax.random.PRNGKey(0)
  value, grads = jax.jit(jax.value_and_grad(loss))(params, x, y, key)
  eager = loss(params, x, y, key)
  np.testing.assert_allclose(float(value), float(eager), rtol=1e-5)
  clean = float(jnp.mean(losses.cross_entropy(_logits_fn(params)(x), y)))
  assert float(value) > clean  # the regulariser adds a positive amount
  for leaf in jax.tree_util.tree_leaves(grads):
    assert np.all(np.isfinite(np.asarray(leaf)))
    assert np.abs(np.asarray(leaf)).max() > 0


@pytest.mark.parametrize("name", ["soar", "scorpio"])
def test_losses_train(name):
  params, _, _, _ = _problem(dtype=jnp.float32)
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.uniform(0.0, 1.0, size=(16, 4, 4, 1)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, 16), jnp.int32)
  loss = _losses(name)
  opt = optax.adam(1e-2)
  key = jax.random.PRNGKey(0)  # fixed: the objective is the same function at every step

  @jax.jit
  def step(p, s, x, y):
    value, grads = jax.value_and_grad(loss)(p, x, y, key)
    updates, s = opt.update(grads, s)
    return optax.apply_updates(p, updates), s, value

  state = opt.init(params)
  history = []
  for _ in range(15):
    params, state, value = step(params, state, x, y)
    history.append(float(value))
  assert history[-1] < 0.8 * history[0], history
