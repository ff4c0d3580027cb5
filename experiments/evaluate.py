"""Evaluate a trained checkpoint with the papers' attack table (clean, FGSM, PGD-20, S-O, SOAE,
AutoAttack standard under Linf and L2).

  python -m experiments.evaluate --config configs/quickstart.py --workdir /tmp/quickstart
  python -m experiments.evaluate --config configs/mnist_madry_cnn.py:pgd --workdir DIR \
      --config.eval.num_examples=10000 --config.eval.eps_linf=0.2 --config.eval.skip=l2

Runs the suite ``config.eval.table`` (every config has the full table there, whatever its
training-time suite ``eval.attacks`` is); ``eval.eps_linf`` / ``eval.eps_l2`` set the budgets of
all its entries, ``eval.skip`` leaves entries, attacks or norms out. Reads the newest checkpoint
written by ``experiments.soat`` in the workdir (``workdir/<method>`` for each method when
``train.method`` lists several), prints the table and writes ``evaluation.json`` and
``evaluation.md`` (header, table, diagnostics) next to it. Robustness in one norm says little
about the other (the S-O paper's point), so both norms sit side by side.
"""

from __future__ import annotations

from experiments import cli, pipeline
from experiments import workdir as workdir_lib
from krylov_adv import data as data_lib
from krylov_adv import evaluation, parallel


def evaluate_workdir(config, workdir: str, *, progress: bool = True
                     ) -> dict[str, list[evaluation.AttackResult]]:
  """Evaluates every method's checkpoint; returns ``{method: [AttackResult, ...]}``."""
  with workdir_lib.config_errors():
    pipeline.validate_config(config)
  pipeline.start_distributed(config)
  progress = progress and parallel.is_primary()
  methods = pipeline.methods_of(config)
  for _, cfg, sub in pipeline.method_runs(config, workdir):  # before the data loads
    workdir_lib.require_trained_workdir(sub, workdir)
    workdir_lib.check_run_config(sub, cfg, record=False)
  if parallel.is_primary():  # before any attack: the results must be writable at the end
    workdir_lib.require_writable(workdir, "evaluation.json")
  with workdir_lib.config_errors():
    dataset = data_lib.load(config.data)
  results, workdirs, checkpoints = {}, {}, {}
  for method, cfg, sub in pipeline.method_runs(config, workdir):
    exp, state, epochs = pipeline.load_trained(cfg, sub, dataset)
    workdirs[method] = sub
    checkpoints[method] = workdir_lib.checkpoint_record(sub, epochs, state)
    if progress:
      busy = workdir_lib.in_use_by(sub)
      beside = f" (the newest finished one: {busy})" if busy else ""
      print(f"[{method}] checkpoint after epoch {epochs}{beside}; attacking "
            f"{min(cfg.eval.num_examples, len(dataset.y_test))} test points with eval.table",
            flush=True)
    results[method] = pipeline.evaluate(exp, state, cfg, "table", progress=progress)
  table = pipeline.write_robustness(
      workdir, results, f"{dataset.name}: {', '.join(methods)}", name="evaluation",
      metadata=pipeline.run_metadata(config, exp, state, workdirs, "table",
                                     checkpoints=checkpoints))
  if progress:
    print(table, flush=True)
  return results


if __name__ == "__main__":
  cli.main(evaluate_workdir, "folder written by experiments.soat")
