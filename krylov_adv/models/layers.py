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

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero


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


_NHWC = ("NHWC", "HWIO", "NHWC")


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides, padding,
                         lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
                         feature_group_count: int = 1, precision=None,
                         **kwargs) -> jax.Array:
  """``lax.conv_general_dilated`` with a faster forward pass for single-channel inputs.

  For ``lhs`` ``(B, H, W, 1)`` (NHWC, HWIO kernel ``(kh, kw, 1, C)``), unit strides and
  dilations and one feature group, the convolution
  ``out[b, h, w, c] = sum_{i, j} pad(lhs)[b, h + i, w + j, 0] rhs[i, j, 0, c]`` is computed as
  ``kh * kw`` shifted copies of the padded input scaled by the kernel's taps
  (:func:`_single_channel_conv`): XLA:CPU's convolution runs a one-channel input at a small
  fraction of its speed (measured on the AutoAttack benchmark's first layer, ``(500, 28, 28,
  1)`` to 16 channels, 5x5: 53 ms against 6 ms for the shifted sum). Derivatives of every order
  go through ``lax.conv_general_dilated`` (the custom JVP below), so gradients and HVPs cost
  what they cost with the plain convolution. The values agree with it to float rounding
  (summation order), not bit for bit.

  Everything else is passed to ``lax.conv_general_dilated`` unchanged. Pass it as
  ``nn.Conv(..., conv_general_dilated=layers.conv_general_dilated)``: the parameters keep
  ``nn.Conv``'s names and shapes.
  """
  simple = (lhs.ndim == 4 and lhs.shape[-1] == 1 and feature_group_count == 1
            and all(s == 1 for s in window_strides)
            and all(d == 1 for d in (lhs_dilation or (1, 1)))
            and all(d == 1 for d in (rhs_dilation or (1, 1)))
            and dimension_numbers == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
            and not kwargs)
  if not simple:
    return jax.lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count, precision=precision, **kwargs)
  if isinstance(padding, str):
    padding = jax.lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], (1, 1), padding)
  return _single_channel_conv(lhs, rhs, tuple(tuple(int(p) for p in pair) for pair in padding))


def _plain_conv(x: jax.Array, kernel: jax.Array, pads) -> jax.Array:
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), pads, dimension_numbers=_NHWC)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _single_channel_conv(x: jax.Array, kernel: jax.Array, pads) -> jax.Array:
  (top, bottom), (left, right) = pads
  kh, kw = kernel.shape[:2]
  xp = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
  ho, wo = xp.shape[1] - kh + 1, xp.shape[2] - kw + 1
  out = None
  for i in range(kh):
    for j in range(kw):
      term = xp[:, i:i + ho, j:j + wo, :] * kernel[i, j, 0]
      out = term if out is None else out + term
  return out


def _single_channel_conv_jvp(pads, primals, tangents):
  # The tangent map is the plain convolution, so reverse mode transposes XLA's convolution (its
  # backward passes are not slow) instead of 25 shifted slices; symbolic zeros skip the term of
  # the argument that is not differentiated (the kernel in an attack, the input in training).
  x, kernel = primals
  tx, tk = tangents
  y = _single_channel_conv(x, kernel, pads)
  terms = []
  if not isinstance(tx, SymbolicZero):
    terms.append(_plain_conv(tx, kernel, pads))
  if not isinstance(tk, SymbolicZero):
    terms.append(_plain_conv(x, tk, pads))
  return y, sum(terms[1:], terms[0]) if terms else jnp.zeros_like(y)


_single_channel_conv.defjvp(_single_channel_conv_jvp, symbolic_zeros=True)
