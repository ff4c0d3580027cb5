"""Models: registry, published parameter counts, shapes, activation choice, BatchNorm modes."""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from krylov_adv import losses, models
from krylov_adv.models import layers


def _num_params(model, shape):
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(shape),
                                                train=False))
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(variables["params"]))


@pytest.mark.parametrize("name,shape,expected", [
    # Madry CNN by hand: 5*5*1*32+32 + 5*5*32*64+64 + 7*7*64*1024+1024 + 1024*10+10.
    ("madry_cnn", (1, 28, 28, 1), 832 + 51264 + 3212288 + 10250),
    # The parameter counts of the PyTorch reference models (torchvision-style CIFAR ResNet-18,
    # the TRADES / MART WideResNets), BatchNorm scale and bias included, running stats not.
    ("resnet18", (1, 32, 32, 3), 11_173_962),
    ("wrn28_10", (1, 32, 32, 3), 36_479_194),
    ("wrn34_10", (1, 32, 32, 3), 46_160_474),
])
def test_parameter_counts_match_reference_architectures(name, shape, expected):
  assert _num_params(models.get(name, num_classes=10), shape) == expected


def test_wide_resnet_depth_and_width_are_configurable():
  # WRN-16-4: n = 2 blocks per stage; count from the formula for pre-activation blocks.
  k, n = 4, 2
  widths = [16 * k, 32 * k, 64 * k]
  total, cin = 3 * 3 * 3 * 16, 16
  for w in widths:
    for j in range(n):
      total += 2 * cin + 9 * cin * w + 2 * w + 9 * w * w  # BN, conv, BN, conv
      if cin != w:
        total += cin * w  # 1x1 projection
      cin = w
  total += 2 * cin + cin * 10 + 10  # final BN and dense
  model = models.get("wide_resnet", depth=16, widen=k)
  assert _num_params(model, (1, 32, 32, 3)) == total
  with pytest.raises(ValueError, match="6n \\+ 4"):
    models.get("wide_resnet", depth=15, widen=1).init(jax.random.PRNGKey(0),
                                                      jnp.zeros((1, 8, 8, 3)))


@pytest.mark.slow
@pytest.mark.parametrize("name,kw,shape", [
    ("tiny_cnn", {}, (3, 8, 8, 1)),
    ("madry_cnn", {}, (3, 28, 28, 1)),
    ("resnet18", {"width": 4}, (3, 32, 32, 3)),
    ("wide_resnet", {"depth": 10, "widen": 1}, (3, 32, 32, 3)),
])
def test_forward_shapes_and_dtype(name, kw, shape):
  model = models.get(name, num_classes=7, **kw)
  x = jax.random.uniform(jax.random.PRNGKey(1), shape)
  # One jitted init + apply: op-by-op dispatch of a ResNet is slower than compiling it.
  logits = jax.jit(lambda z: model.apply(model.init(jax.random.PRNGKey(0), z), z))(x)
  assert logits.shape == (shape[0], 7) and logits.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(logits)))


def test_registry_errors_and_listing():
  assert {"tiny_cnn", "madry_cnn", "resnet18", "wide_resnet", "wrn28_10",
          "wrn34_10"} <= set(models.available())
  with pytest.raises(ValueError, match="unknown model 'vgg'"):
    models.get("vgg")
  with pytest.raises(ValueError, match="unknown activation 'swishy'"):
    models.get("tiny_cnn", activation="swishy")
  with pytest.raises(ValueError, match="num_classes"):
    models.get("tiny_cnn", num_classes=1)
  with pytest.raises(ValueError, match="registered twice"):
    models.register("tiny_cnn")(models.TinyCNN)


def test_registered_model_is_built_by_name():
  name = "test_tiny_cnn_alias"
  models.register(name)(models.TinyCNN)
  try:
    model = models.get(name, num_classes=3, activation="tanh")
    assert isinstance(model, models.TinyCNN) and model.num_classes == 3
    assert model.activation is models.ACTIVATIONS["tanh"]
  finally:
    models._MODELS.pop(name)  # pylint: disable=protected-access


@pytest.mark.slow
def test_activation_by_name_is_used():
  x = jax.random.uniform(jax.random.PRNGKey(1), (2, 8, 8, 1))
  relu = models.get("tiny_cnn", activation="relu")
  soft = models.get("tiny_cnn", activation="softplus")
  params = relu.init(jax.random.PRNGKey(0), x)
  assert soft.activation is jax.nn.softplus
  # Same weights, different nonlinearity -> different logits; a softplus net has curvature
  # along a random direction where the ReLU net (piecewise linear, softmax aside) has less.
  assert not np.allclose(relu.apply(params, x), soft.apply(params, x))
  f = lambda z: soft.apply(params, z)[:, 0].sum()  # a logit: linear in x for ReLU
  g = lambda z: relu.apply(params, z)[:, 0].sum()
  v = jax.random.normal(jax.random.PRNGKey(2), x.shape)
  hv_soft = jax.jvp(jax.grad(f), (x,), (v,))[1]
  hv_relu = jax.jvp(jax.grad(g), (x,), (v,))[1]
  assert np.abs(np.asarray(hv_soft)).max() > 0
  np.testing.assert_allclose(np.asarray(hv_relu), 0.0, atol=1e-6)


@pytest.mark.slow
def test_batchnorm_train_mode_mixes_examples_inference_mode_does_not():
  model = models.get("resnet18", width=4, num_classes=10)
  x = jax.random.uniform(jax.random.PRNGKey(1), (4, 16, 16, 3))
  variables = model.init(jax.random.PRNGKey(0), x, train=False)
  assert jax.tree_util.tree_leaves(variables["batch_stats"])  # BatchNorm running statistics
  # Inference: example 0's logits do not depend on the rest of the batch.
  full = model.apply(variables, x, train=False)
  alone = model.apply(variables, x[:1], train=False)
  np.testing.assert_allclose(np.asarray(full[:1]), np.asarray(alone), rtol=1e-5, atol=1e-5)
  # Training: batch statistics couple the examples, and the running averages move.
  x2 = x.at[1:].set(jax.random.uniform(jax.random.PRNGKey(3), (3, 16, 16, 3)))
  out1, upd = model.apply(variables, x, train=True, mutable=["batch_stats"])
  out2, _ = model.apply(variables, x2, train=True, mutable=["batch_stats"])
  assert not np.allclose(np.asarray(out1[0]), np.asarray(out2[0]), atol=1e-4)
  moved = jax.tree_util.tree_map(lambda a, b: float(jnp.abs(a - b).max()),
                                 upd["batch_stats"], variables["batch_stats"])
  assert max(jax.tree_util.tree_leaves(moved)) > 0


# ----------------------------------------------------------------------------------------------
# layers.max_pool: nn.max_pool's values and gradient (ties included) without select_and_scatter.


def _tied_activations(seed: int, shape) -> jax.Array:
  # Few distinct values (and ReLU zeros), so most tiles hold ties: the case where the gradient
  # rule (first maximum takes everything, not a split) shows.
  r = np.random.default_rng(seed)
  return jnp.asarray(np.maximum(r.integers(-2, 3, shape), 0).astype(np.float32))


@pytest.mark.parametrize("window,shape", [((2, 2), (3, 8, 8, 4)), ((2, 3), (2, 6, 9, 3)),
                                          ((3, 3), (2, 9, 6, 2)),
                                          ((2, 2), (2, 5, 7, 3))])  # not divisible: cropped
def test_max_pool_matches_flax_values_and_gradient_with_ties(window, shape):
  x = _tied_activations(0, shape)
  ours, flax_pool = layers.max_pool, lambda z: nn.max_pool(z, window, strides=window)
  np.testing.assert_array_equal(ours(x, window), flax_pool(x))
  ct = jnp.asarray(np.random.default_rng(1).normal(size=flax_pool(x).shape).astype(np.float32))
  g_ours = jax.vjp(lambda z: ours(z, window), x)[1](ct)[0]
  g_flax = jax.vjp(flax_pool, x)[1](ct)[0]
  np.testing.assert_array_equal(g_ours, g_flax)
  # The ties are there, and a rule that split the cotangent among them would differ.
  split = jax.vjp(lambda z: jnp.max(
      z[..., :z.shape[-3] // window[0] * window[0], :z.shape[-2] // window[1] * window[1], :]
      .reshape(z.shape[0], z.shape[1] // window[0], window[0], z.shape[2] // window[1],
               window[1], z.shape[3]), axis=(2, 4)), x)[1](ct)[0]
  assert np.max(np.abs(np.asarray(split) - np.asarray(g_flax))) > 0.1
  # The custom JVP and the gradient (its transpose) are adjoint: <ct, J t> = <J^T ct, t>.
  t = jnp.asarray(np.random.default_rng(2).normal(size=shape).astype(np.float32))
  jt = jax.jvp(lambda z: ours(z, window), (x,), (t,))[1]
  np.testing.assert_allclose(jnp.vdot(ct, jt), jnp.vdot(g_ours, t), rtol=1e-5)
  np.testing.assert_array_equal(jax.vmap(lambda z: ours(z, window))(x[:, None])[:, 0],
                                flax_pool(x))


@pytest.mark.slow
def test_madry_cnn_matches_flax_max_pool_values_gradient_and_hvp():
  class FlaxPoolMadry(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.max_pool(nn.relu(nn.Conv(32, (5, 5), padding="SAME")(x)), (2, 2), strides=(2, 2))
      x = nn.max_pool(nn.relu(nn.Conv(64, (5, 5), padding="SAME")(x)), (2, 2), strides=(2, 2))
      x = nn.relu(nn.Dense(1024)(x.reshape((x.shape[0], -1))))
      return nn.Dense(10)(x)

  x = jnp.asarray(np.random.default_rng(2).uniform(size=(2, 28, 28, 1)).astype(np.float32))
  # MNIST-like: a blank band of rows.
  x = x.at[:, :6].set(0.0)
  y = jnp.array([3, 7])
  ours = models.MadryCNN()
  # Positive biases: the blank region's conv outputs tie at relu(bias) > 0 inside a pool tile.
  params = jax.tree_util.tree_map(lambda p: p + 0.05, ours.init(jax.random.PRNGKey(0), x))
  loss = lambda m: lambda z: jnp.sum(losses.cross_entropy(m.apply(params, z), y))
  np.testing.assert_array_equal(ours.apply(params, x), FlaxPoolMadry().apply(params, x))
  g_ours, g_flax = jax.grad(loss(ours))(x), jax.grad(loss(FlaxPoolMadry()))(x)
  np.testing.assert_allclose(g_ours, g_flax, rtol=1e-5, atol=1e-6)
  v = jnp.asarray(np.random.default_rng(3).normal(size=x.shape).astype(np.float32))
  hvp = lambda m: jax.jvp(jax.grad(loss(m)), (x,), (v,))[1]
  np.testing.assert_allclose(hvp(ours), hvp(FlaxPoolMadry()), rtol=1e-4, atol=1e-5)


def test_max_pool_rejects_nonpositive_window():
  with pytest.raises(ValueError, match="positive"):
    layers.max_pool(jnp.zeros((1, 4, 4, 1)), (0, 2))


def test_standardized_model_is_the_inner_model_on_standardised_pixels():
  """model.normalize_mean / normalize_std: inner((x - mean) / std), attacked in pixels; a
  standardised model attacked in pixels with [0, 1] equals the inner model attacked in its
  standardised box with eps / s (issue 24's two ways to the same threat model)."""
  from krylov_adv import attacks  # pylint: disable=import-outside-toplevel
  mean, std = (0.25, 0.5, 0.375), (0.5, 0.5, 0.5)
  wrapped = models.get("tiny_cnn", num_classes=5, normalize_mean=mean, normalize_std=std)
  x = jax.random.uniform(jax.random.PRNGKey(0), (4, 8, 8, 3))
  variables = wrapped.init(jax.random.PRNGKey(1), x)
  inner = models.get("tiny_cnn", num_classes=5)
  z = (x - jnp.asarray(mean)) / jnp.asarray(std)
  np.testing.assert_allclose(wrapped.apply(variables, x),
                             inner.apply({"params": variables["params"]["inner"]}, z),
                             rtol=1e-5, atol=1e-6)
  f = models.as_logits_fn(wrapped, variables, train=False)
  g = models.as_logits_fn(inner, {"params": variables["params"]["inner"]}, train=False)
  y = jnp.argmax(f(x), axis=1)
  key = jax.random.PRNGKey(2)
  x_adv = attacks.pgd(f, x, y, key, eps=0.05, norm="linf", steps=3)
  lo, hi = (0 - jnp.asarray(mean)) / 0.5, (1 - jnp.asarray(mean)) / 0.5
  z_adv = attacks.pgd(g, z, y, key, eps=0.05 / 0.5, norm="linf", steps=3, bounds=(lo, hi))
  np.testing.assert_allclose(z_adv * 0.5 + jnp.asarray(mean), x_adv, atol=1e-5)
  with pytest.raises(ValueError, match="normalize_mean and model.normalize_std"):
    models.get("tiny_cnn", normalize_mean=mean)
