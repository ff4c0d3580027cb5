"""The Table I matrix (experiments.table) on scikit-learn's 8x8 digits, TinyCNN: nothing is
downloaded.

  python -m experiments.table --config configs/table_digits.py --workdir /tmp/table_digits
  python -m experiments.table --config configs/table_digits.py:small --workdir /tmp/table_digits

Scale after the colon: ``tiny`` (default; tests: 256 training images, 2 epochs, one-step
attacks, 32 test points, AutoAttack = APGD-CE with 2 steps, the HVP's cost fixed at 1.4
gradients, not measured; about 100 s per row on a loaded 2-core CPU, almost all compiling,
17 minutes for ten rows, before the authors' SOAR and SCORPIO rows made twelve) or ``small``
(5.3 minutes for twelve rows on an idle 2-core CPU: all 1400 training images, 15 epochs, the
papers' full table on the 397 test points, the HVP's cost measured). Linf 0.1 / L2 1.0.
"""

from __future__ import annotations

from configs import common


def get_config(scale: str = "tiny"):
  if scale not in ("tiny", "small"):
    raise ValueError(f"unknown scale {scale!r}; use tiny or small")
  tiny = scale == "tiny"
  eps = 0.1
  c = common.base_config()
  c.data.update(dict(source="digits", name="digits", num_test=397, seed=0,
                     max_train=256 if tiny else 0))
  c.model.name = "tiny_cnn"
  t = c.train
  t.update(dict(epochs=2 if tiny else 15, batch_size=64, learning_rate=0.1,
                lr_schedule="cosine", weight_decay=5e-4, eps=eps, norm="linf"))
  steps = 2 if tiny else 5
  t.pgd.update(dict(steps=steps, step_size=2.5 * eps / steps))
  t.trades.update(dict(steps=steps, step_size=2.5 * eps / steps, beta=6.0))
  t.second_order.update(dict(steps=steps, samples=2, sigma=0.05, step_size=2.5 * eps / steps))
  t.scorpio.update(dict(steps=2 if tiny else 5))
  t.soat.update(dict(steps=1 if tiny else 2, m=4 if tiny else 10, tau=1e-3, alpha=eps))
  c.eval.eps_linf, c.eval.eps_l2 = eps, 1.0
  if tiny:
    c.eval.num_examples = c.eval.batch_size = 32
    c.eval.table = common.tiny_eval_attacks()
  else:
    c.eval.num_examples = c.eval.batch_size = 397
    c.eval.table = common.attack_suite()
  c.eval.attacks = common.attack_suite(include=("clean",))
  return common.add_table(c, paper=("mnist_resnet18",), hvp_cost=1.4 if tiny else 0.0)
