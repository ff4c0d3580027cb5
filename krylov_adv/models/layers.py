"""Layers whose input gradients are cheap on every backend.

:func:`max_pool` is Flax's ``nn.max_pool`` for non-overlapping windows, written so that its
gradient does not go through XLA's ``select_and_scatter``. On the CPU backend
``select_and_scatter`` is a scalar loop nest: measured on the AutoAttack benchmark's MNIST CNN
(``benchmarks/bench_autoattack.py``, 500 images, warm), the backward pass of one 2x2 pool over
``(500, 28, 28, 16)`` took 105 ms against 4 ms for the strided-slice form below, and the whole
input gradient of the CNN 284 ms against 170 ms. Every attack, HVP and training step pays the
input or parameter gradient, so the models of :mod:`krylov_adv.models` use this one.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


def max_pool(x: jax.Array, window: Sequence[int]) -> jax.Array:
  """Max pooling over non-overlapping ``window`` tiles (stride = window, no padding).

  ``out[b, i, j, c] = max_{0 <= p < wh, 0 <= q < ww} x[b, i wh + p, j ww + q, c]``: the same
  values as ``nn.max_pool(x, window, strides=window)``, and the same gradient, ties included:
  the whole cotangent of a tile goes to its first maximal element in row-major order, as XLA's
  ``select_and_scatter`` (with the ``>=`` selector that ``nn.max_pool`` differentiates through)
  gives it. The tile's elements are strided slices folded with ``where(acc >= s, acc, s)``, so
  the gradient is a few elementwise selects (and the HVP, through ``jvp``, too).

  Spatial sizes that ``window`` does not divide fall back to ``nn.max_pool`` (VALID padding,
  trailing rows and columns dropped, the same as the fold would do).

  Args:
    x: ``(B, H, W, C)`` floats (any leading batch dims: ``(..., H, W, C)``).
    window: ``(wh, ww)`` positive ints.

  Returns:
    ``(..., H // wh, W // ww, C)``, ``x``'s dtype.
  """
  wh, ww = (int(w) for w in window)
  if wh < 1 or ww < 1:
    raise ValueError(f"window must be positive, got {tuple(window)}")
  h, w = x.shape[-3], x.shape[-2]
  if h % wh or w % ww:
    return nn.max_pool(x, (wh, ww), strides=(wh, ww))
  acc = None
  for p in range(wh):
    for q in range(ww):
      s = x[..., p::wh, q::ww, :]
      # ``>=`` keeps the earlier element on ties: the first maximum takes the gradient.
      acc = s if acc is None else jnp.where(acc >= s, acc, s)
  return acc
