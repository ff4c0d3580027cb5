"""The plumbing of every entry point: config -> experiment -> trained state -> evaluation -> files.

One job: run a config. ``experiments.soat``, ``experiments.evaluate``, the analyses and the
benchmarks are thin mains over these functions; none of them is imported by another.

  validate_config, methods_of, with_method, method_runs   what a config asks for
  build (Experiment), initial_state                       data, model, optimiser, jitted steps
  start_distributed, make_mesh, global_batch              devices and hosts
  epoch_steps                                             THE train loop (one epoch, per step)
  train                                                   checkpointed: workdir/checkpoints,
                                                          metrics.jsonl, resume
  train_in_memory                                         no files (the analyses' models)
  checkpoint_manager, restore_latest, load_trained        orbax checkpoints
  evaluate, write_robustness                              the attack table and its files

The flow follows the Flax examples: a step is a pure function jitted once (in
``krylov_adv.training``), the loop is short, every hyperparameter is in the config.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from typing import Any, Iterator

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from tqdm import tqdm

from experiments import outputs
from experiments import workdir as workdir_lib
from krylov_adv import data as data_lib
from krylov_adv import evaluation, models, parallel, stats, training


# ---------------------------------------------------------------------------------------------
# What a config asks for


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ``ValueError`` for a bad config before anything runs: unknown data source, model,
  activation, method or attack, ``eps < 0`` or non-finite (``eval.eps_*`` too), a NaN/inf real
  hyperparameter, an unknown norm, non-positive sizes, and every selected method's and every
  entry of both evaluation suites' hyperparameters (``training.check_attack_config``), with
  messages naming the field
  (``eval.attacks.pgd_linf.steps must be an integer >= 1, got 0``)."""
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
  training.check_finite_reals("eval", {f: float(config.eval[f]) for f in ("eps_linf", "eps_l2")})
  for field in ("eps_linf", "eps_l2"):
    if not float(config.eval[field]) >= 0:
      raise ValueError(f"eval.{field} must be >= 0, got {config.eval[field]}")
  from krylov_adv import attacks
  for suite in SUITES:
    for entry, cfg in config.eval[suite].items():
      where = f"eval.{suite}.{entry}"
      if cfg.get("name") != "clean":
        attacks.get(cfg.get("name"))
      training.check_eps_norm(where, 0.0 if cfg.get("eps") is None else cfg.eps,
                              cfg.get("norm"))
      if cfg.name != "clean":
        hyper = _hyperparameters(cfg)
        training.check_attack_config(where, cfg.name, hyper)
      if cfg.name == "autoattack":
        # The ensemble's plan (version, custom components, their hyperparameters) is checked
        # by the function AutoAttack builds it with, before any attack runs.
        from krylov_adv.attacks import _autoattack
        try:
          _autoattack.version_components(hyper.get("version", "standard"),
                                         hyper.get("attacks"), hyper.get("hyperparameters"))
        except ValueError as e:
          raise ValueError(f"{where}: {e}") from None
  if int(config.eval.num_examples) < 1 or int(config.eval.batch_size) < 1:
    raise ValueError("eval.num_examples and eval.batch_size must be >= 1")


# The two evaluation suites of a config: eval.attacks after training (experiments.soat),
# eval.table for experiments.evaluate (the papers' full table in every config).
SUITES = ("attacks", "table")
# Fields of a suite entry that are not keyword arguments of its attack.
_ENTRY_FIELDS = ("label", "name", "norm", "eps")


def _hyperparameters(cfg) -> dict[str, Any]:
  return {k: v for k, v in cfg.to_dict().items() if k not in _ENTRY_FIELDS}


def eval_suite(config, suite: str = "attacks") -> dict[str, dict[str, Any]]:
  """The entries of ``config.eval.<suite>`` as plain dicts, ready to run.

  An entry whose ``eps`` is ``None`` (every suite ``configs.common.attack_suite`` builds) takes
  ``config.eval.eps_<norm>``, read here at evaluation time so that one override moves the whole
  suite; entries named in ``config.eval.skip`` (comma-separated entry names, attack names or
  norms) are left out.
  """
  skip = {t.strip() for t in str(config.eval.get("skip", "")).split(",") if t.strip()}
  out = {}
  for entry, cfg in config.eval[suite].items():
    c = cfg.to_dict()
    if skip & {entry, c["name"], c["norm"]}:
      continue
    if c.get("eps") is None:
      c["eps"] = float(config.eval[f"eps_{c['norm']}"])
    out[entry] = c
  return out


def suite_key_indices(config, suite: str = "attacks") -> dict[str, int]:
  """``{entry: i}``, each entry's position in the whole ``config.eval.<suite>`` before
  ``eval.skip``: the ``fold_in`` index of its attack key (``evaluation.evaluate_attacks``), so
  that skipping an entry changes no other entry's key, and with nothing skipped every key is the
  positional one it always was."""
  return {entry: i for i, entry in enumerate(config.eval[suite].keys())}


def methods_of(config) -> list[str]:
  """The training methods of ``config.train.method`` (comma-separated)."""
  methods = [m.strip() for m in str(config.train.method).split(",") if m.strip()]
  if not methods:
    raise ValueError("train.method is empty")
  return methods


def with_method(config, method: str, activation: str | None = None
                ) -> ml_collections.ConfigDict:
  """A copy of ``config`` for one training method (and, when given, one model activation)."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.train.method = method
  if activation:
    c.model.activation = activation
  return c


def method_runs(config, workdir: str) -> Iterator[tuple[str, ml_collections.ConfigDict, str]]:
  """``(method, single-method config, its workdir)`` for each method of ``config``: the workdir
  itself for one method, ``workdir/<method>`` for several."""
  methods = methods_of(config)
  for method in methods:
    yield (method, with_method(config, method),
           workdir if len(methods) == 1 else os.path.join(workdir, method))


# ---------------------------------------------------------------------------------------------
# Build


@dataclasses.dataclass
class Experiment:
  """What one run needs: the data, the model, the optimiser and the jitted train step."""
  config: Any
  dataset: data_lib.Dataset
  model: Any
  tx: Any
  steps_per_epoch: int
  train_step: Any


def build(config, dataset: data_lib.Dataset | None = None) -> Experiment:
  """Data, model, optimiser and jitted train step of a single-method config."""
  dataset = data_lib.load(config.data) if dataset is None else dataset
  model = models.get(config.model.name, num_classes=dataset.num_classes,
                     activation=config.model.activation,
                     normalize_mean=config.model.get("normalize_mean", ()),
                     normalize_std=config.model.get("normalize_std", ()),
                     **config.model.options.to_dict())
  spe = data_lib.steps_per_epoch(len(dataset.y_train), config.train.batch_size)
  tx = training.make_optimizer(config.train, spe)
  return Experiment(config, dataset, model, tx, spe,
                    training.make_train_step(model, tx, config.train))


def initial_state(exp: Experiment) -> training.TrainState:
  """The freshly initialised train state (seed ``config.seed``), on the default device."""
  return training.create_train_state(exp.model, exp.tx, jax.random.PRNGKey(exp.config.seed),
                                     exp.dataset.x_train.shape[1:])


def abstract_state(exp: Experiment, mesh) -> training.TrainState:
  """The train state's shapes and dtypes (``jax.ShapeDtypeStruct`` leaves, replicated over
  ``mesh``): a restore template that costs no initialisation. Running ``model.init`` eagerly
  compiles each of its random initialisers and ops one by one (seconds on a CPU, paid by every
  evaluation before its first attack); the restored values replace the template anyway."""
  sharding = parallel.replicated_sharding(mesh)
  return jax.tree_util.tree_map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
      jax.eval_shape(lambda: initial_state(exp)))


# ---------------------------------------------------------------------------------------------
# Devices and hosts


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


# ---------------------------------------------------------------------------------------------
# Training


def epoch_steps(exp: Experiment, state: training.TrainState, mesh, epoch: int
                ) -> Iterator[tuple[training.TrainState, training.StepMetrics]]:
  """The train loop of one epoch: yields ``(state, metrics)`` after every step.

  The batches depend only on ``(config.seed, epoch)`` and the attack key is fixed (the steps
  fold in ``state.step``), so a resumed run repeats the uninterrupted one. Each batch is
  sharded over the mesh's ``"data"`` axis: attacks (GMRES included) run per device on their
  examples, and only the parameter gradients are reduced across devices.
  """
  c = exp.config
  key = jax.random.PRNGKey(c.seed + 1)
  for xb, yb in data_lib.epoch_batches(exp.dataset.x_train, exp.dataset.y_train,
                                       int(c.train.batch_size), seed=c.seed, epoch=epoch,
                                       augment=bool(c.data.augment)):
    state, metrics = exp.train_step(state, *global_batch(xb, yb, mesh), key)
    yield state, metrics


def train_in_memory(config, dataset: data_lib.Dataset):
  """Trains a single-method config with :func:`epoch_steps`, no files written; returns
  ``(model, state)``. Data-parallel on the config's mesh like :func:`train`: parameters
  replicated, each batch sharded over ``"data"`` (each host placing its own slice)."""
  exp = build(config, dataset)
  mesh = make_mesh(config)
  state = parallel.replicate(initial_state(exp), mesh)
  for epoch in range(int(config.train.epochs)):
    for state, metrics in epoch_steps(exp, state, mesh, epoch):
      pass
    if not np.isfinite(float(metrics.loss)):
      raise FloatingPointError(f"training {config.train.method} diverged in epoch {epoch + 1}")
  return exp.model, state


def clean_test_accuracy(exp: Experiment, state) -> float:
  """Accuracy of ``state`` on the whole test split (``evaluation.accuracy``, batches of 512)."""
  logits_fn = training.inference_logits_fn(exp.model, state.params, state.batch_stats)
  return evaluation.accuracy(logits_fn, exp.dataset.x_test, exp.dataset.y_test, batch_size=512)


def epoch_progress_line(method: str, record: dict[str, Any], epochs: int) -> str:
  """The line printed after each epoch, from its ``metrics.jsonl`` record: ``[pgd] epoch 3/15:
  loss 1.2345, train acc on adversarial batches 0.4567, clean test acc 0.9000 (4.2 s)``. The
  train accuracy says which batches it was measured on (:func:`train_accuracy_batches`); a
  method that also measures the clean batches (``trades``) adds that one."""
  on = record.get("train_accuracy_on") or train_accuracy_batches(method)
  clean = record.get("train_clean_accuracy")
  also = (f" (clean batches {clean:.4f})" if on != "clean" and clean is not None else "")
  return (f"[{method}] epoch {record['epoch']}/{epochs}: loss {record['train_loss']:.4f}, "
          f"train acc on {on} batches {record['train_accuracy']:.4f}{also}, clean test acc "
          f"{record['test_accuracy']:.4f} ({record['seconds']:.1f} s)")


def train(config, workdir: str, *, dataset: data_lib.Dataset | None = None,
          stop_after_epoch: int | None = None, progress: bool = True):
  """Trains a single-method config, resuming from ``workdir/checkpoints`` when present.

  Writes ``config.json``, one ``metrics.jsonl`` line and one orbax checkpoint per epoch.

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
  workdir_lib.note_progress(start_epoch, config.train.method, workdir=workdir)
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  if primary:
    for line in restored.messages(workdir):
      print(line, file=sys.stderr, flush=True)
    if start_epoch and progress:
      print(f"[{config.train.method}] resuming {workdir} after epoch {start_epoch}", flush=True)
    workdir_lib.truncate_metrics(metrics_path, start_epoch)
    workdir_lib.atomic_write_text(os.path.join(workdir, "config.json"), config.to_json(indent=2))
  lr_fn = training.learning_rate_schedule(config.train, exp.steps_per_epoch)
  last = int(config.train.epochs) if stop_after_epoch is None else min(
      int(config.train.epochs), int(stop_after_epoch))
  try:
    state = _train_epochs(exp, state, mesh, mngr, workdir, range(start_epoch, last), progress,
                          primary, lr_fn, metrics_path)
  except BaseException:
    # Ctrl-C, SIGTERM (experiments.workdir.Terminated), a full disk, a diverged loss: finish the
    # save in flight while the workdir is still locked, so that the checkpoint it writes is
    # complete (a second signal abandons it: orbax removes its temporary folder next time).
    with contextlib.suppress(BaseException):
      mngr.wait_until_finished()
    raise
  mngr.wait_until_finished()
  mngr.close()
  workdir_lib.note_progress(max(start_epoch, last), config.train.method, workdir=workdir)
  return exp, state


def _train_epochs(exp, state, mesh, mngr, workdir, epochs, progress, primary, lr_fn,
                  metrics_path):
  """The epochs of :func:`train`: one ``metrics.jsonl`` line and one checkpoint each."""
  config = exp.config
  for epoch in epochs:
    start = time.perf_counter()
    sums = np.zeros(3)
    bar = tqdm(epoch_steps(exp, state, mesh, epoch), total=exp.steps_per_epoch,
               disable=not progress, leave=False,
               desc=f"{config.train.method} epoch {epoch + 1}/{config.train.epochs}")
    acc_on = train_accuracy_batches(config.train.method)
    try:
      for state, m in bar:
        sums += np.asarray([float(m.loss), float(m.accuracy), float(m.clean_accuracy)])
        bar.set_postfix({"loss": f"{float(m.loss):.3f}",
                         "adv. batch acc" if acc_on == "adversarial" else "acc":
                         f"{float(m.accuracy):.3f}"})
    finally:  # cleared on Ctrl-C too, so that the line saying where the run stopped starts
      bar.close()  # on a line of its own
    mean = sums / exp.steps_per_epoch
    record = dict(epoch=epoch + 1, step=int(state.step), method=config.train.method,
                  train_loss=mean[0], train_accuracy=mean[1], train_accuracy_on=acc_on,
                  train_clean_accuracy=None if np.isnan(mean[2]) else mean[2],
                  test_accuracy=clean_test_accuracy(exp, state),
                  learning_rate=float(lr_fn(int(state.step) - 1)),
                  seconds=time.perf_counter() - start)
    if not np.isfinite(mean[0]):
      raise FloatingPointError(f"training diverged in epoch {epoch + 1}: loss {mean[0]}")
    if primary:
      workdir_lib.append_line(metrics_path, json.dumps(record))
    workdir_lib.save_checkpoint(mngr, epoch + 1, state, workdir, primary=primary)
    workdir_lib.note_progress(epoch + 1, config.train.method, flush=mngr.wait_until_finished,
                              workdir=workdir)
    if progress:
      print(epoch_progress_line(config.train.method, record, int(config.train.epochs)),
            flush=True)
  return state


# ---------------------------------------------------------------------------------------------
# Checkpoints


def _sync_hosts() -> None:
  from jax.experimental import multihost_utils
  multihost_utils.sync_global_devices("experiments.workdir")


def checkpoint_manager(workdir: str, max_to_keep: int = 2) -> ocp.CheckpointManager:
  """Orbax manager of ``workdir/checkpoints``; checkpoint ``e`` holds the state after epoch
  ``e`` (so ``latest_step()`` is the number of completed epochs).

  The manager is told up front that each checkpoint holds one default item (a
  ``StandardCheckpointHandler``): left to guess, orbax locks its mode on the first restore from
  whether that step's folder has a ``default`` subfolder, so a reader whose first try hit a
  checkpoint being deleted by the run training beside it (``evaluate`` while ``soat`` runs)
  could restore nothing after it (``Must provide args of type Composite``)."""
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, "checkpoints")),
      item_handlers=ocp.StandardCheckpointHandler(),
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))


def restore_latest(mngr: ocp.CheckpointManager, template: training.TrainState):
  """``(state, completed_epochs)``; ``(template, 0)`` when there is no checkpoint."""
  latest = mngr.latest_step()
  if latest is None:
    return template, 0
  state = mngr.restore(latest, args=ocp.args.StandardRestore(template))
  return state, int(latest)


def load_trained(config, workdir: str, dataset: data_lib.Dataset | None = None):
  """``(experiment, state, epochs)`` from the latest checkpoint of a single-method workdir,
  restored replicated over the config's mesh (whatever device count wrote it).

  The newest checkpoint that restores and matches its checksum (``experiments.workdir``);
  damaged ones are named on stderr and left in place.

  Raises:
    experiments.workdir.ConfigError: the workdir is missing or holds no checkpoint (nothing is
      created in it), or it was trained with another config.
    experiments.workdir.CheckpointError: no checkpoint restores and matches its checksum.
  """
  workdir_lib.require_trained_workdir(workdir)
  workdir_lib.check_run_config(workdir, config, record=False)
  exp = build(config, dataset)
  mngr = checkpoint_manager(workdir)
  restored = workdir_lib.restore_newest(mngr, abstract_state(exp, make_mesh(config)), workdir,
                                        allow_none=False)
  mngr.close()
  if parallel.is_primary():
    for line in restored.messages(workdir):
      print(line, file=sys.stderr, flush=True)
  return exp, restored.state, restored.step


# ---------------------------------------------------------------------------------------------
# Evaluation and its files


def attack_progress_line(tag: str, i: int, n: int, result: evaluation.AttackResult) -> str:
  """``[pgd] attack 3/12 PGD-20 Linf 0.1: 41.31% robust accuracy (12.4 s)``: the line printed
  after each attack of an evaluation (``i`` 0-based), as training prints one per epoch."""
  what = "clean accuracy" if result.attack == "clean" else "robust accuracy"
  return (f"[{tag}] attack {i + 1}/{n} {result.label} "
          f"{outputs.threat_text(result.norm, result.eps)}: {100 * result.accuracy:.2f}% {what} "
          f"({result.seconds:.1f} s)")


def evaluate(exp: Experiment, state, config, suite: str = "attacks", *,
             progress: bool = False) -> list[evaluation.AttackResult]:
  """Runs the suite ``config.eval.<suite>`` (:func:`eval_suite`) on the first
  ``eval.num_examples`` test points; SOAE and AutoAttack through their ``NAME_with_report``
  entry, so that each result's ``extras`` hold their diagnostics at no extra cost. With
  ``progress`` (process 0 only) prints :func:`attack_progress_line` after each attack."""
  n = min(int(config.eval.num_examples), len(exp.dataset.y_test))
  # Parameters are traced by the attacks: every state of this architecture (each checkpoint,
  # each table row) shares their compiled code.
  logits_fn = training.inference_logits_fn(exp.model, state.params, state.batch_stats)
  tag = str(config.train.method)
  on_result = None
  if progress and parallel.is_primary():
    on_result = lambda i, total, r: print(attack_progress_line(tag, i, total, r), flush=True)
  # Data parallel like training: each attack batch is sharded over the mesh's "data" axis.
  return evaluation.evaluate_attacks(logits_fn, exp.dataset.x_test[:n], exp.dataset.y_test[:n],
                                     eval_suite(config, suite),
                                     jax.random.PRNGKey(config.seed + 2),
                                     batch_size=int(config.eval.batch_size),
                                     mesh=make_mesh(config), reports=evaluation.FREE_REPORTS,
                                     key_indices=suite_key_indices(config, suite),
                                     on_result=on_result)


def git_commit() -> str | None:
  """``git rev-parse HEAD`` of the code's checkout (``+dirty`` when tracked files changed),
  or ``None`` outside a git checkout or without git."""
  import subprocess
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                            text=True, timeout=10, check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                           capture_output=True, text=True, timeout=10).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return None
  return commit + ("+dirty" if dirty else "") if commit else None


def _training_seconds(workdir: str) -> tuple[float, int]:
  """``(sum of the epochs' seconds, epochs)`` from ``workdir/metrics.jsonl``."""
  total, epochs = 0.0, 0
  try:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      for line in f:
        try:
          rec = json.loads(line)
        except ValueError:
          continue
        total += float(rec.get("seconds", 0.0))
        epochs += 1
  except OSError:
    pass
  return total, epochs


_METHOD_ATTACK = {"pgd": "pgd", "trades": "trades", "soat": "soae",
                  "second_order": "second_order", "mixed": "pgd"}

# Methods whose loss (hence StepMetrics.accuracy) is computed on the clean batch; every other
# method's is on its perturbed batch (the attack's points; SOAR's one-step PGD point).
_CLEAN_LOSS_METHODS = ("standard", "scorpio")


def train_accuracy_batches(method: str) -> str:
  """``"clean"`` or ``"adversarial"``: the batches ``StepMetrics.accuracy`` (metrics.jsonl's
  ``train_accuracy``, the training log's train accuracy) of ``method`` is measured on."""
  return "clean" if method in _CLEAN_LOSS_METHODS else "adversarial"


def checkpoint_of(exp: Experiment, state, workdir: str) -> dict[str, Any]:
  """``{"step", "checksum"}`` of the checkpoint ``state`` is (``experiments.workdir.
  checkpoint_record``): the step is the epochs ``state`` has trained (its optimiser step over
  the steps per epoch), the checksum the one ``checksums.json`` recorded for it."""
  epochs = int(parallel.to_host(state.step)) // max(1, exp.steps_per_epoch)
  return workdir_lib.checkpoint_record(workdir, epochs, state)


def run_metadata(config, exp: Experiment, state, workdirs: dict[str, str],
                 suite: str = "attacks", checkpoints: dict[str, dict] | None = None
                 ) -> dict[str, Any]:
  """What a results file measured: model, data, each method's training (threat model,
  hyperparameters, time from ``metrics.jsonl``, the checkpoint evaluated), the test points, each
  attack's settings (the config's hyperparameters over the attack's signature defaults) and the
  code version.

  Args:
    workdirs: ``{method: its workdir}`` (:func:`method_runs`).
    checkpoints: ``{method: {"step", "checksum"}}`` (:func:`checkpoint_of`), the checkpoint each
      method's results measured: recorded as ``training.<method>.checkpoint``, and its step is
      the ``epochs`` reported (not ``train.epochs`` of the config, which a reader such as
      ``evaluate --config.train.epochs=7`` may set beyond what the workdir trained).
  """
  import inspect
  from krylov_adv import attacks
  ds = exp.dataset
  n = min(int(config.eval.num_examples), len(ds.y_test))
  params = int(sum(np.size(p) for p in jax.tree_util.tree_leaves(state.params)))
  training_md = {}
  for method, wd in workdirs.items():
    t = with_method(config, method).train
    seconds, epochs = _training_seconds(wd)
    ckpt = (checkpoints or {}).get(method)
    entry = dict(epochs=int(ckpt["step"]) if ckpt else int(t.epochs),
                 batch_size=int(t.batch_size),
                 optimizer=dict(name="sgd", learning_rate=float(t.learning_rate),
                                lr_schedule=t.lr_schedule, momentum=float(t.momentum),
                                weight_decay=float(t.weight_decay)),
                 seconds=seconds, epochs_recorded=epochs)
    if ckpt:
      entry["checkpoint"] = dict(step=int(ckpt["step"]), checksum=ckpt["checksum"])
    if method == "mixed":
      entry["hyperparameters"] = t.mixed.to_dict()
    elif method != "standard":
      entry["threat_model"] = dict(norm=t.norm, eps=float(t.eps))
      entry["hyperparameters"] = t[method].to_dict() if method in t else {}
      entry["attack"] = _METHOD_ATTACK.get(method, method)
    training_md[method] = entry
  suite_md = {}
  for entry, c in eval_suite(config, suite).items():
    settings = {}
    if c["name"] != "clean":
      sig = inspect.signature(attacks.get(c["name"]))
      settings = {k: p.default for k, p in sig.parameters.items()
                  if p.kind is inspect.Parameter.KEYWORD_ONLY and k not in ("eps", "norm")
                  and p.default is not inspect.Parameter.empty}
      settings.update({k: v for k, v in c.items() if k not in _ENTRY_FIELDS})
      if "step_size" in settings and settings["step_size"] is None and "steps" in settings:
        settings["step_size"] = 2.5 * c["eps"] / settings["steps"]  # the attacks' default
      if c["name"] == "fgsm" and settings.get("step_size") is None:
        settings["step_size"] = c["eps"]
      if c["name"] == "soae" and settings.get("alpha") is None:
        settings["alpha"] = c["eps"]
    suite_md[entry] = dict(label=c["label"], name=c["name"], norm=c["norm"], eps=c["eps"],
                           settings=settings)
  return dict(
      code_version=git_commit(),
      data=dict(source=config.data.source, name=ds.name, train_examples=int(len(ds.y_train)),
                test_examples=int(len(ds.y_test)), augment=bool(config.data.augment),
                **({"root": config.data.root} if config.data.root else {})),
      model=dict(name=config.model.name, activation=config.model.activation,
                 options=config.model.options.to_dict(), parameters=params),
      training=training_md,
      evaluation=dict(suite=f"eval.{suite}", test_points=n,
                      batch_size=int(config.eval.batch_size), seed=int(config.seed) + 2,
                      attacks=suite_md))


def write_robustness(workdir: str, results_by_method: dict[str, list[evaluation.AttackResult]],
                     title: str, name: str = "results", metadata: dict | None = None) -> str:
  """Writes ``<name>.json`` and ``<name>.md`` through ``outputs.write_results`` (process 0
  only): the header of ``metadata`` (:func:`run_metadata`), the robust-accuracy table and the
  attacks' diagnostics (SOAE's Krylov dimensions, AutoAttack's components). The JSON holds
  ``{"metadata", "results": {method: [result, ...]}, "diagnostics", "worst_case", "flags_file"}``,
  each result with its 95% Wilson interval ``ci95: [lo, hi]``, ``worst_case`` per method
  :func:`worst_case_results`; the per-example flags
  (``AttackResult.correct``) go to ``<name>_robust_flags.npz`` (``outputs.write_flags``: one
  ``(n,)`` bool per result keyed ``<entry>``, or ``<method>/<entry>`` for several methods, and
  the test-point ``indices``), written before the JSON. Returns the markdown table."""
  # Each column names what its model was trained against apart from what the attack ran in.
  trained = ({m: outputs.training_text(t) for m, t in metadata["training"].items()}
             if metadata else None)
  table = outputs.robustness_table(results_by_method, trained)
  diagnostics = {m: [dict(label=r.label, norm=r.norm, eps=r.eps, attack=r.attack,
                          **evaluation.summarize_reports(r.extras))
                     for r in rs if evaluation.summarize_reports(r.extras)]
                 for m, rs in results_by_method.items()}
  results = {m: [dict({k: v for k, v in r._asdict().items() if k not in ("extras", "correct")},
                      ci95=outputs.result_interval(r.accuracy, r.num_examples))
                 for r in rs] for m, rs in results_by_method.items()}
  flags_file = write_robustness_flags(workdir, results_by_method, name)
  worst = {m: worst_case_results(rs) for m, rs in results_by_method.items()}
  markdown = (f"# {title}\n\n" + (outputs.metadata_markdown(metadata) if metadata else "")
              + "Robust accuracy (higher is better). Rows: the attack. Columns: each model, "
              "with the threat model it was trained against, then the threat model the row's "
              f"attack ran in.\n\n{table}"
              + outputs.diagnostics_markdown(diagnostics))
  outputs.write_results(workdir, dict(metadata=metadata, results=results,
                                      diagnostics=diagnostics, worst_case=worst,
                                      flags_file=flags_file), markdown,
                        json_name=f"{name}.json", markdown_name=f"{name}.md")
  return table


def write_robustness_flags(workdir: str,
                           results_by_method: dict[str, list[evaluation.AttackResult]],
                           name: str = "results") -> str | None:
  """Writes the per-example flags of :func:`write_robustness`'s results to
  ``workdir/<name>_robust_flags.npz`` (``outputs.write_flags``; the points are the first ``n``
  test points, ``indices = arange(n)``); returns the file name, ``None`` when no result carries
  flags."""
  flags, n = {}, None
  single = len(results_by_method) == 1
  for method, rs in results_by_method.items():
    for r in rs:
      if r.correct is None:
        continue
      key = r.entry or f"{r.attack}_{r.norm}"
      flags[key if single else f"{method}/{key}"] = r.correct
      n = len(r.correct)
  if not flags:
    return None
  file = f"{name}_robust_flags.npz"
  outputs.write_flags(os.path.join(workdir, file), flags, np.arange(n))
  return file


def worst_case_results(results: list[evaluation.AttackResult]) -> list[dict]:
  """Per norm, the points correct under every result of that norm, clean included
  (``krylov_adv.stats.worst_case`` of their ``correct`` flags, AutoAttack's rule):
  ``[{"norm", "eps", "accuracy", "ci95", "num_examples", "components"}]``; results without
  flags are left out."""
  out = []
  for norm in dict.fromkeys(r.norm for r in results):
    parts = [r for r in results if r.norm == norm and r.correct is not None]
    if not parts:
      continue
    f = stats.worst_case([r.correct for r in parts])
    out.append(dict(norm=norm, eps=parts[0].eps, accuracy=float(f.mean()) if f.size else 0.0,
                    ci95=stats.ci95(int(f.sum()), int(f.size)), num_examples=int(f.size),
                    components=[r.entry or r.label for r in parts]))
  return out
