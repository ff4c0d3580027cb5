"""Layers whose input gradients are cheap on every backend.

:func:`max_pool` is Flax's ``nn.max_pool`` for non-overlapping windows with a derivative that
does not go through XLA's ``select_and_scatter``. On the CPU backend ``select_and_scatter`` is a
scalar loop nest: measured on the AutoAttack benchmark's MNIST CNN
(``benchmarks/bench_autoattack.py``: conv16-pool-conv32-pool-dense128-dense10, 500 images, warm),
the input gradient of the CNN took 265 ms with ``nn.max_pool`` and 117 ms with this one, its HVP
326 ms and 171 ms, with identical values; the forward pass is the same operation in both. Every
attack, HVP and training step pays the input or parameter gradient, so the models of
:mod:`krylov_adv.models` use this one.
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


def max_pool(x: jax.Array, window: Sequence[int]) -> jax.Array:
  """Max pooling over non-overlapping ``window`` tiles (stride = window, no padding).

  ``out[..., i, j, c] = max_{0 <= p < wh, 0 <= q < ww} x[..., i wh + p, j ww + q, c]``, computed
  by ``nn.max_pool(x, window, strides=window)`` (trailing rows and columns that ``window`` does
  not divide are dropped, as its VALID padding does). The derivative is a custom JVP: the
  tangent of a tile is the tangent of its first maximal element in row-major order (the tile's
  strided slices folded with ``where(acc >= s, acc, s)``), the rule ``select_and_scatter`` (with
  the ``>=`` selector ``nn.max_pool`` differentiates through) gives the gradient, ties included.
  That tangent map is a few elementwise selects and strided slices, and so is its transpose,
  the gradient; second-order derivatives (the HVP, ``jvp`` of ``grad``) go through it too.

  Args:
    x: ``(..., H, W, C)`` floats.
    window: ``(wh, ww)`` positive ints.

  Returns:
    ``(..., H // wh, W // ww, C)``, ``x``'s dtype.
  """
  wh, ww = (int(w) for w in window)
  if wh < 1 or ww < 1:
    raise ValueError(f"window must be positive, got {tuple(window)}")
  h, w = x.shape[-3], x.shape[-2]
  return _tiled_max(x[..., :h - h % wh, :w - w % ww, :], (wh, ww))


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _tiled_max(x: jax.Array, window: tuple[int, int]) -> jax.Array:
  # The forward pass stays XLA's reduce_window (as fast as anything here, also inside loops).
  return nn.max_pool(x, window, strides=window)


@_tiled_max.defjvp
def _tiled_max_jvp(window, primals, tangents):
  (x,), (t,) = primals, tangents
  wh, ww = window
  best = tangent = None
  for p in range(wh):
    for q in range(ww):
      s, u = x[..., p::wh, q::ww, :], t[..., p::wh, q::ww, :]
      if best is None:
        best, tangent = s, u
      else:
        keep = best >= s  # ties keep the earlier element: the first maximum takes the tangent
        best, tangent = jnp.where(keep, best, s), jnp.where(keep, tangent, u)
  return _tiled_max(x, window), tangent
