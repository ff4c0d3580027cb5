"""AutoAttack components and the ensemble on the digits model, and on a gradient-masked toy.

Budgets on 8x8 digits: linf eps = 0.3, the MNIST standard (a per-pixel budget does not depend on
the image size). l2 eps = 1.5, scaled down from MNIST's 28x28: changing every stroke pixel by the
linf budget 0.3 costs 0.3 * sqrt(151) = 3.7 in l2 on MNIST (151 nonzero pixels on average) and
0.3 * sqrt(33) = 1.7 on these digits (33 nonzero pixels); MNIST's usual l2 budgets 2-3 are
0.55-0.8 of that and 1.5 is 0.87 of it, i.e. the same construction on the generous side (scaling by
the mean image norm instead, 2.0 * 3.86 / 9.30, would give 0.83). Random noise at either budget
leaves >= 75% of the points correct (about 90% measured), so "robust accuracy <= 0.5 x clean"
separates a working attack from a no-op by a wide margin.

Hyperparameters are cut down to keep compile and run time small (APGD 20 iterations, 3 target
classes, Square 300 queries); the defaults are the published ones.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from krylov_adv import attacks, projections
from krylov_adv.attacks import _autoattack as aa
from krylov_adv.models.cnn import TinyCNN

BUDGETS = {"linf": 0.3, "l2": 1.5}
FAST = {
    "apgd_ce": {"steps": 20},
    "apgd_dlr": {"steps": 20},
    "apgd_t": {"steps": 20, "n_target_classes": 3},
    "fab_t": {"steps": 20, "n_target_classes": 3},
    "fab": {"steps": 20},
    "square": {"steps": 300},
}
COMPONENTS = ["apgd_ce", "apgd_dlr", "apgd_t", "fab_t", "fab", "square"]
N = 32


def _accuracy(logits_fn, x, y) -> float:
  return float(np.mean(np.asarray(jnp.argmax(logits_fn(x), axis=1)) == np.asarray(y)))


def _assert_in_threat_model(x_adv, x, eps, norm):
  assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
  assert np.all(np.isfinite(np.asarray(x_adv)))
  assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
  dist = np.asarray(projections.per_example_norm(x_adv - x, norm))
  assert np.all(dist <= eps * (1 + 1e-5) + 1e-6), dist.max()


@pytest.fixture(scope="session")
def digits_batch(digits_model):
  return jnp.asarray(digits_model.x_test[:N]), jnp.asarray(digits_model.y_test[:N])


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("name", COMPONENTS)
def test_component_drives_robust_accuracy_far_below_clean(digits_model, digits_batch, name, norm):
  x, y = digits_batch
  eps = BUDGETS[norm]
  clean = _accuracy(digits_model.logits_fn, x, y)
  assert clean == 1.0  # the fixture keeps correctly classified points
  noise = _accuracy(digits_model.logits_fn, projections.random_start(
      jax.random.PRNGKey(9), x, eps, norm), y)
  x_adv = attacks.get(name)(digits_model.logits_fn, x, y, jax.random.PRNGKey(0), eps=eps,
                            norm=norm, **FAST[name])
  _assert_in_threat_model(x_adv, x, eps, norm)
  robust = _accuracy(digits_model.logits_fn, x_adv, y)
  assert noise >= 0.75  # the budget alone does not do the job
  assert robust <= 0.5 * clean, (name, norm, robust)


def test_ensemble_is_never_weaker_than_a_component_alone(digits_model, digits_batch):
  # A smaller budget than the standard one, so that some points survive APGD-CE and the later
  # components actually run.
  x, y = digits_batch
  eps, norm, key = 0.1, "linf", jax.random.PRNGKey(0)
  x_adv, report = attacks.autoattack_with_report(digits_model.logits_fn, x, y, key, eps=eps,
                                            norm=norm, hyperparameters=FAST)
  assert report.components == ("apgd_ce", "apgd_t", "fab_t", "square")
  _assert_in_threat_model(x_adv, x, eps, norm)
  assert report.clean_accuracy == 1.0
  after = np.asarray(report.robust_accuracy_after)
  assert np.all(np.diff(after) <= 0) and after[-1] == report.robust_accuracy
  assert len(report.seconds) == 4 and all(s >= 0 for s in report.seconds)
  # The report agrees with the returned batch.
  correct = np.asarray(jnp.argmax(digits_model.logits_fn(x_adv), axis=1)) == np.asarray(y)
  np.testing.assert_array_equal(correct, report.robust)
  assert report.robust_accuracy == pytest.approx(correct.mean())
  assert 0.0 < report.robust_accuracy < 0.5
  for name in report.components:
    alone = attacks.get(name)(digits_model.logits_fn, x, y, key, eps=eps, norm=norm, **FAST[name])
    robust_alone = _accuracy(digits_model.logits_fn, alone, y)
    assert report.robust_accuracy <= robust_alone, (name, robust_alone)
  # The first component ran on the whole batch with the same keys: every point it fooled keeps
  # exactly that component's adversarial example.
  first = attacks.get("apgd_ce")(digits_model.logits_fn, x, y, key, eps=eps, norm=norm,
                                 **FAST["apgd_ce"])
  fooled_first = np.asarray(jnp.argmax(digits_model.logits_fn(first), axis=1)) != np.asarray(y)
  assert fooled_first.any()
  np.testing.assert_array_equal(np.asarray(x_adv)[fooled_first], np.asarray(first)[fooled_first])


@pytest.mark.slow
def test_plus_version_runs_every_component_with_restarts(digits_model, digits_batch):
  x, y = digits_batch[0][:16], digits_batch[1][:16]
  hyper = {name: dict(kw) for name, kw in FAST.items()}
  for name in ("apgd_ce", "apgd_dlr", "fab"):
    hyper[name]["restarts"] = 2  # exercises the random restarts, kept short
  x_adv, report = attacks.autoattack_with_report(digits_model.logits_fn, x, y, jax.random.PRNGKey(0),
                                            eps=0.1, norm="l2", version="plus",
                                            hyperparameters=hyper)
  assert report.components == ("apgd_ce", "apgd_dlr", "fab", "square", "apgd_t", "fab_t")
  _assert_in_threat_model(x_adv, x, 0.1, "l2")
  assert np.all(np.diff(report.robust_accuracy_after) <= 0)
  assert report.robust_accuracy == pytest.approx(_accuracy(digits_model.logits_fn, x_adv, y))


def test_component_result_does_not_depend_on_the_rest_of_the_batch(digits_model, digits_batch):
  x, y = digits_batch
  sub = np.array([2, 5, 11, 30])
  kw = dict(eps=0.1, norm="linf", **FAST["square"])
  full = attacks.get("square")(digits_model.logits_fn, x, y, jax.random.PRNGKey(0), **kw)
  part = attacks.get("square")(digits_model.logits_fn, x[sub], y[sub], jax.random.PRNGKey(0),
                               example_index=sub, **kw)
  np.testing.assert_array_equal(np.asarray(full)[sub], np.asarray(part))


def test_batches_of_any_size(digits_model, digits_batch):
  x, y = digits_batch
  for b in (1, 3):
    x_adv, report = attacks.autoattack_with_report(
        digits_model.logits_fn, x[:b], y[:b], jax.random.PRNGKey(0), eps=0.3, norm="linf",
        version="custom", attacks=["apgd_ce"], hyperparameters=FAST)
    assert x_adv.shape == x[:b].shape and report.robust.shape == (b,)
    _assert_in_threat_model(x_adv, x[:b], 0.3, "linf")


def test_deterministic_for_a_key(digits_model, digits_batch):
  x, y = digits_batch
  kw = dict(eps=0.1, norm="l2", **FAST["square"])
  a = attacks.get("square")(digits_model.logits_fn, x, y, jax.random.PRNGKey(3), **kw)
  b = attacks.get("square")(digits_model.logits_fn, x, y, jax.random.PRNGKey(3), **kw)
  c = attacks.get("square")(digits_model.logits_fn, x, y, jax.random.PRNGKey(4), **kw)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(np.asarray(a), np.asarray(c))


# ----------------------------------------------------------------------------------------------
# Gradient masking: why the ensemble includes a score-based attack.


@pytest.fixture(scope="session")
def masked_model(digits_model):
  """The digits CNN on input quantised to 5 levels, ``round(4 x) / 4``: a hard step with zero
  gradient almost everywhere, so gradient attacks see a flat loss."""
  model = TinyCNN(num_classes=10)
  logits_fn = jax.jit(lambda z: model.apply(digits_model.params, jnp.round(4.0 * z) / 4.0))
  x, y = jnp.asarray(digits_model.x_test), jnp.asarray(digits_model.y_test)
  keep = np.asarray(jnp.argmax(logits_fn(x), axis=1)) == np.asarray(y)
  return logits_fn, x[keep][:N], y[keep][:N]


def test_masked_model_really_has_zero_input_gradient(masked_model):
  logits_fn, x, y = masked_model
  g = jax.grad(lambda z: jnp.sum(jax.nn.log_softmax(logits_fn(z))[jnp.arange(N), y]))(x)
  assert float(jnp.abs(g).max()) == 0.0


def test_square_breaks_gradient_masking_where_apgd_does_not(masked_model):
  logits_fn, x, y = masked_model
  eps, norm, key = 0.3, "linf", jax.random.PRNGKey(0)
  apgd_adv = attacks.get("apgd_ce")(logits_fn, x, y, key, eps=eps, norm=norm, **FAST["apgd_ce"])
  square_adv = attacks.get("square")(logits_fn, x, y, key, eps=eps, norm=norm, **FAST["square"])
  _assert_in_threat_model(square_adv, x, eps, norm)
  robust_apgd = _accuracy(logits_fn, apgd_adv, y)
  robust_square = _accuracy(logits_fn, square_adv, y)
  # APGD only gets what its random start happens to hit (random noise alone: ~90% robust).
  assert robust_apgd >= 0.75, robust_apgd
  assert robust_square <= 0.25, robust_square
  # And the ensemble inherits Square's success.
  _, report = attacks.autoattack_with_report(logits_fn, x, y, key, eps=eps, norm=norm,
                                        version="custom", attacks=["apgd_ce", "square"],
                                        hyperparameters=FAST)
  assert report.robust_accuracy_after[0] == pytest.approx(robust_apgd)
  assert report.robust_accuracy <= robust_square


# ----------------------------------------------------------------------------------------------
# API and validation.


def test_registry_names():
  for name in ["apgd_ce", "apgd_dlr", "apgd_t", "fab_t", "fab", "square", "autoattack"]:
    assert name in attacks.available()


def test_versions():
  names = lambda v: [n for n, _ in aa.version_components(v)]
  assert names("standard") == ["apgd_ce", "apgd_t", "fab_t", "square"]
  assert names("plus") == ["apgd_ce", "apgd_dlr", "fab", "square", "apgd_t", "fab_t"]
  plus = dict(aa.version_components("plus"))
  assert plus["apgd_ce"]["restarts"] == 5 and plus["fab"]["restarts"] == 5
  custom = aa.version_components("custom", ["square", ("apgd_t", {"steps": 7})],
                                 {"square": {"steps": 11}})
  assert custom == (("square", {"steps": 11}), ("apgd_t", {"steps": 7}))


def test_bad_input_raises_value_error(digits_model, digits_batch):
  x, y = digits_batch
  f, key = digits_model.logits_fn, jax.random.PRNGKey(0)
  with pytest.raises(ValueError, match="norm"):
    attacks.get("apgd_ce")(f, x, y, key, eps=0.3, norm="l0")
  with pytest.raises(ValueError, match="eps"):
    attacks.get("square")(f, x, y, key, eps=-0.1, norm="linf")
  with pytest.raises(ValueError, match="labels"):
    attacks.get("fab_t")(f, x, y + 10, key, eps=0.3, norm="linf")
  with pytest.raises(ValueError, match="NaN"):
    attacks.get("apgd_t")(f, x.at[0, 0, 0, 0].set(jnp.nan), y, key, eps=0.3, norm="linf")
  with pytest.raises(ValueError, match="steps"):
    attacks.get("apgd_ce")(f, x, y, key, eps=0.3, norm="linf", steps=0)
  with pytest.raises(ValueError, match="version"):
    attacks.get("autoattack")(f, x, y, key, eps=0.3, norm="linf", version="fast")
  with pytest.raises(ValueError, match="custom"):
    attacks.get("autoattack")(f, x, y, key, eps=0.3, norm="linf", version="custom")
  with pytest.raises(ValueError, match="component"):
    attacks.get("autoattack")(f, x, y, key, eps=0.3, norm="linf", version="custom",
                              attacks=["pgd_ce"])
  with pytest.raises(ValueError, match="hyperparameter"):
    attacks.get("autoattack")(f, x, y, key, eps=0.3, norm="linf",
                              hyperparameters={"square": {"restarts": 5}})
  three_classes = lambda z: f(z)[:, :3]
  with pytest.raises(ValueError, match="DLR"):
    attacks.get("apgd_t")(three_classes, x, jnp.zeros_like(y), key, eps=0.3, norm="linf")
