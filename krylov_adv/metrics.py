"""Perceptual distances between images and their adversarial versions: PSNR and SSIM.

Both are batched: images are ``(B, H, W, C)`` (or ``(B, H, W)``) float arrays and the result is
one value per example ``(B,)``. The SOAE paper reports both in its Table V (PSNR [36] and
SSIM [37] = Wang et al. 2004) for FGSM, PGD, AutoAttack and SOAE examples.

SSIM follows Wang, Bovik, Sheikh and Simoncelli (2004), "Image quality assessment: from error
visibility to structural similarity", Eq. (13) with the paper's defaults: an 11 x 11 circular
symmetric Gaussian window with standard deviation 1.5 (normalised to sum 1), ``K1 = 0.01``,
``K2 = 0.03``, ``C1 = (K1 L)^2``, ``C2 = (K2 L)^2`` with ``L`` the data range, population
(biased) local variances, the SSIM map evaluated at every position where the window fits inside
the image ("valid" positions, as in the authors' ``ssim_index.m``) and averaged (MSSIM, their
Eq. 17). Colour images average the per-channel maps. This is what
``skimage.metrics.structural_similarity(x, y, gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=1, channel_axis=-1)`` computes: skimage filters with
reflection padding and then crops ``(win_size - 1) / 2`` border pixels, which leaves exactly the
valid positions.

The arithmetic is DeepMind's ``dm-pix`` (``pix.psnr``, ``pix.ssim``), which computes exactly
this SSIM (separable Gaussian, "valid" windows, mean over rows, columns and channels; checked in
``tests/test_metrics.py`` against an independent SciPy transcription of skimage). It differs
from the formula above only by two rounding guards that change nothing but rounding: local
variances are clipped below at ``eps_float32^2`` and the covariance to ``|s_xy| <= s_x s_y``.
What this module adds is the batch convention (``(B, H, W)`` is a batch of grey images, where
``pix`` would read a rank-3 array as one ``(H, W, C)`` image), a data range other than 1 for
PSNR (``pix.psnr`` assumes 1), and input checks with readable messages.
"""

from __future__ import annotations

import functools
import math

import dm_pix as pix
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def _check_pair(x, y) -> None:
  if x.shape != y.shape:
    raise ValueError(f"images must have the same shape, got {x.shape} and {y.shape}")
  if x.ndim not in (3, 4):
    raise ValueError(f"expected a batch of images (B, H, W) or (B, H, W, C), got shape {x.shape}")
  for a in (x, y):
    if not jnp.issubdtype(a.dtype, jnp.floating):
      raise ValueError(f"images must be floating point, got dtype {a.dtype}")
    if not isinstance(a, jax.core.Tracer) and not np.all(np.isfinite(np.asarray(a))):
      raise ValueError("images contain NaN or inf")


def _check_range(data_range) -> None:
  if not float(data_range) > 0:
    raise ValueError(f"data_range must be > 0, got {data_range}")


@functools.partial(jax.jit, static_argnames=("data_range",))
def _psnr(x: Array, y: Array, data_range: float) -> Array:
  x, y = _with_channels(x, y)
  # pix.psnr is 10 log10(1 / MSE); a range L adds 20 log10(L). MSE = 0 (identical images)
  # gives +inf, the conventional PSNR of a perfect copy.
  return pix.psnr(x, y) + psnr_offset_for_range(data_range)


def psnr(x: Array, y: Array, *, data_range: float = 1.0) -> Array:
  """Peak signal-to-noise ratio per example, ``10 log10(L^2 / MSE_i)`` in dB.

  ``MSE_i = mean((x_i - y_i)^2)`` over all pixels and channels of example ``i``; ``L`` is the
  data range (1 for images in ``[0, 1]``, 255 for 8-bit images). Identical images give ``inf``.

  Args:
    x, y: float arrays of the same shape ``(B, H, W[, C])``.
    data_range: ``L > 0``.

  Returns:
    ``(B,)`` array of the promoted dtype of ``x`` and ``y``.
  """
  _check_pair(x, y)
  _check_range(data_range)
  return _psnr(x, y, float(data_range))


def gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
  """The 1-D Gaussian ``w_k ~ exp(-k^2 / (2 sigma^2))``, ``k = -(size-1)/2 .. (size-1)/2``,
  normalised to sum 1. ``(size,)`` float64; the 2-D window is its outer product with itself
  (which is Wang et al.'s normalised 11 x 11 Gaussian for the defaults, and what ``pix.ssim``
  filters with)."""
  if int(size) != size or size < 1 or size % 2 == 0:
    raise ValueError(f"window size must be an odd integer >= 1, got {size}")
  if not sigma > 0:
    raise ValueError(f"sigma must be > 0, got {sigma}")
  k = np.arange(size, dtype=np.float64) - (size - 1) / 2
  w = np.exp(-(k * k) / (2.0 * sigma * sigma))
  return w / w.sum()


def _with_channels(x: Array, y: Array) -> tuple[Array, Array]:
  """``(B, H, W)`` -> ``(B, H, W, 1)`` in the promoted float dtype; ``pix`` reads rank 3 as one
  ``(H, W, C)`` image, our rank 3 is a batch of grey images."""
  dtype = jnp.result_type(x.dtype, y.dtype)
  x, y = x.astype(dtype), y.astype(dtype)
  if x.ndim == 3:
    x, y = x[..., None], y[..., None]
  return x, y


@functools.partial(jax.jit, static_argnames=("data_range", "win_size", "sigma", "k1", "k2"))
def _ssim(x: Array, y: Array, data_range: float, win_size: int, sigma: float, k1: float,
          k2: float) -> Array:
  x, y = _with_channels(x, y)
  return pix.ssim(x, y, max_val=data_range, filter_size=win_size, filter_sigma=sigma, k1=k1,
                  k2=k2)


def ssim(x: Array, y: Array, *, data_range: float = 1.0, win_size: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> Array:
  """Mean structural similarity (Wang et al. 2004, Eqs. 13 and 17) per example.

  ``SSIM(p) = (2 mu_x mu_y + C1)(2 s_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 + C2))``
  where ``mu``, ``s^2`` and ``s_xy`` are Gaussian-weighted local means, variances and the
  covariance around pixel ``p`` (window ``win_size`` x ``win_size``, standard deviation
  ``sigma``), ``C1 = (k1 L)^2``, ``C2 = (k2 L)^2``; the result is the mean of the map over
  all valid window positions (and channels).

  Args:
    x, y: float arrays of the same shape ``(B, H, W)`` or ``(B, H, W, C)`` with ``H, W >=
      win_size`` (SSIM is undefined on images smaller than its window).
    data_range: ``L > 0``, 1 for images in ``[0, 1]``.
    win_size: odd window size (11 in Wang et al.).
    sigma: Gaussian standard deviation (1.5).
    k1, k2: stabilising constants (0.01, 0.03).

  Returns:
    ``(B,)`` array in ``[-1, 1]``; 1 exactly when ``x_i == y_i``.
  """
  _check_pair(x, y)
  _check_range(data_range)
  gaussian_window(win_size, sigma)  # validates size and sigma
  h, w = x.shape[1], x.shape[2]
  if h < win_size or w < win_size:
    raise ValueError(f"SSIM with a {win_size} x {win_size} window needs images of at least that "
                     f"size, got {h} x {w}")
  if not (k1 > 0 and k2 > 0):
    raise ValueError(f"k1 and k2 must be > 0, got {k1}, {k2}")
  return _ssim(x, y, float(data_range), int(win_size), float(sigma), float(k1), float(k2))


def psnr_offset_for_range(data_range: float) -> float:
  """``20 log10(L)``: what a PSNR computed with data range ``L`` adds to the one with range 1
  for the same images (e.g. +48.13 dB for ``L = 255`` on ``[0, 1]`` images)."""
  _check_range(data_range)
  return 20.0 * math.log10(data_range)


__all__ = ["gaussian_window", "psnr", "psnr_offset_for_range", "ssim"]
