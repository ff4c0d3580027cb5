"""Adversarial training: train state, optimiser, and one pure jitted step per method.

Methods (``train.method``):

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

The optimiser is SGD with momentum and L2 weight decay (``add_decayed_weights`` before the
momentum, like PyTorch's ``SGD(weight_decay=...)`` used by the papers), with a learning-rate
schedule from the config.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from krylov_adv import attacks, losses, projections

Array = jax.Array

METHODS = ("standard", "pgd", "trades", "soat", "mixed", "second_order")
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


# ---------------------------------------------------------------------------------------------
# Config validation


def _check_eps_norm(where: str, eps, norm: str) -> None:
  projections.check_norm(norm)
  if not float(eps) >= 0:
    raise ValueError(f"{where}: eps must be >= 0, got {eps}")


def validate_train_config(cfg) -> None:
  """Raises ``ValueError`` with a clear message for a bad ``train`` config.

  Checks the method name, the learning-rate schedule, positive sizes and rates, and ``eps``
  (``>= 0``) and ``norm`` (``linf | l2``) of the method's threat model.
  """
  if cfg.method not in METHODS:
    raise ValueError(f"unknown training method {cfg.method!r}; use one of {METHODS}")
  if cfg.lr_schedule not in SCHEDULES:
    raise ValueError(f"unknown lr_schedule {cfg.lr_schedule!r}; use one of {SCHEDULES}")
  for name in ("epochs", "batch_size"):
    if int(cfg[name]) != cfg[name] or cfg[name] < 1:
      raise ValueError(f"train.{name} must be an integer >= 1, got {cfg[name]}")
  if not float(cfg.learning_rate) > 0:
    raise ValueError(f"train.learning_rate must be > 0, got {cfg.learning_rate}")
  if not 0 <= float(cfg.momentum) < 1 or not float(cfg.weight_decay) >= 0:
    raise ValueError("train.momentum must lie in [0, 1) and train.weight_decay be >= 0")
  if cfg.method in ("pgd", "trades", "soat", "second_order"):
    _check_eps_norm(f"train ({cfg.method})", cfg.eps, cfg.norm)
  if cfg.method == "mixed":
    _check_eps_norm("train.mixed (linf)", cfg.mixed.eps_linf, "linf")
    _check_eps_norm("train.mixed (l2)", cfg.mixed.eps_l2, "l2")
  if cfg.method == "trades" and not float(cfg.trades.beta) >= 0:
    raise ValueError(f"train.trades.beta must be >= 0, got {cfg.trades.beta}")


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

  This is how every attack sees the model, in training steps and in evaluation.
  """
  variables = {"params": params}
  if batch_stats:
    variables["batch_stats"] = batch_stats
  return lambda x: model.apply(variables, x, train=False)


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


def make_adversary(cfg) -> Callable[..., Array] | None:
  """The inner maximisation of ``cfg.method`` as ``f(logits_fn, x, y, key, step) -> x_adv``.

  ``None`` for ``standard``. ``pgd``, ``soat`` and ``second_order`` call the registered attacks
  ``pgd``, ``soae`` and ``second_order`` with ``eps``, ``norm`` and the hyperparameters in
  ``cfg.pgd``, ``cfg.soat``, ``cfg.second_order``; ``mixed`` switches between Linf and L2 PGD on
  the parity of ``step``; ``trades`` calls the registered attack ``trades`` (its inner
  maximisation, :func:`krylov_adv.attacks.trades`) with ``cfg.trades`` less ``beta``.
  """
  method = cfg.method
  if method == "standard":
    return None
  if method == "trades":
    kw = _attack_kwargs(cfg.trades)
    kw.pop("beta")
    return lambda logits_fn, x, y, key, step: attacks.trades(
        logits_fn, x, y, key, eps=cfg.eps, norm=cfg.norm, **kw)
  if method == "mixed":
    m = cfg.mixed
    pgd = attacks.get("pgd")
    linf = functools.partial(pgd, eps=m.eps_linf, norm="linf", steps=m.steps,
                             step_size=m.step_size_linf)
    l2 = functools.partial(pgd, eps=m.eps_l2, norm="l2", steps=m.steps, step_size=m.step_size_l2)

    def mixed(logits_fn, x, y, key, step):
      return jax.lax.cond(step % 2 == 0, lambda: linf(logits_fn, x, y, key),
                          lambda: l2(logits_fn, x, y, key))

    return mixed
  name = {"pgd": "pgd", "soat": "soae", "second_order": "second_order"}.get(method)
  if name is None:
    raise ValueError(f"unknown training method {method!r}; use one of {METHODS}")
  attack = functools.partial(attacks.get(name), eps=cfg.eps, norm=cfg.norm,
                             **_attack_kwargs(cfg[method]))
  return lambda logits_fn, x, y, key, step: attack(logits_fn, x, y, key)


# ---------------------------------------------------------------------------------------------
# Steps


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, cfg):
  """Builds the jitted training step of ``cfg.method``.

  Returns:
    ``step(state, x, y, key) -> (state, StepMetrics)`` (pure, jitted). ``x (B, H, W, C)``
    float32 in ``[0, 1]``, ``y (B,)`` int32; ``key`` is the run's key, folded with
    ``state.step`` so that the randomness of each step is a function of the step number (a
    resumed run draws the same attack noise as an uninterrupted one).
  """
  validate_train_config(cfg)
  adversary = make_adversary(cfg)
  beta = float(cfg.trades.beta) if cfg.method == "trades" else 0.0

  def loss_fn(params, state, x, x_adv, y):
    if cfg.method == "standard":
      logits, stats = _train_forward(model, params, state.batch_stats, x)
      return jnp.mean(losses.cross_entropy(logits, y)), (logits, logits, stats)
    if cfg.method == "trades":
      # Two training-mode passes (clean then adversarial), each updating the running
      # statistics, as in the reference TRADES implementation.
      clean, stats = _train_forward(model, params, state.batch_stats, x)
      adv, stats = _train_forward(model, params, stats, x_adv)
      loss = losses.cross_entropy(clean, y) + beta * losses.kl_divergence(clean, adv)
      return jnp.mean(loss), (adv, clean, stats)
    logits, stats = _train_forward(model, params, state.batch_stats, x_adv)
    return jnp.mean(losses.cross_entropy(logits, y)), (logits, None, stats)

  @jax.jit
  def step(state: TrainState, x: Array, y: Array, key: Array):
    key = jax.random.fold_in(key, state.step)
    if adversary is None:
      x_adv = x
    else:
      logits_fn = inference_logits_fn(model, state.params, state.batch_stats)
      x_adv = jax.lax.stop_gradient(adversary(logits_fn, x, y, key, state.step))
    (loss, (logits, clean, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state, x, x_adv, y)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    acc = jnp.mean(jnp.argmax(logits, axis=1) == y)
    clean_acc = jnp.nan if clean is None else jnp.mean(jnp.argmax(clean, axis=1) == y)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=stats,
                              opt_state=opt_state)
    return new_state, StepMetrics(loss, acc, jnp.asarray(clean_acc, jnp.float32))

  return step


def make_eval_step(model: nn.Module):
  """``eval_step(state, x, y) -> number of correct predictions`` (int32 scalar), inference mode."""

  @jax.jit
  def eval_step(state: TrainState, x: Array, y: Array) -> Array:
    logits = inference_logits_fn(model, state.params, state.batch_stats)(x)
    return jnp.sum(jnp.argmax(logits, axis=1) == y)

  return eval_step
