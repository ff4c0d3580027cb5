"""One job: the analyses' trained classifiers — trained here and cached in ``workdir/models``, or
restored from an ``experiments.soat`` workdir — ready to attack.

The cache holds one ``.npz`` per model (NumPy arrays only, read with ``allow_pickle=False``: no
pickle in files a user receives), keyed by a hash of the data, model and training configs, so
several experiments sharing a workdir train each model once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from experiments import datasets, pipeline
from krylov_adv import data as data_lib
from krylov_adv import evaluation, losses, models, parallel, training

# The key under which a cache file stores the training time next to the flattened variables.
_SECONDS = "__seconds__"


@dataclasses.dataclass(frozen=True)
class TrainedModel:
  """A classifier ready to attack.

  label: ``"<method>"`` or ``"<method>/<activation>"``; logits_fn: jitted ``(B, H, W, C) ->
  (B, K)`` in inference mode (one object per model, so attacks compile once for it);
  variables: ``{"params", "batch_stats"}`` as NumPy; clean_accuracy: on the full test split;
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


def _cache_key(cfg) -> str:
  blob = json.dumps({"data": cfg.data.to_dict(), "model": cfg.model.to_dict(),
                     "train": cfg.train.to_dict(), "seed": cfg.seed}, sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def save_variables(path: str, variables: dict, seconds: float) -> None:
  """Writes ``variables`` (a nested dict of arrays) and ``seconds`` as one ``.npz`` at ``path``,
  through a temporary file and a rename so that a reader never sees half a file."""
  flat = traverse_util.flatten_dict(variables, sep="/")
  tmp = path + ".tmp"
  # A file object, not a name: np.savez would append ".npz" to the temporary name.
  with open(tmp, "wb") as f:
    np.savez(f, **{k: np.asarray(v) for k, v in flat.items()},
             **{_SECONDS: np.float64(seconds)})
  os.replace(tmp, path)


def load_variables(path: str) -> tuple[dict, float]:
  """``(variables, seconds)`` from a file of :func:`save_variables` (no pickle allowed)."""
  with np.load(path, allow_pickle=False) as z:
    flat = {k: z[k] for k in z.files if k != _SECONDS}
    seconds = float(z[_SECONDS])
  variables = traverse_util.unflatten_dict(flat, sep="/")
  # Empty collections (a model without BatchNorm has no statistics) leave no array behind.
  variables.setdefault("params", {})
  variables.setdefault("batch_stats", {})
  return variables, seconds


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
  model is trained here (``pipeline.train_in_memory``) with ``config.train`` (and ``activation``
  overriding ``config.model.activation``), and cached in ``cache_dir`` as
  ``<method>_<activation>_<hash>.npz``.

  The returned ``variables`` are NumPy and ``logits_fn`` runs on this host's default device, so
  that what follows is host-local on every host. With several hosts the cache is read only when
  every host finds it (training is collective, so all must make the same choice) and written
  by process 0 alone.
  """
  cfg = pipeline.with_method(config, method, activation)
  act = cfg.model.activation
  label = method if activation is None else f"{method}/{act}"
  models_dir = datasets.resolve_path(str(config.get("models_dir", "") or ""))
  start = time.perf_counter()
  if models_dir:
    sub = os.path.join(models_dir, method)
    exp, state, _ = pipeline.load_trained(cfg, sub if os.path.isdir(sub) else models_dir,
                                          dataset)
    model, variables, seconds = exp.model, _host_variables(state), 0.0
  else:
    model = models.get(cfg.model.name, num_classes=dataset.num_classes, activation=act,
                       normalize_mean=cfg.model.get("normalize_mean", ()),
                       normalize_std=cfg.model.get("normalize_std", ()),
                       **cfg.model.options.to_dict())
    path = os.path.join(cache_dir, f"{method}_{act}_{_cache_key(cfg)}.npz") if cache_dir else ""
    if path and parallel.all_hosts(os.path.exists(path)):
      variables, seconds = load_variables(path)
    else:
      if progress:
        print(f"training {label} ({cfg.train.epochs} epochs on {dataset.name})", flush=True)
      model, state = pipeline.train_in_memory(cfg, dataset)
      variables = _host_variables(state)
      seconds = time.perf_counter() - start
      if path and parallel.is_primary():
        os.makedirs(cache_dir, exist_ok=True)
        save_variables(path, variables, seconds)
  logits_fn = jax.jit(training.inference_logits_fn(model, variables["params"],
                                                   variables["batch_stats"]))
  acc = evaluation.accuracy(logits_fn, dataset.x_test, dataset.y_test)
  if progress:
    print(f"model {label}: clean test accuracy {acc:.4f}", flush=True)
  return TrainedModel(label, method, act, logits_fn, variables, acc, seconds, model)


def cross_entropy_fn(logits_fn, y) -> Callable[[jax.Array], jax.Array]:
  """``x (B, ...) -> (B,)`` per-example cross-entropy of ``logits_fn`` against labels ``y``."""
  return lambda x: losses.cross_entropy(logits_fn(x), y)


def logits_in_dtype(model: TrainedModel, dtype) -> Callable[[jax.Array], jax.Array]:
  """``x -> logits`` with every parameter cast to ``dtype`` (un-jitted; float64 needs
  ``jax.enable_x64``). Used to compare float32 against float64 arithmetic on the same model."""
  variables = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), model.variables)
  return training.inference_logits_fn(model.module, variables["params"], variables["batch_stats"])


def cache_dir(workdir: str) -> str:
  """Where the analyses sharing ``workdir`` cache their trained models: ``workdir/models``."""
  return os.path.join(workdir, "models")


def by_method(config, dataset: data_lib.Dataset, methods, workdir: str, *,
              progress: bool = True) -> dict[str, TrainedModel]:
  """``{method: get_model(...)}`` for each training method, cached in ``workdir/models``."""
  return {m: get_model(config, dataset, m, cache_dir=cache_dir(workdir), progress=progress)
          for m in methods}


def by_activation(config, dataset: data_lib.Dataset, activations, workdir: str, *,
                  method: str = "standard", progress: bool = True) -> dict[str, TrainedModel]:
  """``{activation: get_model(...)}``: one ``method`` model per activation, cached in
  ``workdir/models``."""
  return {act: get_model(config, dataset, method, activation=act, cache_dir=cache_dir(workdir),
                         progress=progress) for act in activations}
