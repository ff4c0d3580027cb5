"""Input Hessian-vector products against jax.hessian and finite-difference truncation theory."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from krylov_adv import hvp
from krylov_adv.models.cnn import TinyCNN


def _mlp_loss(params, y):
  """Smooth per-example loss (tanh MLP + cross-entropy) on flat inputs (B, d)."""
  w1, b1, w2 = params

  def loss_fn(x):
    logits = jnp.tanh(x.reshape(x.shape[0], -1) @ w1 + b1) @ w2
    return -jax.nn.log_softmax(logits)[jnp.arange(x.shape[0]), y]

  return loss_fn


def _setup(dtype, bsz=3, d=6, k=4, seed=0):
  rng = np.random.default_rng(seed)
  params = (jnp.asarray(rng.normal(size=(d, 8)), dtype), jnp.asarray(rng.normal(size=8), dtype),
            jnp.asarray(rng.normal(size=(8, k)), dtype))
  y = jnp.asarray(rng.integers(0, k, bsz))
  x = jnp.asarray(rng.uniform(size=(bsz, d)), dtype)
  v = jnp.asarray(rng.normal(size=(bsz, d)), dtype)
  return _mlp_loss(params, y), x, v


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def _reference_blocks(loss_fn, x):
  """Full Hessian of the summed loss, (B, d, B, d), by jax.hessian."""
  return jax.hessian(lambda z: jnp.sum(loss_fn(z)))(x)


def _hessian_from_products(matvec, x):
  """The full (B, d, B, d) Hessian assembled from ``matvec`` applied to every one-hot direction:
  column (j, k) is ``matvec(e_jk)``."""
  bsz, d = x.shape
  basis = jnp.eye(bsz * d, dtype=x.dtype).reshape(bsz * d, bsz, d)
  cols = np.asarray(jax.jit(jax.vmap(matvec))(basis))          # (B*d, B, d): [jk, i, a]
  return cols.reshape(bsz, d, bsz, d).transpose(2, 3, 0, 1)


@pytest.mark.parametrize("method,tol", [("exact", 1e-12), ("exact_linearized", 1e-12),
                                        ("fd_central", 1e-6), ("fd_forward", 1e-4)])
def test_hvp_products_assemble_the_block_diagonal_hessian(x64, method, tol):
  # hvp.py's batched products, applied to one-hot directions, must rebuild jax.hessian of the
  # summed loss: the diagonal blocks H_i, and zero off-diagonal blocks (a product in example
  # j's direction must not leak into example i: the block-diagonal assumption, module docstring).
  loss_fn, x, _ = _setup(jnp.float64)
  want = np.asarray(_reference_blocks(loss_fn, x))
  op = hvp.make_hvp(loss_fn, x, method=method, eta=1e-5)
  got = _hessian_from_products(op.matvec, x)
  scale = np.abs(want).max()
  np.testing.assert_allclose(got, want, rtol=0, atol=tol * scale)
  bsz = x.shape[0]
  for i in range(bsz):
    for j in range(bsz):
      if i != j:
        np.testing.assert_array_equal(want[i, :, j, :], 0.0)
        np.testing.assert_allclose(got[i, :, j, :], 0.0, atol=tol * scale)
  assert np.abs(want[0, :, 0, :]).max() > 1e-3  # and the diagonal blocks are not trivial
  if method == "exact":
    np.testing.assert_allclose(_hessian_from_products(lambda v: hvp.exact_hvp(loss_fn, x, v), x),
                               want, rtol=0, atol=tol * scale)


def test_block_diagonal_claim_fails_when_examples_interact(x64):
  # A batch-statistics layer (BatchNorm in training mode) couples examples: hvp.py's product is
  # then the full Hessian of the summed loss, off-diagonal blocks included (as jax.hessian
  # says), and no longer one H_i v_i per example: the assumption hvp.py documents matters.
  loss_fn, x, _ = _setup(jnp.float64)
  coupled = lambda z: loss_fn(z - z.mean(axis=0, keepdims=True))
  want = np.asarray(_reference_blocks(coupled, x))
  got = _hessian_from_products(lambda v: hvp.exact_hvp(coupled, x, v), x)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-12 * np.abs(want).max())
  assert np.abs(got[0, :, 1, :]).max() > 1e-6


def test_exact_hvp_matches_jax_hessian(x64):
  loss_fn, x, v = _setup(jnp.float64)
  full = np.asarray(_reference_blocks(loss_fn, x))
  want = np.stack([full[i, :, i, :] @ np.asarray(v[i]) for i in range(x.shape[0])])
  np.testing.assert_allclose(hvp.exact_hvp(loss_fn, x, v), want, rtol=1e-12, atol=1e-14)
  for method in ("exact", "exact_linearized"):
    op = hvp.make_hvp(loss_fn, x, method=method)
    np.testing.assert_allclose(op.matvec(v), want, rtol=1e-12, atol=1e-14)
  per_example_grad = jax.vmap(jax.grad(lambda xi, i: loss_fn(x.at[i].set(xi))[i]))(
      x, jnp.arange(x.shape[0]))
  np.testing.assert_allclose(op.grad, per_example_grad, rtol=1e-12)
  np.testing.assert_allclose(hvp.input_grad(loss_fn, x), per_example_grad, rtol=1e-12)


@pytest.mark.slow
def test_exact_hvp_float32_on_cnn_under_jit():
  model = TinyCNN(num_classes=10, activation=jax.nn.softplus)
  x = jax.random.uniform(jax.random.PRNGKey(0), (4, 8, 8, 1))
  params = model.init(jax.random.PRNGKey(1), x)
  y = jnp.array([0, 3, 5, 9])
  loss_fn = lambda z: -jax.nn.log_softmax(model.apply(params, z))[jnp.arange(z.shape[0]), y]
  v = jax.random.normal(jax.random.PRNGKey(2), x.shape)
  got = jax.jit(lambda x, v: hvp.exact_hvp(loss_fn, x, v))(x, v)
  got_op = jax.jit(
      lambda x, v: hvp.make_hvp(loss_fn, x, method="exact_linearized").matvec(v))(x, v)
  for i in range(4):
    h_i = jax.hessian(lambda xi: loss_fn(x.at[i].set(xi))[i])(x[i]).reshape(64, 64)
    want = h_i @ v[i].reshape(64)
    scale = float(jnp.abs(want).max())
    np.testing.assert_allclose(got[i].reshape(64), want, atol=1e-4 * scale)
    np.testing.assert_allclose(got_op[i].reshape(64), want, atol=1e-4 * scale)
  assert got.dtype == jnp.float32


def test_finite_differences_converge_at_their_order(x64):
  loss_fn, x, v = _setup(jnp.float64)
  exact = np.asarray(hvp.exact_hvp(loss_fn, x, v))
  norm = np.linalg.norm(exact)

  def rel_err(scheme, eta):
    approx = np.asarray(hvp.fd_hvp(loss_fn, x, v, eta=eta, scheme=scheme))
    return np.linalg.norm(approx - exact) / norm

  fwd = [rel_err("forward", eta) for eta in (1e-2, 1e-3, 1e-4)]
  cen = [rel_err("central", eta) for eta in (1e-2, 1e-3, 1e-4)]
  # Forward error is O(eta): a decade of eta buys a decade of accuracy.
  assert 5 < fwd[0] / fwd[1] < 20 and 5 < fwd[1] / fwd[2] < 20
  # Central error is O(eta^2): a decade of eta buys two.
  assert 50 < cen[0] / cen[1] < 200
  assert fwd[2] < 1e-3 and cen[1] < 1e-4
  # The operator built by name equals the direct call, and reuses the gradient.
  for method, scheme in (("fd_forward", "forward"), ("fd_central", "central")):
    op = hvp.make_hvp(loss_fn, x, method=method, eta=1e-3)
    np.testing.assert_allclose(op.matvec(v), hvp.fd_hvp(loss_fn, x, v, eta=1e-3, scheme=scheme),
                               rtol=1e-12)


def test_forward_difference_reuses_given_gradient(x64):
  loss_fn, x, v = _setup(jnp.float64)
  g = hvp.input_grad(loss_fn, x)
  np.testing.assert_allclose(hvp.fd_hvp(loss_fn, x, v, eta=1e-4, grad_x=g),
                             hvp.fd_hvp(loss_fn, x, v, eta=1e-4), rtol=1e-12)
  # A wrong gradient changes the answer: the given gradient really is the one used.
  assert not np.allclose(hvp.fd_hvp(loss_fn, x, v, eta=1e-4, grad_x=g + 1e-6),
                         hvp.fd_hvp(loss_fn, x, v, eta=1e-4))


def test_invalid_arguments():
  loss_fn, x, v = _setup(jnp.float32)
  with pytest.raises(ValueError, match="method"):
    hvp.make_hvp(loss_fn, x, method="newton")
  with pytest.raises(ValueError, match="eta"):
    hvp.make_hvp(loss_fn, x, method="fd_forward", eta=0.0)
  with pytest.raises(ValueError, match="eta"):
    hvp.fd_hvp(loss_fn, x, v, eta=-1e-3)
  for eta in (float("inf"), float("nan")):  # inf used to give NaN products
    with pytest.raises(ValueError, match="eta must be a finite number > 0"):
      hvp.make_hvp(loss_fn, x, method="fd_central", eta=eta)
  with pytest.raises(ValueError, match="scheme"):
    hvp.fd_hvp(loss_fn, x, v, eta=1e-3, scheme="backward")
  with pytest.raises(ValueError, match="shape"):
    hvp.exact_hvp(loss_fn, x, v[:, :3])
  with pytest.raises(ValueError, match="per-example"):
    hvp.input_grad(lambda z: jnp.sum(loss_fn(z)), x)


def test_one_default_for_the_hvp_method_and_eta():
  # Each default is written once, in krylov_adv.hvp, and every user of make_hvp refers to it
  # (before: make_hvp's eta=1e-3 against SOAE's 1e-5, and "exact" written in five places).
  import inspect

  from krylov_adv import attacks, regularizers
  from krylov_adv.attacks import _soae

  assert hvp.DEFAULT_METHOD == "exact" and hvp.DEFAULT_ETA == 1e-5  # the SOAE paper's eta
  make = inspect.signature(hvp.make_hvp).parameters
  assert make["method"].default == hvp.DEFAULT_METHOD and make["eta"].default == hvp.DEFAULT_ETA
  for fn in (attacks.soae, attacks.soae_direction):
    params = inspect.signature(fn).parameters
    assert params["hvp"].default == hvp.DEFAULT_METHOD, fn
    assert params["eta"].default == hvp.DEFAULT_ETA, fn
  assert (_soae.DEFAULT_HVP, _soae.DEFAULT_ETA) == (hvp.DEFAULT_METHOD, hvp.DEFAULT_ETA)
  for fn in (regularizers.scorpio_maximizer, regularizers.quadratic_model,
             regularizers.scorpio_regularizer, regularizers.scorpio_loss):
    params = inspect.signature(fn).parameters
    assert params["hvp"].default == hvp.DEFAULT_METHOD, fn
    assert params["eta"].default == hvp.DEFAULT_ETA, fn


def test_make_hvp_passes_each_methods_fd_scheme_explicitly(monkeypatch):
  # The scheme comes from hvp.FD_SCHEMES, not from slicing the method's name: renaming a scheme
  # there reaches fd_hvp (before: method[3:]).
  loss_fn, x, v = _setup(jnp.float32)
  assert hvp.FD_SCHEMES == {"fd_forward": "forward", "fd_central": "central"}
  assert set(hvp.FD_SCHEMES) | {"exact", "exact_linearized"} == set(hvp.HVP_METHODS)
  seen = []
  real = hvp.fd_hvp
  monkeypatch.setattr(hvp, "fd_hvp", lambda *a, **kw: seen.append(kw["scheme"]) or real(*a, **kw))
  monkeypatch.setitem(hvp.FD_SCHEMES, "fd_forward", "central")
  hvp.make_hvp(loss_fn, x, method="fd_forward").matvec(v)
  assert seen == ["central"]
