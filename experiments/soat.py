"""Train a classifier with an adversarial-training method, then evaluate it with the attacks.

  python -m experiments.soat --config configs/quickstart.py --workdir /tmp/quickstart
  python -m experiments.soat --config configs/cifar10_resnet18.py:pgd --workdir /tmp/c10 \
      --config.train.epochs=3

Writes into the workdir (one subfolder per method when ``train.method`` lists several):
``config.json``, ``metrics.jsonl`` (one line per epoch), ``checkpoints/`` (orbax, one per
epoch), ``results.json`` and ``results.md`` (robust-accuracy table). Rerunning with the same
workdir resumes from the last checkpoint: the batches of an epoch depend only on ``(seed,
epoch)`` and the attack noise only on ``(seed, step)``, so a resumed run reproduces the
uninterrupted one and a run killed mid-way loses at most the current epoch.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from tqdm import tqdm

from experiments import workdir as workdir_lib
from krylov_adv import data as data_lib
from krylov_adv import evaluation, models, parallel, training


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ``ValueError`` for a bad config: unknown data source, model, activation, method or
  attack, ``eps < 0``, an unknown norm, non-positive sizes."""
  if config.data.source not in data_lib.SOURCES:
    raise ValueError(f"unknown data source {config.data.source!r}; use one of "
                     f"{data_lib.SOURCES}")
  if config.data.source == "tfds" and config.data.name not in data_lib.TFDS_NAMES:
    raise ValueError(f"unknown dataset {config.data.name!r} for source 'tfds'; use one of "
                     f"{data_lib.TFDS_NAMES}")
  if config.data.source in ("idx", "cifar10_python") and not config.data.root:
    raise ValueError(f"data.root must name the folder of the {config.data.source} files")
  if config.model.name not in models.available():
    raise ValueError(f"unknown model {config.model.name!r}; available: {models.available()}")
  models.get_activation(config.model.activation)
  for method in methods_of(config):
    training.validate_train_config(with_method(config, method).train)
  from krylov_adv import attacks
  for entry, cfg in config.eval.attacks.items():
    if cfg.name != "clean":
      attacks.get(cfg.name)
    if cfg.norm not in ("linf", "l2"):
      raise ValueError(f"eval.attacks.{entry}: unknown norm {cfg.norm!r}; use 'linf' or 'l2'")
    if not float(cfg.eps) >= 0:
      raise ValueError(f"eval.attacks.{entry}: eps must be >= 0, got {cfg.eps}")
  if int(config.eval.num_examples) < 1 or int(config.eval.batch_size) < 1:
    raise ValueError("eval.num_examples and eval.batch_size must be >= 1")


def methods_of(config) -> list[str]:
  """The training methods of ``config.train.method`` (comma-separated)."""
  methods = [m.strip() for m in str(config.train.method).split(",") if m.strip()]
  if not methods:
    raise ValueError("train.method is empty")
  return methods


def with_method(config, method: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(config.to_dict())
  c.train.method = method
  return c


@dataclasses.dataclass
class Experiment:
  """What one run needs: the data, the model, the optimiser and the jitted steps."""
  config: Any
  dataset: data_lib.Dataset
  model: Any
  tx: Any
  steps_per_epoch: int
  train_step: Any
  eval_step: Any


def build(config, dataset: data_lib.Dataset | None = None) -> Experiment:
  """Data, model, optimiser and jitted steps of a single-method config."""
  dataset = data_lib.load(config.data) if dataset is None else dataset
  model = models.get(config.model.name, num_classes=dataset.num_classes,
                     activation=config.model.activation, **config.model.options.to_dict())
  spe = data_lib.steps_per_epoch(len(dataset.y_train), config.train.batch_size)
  tx = training.make_optimizer(config.train, spe)
  return Experiment(config, dataset, model, tx, spe, training.make_train_step(model, tx,
                                                                              config.train),
                    training.make_eval_step(model))


def start_distributed(config) -> None:
  """Multi-host start-up when ``config.parallel.distributed`` is set (coordinator fields, or
  the standard environment variables when they are empty). Must precede any other JAX call
  that touches devices; a no-op on one host and when called again."""
  p = config.get("parallel", None)
  if p is not None and bool(p.distributed):
    parallel.initialize_distributed(p.coordinator_address or None,
                                    int(p.num_processes) or None,
                                    None if int(p.process_id) < 0 else int(p.process_id))


def make_mesh(config) -> jax.sharding.Mesh:
  """The data-parallel mesh of ``config.parallel`` (all devices by default), after multi-host
  start-up (:func:`start_distributed`); checks that the batch splits evenly."""
  start_distributed(config)
  p = config.get("parallel", None)
  mesh = parallel.make_mesh(None if p is None else tuple(p.mesh_shape))
  parallel.check_batch_divisible(int(config.train.batch_size), mesh)
  return mesh


def global_batch(xb: np.ndarray, yb: np.ndarray, mesh) -> tuple[jax.Array, jax.Array]:
  """A host batch ``xb (B, H, W, C)``, ``yb (B,)`` as global arrays sharded over ``mesh``'s
  ``"data"`` axis. Every host holds the same global batch (the shuffle depends only on the seed
  and the epoch); with several hosts each one places only its own slice
  (``parallel.host_shard_indices``)."""
  if jax.process_count() == 1:
    return parallel.shard_batch((xb, yb), mesh)
  own = parallel.host_shard_indices(len(yb))
  return parallel.host_local_to_global((xb[own], yb[own]), mesh)


def initial_state(exp: Experiment) -> training.TrainState:
  return training.create_train_state(exp.model, exp.tx, jax.random.PRNGKey(exp.config.seed),
                                     exp.dataset.x_train.shape[1:])


def checkpoint_manager(workdir: str, max_to_keep: int = 2) -> ocp.CheckpointManager:
  """Orbax manager of ``workdir/checkpoints``; checkpoint ``e`` holds the state after epoch
  ``e`` (so ``latest_step()`` is the number of completed epochs)."""
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, "checkpoints")),
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))


def restore_latest(mngr: ocp.CheckpointManager, template: training.TrainState):
  """``(state, completed_epochs)``; ``(template, 0)`` when there is no checkpoint."""
  latest = mngr.latest_step()
  if latest is None:
    return template, 0
  state = mngr.restore(latest, args=ocp.args.StandardRestore(template))
  return state, int(latest)


def clean_test_accuracy(exp: Experiment, state, batch_size: int = 512) -> float:
  x, y = exp.dataset.x_test, exp.dataset.y_test
  correct = 0
  for start in range(0, len(y), batch_size):
    correct += int(exp.eval_step(state, jnp.asarray(x[start:start + batch_size]),
                                 jnp.asarray(y[start:start + batch_size])))
  return correct / len(y)


def train(config, workdir: str, *, dataset: data_lib.Dataset | None = None,
          stop_after_epoch: int | None = None, progress: bool = True):
  """Trains a single-method config, resuming from ``workdir/checkpoints`` when present.

  Args:
    stop_after_epoch: stop (as if killed) once this many epochs are done; for tests.

  Returns:
    ``(experiment, state)`` after the last completed epoch.
  """
  os.makedirs(workdir, exist_ok=True)
  mesh = make_mesh(config)
  # With several hosts every process trains (each feeds its slice of the batch), orbax writes
  # each checkpoint once, and only process 0 writes the other files and prints.
  primary = parallel.is_primary()
  progress = progress and primary
  # experiments.workdir: a rerun must use the config the workdir was trained with.
  workdir_lib.check_run_config(workdir, config, record=primary)
  exp = build(config, dataset)
  mngr = checkpoint_manager(workdir, int(config.checkpoint.max_to_keep))
  # Parameters and optimiser state are replicated on every device; restoring into the
  # replicated template reshards a checkpoint written on any device count onto this mesh.
  # The newest checkpoint that restores and matches its checksum; damaged ones are moved aside.
  restored = workdir_lib.restore_newest(
      mngr, parallel.replicate(initial_state(exp), mesh), workdir, quarantine=True,
      primary=primary, sync=None if jax.process_count() == 1 else _sync_hosts)
  state, start_epoch = restored.state, restored.step
  workdir_lib.note_progress(start_epoch, config.train.method)
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  if primary:
    for line in restored.messages(workdir):
      print(line, file=sys.stderr, flush=True)
    if start_epoch and progress:
      print(f"[{config.train.method}] resuming {workdir} after epoch {start_epoch}", flush=True)
    workdir_lib.truncate_metrics(metrics_path, start_epoch)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json(indent=2))
  key = jax.random.PRNGKey(config.seed + 1)
  lr_fn = training.learning_rate_schedule(config.train, exp.steps_per_epoch)
  last = int(config.train.epochs) if stop_after_epoch is None else min(
      int(config.train.epochs), int(stop_after_epoch))
  for epoch in range(start_epoch, last):
    start = time.perf_counter()
    sums = np.zeros(3)
    batches = data_lib.epoch_batches(exp.dataset.x_train, exp.dataset.y_train,
                                     config.train.batch_size, seed=config.seed, epoch=epoch,
                                     augment=bool(config.data.augment))
    bar = tqdm(batches, total=exp.steps_per_epoch, disable=not progress, leave=False,
               desc=f"{config.train.method} epoch {epoch + 1}/{config.train.epochs}")
    for xb, yb in bar:
      # The batch is sharded over the "data" axis: attacks (GMRES included) run per device on
      # their examples, and only the parameter gradients are reduced across devices.
      state, m = exp.train_step(state, *global_batch(xb, yb, mesh), key)
      sums += np.asarray([float(m.loss), float(m.accuracy), float(m.clean_accuracy)])
      bar.set_postfix(loss=f"{float(m.loss):.3f}", acc=f"{float(m.accuracy):.3f}")
    mean = sums / exp.steps_per_epoch
    record = dict(epoch=epoch + 1, step=int(state.step), method=config.train.method,
                  train_loss=mean[0], train_accuracy=mean[1],
                  train_clean_accuracy=None if np.isnan(mean[2]) else mean[2],
                  test_accuracy=clean_test_accuracy(exp, state),
                  learning_rate=float(lr_fn(int(state.step) - 1)),
                  seconds=time.perf_counter() - start)
    if not np.isfinite(mean[0]):
      raise FloatingPointError(f"training diverged in epoch {epoch + 1}: loss {mean[0]}")
    if primary:
      with open(metrics_path, "a") as f:
        f.write(json.dumps(record) + "\n")
    workdir_lib.save_checkpoint(mngr, epoch + 1, state, workdir, primary=primary)
    workdir_lib.note_progress(epoch + 1, config.train.method, flush=mngr.wait_until_finished)
    if progress:
      print(f"[{config.train.method}] epoch {epoch + 1}: loss {mean[0]:.4f} train acc "
            f"{mean[1]:.4f} test acc {record['test_accuracy']:.4f} ({record['seconds']:.1f}s)",
            flush=True)
  mngr.wait_until_finished()
  mngr.close()
  workdir_lib.note_progress(max(start_epoch, last), config.train.method)
  return exp, state


def evaluate(exp: Experiment, state, config) -> list[evaluation.AttackResult]:
  """Runs ``config.eval.attacks`` on the first ``eval.num_examples`` test points."""
  n = min(int(config.eval.num_examples), len(exp.dataset.y_test))
  logits_fn = jax.jit(training.inference_logits_fn(exp.model, state.params, state.batch_stats))
  # Data parallel like training: each attack batch is sharded over the mesh's "data" axis.
  return evaluation.evaluate_attacks(logits_fn, exp.dataset.x_test[:n], exp.dataset.y_test[:n],
                                     config.eval.attacks, jax.random.PRNGKey(config.seed + 2),
                                     batch_size=int(config.eval.batch_size),
                                     mesh=make_mesh(config))


def write_results(workdir: str, results_by_method: dict[str, list[evaluation.AttackResult]],
                  title: str, name: str = "results") -> str:
  """Writes ``<name>.json`` and ``<name>.md`` (process 0 only); returns the markdown table."""
  table = evaluation.markdown_table(results_by_method)
  if not parallel.is_primary():
    return table
  with open(os.path.join(workdir, f"{name}.json"), "w") as f:
    json.dump({m: [r._asdict() for r in rs] for m, rs in results_by_method.items()}, f, indent=2)
  with open(os.path.join(workdir, f"{name}.md"), "w") as f:
    f.write(f"# {title}\n\nRobust accuracy (higher is better).\n\n{table}")
  return table


def _sync_hosts() -> None:
  from jax.experimental import multihost_utils
  multihost_utils.sync_global_devices("experiments.workdir")


def train_and_evaluate(config, workdir: str, *, stop_after_epoch: int | None = None,
                       progress: bool = True) -> dict[str, list[evaluation.AttackResult]]:
  """Trains every method of ``config.train.method`` and evaluates each with the attacks, holding
  the workdir's lock (``experiments.workdir.workdir_lock``: a second run fails at once).

  Returns ``{method: [AttackResult, ...]}`` (empty lists when stopped early).
  """
  with workdir_lib.config_errors():
    validate_config(config)
  start_distributed(config)
  with workdir_lib.workdir_lock(workdir, process_index=jax.process_index()):
    return _train_and_evaluate(config, workdir, stop_after_epoch=stop_after_epoch,
                               progress=progress)


def _train_and_evaluate(config, workdir: str, *, stop_after_epoch: int | None = None,
                        progress: bool = True) -> dict[str, list[evaluation.AttackResult]]:
  methods = methods_of(config)
  with workdir_lib.config_errors():
    workdir_lib.check_data_root(config.data)
    dataset = data_lib.load(config.data)
  results: dict[str, list[evaluation.AttackResult]] = {}
  for method in methods:
    cfg = with_method(config, method)
    sub = workdir if len(methods) == 1 else os.path.join(workdir, method)
    exp, state = train(cfg, sub, dataset=dataset, stop_after_epoch=stop_after_epoch,
                       progress=progress)
    if stop_after_epoch is not None and stop_after_epoch < cfg.train.epochs:
      results[method] = []
      continue
    results[method] = evaluate(exp, state, cfg)
    if len(methods) > 1:
      write_results(sub, {method: results[method]}, f"{dataset.name}, {method}")
  if all(results.values()):
    table = write_results(workdir, results, f"{dataset.name}: {', '.join(methods)}")
    if progress and parallel.is_primary():
      print(table, flush=True)
  return results


if __name__ == "__main__":
  from experiments import common
  common.main(train_and_evaluate, "folder for checkpoints, metrics and results")
