"""Models are data: every attack traces the model's parameters, so attacking a second parameter
set of the same architecture compiles nothing, and gives what a closure over the same
parameters gives, bit for bit. Compilations and lowerings are counted with
``compile_events.count_compilations``."""

from __future__ import annotations

import warnings

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import compile_events
from krylov_adv import attacks, evaluation, models
from krylov_adv.attacks import checks


def count_compilations():
  """Compilations and lowerings (``compile_events``): a second parameter set must not even be
  lowered again, with or without JAX's persistent compilation cache."""
  return compile_events.count_compilations(lowerings=True)


def mlp_apply(params, x):
  """A two-layer tanh MLP on flattened 4x4x1 images, 5 classes."""
  h = jnp.tanh(x.reshape(x.shape[0], -1) @ params["w1"] + params["b1"])
  return h @ params["w2"]


def mlp_params(seed: int):
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  return {"w1": jax.random.normal(k1, (16, 12)), "b1": jnp.zeros(12),
          "w2": jax.random.normal(k2, (12, 5)) * 2.0}


X = jax.random.uniform(jax.random.PRNGKey(9), (6, 4, 4, 1))
KEY = jax.random.PRNGKey(0)
_AA_TINY = {"apgd_ce": {"steps": 2}, "apgd_t": {"steps": 2, "n_target_classes": 2},
            "fab_t": {"steps": 2, "n_target_classes": 2}, "square": {"steps": 3},
            "apgd_dlr": {"steps": 2}, "fab": {"steps": 2}}
# Every registered attack (SOAE with both directions, AutoAttack in every version), tiny.
CASES = {
    "fgsm": ("fgsm", {}),
    "pgd": ("pgd", {"steps": 2}),
    "second_order": ("second_order", {"steps": 2, "samples": 2}),
    "soae_newton": ("soae", {"steps": 2, "m": 3}),
    "soae_trust_region": ("soae", {"steps": 2, "m": 3, "direction": "trust_region"}),
    "trades": ("trades", {"steps": 2}),
    "apgd_ce": ("apgd_ce", {"steps": 3}),
    "apgd_dlr": ("apgd_dlr", {"steps": 3}),
    "apgd_t": ("apgd_t", {"steps": 3, "n_target_classes": 2}),
    "fab": ("fab", {"steps": 3}),
    "fab_t": ("fab_t", {"steps": 3, "n_target_classes": 2}),
    "square": ("square", {"steps": 4}),
    "autoattack_standard": ("autoattack", {"hyperparameters": _AA_TINY}),
    "autoattack_plus": ("autoattack", {"version": "plus", "hyperparameters": {
        k: dict(v, restarts=1) if k in ("apgd_ce", "apgd_dlr", "fab") else v
        for k, v in _AA_TINY.items()}}),
    "autoattack_custom": ("autoattack", {"version": "custom", "attacks": ["apgd_dlr", "square"],
                                         "hyperparameters": _AA_TINY}),
}
assert {name for name, _ in CASES.values()} == set(attacks.available())


def _run(name, kw, logits_fn, eps):
  # Labels = the attacked model's own predictions: every point starts robust.
  y = jnp.argmax(logits_fn(X), axis=1)
  out = attacks.get(name)(logits_fn, X, y, KEY, eps=eps, norm="linf", **kw)
  return np.asarray(jax.block_until_ready(out))


# AutoAttack's cases are the slow ones (four components, several subset shapes).
CASE_PARAMS = [pytest.param(c, marks=pytest.mark.slow) if CASES[c][0] == "autoattack" else c
               for c in sorted(CASES)]


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_second_parameter_set_compiles_nothing(case):
  """``Partial(apply, params)``: the first parameter set compiles the attack, the second
  (other values, same shapes) compiles nothing. AutoAttack runs at ``eps = 0`` here so that
  every component runs on the whole batch for both parameter sets (the subsets, hence the
  shapes, would otherwise depend on which points each model lets the attack fool)."""
  name, kw = CASES[case]
  eps = 0.0 if name == "autoattack" else 0.2
  # (Whether this compiles depends on what the module's earlier tests compiled; the counter
  # itself is checked by test_plain_function_compiles_once_per_function_object.)
  _run(name, kw, jax.tree_util.Partial(mlp_apply, mlp_params(0)), eps)
  with count_compilations() as second:
    _run(name, kw, jax.tree_util.Partial(mlp_apply, mlp_params(1)), eps)
  assert sum(second.values()) == 0, dict(second)


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_traced_parameters_give_the_closure_result_bit_for_bit(case):
  name, kw = CASES[case]
  params = mlp_params(0)
  traced = _run(name, kw, jax.tree_util.Partial(mlp_apply, params), 0.2)
  closure = _run(name, kw, lambda x: mlp_apply(params, x), 0.2)
  np.testing.assert_array_equal(traced, closure)
  assert np.any(traced != np.asarray(X))  # the attack moved the points


@pytest.mark.slow
def test_autoattack_batched_second_parameter_set_compiles_nothing():
  x = jax.random.uniform(jax.random.PRNGKey(5), (10, 4, 4, 1))
  kw = dict(eps=0.0, norm="linf", hyperparameters=_AA_TINY, batch_size=4)

  def run(seed):  # every point starts robust (its own prediction), so the shapes are equal
    logits_fn = jax.tree_util.Partial(mlp_apply, mlp_params(seed))
    return attacks.autoattack_batched(logits_fn, x, evaluation.model_predictions(logits_fn, x),
                                      KEY, **kw)

  run(0)
  with count_compilations() as second:
    run(1)
  assert sum(second.values()) == 0, dict(second)


def test_plain_function_compiles_once_per_function_object():
  """A plain callable keeps today's contract: static, one compile per function object."""
  params = mlp_params(0)
  y = jnp.argmax(mlp_apply(params, X), axis=1)

  def fn(x):
    return mlp_apply(params, x)

  def attack(f):
    return attacks.pgd(f, X, y, KEY, eps=0.1, norm="l2", steps=2)

  attack(fn)
  with count_compilations() as same:
    attack(fn)
  with count_compilations() as other:
    attack(lambda x: mlp_apply(params, x))
  assert sum(same.values()) == 0
  assert other["_pgd_impl"] >= 1  # lowered again (and compiled, without a persistent cache)


# ----------------------------------------------------------------------------------------------
# One adapter per model family.


class LinenNet(nn.Module):
  """Dense -> BatchNorm -> Dropout -> Dense: inference mode matters for both."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.Dense(12)(x.reshape(x.shape[0], -1))
    h = nn.BatchNorm(use_running_average=not train)(h)
    h = nn.Dropout(0.5, deterministic=not train)(jnp.tanh(h))
    return nn.Dense(5)(h)


class NNXNet(nnx.Module):

  def __init__(self, seed: int):
    rngs = nnx.Rngs(seed)
    self.l1 = nnx.Linear(16, 12, rngs=rngs)
    self.bn = nnx.BatchNorm(12, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)
    self.l2 = nnx.Linear(12, 5, rngs=rngs)

  def __call__(self, x):
    return self.l2(self.drop(jnp.tanh(self.bn(self.l1(x.reshape(x.shape[0], -1))))))


class EqxNet(eqx.Module):
  """A per-example Equinox model: ``(4, 4, 1) -> (5,)``."""
  mlp: eqx.nn.MLP
  drop: eqx.nn.Dropout

  def __init__(self, seed: int):
    self.mlp = eqx.nn.MLP(16, 5, 12, 1, activation=jnp.tanh, key=jax.random.PRNGKey(seed))
    self.drop = eqx.nn.Dropout(0.5)

  def __call__(self, xi, key=None):
    return self.mlp(self.drop(xi.reshape(-1), key=key))


def _linen(seed):
  module = LinenNet()
  variables = module.init(jax.random.PRNGKey(seed), X[:1])
  # Non-trivial running statistics, so that inference mode is visible in the logits.
  variables = {**variables, "batch_stats": jax.tree_util.tree_map(
      lambda a: a + 0.3 * (seed + 1), variables["batch_stats"])}
  ref = lambda x: module.apply(variables, x, train=False)
  return models.as_logits_fn(module, variables, train=False), ref


def _nnx(seed):
  model = NNXNet(seed)
  copy = nnx.clone(model)
  copy.eval()
  return models.as_logits_fn(model), lambda x: copy(x)


def _eqx(seed):
  model = EqxNet(seed)
  ref_model = eqx.nn.inference_mode(model)
  return models.as_logits_fn(model), lambda x: jax.vmap(ref_model)(x)


FAMILIES = {"linen": _linen, "nnx": _nnx, "equinox": _eqx}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_model_family_second_parameter_set_compiles_nothing(family):
  """Each family's adapter: inference-mode logits equal to the family's own inference call,
  deterministic (Dropout off), and a second parameter set compiles nothing (PGD and APGD-CE,
  a jitted loop and a host-driven one)."""
  results = []
  for seed in (0, 1):
    logits_fn, ref = FAMILIES[family](seed)
    np.testing.assert_allclose(np.asarray(jax.jit(logits_fn)(X)), np.asarray(ref(X)),
                               rtol=1e-6, atol=1e-6)
    y = jnp.argmax(ref(X), axis=1)
    with count_compilations() as counts:
      results.append(np.asarray(attacks.pgd(logits_fn, X, y, KEY, eps=0.2, norm="linf",
                                             steps=2)))
      attacks.apgd_ce(logits_fn, X, y, KEY, eps=0.2, norm="linf", steps=2)
    if seed == 0:
      assert sum(counts.values()) > 0
    else:
      assert sum(counts.values()) == 0, dict(counts)
  assert not np.array_equal(results[0], results[1])  # two different models were attacked


def test_nnx_adapter_leaves_the_callers_model_in_training_mode():
  model = NNXNet(0)
  models.as_logits_fn(model)
  assert model.drop.deterministic is False and model.bn.use_running_average is False


def test_as_logits_fn_rejects_wrong_arguments():
  with pytest.raises(TypeError, match="needs its variables"):
    models.as_logits_fn(LinenNet())
  with pytest.raises(TypeError, match="takes the model alone"):
    models.as_logits_fn(NNXNet(0), {"params": {}})
  with pytest.raises(TypeError, match="unknown model type"):
    models.as_logits_fn(object())


# ----------------------------------------------------------------------------------------------
# The pipeline's evaluation: one compile per architecture, whatever the parameters.


@pytest.mark.slow
def test_evaluating_a_second_checkpoint_compiles_nothing():
  from krylov_adv import training
  module = models.get("tiny_cnn", num_classes=10)
  x = np.asarray(jax.random.uniform(jax.random.PRNGKey(2), (10, 8, 8, 1)))
  suite = {"clean": dict(name="clean", norm="linf", eps=0.0),
           "pgd": dict(name="pgd", norm="linf", eps=0.1, steps=2),
           "aa": dict(name="autoattack", norm="linf", eps=0.0, hyperparameters=_AA_TINY)}

  def evaluate(seed):
    variables = module.init(jax.random.PRNGKey(seed), x[:1])
    logits_fn = training.inference_logits_fn(module, variables["params"], {})
    y = np.asarray(evaluation.model_predictions(logits_fn, x))
    return evaluation.evaluate_attacks(logits_fn, x, y, suite, KEY, batch_size=4,
                                       reports=evaluation.FREE_REPORTS)

  evaluate(0)
  with count_compilations() as second:
    evaluate(1)
  # module.init compiles nothing either way (it runs eagerly, op by op, on cached primitives).
  assert sum(second.values()) == 0, dict(second)


# ----------------------------------------------------------------------------------------------
# Checks like the reference's checks.py.


def test_softmax_output_warns_once():
  params = mlp_params(3)
  y = jnp.zeros(6, jnp.int32)
  probs = jax.tree_util.Partial(lambda p, x: jax.nn.softmax(mlp_apply(p, x)), params)
  with pytest.warns(checks.ModelWarning, match="returns probabilities"):
    attacks.fgsm(probs, X, y, KEY, eps=0.1, norm="linf")
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    attacks.fgsm(jax.tree_util.Partial(mlp_apply, params), X, y, KEY, eps=0.1, norm="linf")


def test_randomized_model_warns():
  params = mlp_params(4)
  rng = np.random.default_rng(0)

  def noisy(x):  # Python-side noise: a new draw on every eager call
    return mlp_apply(params, x) + jnp.asarray(rng.normal(size=(x.shape[0], 5)), jnp.float32)

  y = jnp.zeros(6, jnp.int32)
  with pytest.warns(checks.ModelWarning, match="different outputs for the same input"):
    attacks.fgsm(noisy, X, y, KEY, eps=0.1, norm="linf")


def test_too_many_target_classes_warns():
  params = mlp_params(5)
  y = jnp.argmax(mlp_apply(params, X), axis=1)
  with pytest.warns(checks.ModelWarning, match="n_target_classes=9 but the model has only K=5"):
    attacks.apgd_t(jax.tree_util.Partial(mlp_apply, params), X, y, KEY, eps=0.1, norm="linf",
                   steps=1)


def test_unbound_apply_is_a_clear_error():
  module = LinenNet()
  with pytest.raises(TypeError, match="as_logits_fn\\(module, variables"):
    attacks.fgsm(module.apply, X, jnp.zeros(6, jnp.int32), KEY, eps=0.1, norm="linf")


def test_function_of_other_arguments_is_blamed_not_the_image():
  with pytest.raises(ValueError, match="with the parameters bound"):
    attacks.fgsm(mlp_apply, X, jnp.zeros(6, jnp.int32), KEY, eps=0.1, norm="linf")
