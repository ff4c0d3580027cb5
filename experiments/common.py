"""Shared pieces of the analysis experiments (ablation_hvp, krylov_dims, iterations, perceptual,
grad_norms): data, trained models (trained here or read from an ``experiments.soat`` workdir),
timing, JSON and figure output, and the command line.

Config schema: every analysis config is ``configs.common.base_config()`` (data, model, train
recipe, eval) plus an ``experiment`` block with that experiment's own fields, so the models an
experiment trains use exactly the recipe and code of ``experiments.soat``:

  data.*                 the dataset (krylov_adv.data.load), plus data.test_split > 0 to split
                         the MNIST test set of ``data.root`` into train / test when only the
                         t10k files are available offline (held-out: the last test_split images)
  model.name/activation  architecture (the activation may be overridden per model)
  train.*                training recipe; train.method lists the methods of the models needed
  models_dir             optional ``experiments.soat`` workdir whose checkpoints are used instead
                         of training (paper scale: ``workdir/<method>`` when it holds several)
  experiment.*           the experiment's own fields (num_examples, batch_size, sweeps, ...)

Output: ``workdir/<experiment>/results.json`` (everything measured, plus the config), PNG
figures next to it and ``report.md`` (the section ``experiments.report`` assembles).

Several hosts (``parallel.distributed``, as for ``experiments.soat``): the models are trained
data-parallel over every host's devices; the measurements then run on each host's own devices
with the parameters copied to it (they are per example or timings, and small at every scale),
and only process 0 writes files, the model cache included, and prints.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from krylov_adv import data as data_lib
from krylov_adv import evaluation, models, parallel, training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------
# Data


def _resolve(path: str) -> str:
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
    c.root = _resolve(c.root)
  split = int(c.get("test_split", 0) or 0)
  if c.source == "idx" and split > 0:
    x, y = data_lib.load_idx_split(c.root, "t10k")
    if not 0 < split < len(y):
      raise ValueError(f"data.test_split must lie in (0, {len(y)}), got {split}")
    return data_lib.Dataset(x[:-split], y[:-split], x[-split:], y[-split:], 10,
                            f"{c.get('name', 'idx')} (t10k split)")
  return data_lib.load(c)


# ---------------------------------------------------------------------------------------------
# Models


@dataclasses.dataclass(frozen=True)
class TrainedModel:
  """A classifier ready to attack.

  label: ``"<method>"`` or ``"<method>/<activation>"``; logits_fn: jitted ``(B, H, W, C) ->
  (B, K)`` in inference mode (one object per model, so attacks compile once for it);
  variables: ``{"params", "batch_stats"}``; clean_accuracy: on the full test split;
  seconds: training time (0 when loaded); module: the flax module.
  """
  label: str
  method: str
  activation: str
  logits_fn: Callable[[jax.Array], jax.Array]
  variables: Any
  clean_accuracy: float
  seconds: float
  module: Any = None


def _method_config(config, method: str, activation: str | None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(config.to_dict())
  c.train.method = method
  if activation:
    c.model.activation = activation
  return c


def _cache_key(cfg) -> str:
  blob = json.dumps({"data": cfg.data.to_dict(), "model": cfg.model.to_dict(),
                     "train": cfg.train.to_dict(), "seed": cfg.seed}, sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _train_in_memory(cfg, dataset: data_lib.Dataset):
  """Trains ``cfg`` with the jitted step of ``krylov_adv.training`` (no checkpoints),
  data-parallel on the config's mesh exactly as ``experiments.soat.train`` does: parameters
  replicated, each batch sharded over ``"data"`` (each host placing its own slice)."""
  from experiments import soat
  exp = soat.build(cfg, dataset)
  mesh = soat.make_mesh(cfg)
  state = parallel.replicate(soat.initial_state(exp), mesh)
  key = jax.random.PRNGKey(cfg.seed + 1)
  for epoch in range(int(cfg.train.epochs)):
    for xb, yb in data_lib.epoch_batches(dataset.x_train, dataset.y_train,
                                         int(cfg.train.batch_size), seed=cfg.seed, epoch=epoch,
                                         augment=bool(cfg.data.augment)):
      state, metrics = exp.train_step(state, *soat.global_batch(xb, yb, mesh), key)
    if not np.isfinite(float(metrics.loss)):
      raise FloatingPointError(f"training {cfg.train.method} diverged in epoch {epoch + 1}")
  return exp.model, state


def _host_variables(state) -> dict:
  """``{"params", "batch_stats"}`` of a train state as NumPy. The state is replicated over the
  (possibly multi-host) mesh, so every host holds the whole value."""
  return jax.tree_util.tree_map(parallel.to_host, {"params": state.params,
                                                   "batch_stats": state.batch_stats})


def get_model(config, dataset: data_lib.Dataset, method: str, *, activation: str | None = None,
              cache_dir: str | None = None, progress: bool = True) -> TrainedModel:
  """A model trained with ``method`` (``standard | pgd | trades | ...``) on ``dataset``.

  With ``config.models_dir`` set, the checkpoint of an ``experiments.soat`` run is restored
  (``models_dir/<method>`` when that folder exists, else ``models_dir`` itself). Otherwise the
  model is trained here with ``config.train`` (and ``activation`` overriding
  ``config.model.activation``), and cached in ``cache_dir`` keyed by a hash of the data, model
  and training configs, so several experiments sharing a workdir train each model once.

  The returned ``variables`` are NumPy and ``logits_fn`` runs on this host's default device, so
  that what follows is host-local on every host. With several hosts the cache is read only when
  every host finds it (training is collective, so all must make the same choice) and written
  by process 0 alone, through a rename so that a reader never sees half a file.
  """
  cfg = _method_config(config, method, activation)
  act = cfg.model.activation
  label = method if activation is None else f"{method}/{act}"
  models_dir = _resolve(str(config.get("models_dir", "") or ""))
  start = time.perf_counter()
  if models_dir:
    from experiments import evaluate as evaluate_lib
    sub = os.path.join(models_dir, method)
    exp, state, _ = evaluate_lib.load_trained(cfg, sub if os.path.isdir(sub) else models_dir,
                                              dataset)
    model, variables, seconds = exp.model, _host_variables(state), 0.0
  else:
    model = models.get(cfg.model.name, num_classes=dataset.num_classes, activation=act,
                       **cfg.model.options.to_dict())
    path = os.path.join(cache_dir, f"{method}_{act}_{_cache_key(cfg)}.pkl") if cache_dir else ""
    if path and parallel.all_hosts(os.path.exists(path)):
      with open(path, "rb") as f:
        variables, seconds = pickle.load(f)
    else:
      if progress:
        print(f"training {label} ({cfg.train.epochs} epochs on {dataset.name})", flush=True)
      model, state = _train_in_memory(cfg, dataset)
      variables = _host_variables(state)
      seconds = time.perf_counter() - start
      if path and parallel.is_primary():
        os.makedirs(cache_dir, exist_ok=True)
        with open(path + ".tmp", "wb") as f:
          pickle.dump((variables, seconds), f)
        os.replace(path + ".tmp", path)
  logits_fn = jax.jit(training.inference_logits_fn(model, variables["params"],
                                                   variables["batch_stats"]))
  acc = evaluation.accuracy(logits_fn, dataset.x_test, dataset.y_test)
  if progress:
    print(f"model {label}: clean test accuracy {acc:.4f}", flush=True)
  return TrainedModel(label, method, act, logits_fn, variables, acc, seconds, model)


def cross_entropy_fn(logits_fn, y) -> Callable[[jax.Array], jax.Array]:
  """``x (B, ...) -> (B,)`` per-example cross-entropy of ``logits_fn`` against labels ``y``."""
  from krylov_adv import losses
  return lambda x: losses.cross_entropy(logits_fn(x), y)


def logits_in_dtype(model: TrainedModel, dtype) -> Callable[[jax.Array], jax.Array]:
  """``x -> logits`` with every parameter cast to ``dtype`` (un-jitted; float64 needs
  ``jax.enable_x64``). Used to compare float32 against float64 arithmetic on the same model."""
  variables = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), model.variables)
  return training.inference_logits_fn(model.module, variables["params"], variables["batch_stats"])


def first_examples(dataset: data_lib.Dataset, n: int) -> tuple[np.ndarray, np.ndarray]:
  """The first ``n`` held-out images and labels (all of them when ``n`` exceeds the split)."""
  n = min(int(n), len(dataset.y_test))
  return dataset.x_test[:n], dataset.y_test[:n]


# ---------------------------------------------------------------------------------------------
# Measurement


def block(tree):
  """Waits for every array in ``tree`` (timings must not stop at dispatch)."""
  return jax.block_until_ready(tree)


def time_call(fn: Callable[[], Any], *, repeats: int = 5, warmup: int = 1) -> float:
  """Median wall time in seconds of ``fn()`` (results blocked on) after ``warmup`` calls, which
  absorb compilation."""
  for _ in range(warmup):
    block(fn())
  times = []
  for _ in range(max(int(repeats), 1)):
    start = time.perf_counter()
    block(fn())
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def to_jsonable(obj):
  """NumPy / JAX scalars and arrays to plain Python. Non-finite floats are kept (``json`` writes
  ``NaN`` / ``Infinity``, which Python reads back), so nothing is silently hidden."""
  if isinstance(obj, dict):
    return {str(k): to_jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [to_jsonable(v) for v in obj]
  if isinstance(obj, (np.ndarray, jax.Array)):
    return to_jsonable(np.asarray(obj).tolist())
  if isinstance(obj, np.generic):
    return obj.item()
  return obj


def output_dir(workdir: str, name: str) -> str:
  """``workdir/name``, created by process 0 (the only one that writes there)."""
  path = os.path.join(workdir, name)
  if parallel.is_primary():
    os.makedirs(path, exist_ok=True)
  return path


def write_results(out_dir: str, config, results: dict, markdown: str) -> str:
  """Writes ``results.json`` (results plus the config) and ``report.md`` on process 0; returns
  the JSON path."""
  path = os.path.join(out_dir, "results.json")
  if not parallel.is_primary():
    return path
  with open(path, "w") as f:
    json.dump({"config": json.loads(config.to_json()), "results": to_jsonable(results)}, f,
              indent=2)
  with open(os.path.join(out_dir, "report.md"), "w") as f:
    f.write(markdown)
  return path


def read_results(out_dir: str) -> dict:
  with open(os.path.join(out_dir, "results.json")) as f:
    return json.load(f)


def pyplot():
  """matplotlib's pyplot on the non-interactive Agg backend (no display needed)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def save_figure(fig, path: str) -> str:
  """Saves ``fig`` as ``path`` (process 0 only) and closes it; returns the file name."""
  if parallel.is_primary():
    fig.tight_layout()
    fig.savefig(path, dpi=110)
  pyplot().close(fig)
  return os.path.basename(path)


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
  """A markdown table; floats printed with 4 significant digits."""
  def cell(v):
    if isinstance(v, float):
      return f"{v:.4g}"
    return str(v)
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
  return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Command line


def main(run: Callable[[Any, str], Any],
         workdir_help: str = "output folder (results in workdir/<experiment>/)"):
  """``python -m experiments.<name> --config configs/<name>.py[:scale] --workdir DIR``: the
  command line of every entrypoint (``soat``, ``evaluate`` and the analyses).

  Starts the multi-host runtime first when ``config.parallel.distributed`` is set (it must
  precede every other JAX call), then calls ``run(config, workdir, progress=...)`` with progress
  output on process 0 only.
  """
  from absl import app, flags, logging
  from ml_collections import config_flags

  flags_ = flags.FLAGS
  config_flags.DEFINE_config_file("config", None, "experiment config file (configs/*.py)",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, workdir_help)
  flags.mark_flags_as_required(["config", "workdir"])

  def _main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags_["verbosity"].present:
      logging.set_verbosity(logging.WARNING)  # orbax logs every file operation at INFO
    from experiments import soat
    soat.start_distributed(flags_.config)
    run(flags_.config, flags_.workdir, progress=parallel.is_primary())

  # experiments.workdir: config and workdir mistakes are one stderr line (exit 2), Ctrl-C one
  # line naming the last saved epoch (exit 130); bugs keep their traceback.
  from experiments import workdir as workdir_lib
  workdir_lib.run_cli(lambda: app.run(_main, flags_parser=workdir_lib.parse_flags))


# ---------------------------------------------------------------------------------------------
# Config builders shared by configs/<experiment>.py


SCALES = ("tiny", "small", "paper")


def base_config(scale: str) -> ml_collections.ConfigDict:
  """The data, model and training recipe of an analysis config at ``scale``.

  * ``tiny`` (tests, seconds): digits, TinyCNN, 15 epochs, PGD-3 training.
  * ``small`` (a 2-core CPU, minutes): digits, TinyCNN, 30 epochs, PGD-5 training, Linf 0.1.
  * ``paper``: MNIST through tensorflow-datasets, the Madry CNN, the S-O paper's threat model
    (Linf 0.3) and the SOAE paper's training recipe (``configs._paper.mnist_like``); set
    ``models_dir`` to an ``experiments.soat`` workdir to use its checkpoints.
  """
  from configs import _paper
  from configs import common as config_common
  if scale not in SCALES:
    raise ValueError(f"unknown scale {scale!r}; use one of {SCALES}")
  if scale == "paper":
    c = _paper.mnist_like(dict(source="tfds", name="mnist"), "madry_cnn", "standard")
    c.train.epochs = 100
  else:
    c = config_common.base_config()
    c.data.update(dict(source="digits", name="digits", num_test=397))
    c.model.name = "tiny_cnn"
    t = c.train
    t.update(dict(epochs=30 if scale == "small" else 15, batch_size=64, learning_rate=0.1,
                  lr_schedule="cosine", weight_decay=5e-4, eps=0.1, norm="linf"))
    t.pgd.update(dict(steps=5 if scale == "small" else 3, step_size=0.03))
    t.trades.update(dict(steps=5 if scale == "small" else 3, step_size=0.03, beta=6.0))
  c.train.method = "standard"
  # The analysis experiments do not use the evaluation table; keep it valid and cheap.
  c.eval.attacks = config_common.attack_suite(eps_linf=c.train.eps, eps_l2=0.5,
                                              include=("clean",))
  c.eval.num_examples = 64
  c.models_dir = ""
  c.data.test_split = 0
  c.experiment = ml_collections.ConfigDict()
  return c
