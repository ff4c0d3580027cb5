"""Krylov dimension m per GMRES threshold tau (experiments.krylov_dims; SOAE paper Table IV and
Fig. 2).

  python -m experiments.krylov_dims --config configs/krylov_dims.py --workdir /tmp/analysis
  python -m experiments.krylov_dims --config configs/krylov_dims.py:paper --workdir DIR

Scale after the colon: ``tiny`` (tests), ``small`` (default; digits, 8x8 = 64 input dimensions,
so max_dim = 64 is the full space; Fig. 2's SOAE sweep at 3 of the 5 taus; about 3 minutes on a
loaded 2-core CPU), ``paper`` (MNIST 28x28 = 784, Madry CNN, every tau).
"""

from __future__ import annotations

import ml_collections

from configs import common


def get_config(scale: str = "small"):
  c = common.analysis_config(scale)
  tiny, paper = scale == "tiny", scale == "paper"
  c.experiment = ml_collections.ConfigDict(dict(
      taus=(1e-1, 1e-3) if tiny else (1e-1, 1e-2, 1e-3, 1e-4, 1e-5),
      hvp_methods=("exact", "fd_forward"),
      # Algorithm 1's forward difference with the paper's recommended step.
      eta=1e-5,
      max_dim=24 if tiny else (400 if paper else 64),
      activations=("relu", "softplus"),
      num_examples=8 if tiny else (100 if paper else 64),
      rank_examples=4 if tiny else 8,
      rank_rtol=1e-5,
      # Fig. 2: SOAE robust accuracy and time per tau
      attack_hvp_methods=("exact",) if tiny else ("exact", "fd_forward"),
      # The taus of the attack sweep: each is one SOAE compile and 1 + timing_repeats runs per
      # model and HVP, most of this command's time on a CPU; small keeps both ends and the
      # paper's 1e-3 (the m table above still has every tau: one GMRES run gives them all).
      attack_taus=(1e-1, 1e-3) if tiny else ((1e-1, 1e-3, 1e-5) if not paper else
                                             (1e-1, 1e-2, 1e-3, 1e-4, 1e-5)),
      attack_examples=8 if tiny else (1000 if paper else 128),
      batch_size=8 if tiny else (100 if paper else 128),
      eps=c.train.eps, norm="linf",
      soae=dict(steps=1 if tiny else 4),
      timing_repeats=2 if tiny else 3,  # timed SOAE runs per tau (median, min, max)
  ))
  return c
