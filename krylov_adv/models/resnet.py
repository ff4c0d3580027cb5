"""ResNet-18 for small images (CIFAR-10 32x32, MNIST 28x28), He et al. (2016) with the CIFAR stem.

Stem: conv3x3 (no max-pool, so 32x32 inputs keep their resolution); four stages of two basic
blocks with ``width, 2 width, 4 width, 8 width`` channels (``width = 64`` is the standard model),
strides 1, 2, 2, 2; global average pool; dense ``num_classes``.

BatchNorm: ``train=True`` uses the batch statistics and updates the running averages (the
``batch_stats`` collection, mutable) -- this is how the training steps call the model.
``train=False`` uses the running averages, so examples never interact; every attack calls the
model this way (the per-example input Hessians are then block-diagonal over the batch).
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Activation = Callable[[jax.Array], jax.Array]


class BasicBlock(nn.Module):
  """Two 3x3 convolutions with BatchNorm and a (projected) identity shortcut."""
  features: int
  strides: int = 1
  activation: Activation = nn.relu

  @nn.compact
  def __call__(self, x, train: bool):
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                             epsilon=1e-5)
    conv = functools.partial(nn.Conv, use_bias=False)
    y = conv(self.features, (3, 3), strides=self.strides, padding=1)(x)
    y = self.activation(norm()(y))
    y = conv(self.features, (3, 3), padding=1)(y)
    y = norm()(y)
    if self.strides != 1 or x.shape[-1] != self.features:
      x = norm()(conv(self.features, (1, 1), strides=self.strides)(x))
    return self.activation(x + y)


class ResNet(nn.Module):
  """CIFAR-style ResNet of basic blocks. ``(B, H, W, C)`` in ``[0, 1]`` -> logits ``(B, K)``."""
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  num_classes: int = 10
  width: int = 64
  activation: Activation = nn.relu

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(self.width, (3, 3), padding=1, use_bias=False)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)(x)
    x = self.activation(x)
    for i, blocks in enumerate(self.stage_sizes):
      for j in range(blocks):
        strides = 2 if i > 0 and j == 0 else 1
        x = BasicBlock(self.width * 2**i, strides, self.activation)(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes)(x)


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2))
