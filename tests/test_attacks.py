"""FGSM, PGD, the S-O attack, SOAE and TRADES through the common API: threat model,
determinism, closed-form and reference checks, input validation, the per-iterate traces, and
attack strength on the digits model.

Budgets on 8x8 digits: Linf 0.3 (the MNIST standard) and L2 2.0, at which uniform noise in the
ball leaves 94% (Linf) and 78% (L2) of the test points correct; and Linf 0.1 / L2 0.75, at which
FGSM still leaves points correct. Each attack must beat that noise by a margin (an attack that
returns ``x``, or a random point of the ball, fails).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from krylov_adv import attacks, hvp, losses, projections
from krylov_adv.attacks import _first_order as first_order
from krylov_adv.attacks import toolkit

NAMES = ("fgsm", "pgd", "second_order", "soae")
K = 3


def _steep_mlp():
  """A tanh MLP on 4x4x1 with logits scaled by 30: for many inputs the softmax saturates (the
  cross-entropy gradient underflows to exactly 0), for misclassified ones the gradient is huge."""
  rng = np.random.default_rng(0)
  w1 = (rng.normal(size=(16, 24)) / 2).astype(np.float32)
  b1 = (rng.normal(size=24) * 0.3).astype(np.float32)
  w2 = (rng.normal(size=(24, K)) * 30).astype(np.float32)

  def logits_fn(x):
    return jnp.tanh(x.reshape(x.shape[0], -1) @ w1 + b1) @ w2

  return logits_fn


STEEP = _steep_mlp()

# Small hyperparameters: every configuration compiles once per norm and is reused for all inputs.
CONFIGS = {
    "fgsm": ("fgsm", {}),
    "fgsm_random_start": ("fgsm", dict(random_start=True, step_size=None)),
    "pgd": ("pgd", dict(steps=3, restarts=2)),
    "so_expectation": ("second_order", dict(steps=3, samples=2, sigma=0.1)),
    "so_power": ("second_order", dict(steps=3, form="power", sigma=0.1)),
    "soae": ("soae", dict(steps=2, m=4)),
    "soae_raw_fd": ("soae", dict(steps=2, m=4, step="raw", hvp="fd_forward", eta=1e-3,
                                 alpha=5.0)),
    "trades": ("trades", dict(steps=3)),
}


def _assert_in_threat_model(x_adv, x, eps, norm):
  x_adv, x = np.asarray(x_adv), np.asarray(x)
  assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
  assert np.all(np.isfinite(x_adv))
  assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
  dist = np.asarray(projections.per_example_norm(jnp.asarray(x_adv - x), norm))
  assert np.all(dist <= eps * (1 + 1e-5) + 1e-6), (dist.max(), eps)


def _inputs(norm):
  """(name, x, eps) cases: interior points, box corners, a budget larger than the box, eps = 0."""
  rng = np.random.default_rng(3)
  eps = {"linf": 0.1, "l2": 0.5}[norm]
  interior = rng.uniform(size=(8, 4, 4, 1)).astype(np.float32)
  corners = rng.integers(0, 2, size=(8, 4, 4, 1)).astype(np.float32)
  return [("interior", interior, eps), ("corners", corners, 3 * eps), ("huge_eps", interior, 50.0),
          ("zero_eps", interior, 0.0)]


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_budget_and_box_hold(config, norm):
  name, kw = CONFIGS[config]
  attack = attacks.get(name)
  y = jnp.asarray(np.arange(8) % K, jnp.int32)
  saturated = 0
  for case, x, eps in _inputs(norm):
    x_adv = attack(STEEP, jnp.asarray(x), y, jax.random.PRNGKey(1), eps=eps, norm=norm, **kw)
    _assert_in_threat_model(x_adv, x, eps, norm)
    if case == "zero_eps":
      np.testing.assert_array_equal(np.asarray(x_adv), x)
    if case == "interior":
      # Inside the box the attack must move, and uphill: the loss it ascends (the KL to the
      # clean prediction for TRADES, the cross-entropy otherwise) grows over the batch.
      assert not np.array_equal(np.asarray(x_adv), x), config
      if name == "trades":
        ascended = lambda z: losses.kl_divergence(STEEP(jnp.asarray(x)), STEEP(z))
      else:
        ascended = lambda z: losses.cross_entropy(STEEP(z), y)
      assert float(jnp.sum(ascended(x_adv))) > float(jnp.sum(ascended(jnp.asarray(x)))), config
    g = np.asarray(jax.grad(lambda z: jnp.sum(losses.cross_entropy(STEEP(z), y)))(x))
    saturated += int(np.sum(np.all(g.reshape(8, -1) == 0, axis=1)))
  assert saturated > 0  # the steep model does produce exactly-zero gradients


@pytest.mark.parametrize("name,kw", [
    ("pgd", dict(steps=3, restarts=2)),
    ("second_order", dict(steps=3, samples=2, sigma=0.1)),
    ("fgsm", dict(random_start=True)),
])
def test_deterministic_for_a_key_and_random_across_keys(name, kw):
  x = jnp.asarray(np.random.default_rng(4).uniform(size=(8, 4, 4, 1)), jnp.float32)
  y = jnp.asarray(np.arange(8) % K, jnp.int32)
  run = lambda seed: np.asarray(attacks.get(name)(STEEP, x, y, jax.random.PRNGKey(seed),
                                                  eps=0.1, norm="l2", **kw))
  np.testing.assert_array_equal(run(0), run(0))
  assert not np.array_equal(run(0), run(1))


def test_fgsm_matches_closed_form_on_a_linear_model():
  # logits = x W: grad CE = W (softmax(x W) - e_y), in NumPy.
  rng = np.random.default_rng(5)
  w = rng.normal(size=(16, K)).astype(np.float32)
  logits_fn = lambda x: x.reshape(x.shape[0], -1) @ w
  x = rng.uniform(size=(6, 4, 4, 1)).astype(np.float32)
  y = np.array([0, 1, 2, 0, 1, 2], np.int32)
  z = x.reshape(6, -1) @ w
  p = np.exp(z - z.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  g = (p - np.eye(K)[y]) @ w.T
  for norm, eps in (("linf", 0.1), ("l2", 0.7)):
    step = np.sign(g) if norm == "linf" else g / np.linalg.norm(g, axis=1, keepdims=True)
    expected = np.clip(x.reshape(6, -1) + eps * step, 0, 1).reshape(x.shape)
    got = attacks.get("fgsm")(logits_fn, x, y, jax.random.PRNGKey(0), eps=eps, norm=norm)
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-6)


def test_pgd_restarts_keep_the_worst_case_per_example():
  # Rebuild the restarts from their parts and select in NumPy: the first misclassified restart,
  # else the highest loss.
  x = jnp.asarray(np.random.default_rng(6).uniform(size=(8, 4, 4, 1)), jnp.float32)
  y = jnp.argmax(STEEP(x), axis=1).astype(jnp.int32)  # all correct before the attack
  key, eps, norm, steps, restarts = jax.random.PRNGKey(7), 0.2, "linf", 2, 4
  step_size = toolkit.default_step_size(eps, steps)
  loss_fn = toolkit.make_loss_fn(STEEP, y)
  run = jax.jit(lambda k: first_order.pgd_run(
      loss_fn, x, projections.random_start(k, x, eps, norm), eps, step_size, norm=norm,
      steps=steps))
  cands = [np.asarray(run(k)) for k in jax.random.split(key, restarts)]
  cand_loss = np.stack([np.asarray(loss_fn(jnp.asarray(c))) for c in cands])
  cand_fooled = np.stack([np.argmax(np.asarray(STEEP(jnp.asarray(c))), 1) != np.asarray(y)
                          for c in cands])
  expected, chosen = [], []
  for i in range(8):
    fooled = np.flatnonzero(cand_fooled[:, i])
    r = fooled[0] if fooled.size else int(np.argmax(cand_loss[:, i]))
    expected.append(cands[r][i])
    chosen.append(r)
  got = attacks.get("pgd")(STEEP, x, y, key, eps=eps, norm=norm, steps=steps, restarts=restarts)
  np.testing.assert_allclose(np.asarray(got), np.stack(expected), atol=1e-6)
  # The selection is not trivial: some example keeps a later restart.
  assert max(chosen) > 0, chosen


def test_second_order_without_noise_is_pgd_without_random_start():
  x = jnp.asarray(np.random.default_rng(8).uniform(size=(8, 4, 4, 1)), jnp.float32)
  y = jnp.asarray(np.arange(8) % K, jnp.int32)
  kw = dict(eps=0.5, norm="l2", steps=3, step_size=0.2)
  a = attacks.get("second_order")(STEEP, x, y, jax.random.PRNGKey(0), samples=1, sigma=0.0, **kw)
  b = attacks.get("pgd")(STEEP, x, y, jax.random.PRNGKey(0), random_start=False, **kw)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
  assert not np.allclose(np.asarray(b), np.asarray(x))


def _quadratic():
  # L_i(x) = x_i^T A x_i / 2, so grad L(x + d) = A (x + d) and A^{-1} grad - x recovers d.
  rng = np.random.default_rng(9)
  q = rng.normal(size=(16, 16))
  a = q @ q.T / 16 + np.eye(16)
  loss_fn = lambda z: 0.5 * jnp.einsum("bi,ij,bj->b", z.reshape(z.shape[0], -1), a,
                                       z.reshape(z.shape[0], -1))
  x = rng.uniform(size=(64, 16)).astype(np.float32)
  return a, loss_fn, x


def test_power_form_is_the_gradient_at_a_unit_displacement():
  a, loss_fn, x = _quadratic()
  sigma = 0.05
  fn = jax.jit(lambda x, key, xi: attacks.smoothed_gradient(loss_fn, x, key, form="power",
                                                       sigma=sigma, xi=xi))
  key = jax.random.PRNGKey(0)
  for xi, length in ((0.3, 0.3), (None, sigma * 4.0)):  # default xi = sigma * sqrt(16)
    g = np.asarray(fn(jnp.asarray(x), key, xi), np.float64)
    d = np.linalg.solve(a, g.T).T - x
    np.testing.assert_allclose(np.linalg.norm(d, axis=1), length, rtol=1e-3)
  # Directions differ across examples (one draw each).
  assert np.min(np.linalg.norm(d[1:] / length - d[:1] / length, axis=1)) > 0.1


def test_expectation_form_averages_gaussian_draws():
  a, loss_fn, x = _quadratic()
  sigma, samples = 0.2, 4
  g = attacks.smoothed_gradient(loss_fn, jnp.asarray(x), jax.random.PRNGKey(1),
                                form="expectation", samples=samples, sigma=sigma)
  mean_noise = np.linalg.solve(a, np.asarray(g, np.float64).T).T - x
  # The mean of `samples` draws of N(0, sigma^2) has standard deviation sigma / sqrt(samples);
  # 1024 entries estimate it to about 2%.
  assert abs(mean_noise.std() / (sigma / np.sqrt(samples)) - 1) < 0.1
  assert abs(mean_noise.mean()) < 4 * sigma / np.sqrt(samples * mean_noise.size)


def test_registry_and_config_construction():
  assert set(NAMES) <= set(attacks.available())
  cfg = ml_collections.ConfigDict(dict(name="pgd", eps=0.1, norm="linf", steps=2,
                                       random_start=False))
  attack = attacks.from_config(cfg)
  x = jnp.asarray(np.random.default_rng(10).uniform(size=(4, 4, 4, 1)), jnp.float32)
  y = jnp.zeros((4,), jnp.int32)
  direct = attacks.get("pgd")(STEEP, x, y, jax.random.PRNGKey(0), eps=0.1, norm="linf", steps=2,
                              random_start=False)
  np.testing.assert_array_equal(np.asarray(attack(STEEP, x, y, jax.random.PRNGKey(0))),
                                np.asarray(direct))
  with pytest.raises(ValueError, match="unknown attack"):
    attacks.get("pgd2")


def test_attacks_run_inside_an_outer_jit():
  # As in a training step: traced x and y skip the value checks but not the static ones.
  x = jnp.asarray(np.random.default_rng(11).uniform(size=(4, 4, 4, 1)), jnp.float32)
  y = jnp.asarray([0, 1, 2, 0], jnp.int32)

  @jax.jit
  def step(x, y, key):
    return attacks.get("soae")(STEEP, x, y, key, eps=0.1, norm="linf", steps=1, m=2)

  eager = attacks.get("soae")(STEEP, x, y, jax.random.PRNGKey(0), eps=0.1, norm="linf", steps=1,
                              m=2)
  np.testing.assert_allclose(np.asarray(step(x, y, jax.random.PRNGKey(0))), np.asarray(eager),
                             atol=1e-6)


_BAD_X = np.full((2, 4, 4, 1), 0.5, np.float32)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("change,match", [
    (dict(eps=-0.1), "eps"),
    (dict(norm="l0"), "norm"),
    (dict(y=np.array([0, K], np.int32)), "labels"),
    (dict(y=np.array([0, -1], np.int32)), "labels"),
    (dict(x=_BAD_X + 0.6), r"\[0, 1\]"),
    (dict(x=_BAD_X - 0.6), r"\[0, 1\]"),
    (dict(x=np.where(np.arange(32).reshape(2, 4, 4, 1) == 3, np.nan, _BAD_X)), "NaN"),
    (dict(x=np.where(np.arange(32).reshape(2, 4, 4, 1) == 3, np.inf, _BAD_X)), "NaN or inf"),
    (dict(y=np.array([0, 1, 2], np.int32)), "batch sizes"),
    (dict(y=np.array([0.0, 1.0], np.float32)), "integers"),
    (dict(loss="mse"), "loss"),
])
def test_bad_input_raises_value_error(name, change, match):
  args = dict(x=_BAD_X, y=np.array([0, 1], np.int32), eps=0.1, norm="linf")
  args.update(change)
  x, y = args.pop("x"), args.pop("y")
  with pytest.raises(ValueError, match=match):
    attacks.get(name)(STEEP, x, y, jax.random.PRNGKey(0), **args)


@pytest.mark.parametrize("name,kw,match", [
    ("soae", dict(tau=0.0), "tau"),
    ("soae", dict(tau=-1e-3), "tau"),
    ("soae", dict(m=0), "m must"),
    ("soae", dict(m=2.5), "m must"),
    ("soae", dict(eta=0.0), "eta"),
    ("soae", dict(eta=-1e-5), "eta"),
    ("soae", dict(steps=0), "steps"),
    ("soae", dict(hvp="bfgs"), "HVP method"),
    ("soae", dict(step="unit"), "step"),
    ("soae", dict(alpha=-1.0), "alpha"),
    ("pgd", dict(steps=0), "steps"),
    ("pgd", dict(restarts=0), "restarts"),
    ("pgd", dict(step_size=-0.1), "step_size"),
    ("fgsm", dict(step_size=-0.1), "step_size"),
    ("second_order", dict(samples=0), "samples"),
    ("second_order", dict(sigma=-0.1), "sigma"),
    ("second_order", dict(form="newton"), "form"),
    ("second_order", dict(xi=0.0), "xi"),
])
def test_bad_hyperparameters_raise_value_error(name, kw, match):
  with pytest.raises(ValueError, match=match):
    attacks.get(name)(STEEP, _BAD_X, np.array([0, 1], np.int32), jax.random.PRNGKey(0), eps=0.1,
                      norm="linf", **kw)


def test_dlr_needs_three_classes():
  two = lambda x: x.reshape(x.shape[0], -1)[:, :2]
  with pytest.raises(ValueError, match="3 classes"):
    attacks.get("pgd")(two, _BAD_X, np.array([0, 1], np.int32), jax.random.PRNGKey(0), eps=0.1,
                       norm="linf", loss="dlr")


# ----------------------------------------------------------------------------------------------
# Strength on a trained model.

# The standard budgets, and smaller ones at which FGSM still leaves points correct (so that the
# PGD-vs-FGSM comparison is not 0 <= 0). eps is traced: the second budget costs no compilation.
DIGITS_EPS = {"linf": (0.3, 0.1), "l2": (2.0, 0.75)}
DIGITS_HYPER = {
    "fgsm": {},
    "pgd": dict(steps=10),
    "second_order": dict(steps=10, samples=4, sigma=0.05),
    "soae": dict(steps=4, m=10),
    "trades": dict(steps=10),
}
N_DIGITS = 32


def _accuracy(logits_fn, x, y) -> float:
  return float(np.mean(np.asarray(jnp.argmax(logits_fn(x), axis=1)) == np.asarray(y)))


@pytest.fixture(scope="module")
def digits_accuracies(digits_model):
  """Robust accuracy of every attack under both norms on 32 correctly classified test points."""
  x = jnp.asarray(digits_model.x_test[:N_DIGITS])
  y = jnp.asarray(digits_model.y_test[:N_DIGITS])
  out = {"clean": _accuracy(digits_model.logits_fn, x, y)}
  for norm, budgets in DIGITS_EPS.items():
    for eps in budgets:
      for name, kw in DIGITS_HYPER.items():
        x_adv = attacks.get(name)(digits_model.logits_fn, x, y, jax.random.PRNGKey(0), eps=eps,
                                  norm=norm, **kw)
        _assert_in_threat_model(x_adv, x, eps, norm)
        out[(norm, eps, name)] = _accuracy(digits_model.logits_fn, x_adv, y)
      # Random noise of the same budget: the best of 8 uniform draws in the ball per point.
      noisy = [projections.random_start(jax.random.PRNGKey(100 + r), x, eps, norm)
               for r in range(8)]
      correct = np.all([np.asarray(jnp.argmax(digits_model.logits_fn(z), axis=1)) == np.asarray(y)
                        for z in noisy], axis=0)
      out[(norm, eps, "noise")] = float(np.mean(correct))
  return out


# How far below random noise of the same budget every attack must bring the accuracy, at the
# standard budgets (Linf 0.3, L2 2.0) and at the small ones (Linf 0.1, L2 0.75).
BEAT_NOISE_BY = {"linf": (0.5, 0.15), "l2": (0.4, 0.15)}


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_every_attack_beats_random_noise_of_the_same_norm(digits_accuracies, norm):
  clean = digits_accuracies["clean"]
  assert clean == 1.0  # the fixture keeps correctly classified points
  for eps, margin in zip(DIGITS_EPS[norm], BEAT_NOISE_BY[norm], strict=True):
    noise = digits_accuracies[(norm, eps, "noise")]
    for name in DIGITS_HYPER:
      assert digits_accuracies[(norm, eps, name)] <= noise - margin, (name, eps,
                                                                      digits_accuracies)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_is_at_least_as_strong_as_fgsm(digits_accuracies, norm):
  for eps in DIGITS_EPS[norm]:
    pgd, fgsm = digits_accuracies[(norm, eps, "pgd")], digits_accuracies[(norm, eps, "fgsm")]
    assert pgd <= fgsm, (eps, digits_accuracies)
  # At the smaller budget FGSM leaves points correct, so the comparison has room to fail.
  assert digits_accuracies[(norm, DIGITS_EPS[norm][1], "fgsm")] > 0


# ----------------------------------------------------------------------------------------------
# The per-iterate traces of pgd_with_report and second_order_with_report.


@pytest.mark.parametrize("name,kw", [
    ("pgd", dict(steps=3, restarts=2)),
    ("second_order", dict(steps=3, samples=2, sigma=0.1, random_start=True)),
])
def test_with_report_returns_the_attack_and_its_trace(name, kw):
  x = jnp.asarray(np.random.default_rng(12).uniform(size=(8, 4, 4, 1)), jnp.float32)
  y = jnp.asarray(np.arange(8) % K, jnp.int32)
  args = (STEEP, x, y, jax.random.PRNGKey(3))
  plain = getattr(attacks, name)(*args, eps=0.3, norm="l2", **kw)
  out = getattr(attacks, f"{name}_with_report")(*args, eps=0.3, norm="l2", **kw)
  assert isinstance(out, attacks.WithReport)
  np.testing.assert_array_equal(np.asarray(out.x_adv), np.asarray(plain))
  trace = out.report.trace
  lead = (kw["restarts"], kw["steps"] + 1) if name == "pgd" else (kw["steps"] + 1,)
  assert trace.loss.shape == trace.grad_norm.shape == trace.correct.shape == lead + (8,)
  # Each record is the statistic of its iterate: check the first and (one restart's) last.
  first = jax.tree_util.tree_map(lambda a: a[0][0] if name == "pgd" else a[0], trace)
  last = jax.tree_util.tree_map(lambda a: a[-1][-1] if name == "pgd" else a[-1], trace)
  loss_fn = lambda z: losses.cross_entropy(STEEP(z), y)
  if name == "second_order":
    x_last = out.x_adv
    np.testing.assert_allclose(np.asarray(last.loss), np.asarray(loss_fn(x_last)), rtol=1e-5)
    np.testing.assert_allclose(
        np.asarray(last.grad_norm),
        np.asarray(projections.per_example_norm(hvp.input_grad(loss_fn, x_last), "l2")),
        rtol=1e-4)
  x0 = projections.random_start(jax.random.split(jax.random.PRNGKey(3), 2)[0], x, 0.3, "l2")
  if name == "pgd":  # restart 0 starts at the first of split(key, restarts)
    np.testing.assert_allclose(np.asarray(first.loss), np.asarray(loss_fn(x0)), rtol=1e-5)


def test_pgd_trace_follows_the_iterates():
  # Without random start and with one restart, the trace's t-th record is the statistic of the
  # t-th PGD iterate, rebuilt here step by step in NumPy.
  x = jnp.asarray(np.random.default_rng(13).uniform(size=(8, 4, 4, 1)), jnp.float32)
  y = jnp.asarray(np.arange(8) % K, jnp.int32)
  eps, a, steps = 0.5, 0.2, 3
  out = attacks.pgd_with_report(STEEP, x, y, jax.random.PRNGKey(0), eps=eps, norm="l2",
                                steps=steps, step_size=a, random_start=False)
  loss_fn = lambda z: losses.cross_entropy(STEEP(z), y)
  xt = np.asarray(x, np.float64)
  for t in range(steps + 1):
    g = np.asarray(hvp.input_grad(loss_fn, jnp.asarray(xt, jnp.float32)), np.float64)
    gn = np.linalg.norm(g.reshape(8, -1), axis=1)
    np.testing.assert_allclose(np.asarray(out.report.trace.grad_norm[0, t]), gn, rtol=1e-4,
                               atol=1e-6)
    np.testing.assert_array_equal(
        np.asarray(out.report.trace.correct[0, t]),
        np.argmax(np.asarray(STEEP(jnp.asarray(xt, jnp.float32))), 1) == np.asarray(y))
    if t == steps:
      break
    step = g / np.maximum(gn, 1e-12).reshape(-1, 1, 1, 1)
    d = xt + a * step - np.asarray(x)
    dn = np.linalg.norm(d.reshape(8, -1), axis=1).reshape(-1, 1, 1, 1)
    xt = np.clip(np.asarray(x) + d * np.minimum(1.0, eps / np.maximum(dn, 1e-12)), 0, 1)
  np.testing.assert_allclose(np.asarray(out.x_adv), xt, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Every registered attack: NaN models and edge inputs (issue 15, items 8 and 9). Tiny settings;
# one model object and one shape per attack, so that each attack compiles once for all tests.

K4 = 4
_W4 = np.random.default_rng(14).normal(size=(16, K4)).astype(np.float32)


def _nhwc_linear(x):
  """A linear model on NHWC 4x4x1 images that, like a CNN, needs rank-4 input."""
  b, h, w, c = x.shape
  return x.reshape(b, h * w * c) @ _W4


def _flat_linear(x):
  """The same model flattening with ``reshape(B, -1)`` (cannot trace at ``B = 0``)."""
  return x.reshape(x.shape[0], -1) @ _W4


def _nan_model(x):
  """Returns NaN logits everywhere (e.g. a model whose weights have diverged)."""
  return _nhwc_linear(x) * jnp.nan


def _nan_above(x):
  """Finite logits for images whose brightest pixel is below 0.55, NaN above: the model
  overflows in part of the ball."""
  z = _nhwc_linear(x)
  # A factor, not jnp.where(..., z, nan): the NaN must reach the gradient too.
  return z * jnp.where(jnp.max(x.reshape(x.shape[0], -1), axis=1, keepdims=True) < 0.55, 1.0,
                       jnp.nan)


TINY = {
    "fgsm": {},
    "pgd": dict(steps=2),
    "second_order": dict(steps=2, samples=1),
    "soae": dict(steps=1, m=2),
    "trades": dict(steps=2),
    "apgd_ce": dict(steps=2),
    "apgd_dlr": dict(steps=2),
    "apgd_t": dict(steps=2, n_target_classes=1),
    "fab": dict(steps=2),
    "fab_t": dict(steps=2, n_target_classes=1),
    "square": dict(steps=2),
    "autoattack": dict(version="custom", attacks=[("apgd_ce", dict(steps=2))]),
}
_X4 = np.random.default_rng(15).uniform(0.0, 0.5, size=(4, 4, 4, 1)).astype(np.float32)
_Y4 = np.arange(4, dtype=np.int32)


def _run(name, logits_fn, x, y=_Y4, eps=0.1, norm="linf"):
  return attacks.get(name)(logits_fn, x, y, jax.random.PRNGKey(0), eps=eps, norm=norm,
                           **TINY[name])


def test_tiny_settings_cover_every_registered_attack():
  assert sorted(TINY) == attacks.available()


@pytest.mark.parametrize("name", sorted(TINY))
def test_nan_model_gives_finite_points_of_the_threat_model(name):
  # Today fgsm, pgd, second_order, trades and apgd return NaN here.
  x_adv = _run(name, _nan_model, _X4)
  _assert_in_threat_model(x_adv, _X4, 0.1, "linf")


@pytest.mark.parametrize("name", ["pgd", "trades", "soae"])
def test_model_overflowing_in_part_of_the_ball_keeps_the_last_finite_iterate(name):
  # Steps that reach a pixel >= 0.55 make the model NaN; the attack keeps the last finite
  # iterate (it moved: some example differs from x), never a NaN.
  x = np.full((4, 4, 4, 1), 0.5, np.float32)
  x_adv = _run(name, _nan_above, x)
  _assert_in_threat_model(x_adv, x, 0.1, "linf")
  assert not np.array_equal(np.asarray(x_adv), x), name


@pytest.mark.parametrize("name", sorted(TINY))
def test_empty_batch_is_returned_unchanged(name):
  # A model that flattens with reshape(B, -1), as most do: today ZeroDivisionError inside JAX.
  x = _X4[:0]
  x_adv = _run(name, _flat_linear, x, y=_Y4[:0])
  assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
  # Static checks still run on an empty batch.
  with pytest.raises(ValueError, match="eps"):
    _run(name, _flat_linear, x, y=_Y4[:0], eps=-1.0)


@pytest.mark.parametrize("name", ["pgd_with_report", "second_order_with_report",
                                  "soae_with_report", "autoattack_with_report"])
def test_reports_of_an_empty_batch_raise(name):
  with pytest.raises(ValueError, match="empty batch"):
    getattr(attacks, name)(_flat_linear, _X4[:0], _Y4[:0], jax.random.PRNGKey(0), eps=0.1,
                           norm="linf")


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize("name", sorted(TINY))
def test_half_precision_is_attacked_in_float32_and_returned_in_its_dtype(name, dtype):
  # Today pgd, apgd, fab and autoattack fail with a loop-carry TypeError inside JAX.
  x_half = jnp.asarray(_X4, dtype)
  got = _run(name, _nhwc_linear, x_half)
  assert got.dtype == dtype and got.shape == _X4.shape
  want = _run(name, _nhwc_linear, x_half.astype(jnp.float32)).astype(dtype)
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
  g = np.asarray(got, np.float32)
  assert np.all(np.isfinite(g)) and g.min() >= 0.0 and g.max() <= 1.0
  assert np.max(np.abs(g - np.asarray(x_half, np.float32))) <= 0.1 + 1e-2  # half rounding


@pytest.mark.parametrize("name", sorted(TINY))
def test_integer_x_raises_value_error(name):
  with pytest.raises(ValueError, match="floating-point.*int32"):
    _run(name, _nhwc_linear, (_X4 > 0.25).astype(np.int32))


@pytest.mark.parametrize("shape", [(4, 4, 4), (4, 4, 4, 1, 1)])
@pytest.mark.parametrize("name", sorted(TINY))
def test_rank_the_model_cannot_take_raises_value_error_naming_the_shape(name, shape):
  # Today the model's own "not enough values to unpack" (or a Square-specific message).
  with pytest.raises(ValueError, match=r"logits_fn cannot take x of shape \(4, 4, 4"):
    _run(name, _nhwc_linear, _X4.reshape(shape))


# ----------------------------------------------------------------------------------------------
# Budgets and calls that make no sense (issue 28, items 7 and 9). Every check below runs before
# anything is compiled.

_NONFINITE = [float("inf"), float("nan"), -float("inf")]


@pytest.mark.parametrize("value", _NONFINITE)
@pytest.mark.parametrize("name", sorted(TINY))
def test_non_finite_eps_raises_value_error(name, value):
  # Today eps=inf is accepted (robust accuracy 1.00 for FGSM, S-O and SOAE: every step is NaN
  # and falls back to the clean point); the empty batch takes the same check.
  for x, y in ((_X4, _Y4), (_X4[:0], _Y4[:0])):
    with pytest.raises(ValueError, match=r"^eps must be a finite number, got (-?inf|nan)$"):
      _run(name, _nhwc_linear, x, y=y, eps=value)


# Every real-valued hyperparameter of every attack.
_REAL_HYPERPARAMETERS = [
    ("fgsm", "step_size"), ("pgd", "step_size"), ("trades", "step_size"),
    ("second_order", "step_size"), ("second_order", "sigma"), ("second_order", "xi"),
    ("soae", "alpha"), ("soae", "tau"), ("soae", "eta"),
    ("apgd_ce", "rho"), ("apgd_dlr", "rho"), ("apgd_t", "rho"),
    ("fab", "alpha_max"), ("fab", "overshoot"), ("fab", "beta"),
    ("fab_t", "alpha_max"), ("fab_t", "overshoot"), ("fab_t", "beta"),
    ("square", "p_init"),
]


@pytest.mark.parametrize("value", _NONFINITE)
@pytest.mark.parametrize("name,field", _REAL_HYPERPARAMETERS)
def test_non_finite_hyperparameters_raise_value_error(name, field, value):
  with pytest.raises(ValueError, match=rf"^{field} must (be a finite number|lie in)"):
    attacks.get(name)(_nhwc_linear, _X4, _Y4, jax.random.PRNGKey(0), eps=0.1, norm="linf",
                      **{**TINY[name], field: value})


def test_real_hyperparameter_list_covers_every_attack_signature():
  # A new float hyperparameter must join the list above (and get its check).
  import inspect
  listed = {(n, f) for n, f in _REAL_HYPERPARAMETERS}
  for name in sorted(TINY):
    params = inspect.signature(attacks.get(name)).parameters
    for field, p in params.items():
      real = (p.annotation in (float, "float") or isinstance(p.default, float)
              or field in ("step_size", "alpha", "xi"))  # real, default None: from eps
      if field != "eps" and real:
        assert (name, field) in listed, (name, field)


@pytest.mark.parametrize("name", sorted(TINY))
def test_integer_logits_raise_value_error(name):
  # Today a raw JAX TypeError from inside the gradient ("Expected the input to have a dtype
  # that is a subdtype of floating").
  to_int = lambda x: (100 * _nhwc_linear(x)).astype(jnp.int32)
  with pytest.raises(ValueError, match=r"^logits_fn must return floating-point logits, got "
                                       r"dtype int32"):
    _run(name, to_int, _X4)


@pytest.mark.parametrize("entry", ["autoattack", "autoattack_with_report", "autoattack_batched"])
def test_autoattack_under_jit_says_to_call_it_outside(entry):
  # Today a ConcretizationTypeError from the host loop over the components.
  kw = dict(eps=0.1, norm="linf", **TINY["autoattack"])
  if entry == "autoattack_batched":
    kw["batch_size"] = 2
  fn = getattr(attacks, entry)
  with pytest.raises(ValueError, match=r"^autoattack cannot run under jax\.jit.*runs on the "
                                       r"host.*call it outside jit"):
    jax.jit(lambda x, y, k: fn(_nhwc_linear, x, y, k, **kw))(_X4, _Y4, jax.random.PRNGKey(0))
