"""Training: schedules, the optimiser, TRADES' inner maximisation, and the jitted steps of every
method against step-by-step reference computations."""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import test_tiny
from krylov_adv import attacks, data, losses, models, projections, training


def _cfg(method):
  return test_tiny.get_config(method).train


def _require(name):
  if name not in attacks.available():
    pytest.skip(f"attack {name!r} is not registered yet")


@pytest.fixture(scope="module")
def batch():
  ds = data.synthetic(num_train=16, num_test=2, shape=(8, 8, 1), seed=3)
  return jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)


def test_schedules_match_closed_forms():
  c = _cfg("standard")
  c.epochs, c.learning_rate = 4, 0.1
  c.lr_schedule = "cosine"
  f = training.learning_rate_schedule(c, 10)
  for t in (0, 7, 20, 39):
    assert np.isclose(f(t), 0.1 * 0.5 * (1 + np.cos(np.pi * t / 40)), rtol=1e-6)
  c.lr_schedule, c.lr_boundaries, c.lr_decay = "piecewise", (0.5, 0.75), 0.1
  f = training.learning_rate_schedule(c, 10)
  for t, want in ((0, 0.1), (19, 0.1), (20, 0.01), (29, 0.01), (30, 0.001), (39, 0.001)):
    assert np.isclose(f(t), want, rtol=1e-6), t
  c.lr_schedule = "constant"
  assert np.isclose(training.learning_rate_schedule(c, 10)(33), 0.1)


def test_optimizer_is_sgd_momentum_with_l2_weight_decay():
  c = _cfg("standard")
  c.lr_schedule, c.learning_rate, c.momentum, c.weight_decay = "constant", 0.1, 0.9, 0.01
  tx = training.make_optimizer(c, 10)
  theta = {"w": jnp.array([1.0, -2.0])}
  state = tx.init(theta)
  grads = [jnp.array([0.5, 0.25]), jnp.array([-1.0, 2.0])]
  m, p = np.zeros(2), np.array([1.0, -2.0])
  for g in grads:
    upd, state = tx.update({"w": g}, state, theta)
    theta = optax.apply_updates(theta, upd)
    # PyTorch SGD: d = g + wd p; m = mu m + d; p -= lr m.
    m = 0.9 * m + (np.asarray(g) + 0.01 * p)
    p = p - 0.1 * m
    np.testing.assert_allclose(np.asarray(theta["w"]), p, rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.5)])
def test_trades_adversary_stays_admissible_and_increases_kl(digits_model, norm, eps):
  x = jnp.asarray(digits_model.x_test[:16])
  y = jnp.asarray(digits_model.y_test[:16])
  f = digits_model.logits_fn
  xa = attacks.trades(f, x, y, jax.random.PRNGKey(0), eps=eps, norm=norm, steps=5,
                      step_size=eps / 4)
  d = np.asarray(projections.per_example_norm(xa - x, norm))
  assert d.max() <= eps * (1 + 1e-5) and float(xa.min()) >= 0 and float(xa.max()) <= 1
  kl = lambda z: np.asarray(losses.kl_divergence(f(x), f(z)))
  start = projections.project(x + 0.001 * jax.random.normal(jax.random.PRNGKey(0), x.shape),
                              x, eps, norm)
  assert kl(xa).mean() > 10 * kl(start).mean()


def _manual_step(model, tx, state, x_train_input, y, *, bn):
  """Reference: one SGD step on CE at the given inputs, BatchNorm in training mode."""
  def loss(params):
    if bn:
      logits, upd = model.apply({"params": params, "batch_stats": state.batch_stats},
                                x_train_input, train=True, mutable=["batch_stats"])
      return losses.cross_entropy(logits, y).mean(), upd["batch_stats"]
    return losses.cross_entropy(model.apply({"params": params}, x_train_input), y).mean(), {}
  (_, stats), g = jax.value_and_grad(loss, has_aux=True)(state.params)
  upd, _ = tx.update(g, state.opt_state, state.params)
  return optax.apply_updates(state.params, upd), stats


def _setup(method, model_name="tiny_cnn", **model_kw):
  cfg = _cfg(method)
  model = models.get(model_name, num_classes=10, **model_kw)
  tx = training.make_optimizer(cfg, 4)
  state = training.create_train_state(model, tx, jax.random.PRNGKey(0), (8, 8, 1))
  return cfg, model, tx, state, training.make_train_step(model, tx, cfg)


@pytest.mark.slow
def test_standard_step_matches_reference_and_is_pure(batch):
  x, y = batch
  _, model, tx, state, step = _setup("standard")
  key = jax.random.PRNGKey(5)
  new, m = step(state, x, y, key)
  again, _ = step(state, x, y, key)
  want, _ = _manual_step(model, tx, state, x, y, bn=False)
  chex_close = lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                                                       atol=1e-6)
  jax.tree_util.tree_map(chex_close, new.params, want)
  jax.tree_util.tree_map(chex_close, again.params, new.params)
  assert int(new.step) == 1 and int(state.step) == 0
  logits = model.apply({"params": state.params}, x)
  assert np.isclose(float(m.loss), float(losses.cross_entropy(logits, y).mean()), rtol=1e-5)
  assert np.isclose(float(m.accuracy), float(jnp.mean(jnp.argmax(logits, 1) == y)))


@pytest.mark.slow
def test_pgd_step_trains_on_inference_mode_pgd_examples_with_batchnorm(batch):
  """A BatchNorm model: the attack must see running statistics (train=False), the loss batch
  statistics (train=True), and the running statistics must be updated."""
  _require("pgd")
  x, y = batch
  cfg, model, tx, state, step = _setup("pgd", "wide_resnet", depth=10, widen=1)
  key = jax.random.PRNGKey(9)
  new, _ = step(state, x, y, key)
  f = lambda z: model.apply({"params": state.params, "batch_stats": state.batch_stats}, z,
                            train=False)
  x_adv = attacks.get("pgd")(f, x, y, jax.random.fold_in(key, 0), eps=cfg.eps, norm=cfg.norm,
                             **cfg.pgd.to_dict())
  want_params, want_stats = _manual_step(model, tx, state, x_adv, y, bn=True)
  close = lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4,
                                                  atol=2e-5)
  jax.tree_util.tree_map(close, new.params, want_params)
  jax.tree_util.tree_map(close, new.batch_stats, want_stats)
  moved = jax.tree_util.tree_map(lambda a, b: float(jnp.abs(a - b).max()), new.batch_stats,
                                 state.batch_stats)
  assert max(jax.tree_util.tree_leaves(moved)) > 0


@pytest.mark.slow
def test_mixed_alternates_linf_and_l2_pgd(batch):
  _require("pgd")
  x, y = batch
  cfg, model, tx, state, step = _setup("mixed")
  key = jax.random.PRNGKey(2)
  pgd = attacks.get("pgd")
  m = cfg.mixed
  for norm, eps, size in (("linf", m.eps_linf, m.step_size_linf), ("l2", m.eps_l2,
                                                                    m.step_size_l2)):
    f = lambda z, p=state.params: model.apply({"params": p}, z)
    x_adv = pgd(f, x, y, jax.random.fold_in(key, int(state.step)), eps=eps, norm=norm,
                steps=m.steps, step_size=size)
    want, _ = _manual_step(model, tx, state, x_adv, y, bn=False)
    state, _ = step(state, x, y, key)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(
        np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6), state.params, want)


@pytest.mark.slow
@pytest.mark.parametrize("method,attack", [("trades", None), ("soat", "soae"),
                                           ("second_order", "second_order"), ("soar", None),
                                           ("scorpio", None)])
def test_other_methods_take_finite_steps(batch, method, attack):
  if attack:
    _require(attack)
  x, y = batch
  _, model, _, state, step = _setup(method)
  s = state
  for _ in range(2):
    s, m = step(s, x, y, jax.random.PRNGKey(0))
    assert np.isfinite(float(m.loss)) and 0 <= float(m.accuracy) <= 1
  diff = jax.tree_util.tree_map(lambda a, b: float(jnp.abs(a - b).max()), s.params, state.params)
  assert max(jax.tree_util.tree_leaves(diff)) > 0
  if method == "trades":
    assert 0 <= float(m.clean_accuracy) <= 1


@pytest.mark.slow
@pytest.mark.parametrize("method", ["pgd", "soat", "second_order", "trades", "mixed", "soar",
                                    "scorpio"])
def test_adversarial_loss_exceeds_clean_loss(batch, method):
  """Each adversarial method minimises a loss larger than the clean one: its attack found
  points of higher loss (an attack that returned ``x`` would give exactly the clean loss)."""
  x, y = batch
  _, model, _, state, step = _setup(method)
  _, m = step(state, x, y, jax.random.PRNGKey(0))
  clean = losses.cross_entropy(model.apply({"params": state.params}, x), y).mean()
  assert float(m.loss) > float(clean) + 1e-4, (float(m.loss), float(clean))


@pytest.mark.parametrize("change,match", [
    (dict(method="fgsm_training"), "unknown training method 'fgsm_training'"),
    (dict(method="pgd", eps=-0.1), "eps must be >= 0"),
    (dict(method="soat", norm="l0"), "unknown norm 'l0'"),
    (dict(lr_schedule="step"), "unknown lr_schedule"),
    (dict(batch_size=0), "batch_size"),
    (dict(learning_rate=0.0), "learning_rate"),
    # Non-finite numbers (issue 28.7): today accepted.
    (dict(method="pgd", eps=float("inf")), r"^train\.eps must be a finite number, got inf$"),
    (dict(method="soat", eps=float("nan")), r"^train\.eps must be a finite number, got nan$"),
    (dict(learning_rate=float("inf")),
     r"^train\.learning_rate must be a finite number, got inf$"),
    (dict(weight_decay=float("inf")), r"^train\.weight_decay must be a finite number, got inf$"),
])
def test_validate_train_config_errors(change, match):
  c = _cfg("standard")
  c.update(change)
  with pytest.raises(ValueError, match=match):
    training.validate_train_config(c)


def test_mixed_eps_is_validated():
  c = _cfg("mixed")
  c.mixed.eps_l2 = -1.0
  with pytest.raises(ValueError, match=r"train\.mixed\.eps_l2 must be >= 0"):
    training.validate_train_config(c)


@pytest.mark.parametrize("method,field,value,match", [
    ("pgd", "steps", 0, r"train\.pgd\.steps must be an integer >= 1, got 0"),
    ("pgd", "step_size", -0.1, r"train\.pgd\.step_size must be >= 0, got -0.1"),
    ("pgd", "stepz", 3, r"train\.pgd\.stepz is not a hyperparameter of this method"),
    ("trades", "beta", -1.0, r"train\.trades\.beta must be >= 0"),
    ("trades", "steps", -2, r"train\.trades\.steps must be an integer >= 1, got -2"),
    ("soat", "m", 0, r"train\.soat\.m must be an integer >= 1"),
    ("soat", "steps", 0, r"train\.soat\.steps must be an integer >= 1"),
    ("soat", "tau", 0.0, r"train\.soat\.tau must be > 0"),
    ("soat", "eta", -1e-5, r"train\.soat\.eta must be > 0"),
    ("soat", "hvp", "fd_backward", r"train\.soat\.hvp: unknown HVP method 'fd_backward'"),
    ("mixed", "steps", 0, r"train\.mixed\.steps must be an integer >= 1"),
    ("mixed", "step_size_l2", -0.25, r"train\.mixed\.step_size_l2 must be >= 0"),
    ("mixed", "eps_linf", -0.1, r"train\.mixed\.eps_linf must be >= 0"),
    ("second_order", "samples", 0, r"train\.second_order\.samples must be an integer >= 1"),
    ("second_order", "sigma", -0.05, r"train\.second_order\.sigma must be >= 0"),
    # Non-finite numbers (issue 28.7): today accepted.
    ("pgd", "step_size", float("inf"), r"^train\.pgd\.step_size must be a finite number, got inf$"),
    ("trades", "beta", float("inf"), r"^train\.trades\.beta must be a finite number, got inf$"),
    ("soat", "tau", float("inf"), r"^train\.soat\.tau must be a finite number, got inf$"),
    ("soat", "eta", float("nan"), r"^train\.soat\.eta must be a finite number, got nan$"),
    ("mixed", "eps_l2", float("inf"), r"^train\.mixed\.eps_l2 must be a finite number, got inf$"),
    ("second_order", "sigma", float("inf"),
     r"^train\.second_order\.sigma must be a finite number, got inf$"),
])
def test_method_hyperparameters_are_validated_with_the_field_named(method, field, value, match):
  c = _cfg(method)
  c[method][field] = value
  with pytest.raises(ValueError, match=match):
    training.validate_train_config(c)
  with pytest.raises(ValueError, match=match):
    training.validate_method_config(c, method)


def test_every_selected_method_is_validated_up_front():
  """Issue 15 item 4: with ``train.method="soat,pgd"`` a bad ``train.pgd.steps`` is found by
  checking each listed method before the first step, not after SOAT has trained."""
  c = _cfg("soat")
  c.method = "soat,pgd"
  c.pgd.steps = 0
  training.validate_method_config(c, "soat")
  with pytest.raises(ValueError, match=r"train\.pgd\.steps must be an integer >= 1, got 0"):
    for method in c.method.split(","):
      training.validate_method_config(c, method)
  with pytest.raises(ValueError, match="unknown training method 'soat,pgd'"):
    training.validate_method_config(c)


@pytest.mark.parametrize("method", ["standard", "pgd", "trades", "soat", "mixed",
                                    "second_order", "soar", "scorpio"])
def test_shipped_configs_pass_validation(method):
  from configs import common  # pylint: disable=import-outside-toplevel
  for train_cfg in (_cfg(method), common.base_config().train):
    train_cfg.method = method
    training.validate_train_config(train_cfg)


def test_method_registry():
  assert training.available() == sorted(["standard", "pgd", "trades", "soat", "mixed",
                                         "second_order", "soar", "scorpio"])
  assert training.get("trades").loss is training.trades
  with pytest.raises(ValueError, match=r"unknown training method 'fgsm'; available: \[.*'pgd'"):
    training.get("fgsm")
  with pytest.raises(ValueError, match="registered twice"):
    training.register("pgd")(training.pgd)


def test_a_registered_method_trains_by_name(batch):
  """Adding a method is one registered function: here FGSM adversarial training, checked
  against a step taken by hand on the FGSM examples."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  _require("fgsm")
  x, y = batch
  name = "test_fgsm_training"

  def validate(cfg):
    training.check_eps_norm("train", cfg.eps, cfg.norm)
    training.check_attack_config(f"train.{name}", "fgsm", cfg[name].to_dict())

  @training.register(name, validate=validate)
  def fgsm_training(cfg, model, b):
    x_adv = attacks.get("fgsm")(model.logits_fn, b.x, b.y, b.key, eps=cfg.eps, norm=cfg.norm,
                                **cfg[name].to_dict())
    return training.cross_entropy_at(model, x_adv, b.y)

  try:
    cfg = _cfg("standard")
    cfg.method = name
    cfg[name] = ml_collections.ConfigDict(dict(step_size=0.05))
    model = models.get("tiny_cnn", num_classes=10)
    tx = training.make_optimizer(cfg, 4)
    state = training.create_train_state(model, tx, jax.random.PRNGKey(0), (8, 8, 1))
    new, m = training.make_train_step(model, tx, cfg)(state, x, y, jax.random.PRNGKey(4))
    f = lambda z: model.apply({"params": state.params}, z)
    x_adv = attacks.get("fgsm")(f, x, y, jax.random.fold_in(jax.random.PRNGKey(4), 0),
                                eps=cfg.eps, norm=cfg.norm, step_size=0.05)
    want, _ = _manual_step(model, tx, state, x_adv, y, bn=False)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(
        np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6), new.params, want)
    assert np.isnan(float(m.clean_accuracy))
    cfg[name].step_size = -1.0
    with pytest.raises(ValueError, match=rf"train\.{name}\.step_size must be >= 0"):
      training.make_train_step(model, tx, cfg)
  finally:
    training._METHODS.pop(name)  # pylint: disable=protected-access


@pytest.mark.parametrize("method,field,value,match", [
    ("soar", "h", 0.0, r"train\.soar\.h must be > 0"),
    ("soar", "init", "pgd7", r"train\.soar\.init: unknown 'pgd7'"),
    ("soar", "lamda", 1.0, r"train\.soar\.lamda is not a hyperparameter"),
    ("soar", "grad_clip", -1.0, r"train\.soar\.grad_clip must be >= 0"),
    ("soar", "norm_clip", (2.0, 1.0), r"train\.soar\.norm_clip must be \(\) \(off\) or \(lo, hi\)"),
    ("soar", "norm_clip", (1.0,), r"train\.soar\.norm_clip must be"),
    ("soar", "lam", float("inf"), r"^train\.soar\.lam must be a finite number, got inf$"),
    ("soar", "h", float("nan"), r"^train\.soar\.h must be a finite number, got nan$"),
    ("scorpio", "lam", float("inf"), r"^train\.scorpio\.lam must be a finite number, got inf$"),
    ("scorpio", "steps", 0, r"train\.scorpio\.steps must be an integer >= 1"),
    ("scorpio", "hvp", "fd", r"train\.scorpio\.hvp: unknown HVP method 'fd'"),
    ("scorpio", "step_rule", "armijo", r"train\.scorpio\.step_rule: unknown 'armijo'"),
])
def test_regulariser_methods_validate_their_fields(method, field, value, match):
  c = _cfg(method)
  c[method][field] = value
  with pytest.raises(ValueError, match=match):
    training.validate_train_config(c)


@pytest.mark.slow
def test_scorpio_step_loss_is_clean_loss_plus_the_frank_wolfe_quadratic_max(batch):
  """The registered SCORPIO step minimises ``CE + lam max Q`` exactly as
  ``regularizers.scorpio_loss`` computes it (no BatchNorm: train mode = inference mode)."""
  from krylov_adv import regularizers  # pylint: disable=import-outside-toplevel
  x, y = batch
  cfg, model, _, state, step = _setup("scorpio")
  _, m = step(state, x, y, jax.random.PRNGKey(0))
  f = lambda z: model.apply({"params": state.params}, z)
  kw = dict(cfg.scorpio.to_dict())
  want = regularizers.scorpio_loss(f, x, y, eps=cfg.eps, norm=cfg.norm, **kw)
  np.testing.assert_allclose(float(m.loss), float(want), rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("grad_clip", [1e-3, 0.0])
def test_soar_step_clips_the_regulariser_gradient_alone(batch, grad_clip):
  """One SOAR step's update is the optimiser applied to ``grad CE + clip_c(grad lam mean R)``
  computed by hand (no BatchNorm: train mode = inference mode), and ``grad_clip = 0`` is the
  plain sum."""
  from krylov_adv import regularizers  # pylint: disable=import-outside-toplevel
  x, y = batch
  cfg = _cfg("soar")
  cfg.soar.grad_clip = grad_clip
  model = models.get("tiny_cnn", num_classes=10)
  tx = training.make_optimizer(cfg, 4)
  state = training.create_train_state(model, tx, jax.random.PRNGKey(0), (8, 8, 1))
  key = jax.random.PRNGKey(7)
  new, m = training.make_train_step(model, tx, cfg)(state, x, y, key)

  s = cfg.soar
  k_init, k_z = jax.random.split(jax.random.fold_in(key, 0))
  f0 = lambda z: model.apply({"params": state.params}, z)
  x_exp = regularizers.soar_expansion_point(f0, x, y, k_init, eps=cfg.eps, norm=cfg.norm,
                                            init=s.init, init_step_size=s.init_step_size)
  logits = lambda p, z: model.apply({"params": p}, z)
  ce = lambda p: losses.cross_entropy(logits(p, x_exp), y).mean()
  reg = lambda p: s.lam * regularizers.soar_regularizer(
      lambda z: losses.cross_entropy(logits(p, z), y), x_exp, k_z, eps=cfg.eps, norm=cfg.norm,
      h=s.h, method=s.method, num_samples=s.num_samples).mean()
  v_ce, g_ce = jax.value_and_grad(ce)(state.params)
  v_r, g_r = jax.value_and_grad(reg)(state.params)
  norm = float(optax.global_norm(g_r))
  scale = min(1.0, grad_clip / norm) if grad_clip else 1.0
  if grad_clip:
    assert norm > 10 * grad_clip  # the clip is active
  g = jax.tree_util.tree_map(lambda a, b: a + scale * b, g_ce, g_r)
  upd, _ = tx.update(g, state.opt_state, state.params)
  want = optax.apply_updates(state.params, upd)
  np.testing.assert_allclose(float(m.loss), float(v_ce + v_r), rtol=1e-5)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(
      np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6), new.params, want)


@pytest.mark.slow
def test_soat_defaults_exact_hvp_and_paper_variant_and_trust_region(batch):
  """SOAT's default Hessian product is the exact one; ``soat_paper`` is the paper-literal forward
  difference; ``train.soat.direction="trust_region"`` validates and trains."""
  from configs import common, mnist_madry_cnn
  assert common.base_config().train.soat.hvp == "exact"
  paper = mnist_madry_cnn.get_config("soat_paper").train
  assert paper.method == "soat" and (paper.soat.hvp, paper.soat.eta) == ("fd_forward", 1e-5)
  cfg = _cfg("soat")
  cfg.soat.direction = "trust_region"
  training.validate_train_config(cfg)
  x, y = batch
  model = models.get("tiny_cnn", num_classes=10)
  tx = training.make_optimizer(cfg, 4)
  state = training.create_train_state(model, tx, jax.random.PRNGKey(0), (8, 8, 1))
  _, m = training.make_train_step(model, tx, cfg)(state, x, y, jax.random.PRNGKey(0))
  clean = losses.cross_entropy(model.apply({"params": state.params}, x), y).mean()
  assert np.isfinite(float(m.loss)) and float(m.loss) > float(clean) + 1e-4
