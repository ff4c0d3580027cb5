"""PSNR / SSIM of FGSM, PGD, AutoAttack and SOAE examples (experiments.perceptual; SOAE paper
Table V).

  python -m experiments.perceptual --config configs/perceptual.py --workdir /tmp/analysis
  python -m experiments.perceptual --config configs/perceptual.py:paper --workdir DIR

SSIM's 11 x 11 window needs images of at least 11 x 11, so this experiment does not use the 8x8
digits: ``small`` (default) trains TinyCNN on the real MNIST test set in ``../shared/data/mnist``
(8,000 images train, the last 2,000 are held out), or, where those files are missing (a fresh
clone), on scikit-learn's digits upsampled to 16 x 16 (``data_fallback``); ``tiny`` (tests) uses synthetic 12x12 images;
``paper`` uses MNIST through tensorflow-datasets with the Madry CNN and eps = 8/255 as in the
SOAE paper's Table V.
"""

from __future__ import annotations

import ml_collections

from configs import common


def get_config(scale: str = "small"):
  c = common.analysis_config(scale)
  tiny, paper = scale == "tiny", scale == "paper"
  if tiny:
    c.data.update(dict(source="synthetic", name="synthetic", num_train=1024, num_test=32,
                       shape=(12, 12, 1), num_classes=10, seed=0))
    c.train.epochs = 10
  elif not paper:
    c.data.update(dict(source="idx", name="mnist", root="../shared/data/mnist", test_split=2000))
    c.train.epochs = 3
    c.train.learning_rate = 0.05
    # Without those files (a fresh clone): scikit-learn's bundled digits, each pixel repeated
    # 2 x 2 (16 x 16 images, enough for SSIM's 11 x 11 window); experiments.datasets.choose_data
    # decides and prints which data it used.
    c.data_fallback = ml_collections.ConfigDict(dict(
        data=dict(source="digits", name="digits", num_test=397, upsample=2, test_split=0),
        train=dict(epochs=15, learning_rate=0.1)))
  eps = 8 / 255 if paper else (0.1 if tiny else 0.1)
  pgd_steps = 3 if tiny else 20
  aa = (dict(version="custom", attacks=("apgd_ce",),
             hyperparameters=dict(apgd_ce=dict(steps=3)))
        if tiny else dict(version="standard"))
  c.experiment = ml_collections.ConfigDict(dict(
      model_method="standard",
      # small: 100 points. AutoAttack (standard) is nearly all of this command's time: on 200
      # real MNIST points it took 5.5 of 6.3 minutes on a loaded 2-core CPU.
      num_examples=8 if tiny else (1000 if paper else 100),
      batch_size=8 if tiny else 100,
      num_shown=4 if tiny else 8,
      eps=eps, norm="linf",
      attacks=dict(
          fgsm=dict(name="fgsm"),
          pgd=dict(name="pgd", steps=pgd_steps, step_size=eps / 4, random_start=True),
          autoattack=dict(name="autoattack", **aa),
          soae=dict(name="soae", alpha=eps, steps=1 if tiny else 4, m=4 if tiny else 15,
                    tau=1e-2 if tiny else 1e-3, hvp="fd_forward", eta=1e-5),
      ),
  ))
  return c
