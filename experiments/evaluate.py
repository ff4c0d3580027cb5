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

import json
import os

import jax

from experiments import soat
from krylov_adv import data as data_lib
from krylov_adv import evaluation


def load_trained(config, workdir: str, dataset: data_lib.Dataset | None = None):
  """``(experiment, state, epochs)`` from the latest checkpoint of a single-method workdir.

  Raises:
    FileNotFoundError: the workdir holds no checkpoint.
  """
  exp = soat.build(config, dataset)
  mngr = soat.checkpoint_manager(workdir)
  state, epochs = soat.restore_latest(mngr, soat.initial_state(exp))
  mngr.close()
  if epochs == 0:
    raise FileNotFoundError(f"no checkpoint in {os.path.join(workdir, 'checkpoints')}; train "
                            f"first with python -m experiments.soat")
  return exp, state, epochs


def evaluate_workdir(config, workdir: str, *, progress: bool = True
                     ) -> dict[str, list[evaluation.AttackResult]]:
  """Evaluates every method's checkpoint; returns ``{method: [AttackResult, ...]}``."""
  soat.validate_config(config)
  methods = soat.methods_of(config)
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
  table = evaluation.markdown_table(results)
  with open(os.path.join(workdir, "evaluation.json"), "w") as f:
    json.dump({m: [r._asdict() for r in rs] for m, rs in results.items()}, f, indent=2)
  with open(os.path.join(workdir, "evaluation.md"), "w") as f:
    f.write(f"# {dataset.name}: {', '.join(methods)}\n\n{table}")
  if progress:
    print(table, flush=True)
  return results


def main(argv):
  from absl import app, logging
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every file operation at INFO
  evaluate_workdir(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags

  FLAGS = flags.FLAGS
  config_flags.DEFINE_config_file("config", None, "experiment config file (configs/*.py)",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "folder written by experiments.soat")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
