"""Evaluate a trained checkpoint with the papers' attack table (clean, FGSM, PGD-20, S-O, SOAE,
AutoAttack under Linf and L2).

  python -m experiments.evaluate --config configs/quickstart.py --workdir /tmp/quickstart
  python -m experiments.evaluate --config configs/mnist_madry_cnn.py:pgd --workdir DIR \
      --config.eval.num_examples=10000

Reads the latest checkpoint written by ``experiments.soat`` in the workdir (``workdir/<method>``
for each method when ``train.method`` lists several), prints the table and writes
``evaluation.json`` and ``evaluation.md`` next to it. Robustness in one norm says little about
the other (the S-O paper's point), so both norms sit side by side.
"""

from __future__ import annotations

import os
import sys

from experiments import soat
from experiments import workdir as workdir_lib
from krylov_adv import data as data_lib
from krylov_adv import evaluation, parallel


def load_trained(config, workdir: str, dataset: data_lib.Dataset | None = None):
  """``(experiment, state, epochs)`` from the latest checkpoint of a single-method workdir.

  Raises:
    experiments.workdir.ConfigError: the workdir is missing or holds no checkpoint (nothing is
      created in it), or it was trained with another config.
    experiments.workdir.CheckpointError: no checkpoint restores and matches its checksum.
  """
  workdir_lib.require_trained_workdir(workdir)
  workdir_lib.check_run_config(workdir, config, record=False)
  exp = soat.build(config, dataset)
  mngr = soat.checkpoint_manager(workdir)
  # Restored replicated over the evaluation mesh, whatever device count wrote it; the newest
  # checkpoint that restores and matches its checksum (damaged ones are left in place).
  template = parallel.replicate(soat.initial_state(exp), soat.make_mesh(config))
  restored = workdir_lib.restore_newest(mngr, template, workdir, allow_none=False)
  mngr.close()
  if parallel.is_primary():
    for line in restored.messages(workdir):
      print(line, file=sys.stderr, flush=True)
  return exp, restored.state, restored.step


def evaluate_workdir(config, workdir: str, *, progress: bool = True
                     ) -> dict[str, list[evaluation.AttackResult]]:
  """Evaluates every method's checkpoint; returns ``{method: [AttackResult, ...]}``."""
  with workdir_lib.config_errors():
    soat.validate_config(config)
  soat.start_distributed(config)
  progress = progress and parallel.is_primary()
  methods = soat.methods_of(config)
  subs = [workdir if len(methods) == 1 else os.path.join(workdir, m) for m in methods]
  for method, sub in zip(methods, subs):  # every workdir checked before the data loads
    workdir_lib.require_trained_workdir(sub)
    workdir_lib.check_run_config(sub, soat.with_method(config, method), record=False)
  with workdir_lib.config_errors():
    dataset = data_lib.load(config.data)
  results = {}
  for method in methods:
    cfg = soat.with_method(config, method)
    sub = workdir if len(methods) == 1 else os.path.join(workdir, method)
    exp, state, epochs = load_trained(cfg, sub, dataset)
    if progress:
      print(f"[{method}] checkpoint after epoch {epochs}; attacking "
            f"{min(cfg.eval.num_examples, len(dataset.y_test))} test points", flush=True)
    results[method] = soat.evaluate(exp, state, cfg)
  table = soat.write_results(workdir, results, f"{dataset.name}: {', '.join(methods)}",
                             name="evaluation")
  if progress:
    print(table, flush=True)
  return results


if __name__ == "__main__":
  from experiments import common
  common.main(evaluate_workdir, "folder written by experiments.soat")
