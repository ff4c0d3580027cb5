"""PSNR and SSIM (krylov_adv.metrics) against closed forms and an independent SciPy reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from krylov_adv import metrics

K1, K2 = 0.01, 0.03


def _ssim_scipy(x: np.ndarray, y: np.ndarray, data_range: float = 1.0) -> float:
  """Wang et al. (2004) SSIM of one (H, W) image pair, the way scikit-image computes it:
  scipy's Gaussian filter (sigma 1.5, truncate 3.5 -> 11 x 11), reflection padding, then the
  5-pixel border where the window leaves the image is cropped before averaging."""
  x = x.astype(np.float64)
  y = y.astype(np.float64)
  filt = lambda a: ndimage.gaussian_filter(a, sigma=1.5, truncate=3.5)
  mx, my = filt(x), filt(y)
  vx = filt(x * x) - mx * mx
  vy = filt(y * y) - my * my
  cxy = filt(x * y) - mx * my
  c1, c2 = (K1 * data_range)**2, (K2 * data_range)**2
  s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
  return float(s[5:-5, 5:-5].mean())


@pytest.fixture(scope="module")
def images():
  rng = np.random.default_rng(0)
  x = rng.random((4, 16, 13, 1))
  noise = 0.1 * rng.standard_normal(x.shape)
  y = np.clip(x + noise, 0, 1)
  return x.astype(np.float32), y.astype(np.float32)


def test_gaussian_window_matches_scipy_kernel():
  # The 11-tap kernel scipy uses for sigma 1.5, truncate 3.5: filter a unit impulse.
  impulse = np.zeros(21)
  impulse[10] = 1.0
  ref = ndimage.gaussian_filter1d(impulse, 1.5, truncate=3.5)[5:16]
  np.testing.assert_allclose(metrics.gaussian_window(11, 1.5), ref, rtol=1e-12)


@pytest.mark.parametrize("use_jit", [False, True])
def test_psnr_matches_hand_formula(images, use_jit):
  x, y = images
  fn = jax.jit(metrics.psnr) if use_jit else metrics.psnr
  got = np.asarray(fn(jnp.asarray(x), jnp.asarray(y)))
  mse = ((x.astype(np.float64) - y) ** 2).reshape(4, -1).mean(axis=1)
  np.testing.assert_allclose(got, 10 * np.log10(1.0 / mse), rtol=1e-5)
  # Range 255 on the same [0, 1] data adds 20 log10(255) dB.
  got255 = np.asarray(metrics.psnr(jnp.asarray(x), jnp.asarray(y), data_range=255.0))
  np.testing.assert_allclose(got255 - got, metrics.psnr_offset_for_range(255.0), rtol=1e-5)
  assert abs(metrics.psnr_offset_for_range(255.0) - 48.1308) < 1e-3


def test_psnr_constant_offset_closed_form():
  x = jnp.full((2, 12, 12, 1), 0.5)
  d = jnp.asarray([0.1, 0.01]).reshape(2, 1, 1, 1)
  got = np.asarray(metrics.psnr(x, x + d))
  np.testing.assert_allclose(got, [20.0, 40.0], rtol=1e-5)  # 10 log10(1 / d^2)
  assert np.isinf(np.asarray(metrics.psnr(x, x))).all()


def test_ssim_identical_images_is_one(images):
  x, _ = images
  np.testing.assert_allclose(np.asarray(metrics.ssim(jnp.asarray(x), jnp.asarray(x))), 1.0,
                             atol=1e-6)


def test_ssim_constant_images_closed_form():
  # Constant images a and b: every local variance and covariance is 0, so
  # SSIM = (2ab + C1) / (a^2 + b^2 + C1) * C2 / C2.
  a = np.array([0.5, 0.2, 0.9, 0.0])
  b = np.array([0.6, 0.8, 0.45, 0.3])  # shifts (0.1, 0.6) and scales (0.5, and 0 -> 0.3)
  with jax.enable_x64(True):
    x = jnp.asarray(np.broadcast_to(a[:, None, None, None], (4, 11, 14, 2)), jnp.float64)
    y = jnp.asarray(np.broadcast_to(b[:, None, None, None], (4, 11, 14, 2)), jnp.float64)
    got = np.asarray(metrics.ssim(x, y))
  c1 = K1**2
  np.testing.assert_allclose(got, (2 * a * b + c1) / (a**2 + b**2 + c1), rtol=1e-6)


def test_ssim_contrast_flip_closed_form():
  # y = 2 m - x with x = m + A s (s = +-1 checkerboard): equal local means, equal variances and
  # cov = -var, so the map is (-2 var + C2) / (2 var + C2) at every valid position, with var
  # the Gaussian-weighted variance of A s, which is A^2 (1 - mu_s^2); computed here by hand from
  # the window weights.
  m, amp = 0.5, 0.2
  i, j = np.meshgrid(np.arange(13), np.arange(13), indexing="ij")
  s = np.where((i + j) % 2 == 0, 1.0, -1.0)
  x = m + amp * s
  y = 2 * m - x
  w = metrics.gaussian_window()
  ww = np.outer(w, w)
  vals = []
  for r in range(3):
    for c in range(3):
      mu_s = float(np.sum(ww * s[r:r + 11, c:c + 11]))
      var = amp**2 * (1 - mu_s**2)
      mu_x = m + amp * mu_s
      mu_y = m - amp * mu_s
      lum = (2 * mu_x * mu_y + K1**2) / (mu_x**2 + mu_y**2 + K1**2)
      vals.append(lum * (-2 * var + K2**2) / (2 * var + K2**2))
  got = float(metrics.ssim(jnp.asarray(x[None, ..., None]), jnp.asarray(y[None, ..., None]))[0])
  np.testing.assert_allclose(got, np.mean(vals), rtol=1e-5)
  assert got < -0.5


@pytest.mark.parametrize("use_jit", [False, True])
def test_ssim_matches_scipy_reference(images, use_jit):
  x, y = images
  fn = jax.jit(metrics.ssim) if use_jit else metrics.ssim
  got = np.asarray(fn(jnp.asarray(x), jnp.asarray(y)))
  ref = [_ssim_scipy(x[i, ..., 0], y[i, ..., 0]) for i in range(len(x))]
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
  assert np.all(got < 1.0) and np.all(got > 0.0)


def test_ssim_multichannel_is_mean_of_channels():
  rng = np.random.default_rng(1)
  x = rng.random((2, 12, 12, 3)).astype(np.float32)
  y = np.clip(x + 0.05 * rng.standard_normal(x.shape), 0, 1).astype(np.float32)
  got = np.asarray(metrics.ssim(jnp.asarray(x), jnp.asarray(y)))
  ref = [np.mean([_ssim_scipy(x[b, ..., c], y[b, ..., c]) for c in range(3)]) for b in range(2)]
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
  # (B, H, W) input is the single-channel case.
  np.testing.assert_allclose(np.asarray(metrics.ssim(jnp.asarray(x[..., 0]),
                                                     jnp.asarray(y[..., 0]))),
                             [_ssim_scipy(x[b, ..., 0], y[b, ..., 0]) for b in range(2)],
                             rtol=1e-4, atol=1e-5)


def test_ssim_decreases_with_noise():
  rng = np.random.default_rng(2)
  x = rng.random((1, 16, 16, 1)).astype(np.float32)
  n = rng.standard_normal(x.shape).astype(np.float32)
  vals = [float(metrics.ssim(jnp.asarray(x), jnp.asarray(x + s * n))[0]) for s in (0.01, 0.1, 0.3)]
  assert vals[0] > vals[1] > vals[2]


def test_bad_input_raises():
  x = jnp.zeros((2, 12, 12, 1))
  with pytest.raises(ValueError, match="same shape"):
    metrics.psnr(x, jnp.zeros((2, 12, 11, 1)))
  with pytest.raises(ValueError, match="at least"):
    metrics.ssim(jnp.zeros((2, 8, 8, 1)), jnp.zeros((2, 8, 8, 1)))
  with pytest.raises(ValueError, match="NaN"):
    metrics.ssim(x, x.at[0, 0, 0, 0].set(jnp.nan))
  with pytest.raises(ValueError, match="data_range"):
    metrics.psnr(x, x, data_range=0.0)
  with pytest.raises(ValueError, match="odd"):
    metrics.ssim(x, x, win_size=10)
  with pytest.raises(ValueError, match="floating"):
    metrics.psnr(jnp.zeros((2, 3, 3), jnp.int32), jnp.zeros((2, 3, 3), jnp.int32))
