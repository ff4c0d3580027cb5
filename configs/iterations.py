"""Robust accuracy against the number of iterations N, SOAE and PGD (experiments.iterations;
SOAE paper Fig. 3).

  python -m experiments.iterations --config configs/iterations.py --workdir /tmp/analysis
  python -m experiments.iterations --config configs/iterations.py:paper --workdir DIR \
      --config.models_dir=SOAT_WORKDIR   (standard/ and pgd/ checkpoints of experiments.soat)

Scale after the colon: ``tiny`` (tests), ``small`` (default; digits), ``paper`` (MNIST, Madry
CNN, N = 1..20 as in Fig. 3).
"""

from __future__ import annotations

import ml_collections

from configs import common


def get_config(scale: str = "small"):
  c = common.analysis_config(scale)
  tiny, paper = scale == "tiny", scale == "paper"
  eps = c.train.eps
  c.experiment = ml_collections.ConfigDict(dict(
      model_methods=("standard",) if tiny else ("standard", "pgd"),
      iterations=(1, 2) if tiny else ((1, 2, 3, 4, 5, 7, 10, 15, 20) if paper else
                                      (1, 2, 3, 4, 6, 10, 20)),
      num_examples=8 if tiny else (1000 if paper else 128),
      batch_size=8 if tiny else (250 if paper else 128),
      eps=eps, norm="linf",
      attacks=dict(
          # steps_field: the hyperparameter that N sets.
          pgd=dict(name="pgd", steps_field="steps", step_size=eps / 4, random_start=True),
          soae=dict(name="soae", steps_field="steps", alpha=eps, m=4 if tiny else 15,
                    tau=1e-2 if tiny else 1e-3, hvp="fd_forward", eta=1e-5),
      ),
  ))
  return c
