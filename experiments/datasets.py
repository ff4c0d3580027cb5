"""One job: the analyses' data — a config's dataset as ``krylov_adv.data.load`` gives it, plus
relative roots resolved against the repository and an offline MNIST train/test split."""

from __future__ import annotations

import os

import ml_collections
import numpy as np

from krylov_adv import data as data_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def resolve_path(path: str) -> str:
  """``path`` as given when it exists, else relative to the repository root (so that
  ``../shared/data/mnist`` works from any working directory)."""
  if not path or os.path.exists(path) or os.path.isabs(path):
    return path
  return os.path.normpath(os.path.join(ROOT, path))


def load_data(data_cfg) -> data_lib.Dataset:
  """The dataset of ``data_cfg`` (``krylov_adv.data.load``), with two additions: relative roots
  resolve against the repository root, and ``test_split > 0`` with source ``idx`` builds the
  dataset from the ``t10k`` files alone: the first ``N - test_split`` images train, the last
  ``test_split`` are held out (the real MNIST test set is all that is available offline)."""
  c = ml_collections.ConfigDict(data_cfg.to_dict() if hasattr(data_cfg, "to_dict") else data_cfg)
  if "root" in c:
    c.root = resolve_path(c.root)
  split = int(c.get("test_split", 0) or 0)
  if c.source == "idx" and split > 0:
    x, y = data_lib.load_idx_split(c.root, "t10k")
    if not 0 < split < len(y):
      raise ValueError(f"data.test_split must lie in (0, {len(y)}), got {split}")
    return data_lib.Dataset(x[:-split], y[:-split], x[-split:], y[-split:], 10,
                            f"{c.get('name', 'idx')} (t10k split)")
  return data_lib.load(c)


def first_examples(dataset: data_lib.Dataset, n: int) -> tuple[np.ndarray, np.ndarray]:
  """The first ``n`` held-out images and labels (all of them when ``n`` exceeds the split)."""
  n = min(int(n), len(dataset.y_test))
  return dataset.x_test[:n], dataset.y_test[:n]
