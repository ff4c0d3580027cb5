"""Small convolutional networks: the Madry et al. MNIST CNN and a tiny CNN for tests/quickstart.

Inputs are NHWC float images in [0, 1]; outputs are logits ``(B, num_classes)``. Neither model
has BatchNorm, so there is no train/inference distinction and examples never interact.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax

from krylov_adv.models import layers


class MadryCNN(nn.Module):
  """Madry et al. (2018) MNIST CNN: conv32-5x5, 2x2 max-pool, conv64-5x5, 2x2 max-pool,
  dense 1024, dense ``num_classes``. ``activation`` defaults to ReLU (softplus for smooth HVPs).
  The pools are :func:`krylov_adv.models.layers.max_pool` (``nn.max_pool``'s values and
  derivatives, without ``select_and_scatter``'s cost on the CPU backend)."""
  num_classes: int = 10
  activation: Callable[[jax.Array], jax.Array] = nn.relu

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train  # no BatchNorm/dropout: identical in training and inference
    act = self.activation
    x = act(nn.Conv(32, (5, 5), padding="SAME")(x))
    x = layers.max_pool(x, (2, 2))
    x = act(nn.Conv(64, (5, 5), padding="SAME")(x))
    x = layers.max_pool(x, (2, 2))
    x = x.reshape((x.shape[0], -1))
    x = act(nn.Dense(1024)(x))
    return nn.Dense(self.num_classes)(x)


class TinyCNN(nn.Module):
  """A few-thousand-parameter CNN for tests and the quickstart: conv8-3x3, pool, conv16-3x3,
  pool, dense 32, dense ``num_classes``."""
  num_classes: int = 10
  activation: Callable[[jax.Array], jax.Array] = nn.relu

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    act = self.activation
    x = act(nn.Conv(8, (3, 3), padding="SAME")(x))
    x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = act(nn.Conv(16, (3, 3), padding="SAME")(x))
    x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = act(nn.Dense(32)(x))
    return nn.Dense(self.num_classes)(x)
