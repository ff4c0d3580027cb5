"""Shared, session-scoped fixtures. JIT compilation dominates test time, so models are trained
once per session and compiled functions are shared across tests."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

# XLA's CPU compiler without LLVM's optimisation passes, with the older (non-MLIR) fusion emitters
# and without splitting a program's code generation over threads: compiling, not running, is most
# of the suite's time (thousands of small programs), and these options make a compilation about
# five times cheaper in CPU time (GMRES and the attacks: 30 -> 5.8 CPU-s; the first two options
# took the suite from 1198 to 542 CPU-s) while the programs compute the same IEEE float
# operations. Tests check the library, not XLA's code generation; KRYLOV_TESTS_XLA_DEFAULTS=1
# runs the suite with XLA's default compiler options instead (CI's smoke run of the first README
# command uses the defaults too). Options in XLA_FLAGS that the caller set come after these, so
# they win. XLA aborts a process on an option it does not know (a jaxlib older or newer than
# these options), so one subprocess checks them first (about a second); pytest-xdist workers and
# the tests' subprocesses inherit the result through the environment.
FAST_COMPILE_XLA_FLAGS = ("--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false "
                          "--xla_cpu_parallel_codegen_split_count=1")


def _xla_accepts(flags: str) -> bool:
  env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], env=env,
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0


if (os.environ.get("KRYLOV_TESTS_XLA_DEFAULTS", "0") in ("", "0")
    and FAST_COMPILE_XLA_FLAGS not in os.environ.get("XLA_FLAGS", "")):
  if _xla_accepts(FAST_COMPILE_XLA_FLAGS):
    os.environ["XLA_FLAGS"] = (FAST_COMPILE_XLA_FLAGS + " " +
                               os.environ.get("XLA_FLAGS", "")).strip()
  else:
    os.environ["KRYLOV_TESTS_XLA_DEFAULTS"] = "1"

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


# CPU seconds per test module, (fast tier, tests marked slow), measured with `-p tests.timing`
# (tests/timing.py) on the whole suite. Used only to order the modules, most expensive first, so
# that pytest-xdist's `--dist loadfile` (one module per worker at a time) does not leave a long
# module for the end while the other worker idles. Stale or missing numbers cost balance, never
# correctness: a module not listed counts as cheap and keeps its place among the cheap ones.
MODULE_CPU_SECONDS = {
    "test_multihost.py": (0, 91), "test_experiments_analysis.py": (23, 69),
    "test_workdir.py": (7, 37), "test_threat_models.py": (8, 35), "test_krylov.py": (20, 16),
    "test_training.py": (1, 27), "test_experiments_soat.py": (4, 23), "test_attacks.py": (26, 0),
    "test_models_are_data.py": (12, 12), "test_randomized.py": (3, 20), "test_soae.py": (9, 12),
    "test_experiments_soae_direction.py": (1, 19), "test_autoattack.py": (13, 3),
    "test_models.py": (5, 11), "test_parallel.py": (0, 15), "test_table.py": (3, 11),
    "test_regularizers.py": (9, 3), "test_eval_compiles.py": (1, 7), "test_hvp.py": (3, 3),
    "test_autoattack_parts.py": (5, 0),
}


def pytest_configure(config):
  # xdist orders the modules by their number of tests unless told not to; the order below is
  # by cost instead (pytest_collection_modifyitems).
  if hasattr(config.option, "loadscopereorder"):
    config.option.loadscopereorder = False


@pytest.hookimpl(trylast=True)  # after `-m` and `-k` deselected what this run leaves out
def pytest_collection_modifyitems(session, config, items):
  """Orders the modules most expensive first (MODULE_CPU_SECONDS, counting the fast-tier and the
  slow part of a module only where this run selected tests of that part); tests within a module
  keep their order."""
  selected: dict[str, list[bool]] = {}
  for item in items:
    parts = selected.setdefault(item.nodeid.split("::", 1)[0], [False, False])
    parts[item.get_closest_marker("slow") is not None] = True

  def cost(module: str) -> float:
    fast, slow = MODULE_CPU_SECONDS.get(os.path.basename(module), (0, 0))
    has_fast, has_slow = selected[module]
    return fast * has_fast + slow * has_slow

  order = {m: i for i, m in enumerate(sorted(selected, key=lambda m: -cost(m)))}
  items.sort(key=lambda item: order[item.nodeid.split("::", 1)[0]])


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
