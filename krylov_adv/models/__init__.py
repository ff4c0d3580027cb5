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


class Standardized(nn.Module):
  """``inner((x - mean) / std)``: a classifier trained on standardised inputs, called on pixels
  in ``[0, 1]`` (the RobustBench convention: the normalisation is the model's first layer, so
  attacks, budgets and tables stay in pixel units and the box stays ``[0, 1]``).

  ``mean``, ``std``: per-channel tuples (or one value each) broadcast against the last axis of
  ``x`` ``(B, H, W, C)``. The inner model's variables live under ``inner``.
  """
  inner: nn.Module
  mean: tuple
  std: tuple

  @nn.compact
  def __call__(self, x, train: bool = False):
    mean = jax.numpy.asarray(self.mean, x.dtype)
    std = jax.numpy.asarray(self.std, x.dtype)
    return self.inner((x - mean) / std, train=train)


def get(name: str, *, num_classes: int = 10, activation: str = "relu", normalize_mean=(),
        normalize_std=(), **kwargs: Any) -> nn.Module:
  """Builds the model registered under ``name``.

  Args:
    name: one of ``available()``: ``tiny_cnn``, ``madry_cnn``, ``resnet18``, ``wide_resnet``
      (``depth``, ``widen`` keyword arguments), ``wrn28_10``, ``wrn34_10``.
    num_classes: ``K``, the number of logits.
    activation: an activation name from ``ACTIVATIONS`` (``"relu"`` default).
    normalize_mean, normalize_std: per-channel mean and standard deviation (both empty: none);
      when given the model is :class:`Standardized`, ``inner((x - mean) / std)`` on pixels.
    **kwargs: architecture options (``width`` for ResNet, ``depth``/``widen`` for WideResNet).

  Returns:
    An unbound ``flax.linen.Module``.
  """
  ctor = _MODELS.get(name)
  if int(num_classes) != num_classes or num_classes < 2:
    raise ValueError(f"num_classes must be an integer >= 2, got {num_classes}")
  act = get_activation(activation) if isinstance(activation, str) else activation
  model = ctor(num_classes=int(num_classes), activation=act, **kwargs)
  mean, std = tuple(normalize_mean or ()), tuple(normalize_std or ())
  if not mean and not std:
    return model
  if not mean or not std or not all(float(v) > 0 for v in std):
    raise ValueError(f"model.normalize_mean and model.normalize_std must both be given, with "
                     f"std > 0; got mean={mean}, std={std}")
  return Standardized(model, tuple(float(v) for v in mean), tuple(float(v) for v in std))


__all__ = ["ACTIVATIONS", "MadryCNN", "ResNet", "ResNet18", "Standardized", "TinyCNN",
           "WideResNet", "available", "get", "get_activation", "register"]
