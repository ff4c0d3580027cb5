"""Why SOAE's Newton direction is weak (experiments.soae_direction; the proposition in
``krylov_adv/attacks/_soae.py``): first-order margin gains of the Newton, gradient and
trust-region directions, the Krylov dimension with exact vs finite-difference HVPs, and SOAE
(Newton and trust region) vs PGD at equal cost.

  python -m experiments.soae_direction --config configs/soae_direction.py --workdir /tmp/analysis
  python -m experiments.soae_direction --config configs/soae_direction.py:paper --workdir DIR

Scale after the colon: ``tiny`` (tests, seconds), ``small`` (default; digits, TinyCNN, 64 input
dimensions, Linf 0.1 / L2 1.0), ``paper`` (MNIST, Madry CNN, Linf 0.3 / L2 4.0).
"""

from __future__ import annotations

import ml_collections

from configs import common


def get_config(scale: str = "small"):
  c = common.analysis_config(scale)
  tiny, paper = scale == "tiny", scale == "paper"
  c.experiment = ml_collections.ConfigDict(dict(
      # Margin gains and Krylov dimensions at clean test points of standard models.
      activations=("relu", "softplus"),
      num_examples=8 if tiny else (100 if paper else 128),
      eps=dict(linf=0.3, l2=4.0) if paper else dict(linf=0.1, l2=1.0),
      norms=("linf", "l2"),
      # SOAE's Newton solve: the paper's m and tau; the forward difference at the paper's eta.
      m=15, tau=1e-3, eta=1e-5,
      # Attacks at equal cost on ReLU models trained with these methods.
      attack_methods=("standard",) if tiny else ("standard", "pgd"),
      attack_examples=8 if tiny else (500 if paper else 128),
      batch_size=8 if tiny else 128,
      soae=dict(steps=1 if tiny else 4, m=4 if tiny else 15, tau=1e-3, hvp="exact"),
      # Gradient-equivalents of one exact HVP (jvp over grad), fixed for this analysis so that
      # its equal-cost PGD does not depend on the machine; experiments.costs.measure_hvp_cost
      # measures a model's own ratio (experiments.table records it in hvp_cost.json).
      hvp_cost=1.4,
  ))
  return c
