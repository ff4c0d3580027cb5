"""Data sources (IDX, CIFAR python batches, tfds mock, digits, synthetic) and epoch batching."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import pickletools
import struct

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np
import pytest

from krylov_adv import data

REAL_MNIST = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "mnist")


def _write_idx(path, array, gz=True):
  """An IDX file written by hand from the format spec (independent of the reader)."""
  code = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D,
          np.float64: 0x0E}[array.dtype.type]
  header = bytes([0, 0, code, array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape)
  payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
  with (gzip.open if gz else open)(path, "wb") as f:
    f.write(payload)


def _mnist_folder(root, n_train=12, n_test=5, gz=True):
  rng = np.random.default_rng(0)
  arrays = {}
  for split, n in (("train", n_train), ("t10k", n_test)):
    img = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    lbl = rng.integers(0, 10, n).astype(np.uint8)
    sfx = ".gz" if gz else ""
    _write_idx(os.path.join(root, f"{split}-images-idx3-ubyte{sfx}"), img, gz)
    _write_idx(os.path.join(root, f"{split}-labels-idx1-ubyte{sfx}"), lbl, gz)
    arrays[split] = (img, lbl)
  return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_idx_folder_roundtrip(tmp_path, gz):
  arrays = _mnist_folder(str(tmp_path), gz=gz)
  ds = data.load({"source": "idx", "root": str(tmp_path), "name": "fashion_mnist"})
  assert ds.x_train.shape == (12, 28, 28, 1) and ds.x_test.shape == (5, 28, 28, 1)
  assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
  np.testing.assert_array_equal(ds.x_train[..., 0] * 255, arrays["train"][0].astype(np.float32))
  np.testing.assert_array_equal(ds.y_test, arrays["t10k"][1])
  assert ds.num_classes == 10 and ds.name == "fashion_mnist"


def test_read_idx_int32_big_endian(tmp_path):
  a = np.arange(-6, 6, dtype=np.int32).reshape(3, 4) * 100_000
  _write_idx(str(tmp_path / "a.idx"), a, gz=False)
  np.testing.assert_array_equal(data.read_idx(str(tmp_path / "a.idx")), a)


def test_idx_errors_name_the_file(tmp_path):
  _mnist_folder(str(tmp_path))
  missing = tmp_path / "nothing-here.gz"
  with pytest.raises(FileNotFoundError, match="nothing-here.gz"):
    data.read_idx(str(missing))
  bad_magic = tmp_path / "bad-magic"
  bad_magic.write_bytes(b"\x12\x34\x08\x01" + b"\x00" * 8)
  with pytest.raises(ValueError, match="bad-magic.*not an IDX file"):
    data.read_idx(str(bad_magic))
  # Truncate the training images: header promises 12 * 784 bytes.
  path = tmp_path / "train-images-idx3-ubyte.gz"
  raw = gzip.decompress(path.read_bytes())
  path.write_bytes(gzip.compress(raw[:-100]))
  with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz.*truncated or corrupt"):
    data.load({"source": "idx", "root": str(tmp_path)})
  # Not gzip at all although named .gz.
  path.write_bytes(b"this is not gzip data")
  with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz"):
    data.load({"source": "idx", "root": str(tmp_path)})
  os.remove(tmp_path / "t10k-labels-idx1-ubyte.gz")
  with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
    data.load_idx_split(str(tmp_path), "t10k")
  with pytest.raises(ValueError, match="data.root .* has no t10k-labels-idx1-ubyte"):
    data.load({"source": "idx", "root": str(tmp_path)})
  with pytest.raises(ValueError, match="data.root .*no-such-dir.* is not a folder.*"
                                       "train-images-idx3-ubyte"):
    data.load({"source": "idx", "root": str(tmp_path / "no-such-dir")})
  with pytest.raises(ValueError, match="data.root must name the folder of the idx files"):
    data.load({"source": "idx", "root": ""})


def test_real_mnist_test_set():
  img = os.path.join(REAL_MNIST, "t10k-images-idx3-ubyte.gz")
  lbl = os.path.join(REAL_MNIST, "t10k-labels-idx1-ubyte.gz")
  if not (os.path.exists(img) and os.path.exists(lbl)):
    pytest.skip(f"real MNIST test files not present in {REAL_MNIST}")
  # md5 from /work/shared/data/README.md: the files are the genuine ones.
  assert hashlib.md5(open(lbl, "rb").read()).hexdigest() == "ec29112dd5afa0611ce80d1b7f02629c"
  x, y = data.load_idx_split(REAL_MNIST, "t10k")
  assert x.shape == (10000, 28, 28, 1) and x.dtype == np.float32
  assert x.min() == 0.0 and x.max() == 1.0
  # The published class counts of the MNIST test set.
  np.testing.assert_array_equal(np.bincount(y, minlength=10),
                                [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009])
  # Digits are white strokes on black: most pixels are background.
  assert 0.75 < np.mean(x == 0) < 0.85


class _Python2Pickler(pickle._Pickler):  # pylint: disable=protected-access
  """Writes pickles as Python 2's cPickle did for the published CIFAR-10 batches (protocol 2,
  every ``str`` a byte string: SHORT_BINSTRING / BINSTRING opcodes, numpy under its numpy 1
  module name ``numpy.core``). Read with ``encoding="bytes"`` they give bytes, as the real
  files do."""

  def _save_byte_string(self, obj):
    raw = obj.encode("latin1") if isinstance(obj, str) else obj
    if len(raw) < 256:
      self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
    else:
      self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
    self.memoize(obj)

  dispatch = dict(pickle._Pickler.dispatch)  # pylint: disable=protected-access
  dispatch[bytes] = _save_byte_string
  dispatch[str] = _save_byte_string


def _python2_pickle(obj) -> bytes:
  buf = io.BytesIO()
  _Python2Pickler(buf, protocol=2).dump(obj)
  return buf.getvalue().replace(b"cnumpy._core.", b"cnumpy.core.")


def _cifar_batch(rng, n, name):
  """A batch with the published files' fields and types (python ints, bytes)."""
  return {b"batch_label": f"{name} of 5".encode(),
          b"labels": [int(v) for v in rng.integers(0, 10, n)],
          b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
          b"filenames": [f"img_{i}.png".encode() for i in range(n)]}


def _cifar_folder(root, n=4, python2=False):
  rng = np.random.default_rng(1)
  batches = {}
  for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
    d = _cifar_batch(rng, n, name)
    with open(os.path.join(root, name), "wb") as f:
      if python2:
        f.write(_python2_pickle(d))
      else:
        pickle.dump(d, f)
    batches[name] = d
  return batches


@pytest.mark.parametrize("python2", [True, False])
def test_cifar10_python_layout(tmp_path, python2):
  folder = tmp_path / "cifar-10-batches-py"
  folder.mkdir()
  batches = _cifar_folder(str(folder), python2=python2)
  if python2:  # the file is in the published format: only byte strings and numpy.core globals
    ops = [(op.name, arg) for op, arg, _ in pickletools.genops((folder / "test_batch")
                                                               .read_bytes())]
    assert {a for o, a in ops if o == "GLOBAL"} == {"numpy.core.multiarray _reconstruct",
                                                   "numpy ndarray", "numpy dtype"}
    assert not any("UNICODE" in o for o, _ in ops)
  ds = data.load({"source": "cifar10_python", "root": str(tmp_path)})
  assert ds.x_train.shape == (20, 32, 32, 3) and ds.x_test.shape == (4, 32, 32, 3)
  raw = batches["data_batch_2"][b"data"]
  # Row layout: channel-major planes of 32x32 row-major pixels.
  i, r, c, ch = 1, 5, 17, 2
  assert ds.x_train[4 + i, r, c, ch] == np.float32(raw[i, ch * 1024 + r * 32 + c]) / 255
  np.testing.assert_array_equal(ds.y_test, batches["test_batch"][b"labels"])


def test_cifar10_python_errors(tmp_path):
  _cifar_folder(str(tmp_path))
  (tmp_path / "data_batch_3").write_bytes(b"garbage")
  with pytest.raises(ValueError, match="data_batch_3"):
    data.load_cifar10_python(str(tmp_path))
  os.remove(tmp_path / "test_batch")
  (tmp_path / "data_batch_3").unlink()
  with pytest.raises(ValueError, match="data.root .* has no CIFAR-10 batch 'data_batch_3'"):
    data.load_cifar10_python(str(tmp_path))
  with pytest.raises(ValueError, match="data.root must name the folder"):
    data.load({"source": "cifar10_python", "root": ""})


def test_cifar10_protocol5_resave_loads(tmp_path):
  batch = _cifar_batch(np.random.default_rng(0), 3, "test_batch")
  with open(tmp_path / "b", "wb") as f:
    pickle.dump(batch, f, protocol=5)
  x, y = data._read_cifar_batch(str(tmp_path / "b"))  # pylint: disable=protected-access
  np.testing.assert_array_equal(x.transpose(0, 3, 1, 2).reshape(3, -1), batch[b"data"])
  np.testing.assert_array_equal(y, batch[b"labels"])


class _RunsShell:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("payload", ["os.system", "builtins.eval", "numpy scalar"])
def test_cifar10_batch_naming_other_globals_is_refused(tmp_path, payload):
  """A batch file that names any global but numpy's array constructors is refused before
  anything in it is called (a plain ``pickle.load`` would run the shell command)."""
  _cifar_folder(str(tmp_path))
  marker = tmp_path / "pwned"
  batch = _cifar_batch(np.random.default_rng(0), 4, "data_batch_2")
  batch[b"batch_label"] = {"os.system": _RunsShell(marker),
                           "builtins.eval": _Eval(f"open({str(marker)!r}, 'w')"),
                           "numpy scalar": np.int64(3)}[payload]
  (tmp_path / "data_batch_2").write_bytes(pickle.dumps(batch, protocol=2))
  with pytest.raises(pickle.UnpicklingError, match="data_batch_2.*refusing to load global"):
    data.load({"source": "cifar10_python", "root": str(tmp_path)})
  assert not marker.exists()
  if payload == "os.system":  # the file is a working exploit for an unrestricted unpickler
    pickle.loads((tmp_path / "data_batch_2").read_bytes(), encoding="bytes")
    assert marker.exists()


class _Eval:
  def __init__(self, source):
    self.source = source

  def __reduce__(self):
    return (eval, (self.source,))


@pytest.mark.parametrize("name,shape", [("mnist", (28, 28, 1)), ("fashion_mnist", (28, 28, 1)),
                                        ("cifar10", (32, 32, 3))])
def test_tfds_source_on_mock_data(name, shape):
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=6):
    ds = data.load({"source": "tfds", "name": name})
  assert ds.x_train.shape == (6,) + shape and ds.x_test.shape == (6,) + shape
  assert ds.x_train.dtype == np.float32 and 0 <= ds.x_train.min() and ds.x_train.max() <= 1
  assert ds.y_train.dtype == np.int32 and 0 <= ds.y_train.min() and ds.y_train.max() < 10
  with pytest.raises(ValueError, match="unknown tfds dataset 'svhn'"):
    data.load({"source": "tfds", "name": "svhn"})


def test_digits_split_is_fixed_and_matches_sklearn():
  sk = pytest.importorskip("sklearn.datasets")
  ds = data.load({"source": "digits", "num_test": 397, "seed": 0})
  assert ds.x_train.shape == (1400, 8, 8, 1) and ds.x_test.shape == (397, 8, 8, 1)
  ref = sk.load_digits()
  # Every test image is one of sklearn's images, scaled by 1/16, with its label.
  flat = ref.images.reshape(len(ref.images), -1) / 16.0
  for k in (0, 100, 396):
    j = np.flatnonzero(np.all(np.isclose(flat, ds.x_test[k].reshape(-1)), axis=1))
    assert j.size >= 1 and ds.y_test[k] in ref.target[j]
  again = data.load({"source": "digits", "num_test": 397, "seed": 0})
  np.testing.assert_array_equal(again.x_test, ds.x_test)
  # Train and test together are a permutation of the whole set.
  np.testing.assert_array_equal(np.bincount(np.r_[ds.y_train, ds.y_test], minlength=10),
                                np.bincount(ref.target, minlength=10))


def test_synthetic_deterministic_and_learnable_labels():
  a = data.synthetic(num_train=50, num_test=10, shape=(4, 5, 2), num_classes=3, seed=7)
  b = data.synthetic(num_train=50, num_test=10, shape=(4, 5, 2), num_classes=3, seed=7)
  c = data.synthetic(num_train=50, num_test=10, shape=(4, 5, 2), num_classes=3, seed=8)
  np.testing.assert_array_equal(a.x_train, b.x_train)
  np.testing.assert_array_equal(a.y_test, b.y_test)
  assert not np.array_equal(a.x_train, c.x_train)
  assert a.x_train.shape == (50, 4, 5, 2) and a.x_train.dtype == np.float32
  assert 0 <= a.x_train.min() and a.x_train.max() < 1 and set(a.y_train) <= {0, 1, 2}
  # A least-squares linear classifier fits the labels well (they come from a linear rule).
  flat = np.c_[a.x_train.reshape(50, -1), np.ones(50)]
  w, *_ = np.linalg.lstsq(flat, np.eye(3)[a.y_train], rcond=None)
  assert np.mean(np.argmax(flat @ w, 1) == a.y_train) > 0.9


def test_load_rejects_unknown_source():
  with pytest.raises(ValueError, match="unknown data source 'imagenet'; available: .*'idx'"):
    data.load({"source": "imagenet"})
  with pytest.raises(ValueError, match="unknown data source 'imagenet'"):
    data.validate_config({"source": "imagenet"})


def test_source_registry():
  assert data.available() == sorted(["tfds", "idx", "cifar10_python", "digits", "synthetic"])
  assert data.get("synthetic").load is data.synthetic_source
  with pytest.raises(ValueError, match="registered twice"):
    data.register("idx")(lambda c: None)
  data.validate_config({"source": "synthetic"})
  with pytest.raises(ValueError, match="data.root must name"):
    data.validate_config({"source": "idx", "root": ""})
  with pytest.raises(ValueError, match="data.name: unknown tfds dataset 'svhn'"):
    data.validate_config({"source": "tfds", "name": "svhn"})


def test_registered_source_is_loaded_by_name():
  """Adding a source is one registered function; ``load`` picks it by ``source``, validates
  first and applies ``max_train``/``max_test``."""
  name = "test_constant_images"

  def validate(c):
    if c.get("value", 0) < 0:
      raise ValueError(f"data.value must be >= 0, got {c['value']}")

  @data.register(name, validate=validate)
  def constant_images(c):
    x = np.full((6, 2, 2, 1), c.get("value", 0) / 255, np.float32)
    y = (np.arange(6) % 2).astype(np.int32)
    return data.Dataset(x, y, x[:3], y[:3], num_classes=2, name=name)

  try:
    ds = data.load({"source": name, "value": 255, "max_train": 4})
    assert ds.x_train.shape == (4, 2, 2, 1) and ds.x_train.max() == 1.0 and ds.num_classes == 2
    with pytest.raises(ValueError, match="data.value must be >= 0"):
      data.load({"source": name, "value": -1})
    assert name in data.available()
  finally:
    data._SOURCES.pop(name)  # pylint: disable=protected-access


class _ReadSpy(dict):
  """A data config that records which fields a source reads."""

  def __init__(self, *a, **k):
    super().__init__(*a, **k)
    self.read = set()

  def get(self, key, default=None):
    self.read.add(key)
    return super().get(key, default)

  def __getitem__(self, key):
    self.read.add(key)
    return super().__getitem__(key)


@pytest.mark.parametrize("source", ["digits", "synthetic"])
def test_declared_fields_are_the_fields_a_source_reads(source):
  """``register(fields=...)`` against what the source's function actually reads from a full
  schema data block (configs/common.py), so that unread_fields cannot hide a field in use."""
  pytest.importorskip("sklearn")
  from configs import common
  c = _ReadSpy(common.base_config().data.to_dict(), source=source, num_train=20, num_test=10)
  data.get(source).load(c)
  assert c.read == set(data.get(source).fields)


def test_unread_fields_of_the_schema():
  """A digits config's synthetic-only fields (num_train=256 in the schema, while digits trains
  on its 1,400-image split) are unread; a synthetic config reads them."""
  from configs import common
  block = common.base_config().data.to_dict()
  assert data.unread_fields(dict(block, source="digits")) == (
      "data_dir", "name", "num_classes", "num_train", "root", "shape")
  assert data.unread_fields(dict(block, source="synthetic")) == ("data_dir", "name", "root")
  assert data.unread_fields(dict(block, source="tfds")) == (
      "num_classes", "num_test", "num_train", "root", "seed", "shape")
  # A source registered without fields keeps every field; an unknown source has none unread.
  name = "test_undeclared_source"
  data.register(name)(lambda c: None)
  try:
    assert data.unread_fields(dict(block, source=name)) == ()
  finally:
    data._SOURCES.pop(name)  # pylint: disable=protected-access
  assert data.unread_fields(dict(block, source="nope")) == ()


def test_epoch_batches_depend_only_on_seed_and_epoch():
  ds = data.synthetic(num_train=50, num_test=2, seed=0)
  run = lambda seed, epoch: [b for b in data.epoch_batches(ds.x_train, ds.y_train, 16,
                                                           seed=seed, epoch=epoch)]
  first, again, other = run(0, 3), run(0, 3), run(0, 4)
  assert len(first) == 3  # 50 // 16 full batches; the remainder is dropped
  for (xa, ya), (xb, yb) in zip(first, again):
    np.testing.assert_array_equal(xa, xb)
    np.testing.assert_array_equal(ya, yb)
  assert not np.array_equal(first[0][0], other[0][0])
  # Within an epoch every example appears at most once.
  seen = np.concatenate([x.reshape(16, -1) for x, _ in first])
  assert len({row.tobytes() for row in seen}) == 48
  assert first[0][0].dtype == np.float32 and first[0][1].dtype == np.int32


def test_random_crop_flip_is_a_shifted_window_of_the_padded_image():
  rng = np.random.default_rng(0)
  x = rng.random((6, 5, 7, 3), dtype=np.float32)
  out = data.random_crop_flip(np.random.default_rng(1), x, pad=2)
  assert out.shape == x.shape
  padded = np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)))
  flips = 0
  for i in range(len(x)):
    matches = [(dy, dx, f) for dy in range(5) for dx in range(5) for f in (False, True)
               if np.array_equal(out[i], (lambda w: w[:, ::-1] if f else w)(
                   padded[i, dy:dy + 5, dx:dx + 7]))]
    assert matches, f"example {i} is not a crop (+flip) of its padded image"
    flips += matches[0][2]
  assert 0 < flips < len(x)  # seeded draw: some flipped, some not


# ---------------------------------------------------------------------------------------------
# Every source's contract checked at load (issue 28, item 7): one ValueError, never bad data.


def _idx_files(root, train, test):
  """Writes ``{train,t10k}-{images-idx3,labels-idx1}-ubyte`` from ``(images, labels)`` pairs."""
  for split, (img, lbl) in (("train", train), ("t10k", test)):
    _write_idx(os.path.join(root, f"{split}-images-idx3-ubyte"), img, gz=False)
    _write_idx(os.path.join(root, f"{split}-labels-idx1-ubyte"), lbl, gz=False)


def _ok(n=6, shape=(4, 4), dtype=np.float32, seed=0):
  rng = np.random.default_rng(seed)
  img = rng.uniform(size=(n,) + shape).astype(dtype)
  return img, (np.arange(n) % 10).astype(np.uint8)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_idx_float_images_already_in_unit_range_are_not_divided_again(tmp_path, dtype):
  # Today float images are divided by 255 like uint8 ones: every pixel below 0.004.
  train, test = _ok(dtype=dtype), _ok(n=3, dtype=dtype, seed=1)
  _idx_files(str(tmp_path), train, test)
  ds = data.load({"source": "idx", "root": str(tmp_path)})
  np.testing.assert_array_equal(ds.x_train[..., 0], train[0].astype(np.float32))
  np.testing.assert_array_equal(ds.x_test[..., 0], test[0].astype(np.float32))
  # Integer pixels 0..255 of any integer type are still divided by 255.
  img16 = np.array([[[0, 255], [51, 102]]] * 2, np.int16)
  _idx_files(str(tmp_path), (img16, train[1][:2]), (img16, test[1][:2]))
  ds = data.load({"source": "idx", "root": str(tmp_path)})
  np.testing.assert_allclose(ds.x_train[0, ..., 0], [[0.0, 1.0], [0.2, 0.4]], rtol=1e-6)


def _with(arrays, index, value):
  out = arrays.copy()
  out.flat[index] = value
  return out


_IMG, _LBL = _ok()
_BAD_IDX = {
    "nan pixel": ((_with(_IMG, 5, np.nan), _LBL), _ok(3),
                  r"train-images-idx3-ubyte: images contain NaN or inf"),
    "inf pixel": (_ok(), (_with(_ok(3)[0], 0, np.inf), _ok(3)[1]),
                  r"t10k-images-idx3-ubyte: images contain NaN or inf"),
    "int16 up to 4.0": (((_IMG * 1020).astype(np.int16), _LBL), _ok(3),
                        r"train-images-idx3-ubyte: pixel values must lie in \[0, 1\], got range "
                        r"\[0\.\d+, 3\.\d+\] \(int16 integer pixels divided by 255\)"),
    "negative int8": (((_IMG * 100 - 50).astype(np.int8), _LBL), _ok(3),
                      r"pixel values must lie in \[0, 1\], got range \[-0\.1"),
    "float in 0..255": (((_IMG * 255).astype(np.float32), _LBL), _ok(3),
                        r"pixel values must lie in \[0, 1\].*float32 floating-point pixels taken "
                        r"as they are"),
    "fractional labels": ((_IMG, np.array([0, 1.5, 2, 3, 4, 5], np.float32)), _ok(3),
                          r"train-labels-idx1-ubyte: labels must be whole numbers, got 1\.5 at "
                          r"index 1"),
    "nan labels": ((_IMG, np.array([0, 1, np.nan, 3, 4, 5], np.float64)), _ok(3),
                   r"train-labels-idx1-ubyte: labels contain NaN or inf"),
    "label out of range": ((_IMG, _with(_LBL, 2, 10)), _ok(3),
                           r"train split: labels must lie in \[0, 10\), got range \[0, 10\]"),
    "shapes differ": (_ok(), _ok(3, shape=(5, 5)),
                      r"train images \(4, 4, 1\) and test images \(5, 5, 1\) differ in shape"),
    "empty train": ((_IMG[:0], _LBL[:0]), _ok(3), r"idx train split is empty"),
    "empty test": (_ok(), (_IMG[:0], _LBL[:0]), r"idx test split is empty"),
}


@pytest.mark.parametrize("case", sorted(_BAD_IDX))
def test_idx_data_breaking_the_contract_is_one_value_error(tmp_path, case):
  # Today all but "label out of range" load (NaN pixels, pixels up to 4.0, fractional labels
  # truncated, ...) and fail later, if at all.
  train, test, match = _BAD_IDX[case]
  _idx_files(str(tmp_path), train, test)
  with pytest.raises(ValueError, match=match) as e:
    data.load({"source": "idx", "root": str(tmp_path)})
  assert "\n" not in str(e.value)


def test_labels_beyond_int32_do_not_wrap_into_range(tmp_path):
  x, _ = _ok(2)
  with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
    data._finish(x, np.array([0, 2**32 + 1]), x, np.array([0, 1]), 3, "wrap")


@pytest.mark.parametrize("make,match", [
    (lambda x, y: data.Dataset(x * np.nan, y, x, y, 2, "s"), r"s train split: images contain NaN"),
    (lambda x, y: data.Dataset(x, y, x + 1, y, 2, "s"),
     r"s test split: pixel values must lie in \[0, 1\], got range \[1\.\d+, 1\.\d+\]"),
    (lambda x, y: data.Dataset(x.astype(np.float64), y, x, y, 2, "s"),
     r"s train split: images must be float32 in \[0, 1\], got dtype float64"),
    (lambda x, y: data.Dataset(x, y.astype(np.float32), x, y, 2, "s"),
     r"s train split: labels must be int32, got dtype float32"),
    (lambda x, y: data.Dataset(x, y, x, y + 2, 2, "s"),
     r"s test split: labels must lie in \[0, 2\), got range \[2, 3\]"),
    (lambda x, y: data.Dataset(x, y, x[:, :1], y, 2, "s"), r"s: train images .* differ in shape"),
    (lambda x, y: data.Dataset(x, y, x[:0], y[:0], 2, "s"), r"s test split is empty"),
    (lambda x, y: (x, y), r"returned tuple, not a krylov_adv.data.Dataset"),
])
def test_registered_sources_are_held_to_the_contract(make, match):
  name = "test_contract_source"
  x = np.random.default_rng(0).uniform(size=(4, 2, 2, 1)).astype(np.float32)
  y = np.array([0, 1, 0, 1], np.int32)
  data.register(name)(lambda c: make(x, y))
  try:
    with pytest.raises(ValueError, match=match):
      data.load({"source": name})
  finally:
    data._SOURCES.pop(name)  # pylint: disable=protected-access


def test_analysis_t10k_split_is_checked_too(tmp_path):
  from experiments import datasets
  bad = _with(_IMG, 3, np.inf)
  _idx_files(str(tmp_path), _ok(), (bad, _LBL))
  with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte: images contain NaN or inf"):
    datasets.load_data({"source": "idx", "root": str(tmp_path), "test_split": 2})
