"""Pieces shared by the benchmarks."""

from __future__ import annotations

import os

import numpy as np

from krylov_adv import data

MNIST_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data",
                         "mnist")


def mnist_or_noise(batch: int, seed: int, mnist_dir: str = MNIST_DIR):
  """The first ``batch`` genuine MNIST test images (float32 NHWC in [0, 1]) and labels when the
  IDX files are in ``mnist_dir``, else uniform noise and random labels; plus the source name."""
  try:
    x, y = data.load_idx_split(mnist_dir, "t10k")
    return x[:batch], y[:batch], "mnist_test"
  except FileNotFoundError:  # a corrupt file is an error, not a reason to time noise
    rng = np.random.default_rng(seed)
    return (rng.uniform(size=(batch, 28, 28, 1)).astype(np.float32),
            rng.integers(0, 10, batch).astype(np.int32), "uniform_noise")
