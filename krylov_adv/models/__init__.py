"""Flax classifiers and the registry that builds them by name.

Every model maps NHWC images in ``[0, 1]`` to logits ``(B, num_classes)`` and is called as
``model.apply(variables, x, train=...)``. Models with BatchNorm (ResNet, WideResNet) carry a
``batch_stats`` collection: training steps call them with ``train=True`` (batch statistics,
running averages updated), attacks and evaluation with ``train=False`` (running averages, so the
examples of a batch never interact). ``MadryCNN`` and ``TinyCNN`` have no BatchNorm.

  model = models.get("resnet18", num_classes=10, activation="softplus")

:func:`as_logits_fn` turns a model and its parameters into an attack's ``logits_fn`` with the
parameters traced (Flax linen, Flax NNX, Equinox): ``as_logits_fn(model, variables, train=False)``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax

from krylov_adv.models.adapters import as_logits_fn
from krylov_adv.models.cnn import MadryCNN, TinyCNN
from krylov_adv.models.resnet import ResNet, ResNet18
from krylov_adv.models.wide_resnet import WideResNet
from krylov_adv.registry import Registry

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nn.relu,
    # A ReLU net is piecewise linear in its input, so the input Hessian of the cross-entropy
    # comes from the softmax alone (rank <= K - 1); smooth activations add curvature from every
    # layer, which is what the HVP ablations need.
    "softplus": nn.softplus,
    "gelu": nn.gelu,
    "silu": nn.silu,
    "elu": nn.elu,
    "tanh": nn.tanh,
}

_MODELS: Registry[Callable[..., nn.Module]] = Registry("model")
for _name, _ctor in (("tiny_cnn", TinyCNN), ("madry_cnn", MadryCNN), ("resnet18", ResNet18),
                     ("wide_resnet", WideResNet),
                     ("wrn28_10", functools.partial(WideResNet, depth=28, widen=10)),
                     ("wrn34_10", functools.partial(WideResNet, depth=34, widen=10))):
  _MODELS.add(_name, _ctor)


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
  """The activation function called ``name`` (``ValueError`` listing the known names)."""
  try:
    return ACTIVATIONS[name]
  except KeyError:
    raise ValueError(f"unknown activation {name!r}; available: {sorted(ACTIVATIONS)}") from None


def register(name: str):
  """Decorator adding a model constructor (``ctor(*, num_classes, activation, **options) ->
  nn.Module``, e.g. a Flax module class) to the registry under ``name``."""

  def wrap(ctor):
    _MODELS.add(name, ctor)
    return ctor

  return wrap


def available() -> list[str]:
  """Sorted names of the registered models."""
  return _MODELS.names()


def get(name: str, *, num_classes: int = 10, activation: str = "relu", **kwargs: Any) -> nn.Module:
  """Builds the model registered under ``name``.

  Args:
    name: one of ``available()``: ``tiny_cnn``, ``madry_cnn``, ``resnet18``, ``wide_resnet``
      (``depth``, ``widen`` keyword arguments), ``wrn28_10``, ``wrn34_10``.
    num_classes: ``K``, the number of logits.
    activation: an activation name from ``ACTIVATIONS`` (``"relu"`` default).
    **kwargs: architecture options (``width`` for ResNet, ``depth``/``widen`` for WideResNet).

  Returns:
    An unbound ``flax.linen.Module``.
  """
  ctor = _MODELS.get(name)
  if int(num_classes) != num_classes or num_classes < 2:
    raise ValueError(f"num_classes must be an integer >= 2, got {num_classes}")
  act = get_activation(activation) if isinstance(activation, str) else activation
  return ctor(num_classes=int(num_classes), activation=act, **kwargs)


__all__ = ["ACTIVATIONS", "MadryCNN", "ResNet", "ResNet18", "TinyCNN", "WideResNet",
           "available", "get", "get_activation", "register"]
