"""Tiny configs for tests: any method, a few steps on synthetic 8x8 data with TinyCNN.

  python -m experiments.soat --config configs/test_tiny.py:pgd --workdir /tmp/tiny
"""

from __future__ import annotations

from configs import common


def get_config(method: str = "standard"):
  c = common.base_config()
  c.data.update(dict(source="synthetic", num_train=64, num_test=32, shape=(8, 8, 1),
                     num_classes=10, seed=0))
  c.model.name = "tiny_cnn"
  t = c.train
  t.method = method
  t.epochs = 2
  t.batch_size = 16
  t.learning_rate = 0.05
  t.lr_schedule = "cosine"
  t.eps, t.norm = 0.1, "linf"
  t.pgd.update(dict(steps=2, step_size=0.05))
  t.trades.update(dict(steps=2, step_size=0.05))
  t.soat.update(dict(steps=1, m=3, tau=1e-2, hvp="fd_forward", eta=1e-3, alpha=0.1))
  t.mixed.update(dict(eps_linf=0.1, eps_l2=0.5, step_size_linf=0.05, step_size_l2=0.25, steps=2))
  t.second_order.update(dict(steps=2, samples=2, sigma=0.05, step_size=0.05))
  c.eval.num_examples = 16
  c.eval.batch_size = 16
  c.eval.attacks = full_eval_attacks(include=("clean", "fgsm", "pgd"))
  return c


def full_eval_attacks(include=("clean", "fgsm", "pgd", "second_order", "soae", "autoattack")):
  """The papers' attack table at test size (2 PGD steps, 1 SOAE iteration, APGD-CE only)."""
  return common.attack_suite(
      eps_linf=0.1, eps_l2=0.5, pgd_steps=2, soae=dict(steps=1, m=3, tau=1e-2, hvp="exact"),
      second_order=dict(steps=2, samples=2, sigma=0.05),
      autoattack=dict(version="custom", attacks=("apgd_ce",),
                      hyperparameters=dict(apgd_ce=dict(steps=2))),
      include=include)
