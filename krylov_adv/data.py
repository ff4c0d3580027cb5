"""Datasets as in-memory arrays, and seeded epoch iterators with optional CIFAR augmentation.

Every source returns a ``Dataset`` whose images are float32 NHWC in ``[0, 1]`` and whose labels
are int32 in ``[0, num_classes)``; ``load`` checks that contract for every source
(``check_dataset``: finite pixels in ``[0, 1]``, whole labels in range, one image shape, no
empty split) and refuses bad data with one ``ValueError``. Sources (``cfg.source``), each
registered by name (``register``, ``get``, ``available``; ``load(cfg)`` picks one):

* ``tfds``: ``mnist``, ``fashion_mnist``, ``cifar10`` through tensorflow-datasets (needs the
  prepared data or internet). Uses ``tfds.load`` when TensorFlow is installed and the
  TensorFlow-free ``tfds.data_source`` otherwise.
* ``idx``: a folder of raw MNIST-format files ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``
  (MNIST and Fashion-MNIST ship in this format); integer pixels are divided by 255,
  floating-point ones taken as they are.
* ``cifar10_python``: a folder of the CIFAR-10 python batches (``data_batch_1..5``,
  ``test_batch``). They are pickles by format; they are read by a restricted unpickler that
  builds only the numpy arrays and builtin containers they hold and refuses anything else.
* ``digits``: scikit-learn's bundled 8x8 digits (1,797 images; no download), fixed split.
* ``synthetic``: deterministic random images of any shape, labels from a fixed random linear
  rule so a model can learn them (tests).

A bad source config (unknown source, no ``data.root``, a root without the expected files) is
one ``ValueError`` that names the field and the file expected.

Batching: ``epoch_batches`` yields the batches of one epoch in an order that is a pure function of
``(seed, epoch)``, so a run resumed from the checkpoint of epoch ``e`` sees exactly the batches an
uninterrupted run sees.
"""

from __future__ import annotations

import gzip
import os
import pickle
from typing import Any, Callable, Iterator, NamedTuple

import numpy as np

from krylov_adv.registry import Registry

TFDS_NAMES = ("mnist", "fashion_mnist", "cifar10")

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


class Dataset(NamedTuple):
  """Train and test arrays of one dataset.

  x_train: ``(N, H, W, C)`` float32 in ``[0, 1]``; y_train: ``(N,)`` int32.
  x_test: ``(M, H, W, C)`` float32 in ``[0, 1]``; y_test: ``(M,)`` int32.
  num_classes: ``K``; name: a label for logs.
  """
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int
  name: str


def _scaled_images(x: np.ndarray) -> np.ndarray:
  """Pixels as float32: integer pixels (0..255, e.g. uint8) divided by 255, floating-point ones
  taken as they are (already in ``[0, 1]``; dividing them again would silently darken them)."""
  x = np.asarray(x)
  if np.issubdtype(x.dtype, np.integer):
    return x.astype(np.float32) / np.float32(255.0)
  if not np.issubdtype(x.dtype, np.floating):
    raise ValueError(f"images must be integer (0..255) or floating-point pixels, got dtype "
                     f"{x.dtype}")
  return x.astype(np.float32)


def _integer_labels(y, what: str) -> np.ndarray:
  """Labels as int64. Floating-point labels must be whole numbers (``2.7`` is an error, not
  silently truncated to ``2``); NaN/inf and other dtypes are errors naming ``what``."""
  y = np.asarray(y)
  if np.issubdtype(y.dtype, np.integer):
    return y.astype(np.int64)
  if not np.issubdtype(y.dtype, np.floating):
    raise ValueError(f"{what}: labels must be integers, got dtype {y.dtype}")
  if not np.all(np.isfinite(y)):
    raise ValueError(f"{what}: labels contain NaN or inf")
  fractional = np.flatnonzero(y != np.round(y))
  if fractional.size:
    i = int(fractional[0])
    raise ValueError(f"{what}: labels must be whole numbers, got {y.flat[i]} at index {i} "
                     f"({fractional.size} fractional labels)")
  return y.astype(np.int64)


def _check_pixels(x: np.ndarray, what: str, scaling: str = "") -> None:
  """``ValueError`` naming ``what`` unless every pixel of ``x`` is finite and in ``[0, 1]``
  (``scaling``, e.g. ``" (int16 integer pixels divided by 255)"``, ends the range message)."""
  if not x.size:
    return
  lo, hi = x.min(), x.max()  # NaN propagates into both; one pass each over the data
  if lo >= 0 and hi <= 1:
    return
  if not np.all(np.isfinite(x)):
    raise ValueError(f"{what}: images contain NaN or inf")
  raise ValueError(f"{what}: pixel values must lie in [0, 1], got range [{lo}, {hi}]{scaling}")


def check_dataset(ds: Dataset) -> Dataset:
  """Checks the :class:`Dataset` contract every source must keep, and returns ``ds``.

  Raises ``ValueError`` (one line naming the dataset and split) unless: images are float32
  ``(N, H, W, C)``, finite and in ``[0, 1]``; labels are int32 ``(N,)`` in ``[0, K)`` with
  ``K = num_classes >= 1``; train and test images have one shape ``(H, W, C)``; neither split
  is empty (training would die on ``batch_size must lie in [1, 0]``, evaluation on 0/0).
  :func:`load` applies it to every source, registered ones included.
  """
  k = ds.num_classes
  if isinstance(k, bool) or int(k) != k or k < 1:
    raise ValueError(f"{ds.name}: num_classes must be an integer >= 1, got {k}")
  for split, x, y in (("train", ds.x_train, ds.y_train), ("test", ds.x_test, ds.y_test)):
    what = f"{ds.name} {split} split"
    x, y = np.asarray(x), np.asarray(y)
    if x.dtype != np.float32:
      raise ValueError(f"{what}: images must be float32 in [0, 1], got dtype {x.dtype}")
    if y.dtype != np.int32:
      raise ValueError(f"{what}: labels must be int32, got dtype {y.dtype}")
    if x.ndim != 4 or y.ndim != 1 or x.shape[0] != y.shape[0]:
      raise ValueError(f"{what}: images {x.shape} and labels {y.shape} do not match (expected "
                       f"(N, H, W, C) and (N,))")
    if not y.size:
      raise ValueError(f"{what} is empty: a dataset needs training and test examples")
    _check_pixels(x, what)
    if y.min() < 0 or y.max() >= k:
      raise ValueError(f"{what}: labels must lie in [0, {k}), got range [{y.min()}, {y.max()}]")
  if ds.x_train.shape[1:] != ds.x_test.shape[1:]:
    raise ValueError(f"{ds.name}: train images {ds.x_train.shape[1:]} and test images "
                     f"{ds.x_test.shape[1:]} differ in shape")
  return ds


def _finish(x_tr, y_tr, x_te, y_te, num_classes: int, name: str) -> Dataset:
  """The checked :class:`Dataset` from a built-in source's arrays: pixels scaled
  (:func:`_scaled_images`), rank-3 images given a channel axis, labels checked whole and in
  range before the cast to int32 (so that 2**32 + 1 cannot wrap into range)."""
  def images(x):
    x = _scaled_images(x)
    return x[..., None] if x.ndim == 3 else x

  def labels(y, split):
    y = _integer_labels(y, f"{name} {split} split")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
      raise ValueError(f"{name} {split} split: labels must lie in [0, {num_classes}), got range "
                       f"[{y.min()}, {y.max()}]")
    return y.astype(np.int32)

  return check_dataset(Dataset(images(x_tr), labels(y_tr, "train"), images(x_te),
                               labels(y_te, "test"), int(num_classes), name))


# ---------------------------------------------------------------------------------------------
# IDX (MNIST / Fashion-MNIST raw files)


def read_idx(path: str) -> np.ndarray:
  """Reads one IDX file (gzip-compressed when the name ends in ``.gz``).

  Format (LeCun et al.): 2 zero bytes, a type code (0x08 = uint8, ...), the number of dimensions
  ``d``, ``d`` big-endian uint32 sizes, then the data in C order.

  Returns:
    The array with the stored shape and dtype (uint8 for MNIST images ``(N, 28, 28)`` and labels
    ``(N,)``).

  Raises:
    FileNotFoundError: ``path`` does not exist.
    ValueError: the file is not a valid IDX file (bad magic, truncated, corrupt gzip); the
      message names the file.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"IDX file not found: {path}")
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      raw = f.read()
  except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
    raise ValueError(f"cannot read IDX file {path}: {e}") from None
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
    raise ValueError(f"{path} is not an IDX file (bad magic number {raw[:4]!r})")
  ndim = raw[3]
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise ValueError(f"{path}: truncated IDX header")
  shape = tuple(int(s) for s in np.frombuffer(raw, ">u4", count=ndim, offset=4))
  dtype = np.dtype(_IDX_DTYPES[raw[2]])
  expected = int(np.prod(shape)) * dtype.itemsize
  if len(raw) - header != expected:
    raise ValueError(f"{path}: IDX header says shape {shape} ({expected} bytes of data) but the "
                     f"file holds {len(raw) - header} bytes (truncated or corrupt)")
  return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
              "t10k-labels-idx1-ubyte")


def _check_root(root: str, source: str, expected: str) -> None:
  """``ValueError`` naming ``data.root`` unless ``root`` is an existing folder."""
  if not root:
    raise ValueError(f"data.root must name the folder of the {source} files ({expected})")
  if not os.path.isdir(root):
    raise ValueError(f"data.root {root!r} is not a folder; the {source} source expects one "
                     f"holding {expected}")


def _find_idx(root: str, stem: str) -> str | None:
  for name in (stem + ".gz", stem):
    if os.path.isfile(os.path.join(root, name)):
      return os.path.join(root, name)
  return None


def _idx_path(root: str, split: str, kind: str) -> str:
  stem = f"{split}-{kind}-ubyte"
  return _find_idx(root, stem) or os.path.join(root, stem + ".gz")  # read_idx reports it missing


def load_idx_split(root: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """Images ``(N, 28, 28, 1)`` float32 in ``[0, 1]`` and labels ``(N,)`` int32 of one IDX split.

  ``split`` is the file prefix: ``"train"`` or ``"t10k"``. Integer pixels (uint8, as MNIST
  ships; int8/int16/int32 holding 0..255) are divided by 255; floating-point pixels (IDX types
  0x0D/0x0E) are taken as they are. A missing file is a ``FileNotFoundError`` (from
  :func:`read_idx`); :func:`load_idx` checks the whole folder first. ``ValueError`` naming the
  file for pixels that are NaN/inf or outside ``[0, 1]`` after that scaling, and for labels
  that are negative or fractional (float label files must hold whole numbers).
  """
  img_path = _idx_path(root, split, "images-idx3")
  lbl_path = _idx_path(root, split, "labels-idx1")
  images, labels = read_idx(img_path), read_idx(lbl_path)
  if images.ndim != 3 or labels.ndim != 1:
    raise ValueError(f"{img_path}: expected images (N, H, W) and labels (N,), got {images.shape}"
                     f" and {labels.shape}")
  if images.shape[0] != labels.shape[0]:
    raise ValueError(f"{img_path} has {images.shape[0]} images but {lbl_path} has "
                     f"{labels.shape[0]} labels")
  x = _scaled_images(images)[..., None]
  scaling = ("integer pixels divided by 255" if np.issubdtype(images.dtype, np.integer)
             else "floating-point pixels taken as they are")
  _check_pixels(x, img_path, f" ({images.dtype} {scaling})")
  y = _integer_labels(labels, lbl_path)
  if y.size and (y.min() < 0 or y.max() > np.iinfo(np.int32).max):
    raise ValueError(f"{lbl_path}: labels must be >= 0, got range [{y.min()}, {y.max()}]")
  return x, y.astype(np.int32)


def load_idx(root: str, name: str = "idx") -> Dataset:
  """MNIST-format folder -> ``Dataset`` (``train-*`` files for training, ``t10k-*`` for test).

  Raises ``ValueError`` naming ``data.root`` and the file expected when one is missing.
  """
  expected = ", ".join(_IDX_FILES) + " (each optionally .gz)"
  _check_root(root, "idx", expected)
  for stem in _IDX_FILES:
    if _find_idx(root, stem) is None:
      raise ValueError(f"data.root {root!r} has no {stem}[.gz]; the idx source expects "
                       f"{expected}")
  x_tr, y_tr = load_idx_split(root, "train")
  x_te, y_te = load_idx_split(root, "t10k")
  return _finish(x_tr, y_tr, x_te, y_te, 10, name)


# ---------------------------------------------------------------------------------------------
# CIFAR-10 python batches

_CIFAR_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)


def _numpy_pickle_globals() -> dict[tuple[str, str], Any]:
  """The numpy callables a pickled ``ndarray`` refers to, under the module names that numpy 1
  (``numpy.core``, the name in the published CIFAR-10 files) and numpy 2 (``numpy._core``)
  write."""
  try:
    from numpy._core import multiarray, numeric  # numpy >= 2
  except ImportError:  # pragma: no cover - numpy 1
    from numpy.core import multiarray, numeric
  table = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
  # pylint: disable=protected-access
  for core in ("numpy.core", "numpy._core"):
    # Protocols 2-4: _reconstruct(ndarray, (0,), b"b") then ndarray.__setstate__.
    table[(f"{core}.multiarray", "_reconstruct")] = multiarray._reconstruct
    # Protocol 5: _frombuffer(buffer, dtype, shape, order).
    table[(f"{core}.numeric", "_frombuffer")] = numeric._frombuffer
  return table


class _RefusedGlobal(pickle.UnpicklingError):
  """A pickle named a global that :class:`CifarUnpickler` does not admit."""


class CifarUnpickler(pickle.Unpickler):
  """An unpickler for the CIFAR-10 python batches that builds nothing but what they hold.

  A batch is a dict of bytes keys to a ``uint8`` ``ndarray`` (``b"data"``), lists of ints and
  bytes, and bytes. Dicts, lists, bytes and ints are pickle opcodes; the only globals such a
  file names are numpy's array constructors (``ndarray``, ``dtype``, ``_reconstruct``, and
  ``_frombuffer`` for a protocol-5 re-save). Any other global (``os.system``, ``builtins.eval``,
  ...) raises ``pickle.UnpicklingError`` before anything is called.
  """

  _ALLOWED = _numpy_pickle_globals()

  def find_class(self, module: str, name: str):
    try:
      return self._ALLOWED[(module, name)]
    except KeyError:
      raise _RefusedGlobal(
          f"refusing to load global {module}.{name}: a CIFAR-10 python batch holds only numpy "
          "arrays, lists, bytes and ints") from None


def _read_cifar_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
  try:
    with open(path, "rb") as f:
      d = CifarUnpickler(f, encoding="bytes").load()
    data = np.asarray(d[b"data"], np.uint8)
    labels = np.asarray(d[b"labels"], np.int64)
  except _RefusedGlobal as e:
    raise pickle.UnpicklingError(f"{path}: {e}") from None
  except Exception as e:  # pickle raises many types on garbage input
    raise ValueError(f"{path} is not a CIFAR-10 python batch: {type(e).__name__}: {e}") from None
  if data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] != labels.shape[0]:
    raise ValueError(f"{path}: expected data (N, 3072) and N labels, got {data.shape} and "
                     f"{labels.shape}")
  # Rows are channel-major (1024 red, 1024 green, 1024 blue), each 32x32 row-major.
  return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def load_cifar10_python(root: str) -> Dataset:
  """Folder of ``data_batch_1..5`` and ``test_batch`` (or their parent ``cifar-10-batches-py``).

  Raises:
    ValueError: ``root`` is not a folder or lacks a batch (the message names ``data.root`` and
      the file), or a batch is not a CIFAR-10 batch.
    pickle.UnpicklingError: a batch names a global other than numpy's array constructors
      (:class:`CifarUnpickler`); nothing in it is called.
  """
  expected = "data_batch_1..5 and test_batch, or a cifar-10-batches-py folder holding them"
  _check_root(root, "cifar10_python", expected)
  if os.path.isdir(os.path.join(root, "cifar-10-batches-py")):
    root = os.path.join(root, "cifar-10-batches-py")
  for name in _CIFAR_FILES:
    if not os.path.isfile(os.path.join(root, name)):
      raise ValueError(f"data.root {root!r} has no CIFAR-10 batch {name!r}; expected {expected}")
  train = [_read_cifar_batch(os.path.join(root, name)) for name in _CIFAR_FILES[:5]]
  x_te, y_te = _read_cifar_batch(os.path.join(root, "test_batch"))
  x_tr = np.concatenate([t[0] for t in train])
  y_tr = np.concatenate([t[1] for t in train])
  return _finish(x_tr, y_tr, x_te, y_te, 10, "cifar10")


# ---------------------------------------------------------------------------------------------
# tensorflow-datasets


def _tfds_split(tfds, name: str, split: str, data_dir: str | None):
  try:
    import tensorflow  # noqa: F401  pylint: disable=unused-import
    has_tf = True
  except ImportError:
    has_tf = False
  if has_tf:
    arrays = tfds.as_numpy(tfds.load(name, split=split, batch_size=-1, data_dir=data_dir))
    return arrays["image"], arrays["label"]
  # Without TensorFlow: random-access ArrayRecord source, read example by example.
  src = tfds.data_source(name, split=split, data_dir=data_dir)
  examples = [src[i] for i in range(len(src))]
  return (np.stack([e["image"] for e in examples]), np.asarray([e["label"] for e in examples]))


def load_tfds(name: str, data_dir: str | None = None) -> Dataset:
  """``mnist``, ``fashion_mnist`` or ``cifar10`` from tensorflow-datasets (train and test)."""
  if name not in TFDS_NAMES:
    raise ValueError(f"unknown tfds dataset {name!r}; supported: {TFDS_NAMES}")
  import tensorflow_datasets as tfds  # heavy import, only for this source
  x_tr, y_tr = _tfds_split(tfds, name, "train", data_dir)
  x_te, y_te = _tfds_split(tfds, name, "test", data_dir)
  return _finish(x_tr, y_tr, x_te, y_te, 10, name)


# ---------------------------------------------------------------------------------------------
# Bundled and synthetic data


def load_digits(*, num_test: int = 397, seed: int = 0) -> Dataset:
  """scikit-learn's 8x8 digits scaled to ``[0, 1]`` (pixel / 16), a fixed seeded split.

  Returns ``(1797 - num_test)`` training and ``num_test`` test images of shape ``(8, 8, 1)``.
  """
  from sklearn.datasets import load_digits as sk_load_digits  # bundled: no download
  d = sk_load_digits()
  x = (d.images / 16.0).astype(np.float32)[..., None]
  y = d.target.astype(np.int32)
  if not 0 < num_test < len(y):
    raise ValueError(f"num_test must lie in (0, {len(y)}), got {num_test}")
  perm = np.random.default_rng(seed).permutation(len(y))
  tr, te = perm[num_test:], perm[:num_test]
  return _finish(x[tr], y[tr], x[te], y[te], 10, "digits")


def synthetic(*, num_train: int = 256, num_test: int = 64, shape=(8, 8, 1), num_classes: int = 10,
              seed: int = 0) -> Dataset:
  """Deterministic random images ``U[0, 1]^shape`` with labels ``argmax(W x)`` for a fixed random
  ``W`` (so the labels are learnable). Same ``seed`` -> identical arrays."""
  rng = np.random.default_rng(seed)
  shape = tuple(int(s) for s in shape)
  if len(shape) != 3:
    raise ValueError(f"synthetic shape must be (H, W, C), got {shape}")
  x = rng.random((num_train + num_test,) + shape, dtype=np.float32)
  w = rng.standard_normal((int(np.prod(shape)), num_classes)).astype(np.float32)
  flat = x.reshape(len(x), -1)
  y = np.argmax((flat - 0.5) @ w, axis=1)
  return _finish(x[:num_train], y[:num_train], x[num_train:], y[num_train:], num_classes,
                 "synthetic")


# ---------------------------------------------------------------------------------------------
# Registry of sources


class Source(NamedTuple):
  """A registered data source: ``load(c) -> Dataset`` and ``validate(c)`` (raises
  ``ValueError`` naming the bad ``data.*`` field), both given the data config as a dict;
  ``fields``: the ``data.*`` fields ``load`` reads (``None``: not declared)."""
  name: str
  load: Callable[[dict[str, Any]], Dataset]
  validate: Callable[[dict[str, Any]], None]
  fields: tuple[str, ...] | None = None


_SOURCES: Registry[Source] = Registry("data source")


def _no_checks(c: dict[str, Any]) -> None:
  del c


def register(name: str, *, validate: Callable[[dict[str, Any]], None] | None = None,
             fields: tuple[str, ...] | None = None):
  """Decorator adding a data source to the registry under ``name``.

  The decorated function is ``source(c) -> Dataset`` with ``c`` the data config as a plain dict
  (``source`` plus the source's own fields; absent fields take the source's defaults).
  ``validate(c)`` (optional) checks the fields before anything is read. ``fields`` (optional)
  names the fields the source reads, so that :func:`unread_fields` can tell which of the
  schema's other sources' fields a config of this source leaves unused. Example::

    @data.register("my_images", validate=lambda c: ..., fields=("root",))
    def my_images(c):
      return data.Dataset(x_train, y_train, x_test, y_test, num_classes=10, name="my_images")
  """

  def wrap(fn):
    _SOURCES.add(name, Source(name, fn, validate or _no_checks,
                              None if fields is None else tuple(fields)))
    return fn

  return wrap


def unread_fields(cfg) -> tuple[str, ...]:
  """The fields of data config ``cfg`` that its source does not read, sorted: those another
  registered source declares (``register(fields=...)``) and ``cfg``'s source does not.

  The config schema (``configs/common.py``) holds every source's fields, so a ``digits`` config
  carries ``num_train=256``, ``shape`` and ``num_classes`` that only ``synthetic`` reads (digits
  trains on its fixed split, 1,400 images); a record of what a run used leaves these out.
  Fields no source declares (``max_train``, ``augment``, an analysis' ``test_split``) are never
  listed, and neither is anything when the source declares no ``fields`` or is unknown.
  """
  c = _as_dict(cfg)
  if c.get("source") not in _SOURCES:
    return ()
  own = get(c["source"]).fields
  if own is None:
    return ()
  declared = {f for name in available() for f in (get(name).fields or ())}
  return tuple(sorted(f for f in c if f in declared and f not in own))


def get(name: str) -> Source:
  """The data source registered under ``name``; ``ValueError`` listing the known names."""
  return _SOURCES.get(name)


def available() -> list[str]:
  """Sorted names of all registered data sources."""
  return _SOURCES.names()


def _as_dict(cfg) -> dict[str, Any]:
  return dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)


def validate_config(cfg) -> None:
  """Checks a data config without reading any data: the source is registered and its own
  fields are valid (``data.root`` given, a known tfds name, ...). ``ValueError`` otherwise."""
  c = _as_dict(cfg)
  get(c.get("source")).validate(c)


def load(cfg) -> Dataset:
  """The dataset described by a data config.

  Args:
    cfg: ``ConfigDict``/mapping with ``source`` (one of ``available()``) and the source's
      fields: ``name`` (tfds), ``root`` (idx, cifar10_python), ``data_dir`` (tfds, optional),
      ``num_test`` (digits), ``num_train``/``num_test``/``shape``/``num_classes`` (synthetic),
      ``seed``; optional ``max_train``/``max_test`` to keep only the first examples.

  Raises:
    ValueError: unknown source, a bad field, or a ``data.root`` without the expected files
      (the message names the field and the file); data breaking the :class:`Dataset` contract
      (:func:`check_dataset`: NaN/inf or out-of-range pixels, labels out of range, train and
      test images of different shapes, an empty split), whatever the source.
  """
  c = _as_dict(cfg)
  source = get(c.get("source"))
  source.validate(c)
  ds = source.load(c)
  if not isinstance(ds, Dataset):
    raise ValueError(f"data source {source.name!r} returned {type(ds).__name__}, not a "
                     f"krylov_adv.data.Dataset")
  max_train, max_test = c.get("max_train"), c.get("max_test")
  if max_train or max_test:
    ds = ds._replace(x_train=ds.x_train[:max_train or None], y_train=ds.y_train[:max_train or None],
                     x_test=ds.x_test[:max_test or None], y_test=ds.y_test[:max_test or None])
  return check_dataset(ds)


def _needs_root(source: str, expected: str):
  def validate(c):
    if not c.get("root"):
      raise ValueError(f"data.root must name the folder of the {source} files ({expected})")
  return validate


def _validate_tfds(c) -> None:
  if c.get("name") not in TFDS_NAMES:
    raise ValueError(f"data.name: unknown tfds dataset {c.get('name')!r}; supported: "
                     f"{TFDS_NAMES}")


@register("tfds", validate=_validate_tfds, fields=("name", "data_dir"))
def tfds_source(c) -> Dataset:
  """``data.name`` from tensorflow-datasets (:func:`load_tfds`), ``data.data_dir`` optional."""
  return load_tfds(c["name"], c.get("data_dir") or None)


@register("idx", validate=_needs_root("idx", ", ".join(_IDX_FILES)),
          fields=("root", "name"))
def idx_source(c) -> Dataset:
  """The IDX files in ``data.root`` (:func:`load_idx`), labelled ``data.name``."""
  return load_idx(c["root"], c.get("name", "idx"))


@register("cifar10_python", validate=_needs_root("cifar10_python", "data_batch_1..5, test_batch"),
          fields=("root",))
def cifar10_python_source(c) -> Dataset:
  """The CIFAR-10 python batches in ``data.root`` (:func:`load_cifar10_python`)."""
  return load_cifar10_python(c["root"])


@register("digits", fields=("num_test", "seed"))
def digits_source(c) -> Dataset:
  """scikit-learn's digits (:func:`load_digits`) with ``data.num_test`` and ``data.seed``."""
  return load_digits(num_test=c.get("num_test", 397), seed=c.get("seed", 0))


@register("synthetic",
          fields=("num_train", "num_test", "shape", "num_classes", "seed"))
def synthetic_source(c) -> Dataset:
  """:func:`synthetic` with ``data.num_train``, ``num_test``, ``shape``, ``num_classes``,
  ``seed``."""
  return synthetic(num_train=c.get("num_train", 256), num_test=c.get("num_test", 64),
                   shape=c.get("shape", (8, 8, 1)), num_classes=c.get("num_classes", 10),
                   seed=c.get("seed", 0))


# The registered names when this module was imported (kept for callers that test membership;
# ``available()`` also lists sources registered later).
SOURCES = tuple(available())


# ---------------------------------------------------------------------------------------------
# Batching and augmentation


def random_crop_flip(rng: np.random.Generator, x: np.ndarray, pad: int = 4) -> np.ndarray:
  """CIFAR augmentation: zero-pad by ``pad``, random ``H x W`` crop, random horizontal flip.

  x: ``(B, H, W, C)`` float32 -> same shape. Each example gets its own offsets and flip.
  """
  b, h, w, _ = x.shape
  padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  dy = rng.integers(0, 2 * pad + 1, b)
  dx = rng.integers(0, 2 * pad + 1, b)
  rows = dy[:, None] + np.arange(h)[None, :]  # (B, H)
  cols = dx[:, None] + np.arange(w)[None, :]  # (B, W)
  out = padded[np.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]
  flip = rng.random(b) < 0.5
  out[flip] = out[flip, :, ::-1]
  return out


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """Full batches per epoch (the last partial batch is dropped so shapes stay static)."""
  if batch_size < 1 or num_examples < batch_size:
    raise ValueError(f"batch_size must lie in [1, {num_examples}], got {batch_size}")
  return num_examples // batch_size


def epoch_batches(x: np.ndarray, y: np.ndarray, batch_size: int, *, seed: int, epoch: int,
                  augment: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """The shuffled full batches of one epoch.

  The permutation and the augmentation draws come from ``np.random.default_rng([seed, epoch])``,
  so the batches depend only on ``(seed, epoch)``: resuming at epoch ``e`` reproduces them.

  Yields:
    ``(x_batch (batch_size, H, W, C) float32, y_batch (batch_size,) int32)``.
  """
  n = steps_per_epoch(len(y), batch_size)
  rng = np.random.default_rng([int(seed), int(epoch)])
  perm = rng.permutation(len(y))
  for i in range(n):
    idx = perm[i * batch_size:(i + 1) * batch_size]
    xb = x[idx]
    if augment:
      xb = random_crop_flip(rng, xb)
    yield xb, y[idx]
