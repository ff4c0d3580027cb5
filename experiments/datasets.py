"""One job: the analyses' data — a config's dataset as ``krylov_adv.data.load`` gives it, plus
relative roots resolved against the repository, an offline MNIST train/test split, pixel
upsampling, and the choice of a bundled stand-in when a config's data files are missing."""

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
  ``test_split`` are held out (the real MNIST test set is all that is available offline). Either
  way the result is checked (``krylov_adv.data.check_dataset``): bad data is one ValueError."""
  c = ml_collections.ConfigDict(data_cfg.to_dict() if hasattr(data_cfg, "to_dict") else data_cfg)
  if "root" in c:
    c.root = resolve_path(c.root)
  factor = int(c.get("upsample", 1) or 1)
  split = int(c.get("test_split", 0) or 0)
  if c.source == "idx" and split > 0:
    x, y = data_lib.load_idx_split(c.root, "t10k")
    if not 0 < split < len(y):
      raise ValueError(f"data.test_split must lie in (0, {len(y)}), got {split}")
    ds = data_lib.check_dataset(data_lib.Dataset(x[:-split], y[:-split], x[-split:], y[-split:],
                                                 10, f"{c.get('name', 'idx')} (t10k split)"))
  else:
    ds = data_lib.load({k: v for k, v in c.items() if k != "upsample"})
  return upsample(ds, factor) if factor > 1 else ds


def upsample(ds: data_lib.Dataset, factor: int) -> data_lib.Dataset:
  """Every image ``(H, W, C)`` enlarged to ``(factor H, factor W, C)`` by repeating pixels
  (nearest neighbour: the values, and so the ``[0, 1]`` range, are unchanged)."""
  def up(x):
    return np.repeat(np.repeat(x, factor, axis=1), factor, axis=2)
  h, w = ds.x_test.shape[1:3]
  return ds._replace(x_train=up(ds.x_train), x_test=up(ds.x_test),
                     name=f"{ds.name} upsampled {factor}x to {factor * h}x{factor * w}")


IDX_TEST_FILES = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def missing_files(data_cfg) -> list[str]:
  """The files ``data_cfg`` needs that are not there: for the ``idx`` source with
  ``test_split`` the two ``t10k`` files (each optionally ``.gz``) under its resolved root; for
  every other source nothing is checked here (``krylov_adv.data`` reports its own errors)."""
  if data_cfg.source != "idx":
    return []
  root = resolve_path(str(data_cfg.get("root", "") or ""))
  stems = IDX_TEST_FILES if int(data_cfg.get("test_split", 0) or 0) > 0 else (
      "train-images-idx3-ubyte", "train-labels-idx1-ubyte") + IDX_TEST_FILES
  return [s for s in stems if not any(os.path.isfile(os.path.join(root, s + ext))
                                      for ext in (".gz", ""))]


def choose_data(config) -> tuple[ml_collections.ConfigDict, str]:
  """The config an analysis runs with, and one line saying which data that is.

  ``config`` itself when the files of ``config.data`` are present (:func:`missing_files`) or
  when it has no ``data_fallback``; otherwise a copy whose ``data`` and ``train`` fields are
  updated from ``config.data_fallback.{data, train}`` (a bundled stand-in, e.g. scikit-learn's
  digits upsampled, so that a fresh clone runs), with a line naming the missing files and how
  to get them. The copy's own ``data`` is what the trained-model cache is keyed by, so a model
  trained on the stand-in is never reused for the real data.
  """
  missing = missing_files(config.data)
  fallback = config.get("data_fallback")
  if not missing:
    return config, f"data: {config.data.source} {config.data.get('name', '')} " \
                   f"{resolve_path(str(config.data.get('root', '') or ''))}".rstrip()
  if not fallback:
    return config, ""
  chosen = ml_collections.ConfigDict(config.to_dict())
  with chosen.unlocked():
    for section in ("data", "train"):
      if section in fallback:
        for k, v in fallback[section].items():
          chosen[section][k] = v
    del chosen["data_fallback"]
  root = config.data.get("root", "")
  note = (f"data: {root!r} lacks {', '.join(m + '[.gz]' for m in missing)}, so this run uses "
          f"the bundled stand-in ({chosen.data.source}, upsampled "
          f"{int(chosen.data.get('upsample', 1) or 1)}x); for the real data put those MNIST "
          f"files (http://yann.lecun.com/exdb/mnist/) in {root or 'a folder'} or pass "
          f"--config.data.root=DIR")
  return chosen, note


def first_examples(dataset: data_lib.Dataset, n: int) -> tuple[np.ndarray, np.ndarray]:
  """The first ``n`` held-out images and labels (all of them when ``n`` exceeds the split)."""
  n = min(int(n), len(dataset.y_test))
  return dataset.x_test[:n], dataset.y_test[:n]
