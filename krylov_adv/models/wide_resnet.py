"""Wide residual networks WRN-depth-k (Zagoruyko and Komodakis, 2016), pre-activation blocks.

``depth = 6 n + 4``: a 3x3 stem with 16 channels, three stages of ``n`` blocks with
``16 k, 32 k, 64 k`` channels (strides 1, 2, 2), BN-activation, global average pool, dense.
WRN-28-10 and WRN-34-10 are the presets used by the adversarial-training literature.

BatchNorm: ``train=True`` (training steps) normalises with batch statistics and updates the
mutable ``batch_stats``; ``train=False`` (every attack, every evaluation) uses the running
averages so examples never interact.
"""

from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Activation = Callable[[jax.Array], jax.Array]


class WideBlock(nn.Module):
  """Pre-activation block: BN-act-conv3x3-BN-act-conv3x3 plus a (1x1-projected) shortcut."""
  features: int
  strides: int = 1
  activation: Activation = nn.relu

  @nn.compact
  def __call__(self, x, train: bool):
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                             epsilon=1e-5)
    conv = functools.partial(nn.Conv, use_bias=False)
    o = self.activation(norm()(x))
    y = conv(self.features, (3, 3), strides=self.strides, padding=1)(o)
    y = self.activation(norm()(y))
    y = conv(self.features, (3, 3), padding=1)(y)
    if self.strides != 1 or x.shape[-1] != self.features:
      # The projection reads the pre-activated input, as in the reference implementation.
      x = conv(self.features, (1, 1), strides=self.strides)(o)
    return x + y


class WideResNet(nn.Module):
  """WRN-``depth``-``widen``. ``(B, H, W, C)`` in ``[0, 1]`` -> logits ``(B, num_classes)``."""
  depth: int = 28
  widen: int = 10
  num_classes: int = 10
  activation: Activation = nn.relu

  @nn.compact
  def __call__(self, x, train: bool = False):
    if (self.depth - 4) % 6 != 0 or self.depth < 10:
      raise ValueError(f"WideResNet depth must be 6n + 4 with n >= 1, got {self.depth}")
    if self.widen < 1:
      raise ValueError(f"WideResNet widen factor must be >= 1, got {self.widen}")
    n = (self.depth - 4) // 6
    x = nn.Conv(16, (3, 3), padding=1, use_bias=False)(x)
    for i, features in enumerate((16 * self.widen, 32 * self.widen, 64 * self.widen)):
      for j in range(n):
        strides = 2 if i > 0 and j == 0 else 1
        x = WideBlock(features, strides, self.activation)(x, train)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)(x)
    x = self.activation(x)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes)(x)
