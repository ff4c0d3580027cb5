"""APGD and FAB driven from the host (one jitted call per iteration) against their traceable
in-graph loops (``apgd_run`` / ``fab_run`` under ``jit``), and AutoAttack's subset buckets.

The host-driven loops exist for speed only (XLA:CPU runs the input gradient's transposed
convolutions several times slower inside a ``while`` body); they must compute the same thing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from krylov_adv.attacks import _apgd as apgd
from krylov_adv.attacks import _autoattack as aa
from krylov_adv.attacks import _fab as fab
from krylov_adv.attacks import toolkit

_RNG = np.random.default_rng(3)
_W1 = jnp.asarray(_RNG.normal(size=(3, 3, 1, 4)), jnp.float32)
_W2 = jnp.asarray(_RNG.normal(size=(6 * 6 * 4, 5)), jnp.float32) * 0.3


def _conv_model(x):
  # A small conv net, so the gradient goes through a transposed convolution as in the CNNs.
  h = jax.lax.conv_general_dilated(x, _W1, (1, 1), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return jnp.tanh(h).reshape(x.shape[0], -1) @ _W2


_X = jnp.asarray(_RNG.uniform(size=(12, 6, 6, 1)), jnp.float32)
_Y = jnp.argmax(_conv_model(_X), axis=1).astype(jnp.int32)


@pytest.mark.parametrize("targeted,loss", [(False, "ce"), (True, "dlr")])
def test_host_driven_apgd_equals_one_in_graph_run(targeted, loss):
  # One run (restarts = targets = 1): apgd_batch's result is that run's x_adv where fooled,
  # else its x_best; the in-graph fori_loop of apgd_run gives the reference bit for bit.
  keys = toolkit.example_keys(jax.random.PRNGKey(0), jnp.arange(12))
  eps, steps = 0.1, 12
  got, fooled = apgd.apgd_batch(_conv_model, _X, _Y, keys, eps, norm="linf", loss=loss,
                                targeted=targeted, steps=steps, restarts=1, n_target_classes=1,
                                rho=0.75)
  target = toolkit.target_order(_conv_model(_X), _Y)[:, 0]
  x0 = apgd.initial_point(toolkit.fold_keys(keys, 0), _X, eps, "linf")
  run = jax.jit(lambda x0: apgd.apgd_run(_conv_model, _X, _Y, target, x0, eps, norm="linf",
                                         loss=loss, targeted=targeted, steps=steps, rho=0.75))(x0)
  want = toolkit.select(run.fooled, run.x_adv, run.x_best)
  np.testing.assert_array_equal(np.asarray(fooled), np.asarray(run.fooled))
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert 0 < int(np.sum(fooled)) < 12  # both branches of the selection are exercised


def test_host_driven_fab_matches_the_in_graph_run():
  keys = toolkit.example_keys(jax.random.PRNGKey(0), jnp.arange(12))
  steps = 10
  target = toolkit.target_order(_conv_model(_X), _Y)[:, 0]
  adv, dist = jax.jit(lambda: fab.fab_run(_conv_model, _X, _Y, target, _X, norm="linf",
                                          targeted=True, steps=steps, alpha_max=0.1,
                                          overshoot=1.05, beta=0.9))()
  # eps halfway between the two middle distances: half the points are fooled, none is close.
  d = np.sort(np.asarray(dist))
  assert np.all(np.isfinite(d)) and d[5] < d[6]
  eps = float(d[5] + d[6]) / 2
  got, fooled = fab.fab_batch(_conv_model, _X, _Y, keys, eps, norm="linf", targeted=True,
                              steps=steps, restarts=1, n_target_classes=1, alpha_max=0.1,
                              overshoot=1.05, beta=0.9)
  want_fooled = np.asarray(dist) <= eps
  assert want_fooled.sum() == 6
  np.testing.assert_array_equal(np.asarray(fooled), want_fooled)
  # Fused differently by XLA, the two loops may round differently; not more than that.
  np.testing.assert_allclose(np.asarray(got)[want_fooled], np.asarray(adv)[want_fooled],
                             atol=1e-5)
  np.testing.assert_array_equal(np.asarray(got)[~want_fooled], np.asarray(_X)[~want_fooled])


def test_subset_buckets_bound_padding_and_shapes():
  for batch in (16, 64, 1000, 2048):
    sizes = set()
    for n in range(1, batch + 1):
      b = aa._bucket(n, batch)
      assert n <= b <= batch
      assert b - n < min(n, -(-batch // 8)), (batch, n, b)  # padding < min(n, batch / 8)
      sizes.add(b)
      s = aa._bucket(n, batch, 8)
      assert s >= b and (s % 8 == 0 or s == batch)
    # Some powers of two and the 8 multiples of ceil(batch / 8): few shapes (at most
    # log2(batch) + 9), the same for every batch of that size.
    g = -(-batch // 8)
    assert sizes <= {1 << k for k in range(batch.bit_length())} | {
        min(g * j, batch) for j in range(1, 9)}, batch
    assert len(sizes) <= batch.bit_length() + 9
  assert aa._bucket(710, 1000) == 750 and aa._bucket(968, 1000) == 1000


@pytest.mark.parametrize("name", ["apgd_t", "fab_t"])
def test_attacks_run_under_the_callers_jit_like_the_host_driven_loop(name):
  # Under a caller's jit the host cannot steer the loop (the arrays are tracers): the in-graph
  # loop over every run takes over and must give what the host-driven loop gives, so that every
  # attack stays usable inside the user's own jit-compiled code. Several runs (2 targets,
  # 2 restarts) cover the run selection, not just one run.
  from krylov_adv import attacks
  attack = attacks.get(name)
  kw = dict(eps=0.05, norm="linf", steps=4, restarts=2, n_target_classes=2)
  key = jax.random.PRNGKey(5)
  eager = attack(_conv_model, _X, _Y, key, **kw)
  jitted = jax.jit(lambda x, y, k: attack(_conv_model, x, y, k, **kw))(_X, _Y, key)
  assert toolkit.is_traced(jnp.zeros(1)) is False
  np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), atol=2e-3)
  fooled = lambda a: np.asarray(jnp.argmax(_conv_model(a), 1) != _Y)
  np.testing.assert_array_equal(fooled(jitted), fooled(eager))
  assert fooled(eager).any() and not fooled(eager).all()
