"""Exact vs finite-difference HVP ablation (experiments.ablation_hvp).

  python -m experiments.ablation_hvp --config configs/ablation_hvp.py --workdir /tmp/analysis
  python -m experiments.ablation_hvp --config configs/ablation_hvp.py:paper --workdir DIR \
      --config.models_dir=SOAT_WORKDIR   (a workdir of experiments.soat with standard/ and pgd/)

Scale after the colon: ``tiny`` (tests), ``small`` (default; digits; the effect on SOAE at 4 of
the sweep's 7 etas; about 3-4 minutes on a loaded 2-core CPU), ``paper`` (MNIST, Madry CNN, SOAE
paper's Fig. 1 sweep).
"""

from __future__ import annotations

import ml_collections

from configs import common

# SOAE paper Sec. IV-D / Fig. 1 sweeps eta over 1e-1 .. 1e-7.
PAPER_ETAS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7)


def get_config(scale: str = "small"):
  c = common.analysis_config(scale)
  tiny, paper = scale == "tiny", scale == "paper"
  c.experiment = ml_collections.ConfigDict(dict(
      # 1. accuracy of the FD products
      accuracy_examples=8 if tiny else (256 if paper else 64),
      etas=(1e-1, 1e-4, 1e-7) if tiny else PAPER_ETAS,
      dtypes=("float32", "float64"),
      activations=("relu", "softplus"),
      directions=("random", "gradient"),
      # 2. effect on SOAE (Fig. 1): standard and PGD-trained models
      effect_methods=("standard",) if tiny else ("standard", "pgd"),
      hvp_methods=("exact", "fd_forward") if tiny else ("exact", "fd_forward", "fd_central"),
      # small: every other eta of the paper's sweep (its ends and the paper's 1e-5 included);
      # each (model, HVP, eta) is one SOAE compile, which is most of this command's time on a
      # CPU. The accuracy part above keeps the whole sweep (it is cheap).
      effect_etas=(1e-2, 1e-5) if tiny else (PAPER_ETAS if paper else (1e-1, 1e-3, 1e-5, 1e-7)),
      effect_examples=8 if tiny else (1000 if paper else 128),
      batch_size=8 if tiny else (250 if paper else 128),
      eps=c.train.eps, norm="linf",
      soae=dict(steps=1 if tiny else 4, m=4 if tiny else (15 if paper else 20),
                tau=1e-2 if tiny else 1e-3),
      # 3. cost
      timing_batch=8 if tiny else 128, timing_repeats=2 if tiny else 10, timing_eta=1e-3,
  ))
  return c
