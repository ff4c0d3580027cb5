"""Shared, session-scoped fixtures. JIT compilation dominates test time, so models are trained
once per session and compiled functions are shared across tests."""

from __future__ import annotations

import dataclasses
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# XLA's CPU compiler without LLVM's optimisation passes and with the older (non-MLIR) fusion
# emitters: compiling, not running, is most of the suite's time (thousands of small programs),
# and these two options cut the CPU time of a compilation about four-fold (measured on GMRES and
# the attacks: 30 -> 7.5 CPU-s) while the programs compute the same IEEE float operations. Tests
# check the library, not XLA's code generation; KRYLOV_TESTS_XLA_DEFAULTS=1 runs the suite with
# XLA's default compiler options instead. Options in XLA_FLAGS that the caller set come after
# these, so they win.
FAST_COMPILE_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
if (os.environ.get("KRYLOV_TESTS_XLA_DEFAULTS", "0") in ("", "0")
    and FAST_COMPILE_XLA_FLAGS not in os.environ.get("XLA_FLAGS", "")):
  os.environ["XLA_FLAGS"] = (FAST_COMPILE_XLA_FLAGS + " " +
                             os.environ.get("XLA_FLAGS", "")).strip()
# Eight simulated CPU devices for the data-parallel tests (tests/test_parallel.py). Must be set
# before jax is imported; single-device code still runs on device 0 only (measured: the
# single-device tests compile no slower with 8 devices than with 1).
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()

import atexit
import shutil
import tempfile

# JAX's persistent compilation cache, in a temporary folder for this run only: after
# jax.clear_caches() (end of every module, below), in a fresh closure, or in a subprocess
# (`python -m experiments.*`, pytest-xdist workers), an XLA executable with the same HLO is read
# back instead of compiled again. The environment variables reach subprocesses and workers; a
# folder the caller set (JAX_COMPILATION_CACHE_DIR) is used as is and kept.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache_dir = tempfile.mkdtemp(prefix="krylov_adv_tests_jax_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
  # Removed by the process that made it (the pytest main process, not a worker).
  atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

# jax may have been imported (by a plugin) before the lines above: set the same in its config.
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
jax.config.update("jax_persistent_cache_min_entry_size_bytes",
                  int(os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"]))

from krylov_adv.models.cnn import TinyCNN


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code_after_each_module():
  """Drops JAX's compilation caches after each test module. Every compiled executable keeps
  memory mappings alive; over the whole suite (about 600 tests, thousands of compilations) one
  process reaches Linux's default ``vm.max_map_count`` (65530), and XLA then crashes with a
  segmentation fault while compiling. Within a module compiled functions are still shared."""
  yield
  jax.clear_caches()


@dataclasses.dataclass(frozen=True)
class TrainedModel:
  """A small classifier trained briefly on scikit-learn digits (8x8x1, 10 classes).

  logits_fn: jitted ``(B, 8, 8, 1) in [0, 1] -> (B, 10)``.
  x_test, y_test: held-out images (float32 NHWC in [0, 1]) and int32 labels that the model
    classifies correctly (so that attack success is measured from 100% clean accuracy).
  clean_accuracy: accuracy on the full held-out split.
  """
  logits_fn: object
  params: object
  x_test: np.ndarray
  y_test: np.ndarray
  clean_accuracy: float


def _digits():
  sklearn_datasets = pytest.importorskip("sklearn.datasets")
  d = sklearn_datasets.load_digits()
  x = (d.images / 16.0).astype(np.float32)[..., None]
  y = d.target.astype(np.int32)
  rng = np.random.default_rng(0)
  perm = rng.permutation(len(y))
  return x[perm[:1400]], y[perm[:1400]], x[perm[1400:]], y[perm[1400:]]


def _train(activation, steps=300, seed=0):
  x_tr, y_tr, x_te, y_te = _digits()
  model = TinyCNN(num_classes=10, activation=activation)
  params = model.init(jax.random.PRNGKey(seed), x_tr[:1])
  opt = optax.adam(3e-3)
  opt_state = opt.init(params)

  @jax.jit
  def step(params, opt_state, xb, yb):
    def loss(p):
      return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, xb), yb).mean()
    grads = jax.grad(loss)(params)
    updates, opt_state = opt.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state

  rng = np.random.default_rng(seed)
  for _ in range(steps):
    idx = rng.integers(0, len(y_tr), 64)
    params, opt_state = step(params, opt_state, x_tr[idx], y_tr[idx])

  logits_fn = jax.jit(lambda x: model.apply(params, x))
  pred = np.asarray(jnp.argmax(logits_fn(x_te), axis=1))
  correct = pred == y_te
  return TrainedModel(logits_fn=logits_fn, params=params, x_test=x_te[correct][:64],
                      y_test=y_te[correct][:64], clean_accuracy=float(correct.mean()))


@pytest.fixture(scope="session")
def digits_model() -> TrainedModel:
  """TinyCNN (ReLU) trained for 300 Adam steps on digits; ~95% clean accuracy."""
  return _train(jax.nn.relu)


@pytest.fixture(scope="session")
def smooth_digits_model() -> TrainedModel:
  """TinyCNN with softplus (smooth, non-zero input Hessian) trained like ``digits_model``."""
  return _train(jax.nn.softplus)
