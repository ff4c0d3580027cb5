"""Mean ||grad_x L|| per iteration for PGD and the S-O attack on a standard and a TRADES model
(experiments.grad_norms; S-O paper Fig. 1).

  python -m experiments.grad_norms --config configs/grad_norms.py --workdir /tmp/analysis
  python -m experiments.grad_norms --config configs/grad_norms.py:paper --workdir DIR \
      --config.models_dir=SOAT_WORKDIR   (standard/ and trades/ checkpoints of experiments.soat)

Scale after the colon: ``tiny`` (tests), ``small`` (default; digits, TRADES trained under Linf
0.1, attacks under Linf 0.1 and L2 1.0), ``paper`` (MNIST, Madry CNN, Linf 0.3 and L2 4.0 as in
the S-O paper).
"""

from __future__ import annotations

import ml_collections

from configs import common


def get_config(scale: str = "small"):
  c = common.analysis_config(scale)
  tiny, paper = scale == "tiny", scale == "paper"
  eps = dict(linf=0.3, l2=4.0) if paper else dict(linf=0.1, l2=1.0)
  steps = 3 if tiny else (40 if paper else 20)
  c.experiment = ml_collections.ConfigDict(dict(
      model_methods=("standard", "trades"),
      attacks=("pgd", "second_order"),
      norms=("linf",) if tiny else ("linf", "l2"),
      eps=eps,
      steps=steps,
      # 2.5 eps / steps: enough to cross the ball (Madry et al.'s rule of thumb).
      step_size={k: 2.5 * v / steps for k, v in eps.items()},
      samples=2 if tiny else 8,
      sigma=0.1 if paper else 0.05,
      random_start=False,
      num_examples=8 if tiny else (1000 if paper else 128),
      batch_size=8 if tiny else (250 if paper else 128),
  ))
  return c
