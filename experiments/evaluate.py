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
    workdir_lib.require_trained_workdir(sub)
    workdir_lib.check_run_config(sub, cfg, record=False)
  with workdir_lib.config_errors():
    dataset = data_lib.load(config.data)
  results = {}
  for method, cfg, sub in pipeline.method_runs(config, workdir):
    exp, state, epochs = pipeline.load_trained(cfg, sub, dataset)
    if progress:
      print(f"[{method}] checkpoint after epoch {epochs}; attacking "
            f"{min(cfg.eval.num_examples, len(dataset.y_test))} test points", flush=True)
    results[method] = pipeline.evaluate(exp, state, cfg)
  table = pipeline.write_robustness(workdir, results, f"{dataset.name}: {', '.join(methods)}",
                                    name="evaluation")
  if progress:
    print(table, flush=True)
  return results


if __name__ == "__main__":
  cli.main(evaluate_workdir, "folder written by experiments.soat")
