"""Train a classifier with an adversarial-training method, then evaluate it with the attacks.

  python -m experiments.soat --config configs/quickstart.py --workdir /tmp/quickstart
  python -m experiments.soat --config configs/cifar10_resnet18.py:pgd --workdir /tmp/c10 \
      --config.train.epochs=3

Writes into the workdir (one subfolder per method when ``train.method`` lists several):
``config.json``, ``metrics.jsonl`` (one line per epoch), ``checkpoints/`` (orbax, the last
``checkpoint.max_to_keep``), ``results.json`` and ``results.md`` (a header saying what was
measured, the robust-accuracy table of the suite ``eval.attacks``, SOAE's and AutoAttack's
diagnostics). Rerunning with the same workdir resumes from the last checkpoint: the batches of
an epoch depend only on ``(seed, epoch)`` and the attack noise only on ``(seed, step)``, so a
resumed run reproduces the uninterrupted one and a run killed mid-way loses at most the current
epoch.
"""

from __future__ import annotations

import jax

from experiments import cli, pipeline
from experiments import workdir as workdir_lib
from krylov_adv import data as data_lib
from krylov_adv import evaluation, parallel


def train_and_evaluate(config, workdir: str, *, stop_after_epoch: int | None = None,
                       progress: bool = True) -> dict[str, list[evaluation.AttackResult]]:
  """Trains every method of ``config.train.method`` and evaluates each with the attacks, holding
  the workdir's lock (``experiments.workdir.workdir_lock``: a second run fails at once).

  Returns ``{method: [AttackResult, ...]}`` (empty lists when stopped early).
  """
  with workdir_lib.config_errors():
    pipeline.validate_config(config)
  pipeline.start_distributed(config)
  # A multi-method run also locks each method's folder: a run of W/pgd alone is refused while
  # W trains, and W while W/pgd trains.
  methods = pipeline.methods_of(config)
  with workdir_lib.workdir_lock(workdir, process_index=jax.process_index(),
                                subfolders=tuple(methods) if len(methods) > 1 else ()):
    return _train_and_evaluate(config, workdir, stop_after_epoch=stop_after_epoch,
                               progress=progress)


def _train_and_evaluate(config, workdir: str, *, stop_after_epoch: int | None,
                        progress: bool) -> dict[str, list[evaluation.AttackResult]]:
  methods = pipeline.methods_of(config)
  with workdir_lib.config_errors():
    workdir_lib.check_data_root(config.data)
    dataset = data_lib.load(config.data)
  results: dict[str, list[evaluation.AttackResult]] = {}
  workdirs, checkpoints = {}, {}
  for method, cfg, sub in pipeline.method_runs(config, workdir):
    exp, state = pipeline.train(cfg, sub, dataset=dataset, stop_after_epoch=stop_after_epoch,
                                progress=progress)
    workdirs[method] = sub
    checkpoints[method] = pipeline.checkpoint_of(exp, state, sub)
    if stop_after_epoch is not None and stop_after_epoch < cfg.train.epochs:
      results[method] = []
      continue
    if progress and parallel.is_primary():
      print(f"[{method}] attacking {min(int(cfg.eval.num_examples), len(dataset.y_test))} test "
            f"points with eval.attacks", flush=True)
    results[method] = pipeline.evaluate(exp, state, cfg, "attacks", progress=progress)
    if len(methods) > 1:
      pipeline.write_robustness(sub, {method: results[method]}, f"{dataset.name}, {method}",
                                metadata=pipeline.run_metadata(
                                    cfg, exp, state, {method: sub},
                                    checkpoints={method: checkpoints[method]}))
  if all(results.values()):
    table = pipeline.write_robustness(workdir, results, f"{dataset.name}: {', '.join(methods)}",
                                      metadata=pipeline.run_metadata(
                                          config, exp, state, workdirs,
                                          checkpoints=checkpoints))
    if progress and parallel.is_primary():
      print(table, flush=True)
  return results


if __name__ == "__main__":
  cli.main(train_and_evaluate, "folder for checkpoints, metrics and results")
