"""Adversarial training: train state, optimiser, and one pure jitted step per method.

Methods (``train.method``), each registered by name (``register``, ``get``, ``available``):

* ``standard``: ``min_theta CE(f(x), y)``.
* ``pgd``: Madry et al. (2018), ``min_theta CE(f(x_adv), y)`` with ``x_adv`` from PGD-k.
* ``trades``: Zhang et al. (2019), ``CE(f(x), y) + beta KL(f(x) || f(x_adv))`` with ``x_adv``
  maximising the KL term by k signed (linf) / normalised (l2) gradient steps from
  ``x + 0.001 N(0, I)`` (their Algorithm 1).
* ``soat``: the SOAE paper's second-order adversarial training (its Eq. 15): ``CE(f(x + delta*))``
  with ``delta*`` from SOAE (Algorithm 1: N Krylov-Newton steps, dimension <= m, threshold tau,
  HVP method and difference step eta).
* ``mixed``: the S-O paper's mixed strategy (its Sec. 5): batches alternate between L2 and Linf
  PGD examples (even steps Linf, odd steps L2).
* ``second_order``: training on S-O attack examples (S-O paper Eq. 4: PGD on the gradient
  averaged over Gaussian-perturbed inputs).

BatchNorm: the loss that trains ``theta`` is evaluated with ``train=True`` (batch statistics,
running averages updated). Every attack inside a step sees the model through
``inference_logits_fn``, i.e. ``train=False`` with the running averages of the current state, so
the examples of the batch never interact and the attack does not move the running statistics.
Adversarial examples are ``stop_gradient``-ed: the outer minimisation does not differentiate
through the inner maximisation (Danskin's theorem, as in Madry et al.).

A method is one function ``method(cfg, model, batch) -> MethodLoss`` (see :func:`register`):
it receives the ``train`` config, a :class:`StepModel` (the inference-mode ``logits_fn`` that
attacks see and the training-mode ``forward`` that the loss is differentiated through) and the
:class:`Batch`, and returns the loss to minimise with the logits it was computed on.
:func:`make_train_step` differentiates it w.r.t. the parameters and applies the optimiser. An
optional ``validate(cfg)`` checks the method's hyperparameters before the first step
(:func:`validate_method_config`).

The optimiser is SGD with momentum and L2 weight decay (``add_decayed_weights`` before the
momentum, like PyTorch's ``SGD(weight_decay=...)`` used by the papers), with a learning-rate
schedule from the config.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from krylov_adv import attacks, losses, models, projections, regularizers
from krylov_adv import hvp as hvp_lib
from krylov_adv.registry import Registry

Array = jax.Array

SCHEDULES = ("constant", "cosine", "piecewise")


class TrainState(flax.struct.PyTreeNode):
  """Everything a checkpoint holds: a pytree of arrays (the model and optimiser are not in it).

  step: scalar int32, optimiser steps taken. params / batch_stats: the model's variables
  (``batch_stats`` is ``{}`` for models without BatchNorm). opt_state: the optax state.
  """
  step: Array
  params: Any
  batch_stats: Any
  opt_state: Any


class StepMetrics(NamedTuple):
  """Per-step training metrics (scalars): the minimised loss and the accuracy of the logits it
  was computed on (adversarial logits for adversarial methods, clean for ``standard``), and the
  clean accuracy (the same for ``standard``; the natural term for ``trades``; ``nan`` otherwise,
  since computing it would cost an extra forward pass)."""
  loss: Array
  accuracy: Array
  clean_accuracy: Array


class Batch(NamedTuple):
  """One training batch as a method sees it.

  x: ``(B, H, W, C)`` float32 in ``[0, 1]``; y: ``(B,)`` int32; key: this step's PRNG key (the
  run's key folded with ``step``); step: int32 scalar, optimiser steps taken before this one.
  """
  x: Array
  y: Array
  key: Array
  step: Array


class StepModel(NamedTuple):
  """The model as a method sees it during one step.

  logits_fn: ``x (B, H, W, C) -> logits (B, K)`` in inference mode with the parameters at the
    start of the step (:func:`inference_logits_fn`). This is what attacks see; it is constant
    for the outer gradient, so adversarial examples built from it are not differentiated
    through (Danskin's theorem, as in Madry et al.).
  forward: ``forward(x, batch_stats) -> (logits (B, K), batch_stats)`` in training mode
    (BatchNorm on batch statistics, running averages updated), differentiable w.r.t. the
    parameters being trained. Thread ``batch_stats`` from one call to the next.
  batch_stats: the running statistics at the start of the step (``{}`` without BatchNorm).
  params: the parameter pytree being differentiated (the one ``forward`` closes over), or
    ``None`` when the caller does not expose it.
  apply: ``apply(params, x, batch_stats) -> (logits, batch_stats)``, the training-mode pass of
    ``forward`` with explicit parameters (``forward(x, s) == apply(params, x, s)``), or
    ``None``. A method passes transformed parameters through it to treat one term's gradient
    differently (SOAR clips its regulariser's gradient, :func:`soar`).
  """
  logits_fn: Callable[[Array], Array]
  forward: Callable[[Array, Any], tuple[Array, Any]]
  batch_stats: Any
  params: Any = None
  apply: Callable[[Any, Array, Any], tuple[Array, Any]] | None = None


class MethodLoss(NamedTuple):
  """What a training method returns.

  loss: scalar, the mean over the batch of the loss to minimise. logits: ``(B, K)``, the logits
  the loss was computed on (their accuracy is ``StepMetrics.accuracy``). clean_logits: ``(B,
  K)`` clean logits when the method computed them anyway, else ``None``. batch_stats: the
  running statistics after the method's training-mode passes (``StepModel.batch_stats`` if none).
  """
  loss: Array
  logits: Array
  clean_logits: Array | None
  batch_stats: Any


# ---------------------------------------------------------------------------------------------
# Registry of training methods


class Method(NamedTuple):
  """A registered training method: ``loss(cfg, model, batch) -> MethodLoss`` and
  ``validate(cfg)``, which raises ``ValueError`` naming the bad ``train.*`` field."""
  name: str
  loss: Callable[[Any, StepModel, Batch], MethodLoss]
  validate: Callable[[Any], None]


_METHODS: Registry[Method] = Registry("training method")


def _no_checks(cfg) -> None:
  del cfg


def register(name: str, *, validate: Callable[[Any], None] | None = None):
  """Decorator adding a training method to the registry under ``name``.

  The decorated function is ``method(cfg, model: StepModel, batch: Batch) -> MethodLoss`` with
  ``cfg`` the ``train`` config; it is traced inside the jitted step and differentiated w.r.t.
  the parameters behind ``model.forward``. ``validate(cfg)`` (optional) checks the method's
  hyperparameters and raises ``ValueError`` naming the field (``train.<name>.steps must be ...``);
  :func:`validate_train_config` calls it before the first step. Example::

    @training.register("my_method", validate=my_checks)
    def my_method(cfg, model, batch):
      x_adv = attacks.get("pgd")(model.logits_fn, batch.x, batch.y, batch.key, eps=cfg.eps,
                                 norm=cfg.norm, **cfg.my_method.to_dict())
      return training.cross_entropy_at(model, x_adv, batch.y)
  """

  def wrap(fn):
    _METHODS.add(name, Method(name, fn, validate or _no_checks))
    return fn

  return wrap


def get(name: str) -> Method:
  """The training method registered under ``name``; ``ValueError`` listing the known names."""
  return _METHODS.get(name)


def available() -> list[str]:
  """Sorted names of all registered training methods."""
  return _METHODS.names()


# ---------------------------------------------------------------------------------------------
# Config validation

# Range checks of attack hyperparameters by name, applied to the fields a method's sub-config
# sets (the attack checks them again when it runs; these make the error appear before the first
# step and name the config field).
_AT_LEAST_ONE = ("steps", "restarts", "samples", "m")
_NONNEGATIVE = ("alpha", "sigma", "beta")  # and every eps* and step_size* field
_POSITIVE = ("tau", "eta", "xi")


def _sub_config(cfg, name: str) -> dict[str, Any]:
  sub = cfg.get(name) if hasattr(cfg, "get") else None
  if sub is None:
    raise ValueError(f"train.{name} is missing: the {name} method reads its hyperparameters "
                     "from it")
  return dict(sub.to_dict() if hasattr(sub, "to_dict") else sub)


def check_finite_reals(where: str, fields: dict[str, Any]) -> None:
  """``ValueError`` naming ``where.<field>`` for a real (``float``) value in ``fields`` that is
  NaN or inf: a budget, step or rate of ``inf`` makes a run report nonsense rather than fail
  (``eps=inf`` reported robust accuracy 1.00). Other values (ints, strings, ``None``) are left
  to the range checks."""
  for field, value in fields.items():
    if isinstance(value, float) and not math.isfinite(value):
      raise ValueError(f"{where}.{field} must be a finite number, got {value}")


def check_eps_norm(where: str, eps, norm: str, norms=projections.NORMS) -> None:
  """``ValueError`` naming ``where`` (e.g. ``train``) unless ``eps`` is finite and ``>= 0`` and
  ``norm`` is one of ``norms`` (every attack norm; training passes
  :data:`krylov_adv.projections.TRAINING_NORMS`, Linf and L2)."""
  if norm not in norms:
    extra = (" (L1 is an evaluation threat model: the training methods take Linf or L2)"
             if norm in projections.NORMS else "")
    raise ValueError(f"{where}.norm: unknown norm {norm!r}; use one of {tuple(norms)}{extra}")
  check_finite_reals(where, {"eps": float(eps)})
  if not float(eps) >= 0:
    raise ValueError(f"{where}.eps must be >= 0, got {eps}")


def check_hyperparameters(where: str, fields: dict[str, Any], *, allowed=None) -> None:
  """Range checks of the hyperparameters in ``fields`` by name, with messages naming
  ``where.<field>``.

  ``steps``, ``restarts``, ``samples``, ``m``: integers ``>= 1``; ``alpha``,
  ``sigma``, ``beta`` and names starting with ``eps`` or ``step_size``: ``>= 0``; ``tau``,
  ``eta``, ``xi``: ``> 0``; ``hvp``: a name of ``hvp.HVP_METHODS``; every real value: finite.
  ``None`` values (the attack's default) are not checked. With ``allowed`` (names), a field
  outside it is an error.
  """
  check_finite_reals(where, fields)
  for field, value in fields.items():
    name = f"{where}.{field}"
    if allowed is not None and field not in allowed:
      raise ValueError(f"{name} is not a hyperparameter of this method; known: {sorted(allowed)}")
    if value is None:
      continue
    if field in _AT_LEAST_ONE and (isinstance(value, bool) or int(value) != value or value < 1):
      raise ValueError(f"{name} must be an integer >= 1, got {value}")
    nonnegative = field in _NONNEGATIVE or field.startswith(("eps", "step_size"))
    if nonnegative and not float(value) >= 0:
      raise ValueError(f"{name} must be >= 0, got {value}")
    if field in _POSITIVE and not float(value) > 0:
      raise ValueError(f"{name} must be > 0, got {value}")
    if field == "hvp" and value not in hvp_lib.HVP_METHODS:
      raise ValueError(f"{name}: unknown HVP method {value!r}; use one of "
                       f"{hvp_lib.HVP_METHODS}")


def _keyword_names(fn) -> tuple[str, ...] | None:
  """The keyword parameters of ``fn``, or ``None`` when it takes ``**kwargs`` or has no
  inspectable signature."""
  try:
    params = inspect.signature(fn).parameters.values()
  except (TypeError, ValueError):
    return None
  if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
    return None
  return tuple(p.name for p in params
               if p.kind in (inspect.Parameter.KEYWORD_ONLY,
                             inspect.Parameter.POSITIONAL_OR_KEYWORD))


def check_attack_config(where: str, attack: str, fields: dict[str, Any]) -> None:
  """Checks a sub-config whose fields are keyword arguments of the registered ``attack``:
  each must be one of its hyperparameters (not ``eps``/``norm``, which come from the threat
  model) and pass :func:`check_hyperparameters`."""
  names = _keyword_names(attacks.get(attack))
  allowed = None if names is None else tuple(n for n in names if n not in ("eps", "norm"))
  check_hyperparameters(where, fields, allowed=allowed)


def validate_method_config(cfg, method: str | None = None) -> None:
  """Checks the hyperparameters of one training method in the ``train`` config ``cfg``.

  Args:
    cfg: the ``train`` ``ConfigDict`` (or mapping).
    method: a registered method name; default ``cfg.method``. ``cfg.method`` itself is not
      read otherwise, so a config naming several methods (``"soat,pgd"``) is checked by calling
      this once per name.

  Raises:
    ValueError: unknown method (listing the known ones), or a bad hyperparameter; the message
      names the config field (``train.pgd.steps must be an integer >= 1, got 0``).
  """
  get(cfg.method if method is None else method).validate(cfg)


def validate_train_config(cfg) -> None:
  """Raises ``ValueError`` with a clear message for a bad ``train`` config.

  Checks the method name, the learning-rate schedule, positive sizes and rates, then the
  method's own hyperparameters (:func:`validate_method_config`: the threat model ``eps >= 0``
  and ``norm``, attack steps, step sizes, ...).
  """
  get(cfg.method)
  if cfg.lr_schedule not in SCHEDULES:
    raise ValueError(f"unknown lr_schedule {cfg.lr_schedule!r}; use one of {SCHEDULES}")
  for name in ("epochs", "batch_size"):
    if int(cfg[name]) != cfg[name] or cfg[name] < 1:
      raise ValueError(f"train.{name} must be an integer >= 1, got {cfg[name]}")
  check_finite_reals("train", {k: cfg.get(k) for k in ("learning_rate", "momentum",
                                                      "weight_decay", "lr_decay")})
  if not float(cfg.learning_rate) > 0:
    raise ValueError(f"train.learning_rate must be > 0, got {cfg.learning_rate}")
  if not 0 <= float(cfg.momentum) < 1 or not float(cfg.weight_decay) >= 0:
    raise ValueError("train.momentum must lie in [0, 1) and train.weight_decay be >= 0")
  validate_method_config(cfg)


# ---------------------------------------------------------------------------------------------
# Optimiser and state


def learning_rate_schedule(cfg, steps_per_epoch: int) -> optax.Schedule:
  """The learning rate as a function of the step.

  ``constant``: ``lr``. ``cosine``: ``lr * (1 + cos(pi t / T)) / 2`` over ``T = epochs *
  steps_per_epoch``. ``piecewise``: ``lr`` multiplied by ``lr_decay`` at each fraction of ``T``
  in ``lr_boundaries`` (e.g. 0.1 at 50% and 75%, the usual adversarial-training schedule).
  """
  total = int(cfg.epochs) * int(steps_per_epoch)
  lr = float(cfg.learning_rate)
  if cfg.lr_schedule == "constant":
    return optax.constant_schedule(lr)
  if cfg.lr_schedule == "cosine":
    return optax.cosine_decay_schedule(lr, decay_steps=max(total, 1))
  if cfg.lr_schedule == "piecewise":
    bounds = {int(round(f * total)): float(cfg.lr_decay) for f in cfg.lr_boundaries}
    return optax.piecewise_constant_schedule(lr, bounds)
  raise ValueError(f"unknown lr_schedule {cfg.lr_schedule!r}; use one of {SCHEDULES}")


def make_optimizer(cfg, steps_per_epoch: int) -> optax.GradientTransformation:
  """SGD with momentum and L2 weight decay: ``g <- g + wd * theta``, then heavy-ball momentum
  ``m <- mu m + g`` and ``theta <- theta - lr_t m``."""
  return optax.chain(
      optax.add_decayed_weights(float(cfg.weight_decay)),
      optax.sgd(learning_rate_schedule(cfg, steps_per_epoch), momentum=float(cfg.momentum),
                nesterov=bool(cfg.get("nesterov", False))))


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, key: Array,
                       input_shape: tuple[int, ...]) -> TrainState:
  """Initialises the model on a dummy batch ``(1,) + input_shape`` and the optimiser."""
  variables = model.init(key, jnp.zeros((1,) + tuple(input_shape), jnp.float32), train=False)
  params = variables["params"]
  batch_stats = variables.get("batch_stats", {})
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                    opt_state=tx.init(params))


def inference_logits_fn(model: nn.Module, params, batch_stats) -> Callable[[Array], Array]:
  """``x (B, H, W, C) -> logits (B, K)`` with BatchNorm in inference mode (running averages).

  This is how every attack sees the model, in training steps and in evaluation: a pytree
  callable (:func:`krylov_adv.models.as_logits_fn`) whose parameters the attacks trace, so
  every parameter set of one architecture (each epoch's, each checkpoint's, each table row's)
  shares their compiled code.
  """
  variables = {"params": params}
  if batch_stats:
    variables["batch_stats"] = batch_stats
  return models.as_logits_fn(model, variables, train=False)


def _train_forward(model: nn.Module, params, batch_stats, x: Array):
  """Logits with BatchNorm in training mode and the updated running statistics."""
  if not batch_stats:
    return model.apply({"params": params}, x, train=True), batch_stats
  logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                mutable=["batch_stats"])
  return logits, updates["batch_stats"]


# ---------------------------------------------------------------------------------------------
# Inner maximisation


def _attack_kwargs(sub) -> dict[str, Any]:
  return dict(sub.to_dict() if hasattr(sub, "to_dict") else sub)


# ---------------------------------------------------------------------------------------------
# Methods


def cross_entropy_at(model: StepModel, x: Array, y: Array) -> MethodLoss:
  """``mean CE(f(x), y)`` with one training-mode pass at ``x`` (clean or adversarial)."""
  logits, stats = model.forward(x, model.batch_stats)
  return MethodLoss(jnp.mean(losses.cross_entropy(logits, y)), logits, None, stats)


def _threat_model_checks(method: str, attack: str):
  """``validate(cfg)`` for a method attacking in ``(cfg.eps, cfg.norm)`` with ``cfg.<method>``
  as the keyword arguments of the registered ``attack``."""

  def validate(cfg):
    check_eps_norm("train", cfg.eps, cfg.norm, projections.TRAINING_NORMS)
    check_attack_config(f"train.{method}", attack, _sub_config(cfg, method))

  return validate


def _train_on_attack(cfg, model: StepModel, batch: Batch, attack: str, hyper) -> MethodLoss:
  """``CE(f(x_adv), y)`` with ``x_adv`` from the registered ``attack`` in the threat model
  ``(cfg.eps, cfg.norm)`` with the keyword arguments ``hyper`` (a sub-config)."""
  x_adv = attacks.get(attack)(model.logits_fn, batch.x, batch.y, batch.key, eps=cfg.eps,
                              norm=cfg.norm, **_attack_kwargs(hyper))
  return cross_entropy_at(model, jax.lax.stop_gradient(x_adv), batch.y)


@register("standard")
def standard(cfg, model: StepModel, batch: Batch) -> MethodLoss:
  """``CE(f(x), y)`` on the clean batch (the clean accuracy is the reported accuracy)."""
  del cfg
  out = cross_entropy_at(model, batch.x, batch.y)
  return out._replace(clean_logits=out.logits)


@register("pgd", validate=_threat_model_checks("pgd", "pgd"))
def pgd(cfg, model: StepModel, batch: Batch) -> MethodLoss:
  """Madry et al. (2018): ``CE(f(x_adv), y)``, ``x_adv = attacks.pgd(..., **cfg.pgd)``."""
  return _train_on_attack(cfg, model, batch, "pgd", cfg.pgd)


@register("soat", validate=_threat_model_checks("soat", "soae"))
def soat(cfg, model: StepModel, batch: Batch) -> MethodLoss:
  """SOAE paper Eq. 15: ``CE(f(x + delta*), y)``, ``x + delta* = attacks.soae(..., **cfg.soat)``."""
  return _train_on_attack(cfg, model, batch, "soae", cfg.soat)


@register("second_order", validate=_threat_model_checks("second_order", "second_order"))
def second_order(cfg, model: StepModel, batch: Batch) -> MethodLoss:
  """S-O paper Eq. 4 examples: ``CE(f(x_adv), y)``, ``x_adv = attacks.second_order(...,
  **cfg.second_order)``."""
  return _train_on_attack(cfg, model, batch, "second_order", cfg.second_order)


def _validate_trades(cfg) -> None:
  check_eps_norm("train", cfg.eps, cfg.norm, projections.TRAINING_NORMS)
  names = ("beta",) + (_keyword_names(attacks.trades) or ())
  check_hyperparameters("train.trades", _sub_config(cfg, "trades"),
                        allowed=tuple(n for n in names if n not in ("eps", "norm")))


@register("trades", validate=_validate_trades)
def trades(cfg, model: StepModel, batch: Batch) -> MethodLoss:
  """``CE(f(x), y) + beta KL(f(x) || f(x_adv))``, ``x_adv`` from :func:`krylov_adv.attacks.trades`.

  Two training-mode passes (clean then adversarial), each updating the running statistics, as
  in the reference TRADES implementation.
  """
  kw = _attack_kwargs(cfg.trades)
  beta = float(kw.pop("beta"))
  x_adv = attacks.trades(model.logits_fn, batch.x, batch.y, batch.key, eps=cfg.eps, norm=cfg.norm,
                         **kw)
  x_adv = jax.lax.stop_gradient(x_adv)
  clean, stats = model.forward(batch.x, model.batch_stats)
  adv, stats = model.forward(x_adv, stats)
  loss = losses.cross_entropy(clean, batch.y) + beta * losses.kl_divergence(clean, adv)
  return MethodLoss(jnp.mean(loss), adv, clean, stats)


_MIXED_FIELDS = ("eps_linf", "eps_l2", "step_size_linf", "step_size_l2", "steps")


def _validate_mixed(cfg) -> None:
  m = _sub_config(cfg, "mixed")
  missing = [f for f in _MIXED_FIELDS if f not in m]
  if missing:
    raise ValueError(f"train.mixed is missing {missing}")
  check_hyperparameters("train.mixed", m, allowed=_MIXED_FIELDS)


@register("mixed", validate=_validate_mixed)
def mixed(cfg, model: StepModel, batch: Batch) -> MethodLoss:
  """``CE(f(x_adv), y)`` with ``x_adv`` from Linf PGD on even steps and L2 PGD on odd ones
  (``eps_linf``, ``eps_l2``, ``step_size_linf``, ``step_size_l2``, ``steps`` in ``cfg.mixed``)."""
  m = cfg.mixed
  pgd_attack = attacks.get("pgd")
  linf = functools.partial(pgd_attack, eps=m.eps_linf, norm="linf", steps=m.steps,
                           step_size=m.step_size_linf)
  l2 = functools.partial(pgd_attack, eps=m.eps_l2, norm="l2", steps=m.steps,
                         step_size=m.step_size_l2)
  args = (model.logits_fn, batch.x, batch.y, batch.key)
  x_adv = jax.lax.cond(batch.step % 2 == 0, lambda: linf(*args), lambda: l2(*args))
  return cross_entropy_at(model, jax.lax.stop_gradient(x_adv), batch.y)


_SOAR_FIELDS = ("lam", "h", "method", "num_samples", "init", "init_step_size", "grad_clip",
                "norm_clip")
_SCORPIO_FIELDS = ("lam", "steps", "step_rule", "hvp", "eta")


def _check_choice(name: str, value, choices) -> None:
  if value not in choices:
    raise ValueError(f"{name}: unknown {value!r}; use one of {choices}")


def _validate_soar(cfg) -> None:
  check_eps_norm("train", cfg.eps, cfg.norm, projections.TRAINING_NORMS)
  s = _sub_config(cfg, "soar")
  check_hyperparameters("train.soar", {k: None for k in s}, allowed=_SOAR_FIELDS)
  check_finite_reals("train.soar", s)
  if not float(s["lam"]) >= 0:
    raise ValueError(f"train.soar.lam must be >= 0, got {s['lam']}")
  if not float(s["h"]) > 0:
    raise ValueError(f"train.soar.h must be > 0, got {s['h']}")
  n = s["num_samples"]
  if isinstance(n, bool) or int(n) != n or n < 1:
    raise ValueError(f"train.soar.num_samples must be an integer >= 1, got {n}")
  if s.get("init_step_size") is not None and not float(s["init_step_size"]) >= 0:
    raise ValueError(f"train.soar.init_step_size must be >= 0, got {s['init_step_size']}")
  if s.get("grad_clip") is not None and not float(s["grad_clip"]) >= 0:
    raise ValueError(f"train.soar.grad_clip must be >= 0 (0 or None: off), got "
                     f"{s['grad_clip']}")
  clip = s.get("norm_clip")
  if clip is not None and len(clip) and not (
      len(clip) == 2 and all(isinstance(v, (int, float)) and math.isfinite(v) for v in clip)
      and 0 <= clip[0] <= clip[1]):
    raise ValueError(f"train.soar.norm_clip must be () (off) or (lo, hi) with 0 <= lo <= hi, "
                     f"got {clip}")
  _check_choice("train.soar.method", s["method"], regularizers.SOAR_HVPS)
  _check_choice("train.soar.init", s["init"], regularizers.SOAR_INITS)


def _validate_scorpio(cfg) -> None:
  check_eps_norm("train", cfg.eps, cfg.norm, projections.TRAINING_NORMS)
  s = _sub_config(cfg, "scorpio")
  check_hyperparameters("train.scorpio", {k: None for k in s}, allowed=_SCORPIO_FIELDS)
  check_finite_reals("train.scorpio", s)
  check_hyperparameters("train.scorpio", dict(steps=s["steps"], hvp=s["hvp"], eta=s["eta"]))
  if not float(s["lam"]) >= 0:
    raise ValueError(f"train.scorpio.lam must be >= 0, got {s['lam']}")
  _check_choice("train.scorpio.step_rule", s["step_rule"], regularizers.SCORPIO_STEP_RULES)


def _param_logits_fn(model: StepModel) -> Callable[[Array], Array]:
  # Differentiable in the parameters (the regulariser must be); the running statistics this
  # forward would update are discarded. Without BatchNorm (TinyCNN, MadryCNN) this is the
  # inference-mode model and the regularisers' HVPs are per example; with BatchNorm the batch
  # statistics couple the examples, as in the SOAR authors' code (train-mode regulariser).
  return lambda z: model.forward(z, model.batch_stats)[0]


@register("soar", validate=_validate_soar)
def soar(cfg, model: StepModel, batch: Batch) -> MethodLoss:
  """SOAR (Ma et al., arXiv:2004.01832): ``CE(f(x'), y) + lam R_SOAR(x')`` at the one-step PGD
  point ``x'`` (:func:`krylov_adv.regularizers.soar_regularizer`; hyperparameters
  ``cfg.soar``: lam, h, method, num_samples, init, init_step_size, grad_clip, norm_clip; the
  last clamps each example's ``||H~ z||_2``, see the regulariser).

  ``grad_clip = c > 0`` (following the authors' training code, which norm-clips the
  regulariser's own parameter gradient before adding the cross-entropy's; the value is ours):
  the parameter gradient of the loss is

      grad_theta CE + clip_c(grad_theta (lam mean_i R_SOAR(x'_i))),
      clip_c(v) = v min(1, c / ||v||_2)      (global L2 norm over the whole parameter pytree),

  obtained by evaluating the regulariser with the parameters routed through
  :func:`krylov_adv.regularizers.clip_gradient_norm` (an identity whose backward pass clips)
  and the cross-entropy with the plain ones. The loss value is unchanged. Needs
  ``model.params`` and ``model.apply`` (:func:`make_train_step` sets them). ``0`` or ``None``:
  no clipping. Weight decay is added by the optimiser, outside the clip.
  """
  kw = _attack_kwargs(cfg.soar)
  lam = float(kw.pop("lam"))
  grad_clip = kw.pop("grad_clip", None)
  k_init, k_z = jax.random.split(batch.key)
  x_exp = regularizers.soar_expansion_point(
      model.logits_fn, batch.x, batch.y, k_init, eps=cfg.eps, norm=cfg.norm,
      init=kw.pop("init"), init_step_size=kw.pop("init_step_size", None))
  logits, stats = model.forward(x_exp, model.batch_stats)
  ce = jnp.mean(losses.cross_entropy(logits, batch.y))
  if grad_clip:
    if model.params is None or model.apply is None:
      raise ValueError("train.soar.grad_clip needs StepModel.params and StepModel.apply")
    clipped = regularizers.clip_gradient_norm(model.params, float(grad_clip))
    # Same discarded-statistics convention as _param_logits_fn, through the clipped params.
    param_logits = lambda z: model.apply(clipped, z, model.batch_stats)[0]
  else:
    param_logits = _param_logits_fn(model)
  r = regularizers.soar_regularizer(lambda z: losses.cross_entropy(param_logits(z), batch.y),
                                    x_exp, k_z, eps=cfg.eps, norm=cfg.norm, **kw)
  # The clip acts on the cotangent reaching ``clipped``, i.e. on grad(lam * mean R).
  return MethodLoss(ce + lam * jnp.mean(r), logits, None, stats)


@register("scorpio", validate=_validate_scorpio)
def scorpio(cfg, model: StepModel, batch: Batch) -> MethodLoss:
  """SCORPIO (Tsiligkaridis and Roberts, arXiv:2009.04923): ``CE(f(x), y) + lam max Q`` with the
  worst case of the quadratic model found by Frank-Wolfe with HVPs
  (:func:`krylov_adv.regularizers.scorpio_regularizer`; hyperparameters ``cfg.scorpio``: lam,
  steps, step_rule, hvp, eta)."""
  kw = _attack_kwargs(cfg.scorpio)
  lam = float(kw.pop("lam"))
  logits, stats = model.forward(batch.x, model.batch_stats)
  ce = jnp.mean(losses.cross_entropy(logits, batch.y))
  param_logits = _param_logits_fn(model)
  r = regularizers.scorpio_regularizer(
      lambda z: losses.cross_entropy(param_logits(z), batch.y), batch.x, eps=cfg.eps,
      norm=cfg.norm, search_loss_fn=lambda z: losses.cross_entropy(model.logits_fn(z), batch.y),
      **kw)
  return MethodLoss(ce + lam * jnp.mean(r), logits, logits, stats)


# ---------------------------------------------------------------------------------------------
# Steps


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, cfg):
  """Builds the jitted training step of ``cfg.method`` (a registered method, see :func:`get`).

  Returns:
    ``step(state, x, y, key) -> (state, StepMetrics)`` (pure, jitted). ``x (B, H, W, C)``
    float32 in ``[0, 1]``, ``y (B,)`` int32; ``key`` is the run's key, folded with
    ``state.step`` so that the randomness of each step is a function of the step number (a
    resumed run draws the same attack noise as an uninterrupted one).
  """
  validate_train_config(cfg)
  method = get(cfg.method).loss

  @jax.jit
  def step(state: TrainState, x: Array, y: Array, key: Array):
    batch = Batch(x, y, jax.random.fold_in(key, state.step), state.step)
    # Attacks see the parameters at the start of the step through a closure, not through the
    # differentiated argument, so the outer gradient does not flow through them.
    logits_fn = inference_logits_fn(model, state.params, state.batch_stats)

    apply = lambda p, xb, stats: _train_forward(model, p, stats, xb)

    def loss_fn(params):
      forward = lambda xb, stats: apply(params, xb, stats)
      out = method(cfg, StepModel(logits_fn, forward, state.batch_stats, params, apply), batch)
      return out.loss, out

    (loss, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    acc = jnp.mean(jnp.argmax(out.logits, axis=1) == y)
    clean_acc = (jnp.nan if out.clean_logits is None
                 else jnp.mean(jnp.argmax(out.clean_logits, axis=1) == y))
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=out.batch_stats,
                              opt_state=opt_state)
    return new_state, StepMetrics(loss, acc, jnp.asarray(clean_acc, jnp.float32))

  return step
