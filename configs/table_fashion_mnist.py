"""The Table I matrix (experiments.table) on Fashion-MNIST, offline, at a size a 2-core CPU
finishes in under an hour: TinyCNN, reduced training and evaluation.

  apt-get install dataset-fashion-mnist  # 60k + 10k images, /usr/share/datasets/fashion-mnist
  python -m experiments.table --config configs/table_fashion_mnist.py --workdir /tmp/table_fm

Reduced settings (the paper's are 300 epochs of ResNet-18 / WideResNet on the full data, PGD-7
training, Linf 8/255): the first 10,000 training images, 3 epochs of SGD (lr 0.05 cosine,
momentum 0.9, weight decay 5e-4, batch 128), Linf 0.1 training with 5-step attacks (PGD,
TRADES, STN with 4 noise samples), SCORPIO with 5 Frank-Wolfe steps, SOAT with N = 2 outer
iterations and m = 10 (exact HVP; ``soat_paper``: the forward difference at eta = 1e-5). The
evaluation is the papers' full table (PGD-20, S-O-20 with 8 samples, SOAE N = 4 / m = 15 /
tau = 1e-3 with the exact HVP; AutoAttack reduced to its APGD-CE and APGD-T components) on
the first 200 test points, Linf 0.1 and L2 1.5. ``:madry_cnn`` trains the Madry CNN with the full training set and 10 epochs instead
(an accelerator's run).
"""

from __future__ import annotations

from configs import common

ROOT = "/usr/share/datasets/fashion-mnist"
EPS_LINF, EPS_L2 = 0.1, 1.5


def get_config(model: str = "tiny_cnn"):
  if model not in ("tiny_cnn", "madry_cnn"):
    raise ValueError(f"unknown model {model!r}; use tiny_cnn or madry_cnn")
  cpu = model == "tiny_cnn"
  c = common.base_config()
  c.data.update(dict(source="idx", name="fashion_mnist", root=ROOT,
                     max_train=10000 if cpu else 0))
  c.model.name = model
  t = c.train
  t.update(dict(epochs=3 if cpu else 10, batch_size=128, learning_rate=0.05 if cpu else 0.01,
                lr_schedule="cosine", weight_decay=5e-4, eps=EPS_LINF, norm="linf"))
  steps = 5 if cpu else 10
  step = 2.5 * EPS_LINF / steps
  t.pgd.update(dict(steps=steps, step_size=step))
  t.trades.update(dict(steps=steps, step_size=step, beta=6.0))
  t.second_order.update(dict(steps=steps, samples=4, sigma=0.05, step_size=step))
  t.scorpio.update(dict(steps=5))
  t.soat.update(dict(steps=2 if cpu else 4, m=10 if cpu else 15, tau=1e-3, alpha=EPS_LINF))
  c.eval.eps_linf, c.eval.eps_l2 = EPS_LINF, EPS_L2
  c.eval.num_examples = c.eval.batch_size = 200 if cpu else 1000
  # On the CPU, AutoAttack's APGD-CE and APGD-T (100 steps, 9 target classes): FAB-T and Square
  # (5000 queries) cost minutes per model and norm here, where the whole table has an hour.
  # The accelerator's run keeps the standard version.
  c.eval.table = common.attack_suite(autoattack=dict(
      version="custom", attacks=("apgd_ce", "apgd_t")) if cpu else None)
  if cpu:
    for norm in ("linf", "l2"):
      c.eval.table[f"autoattack_{norm}"].label = "AutoAttack (APGD-CE, APGD-T)"
  c.eval.attacks = common.attack_suite(include=("clean",))
  return common.add_table(c, paper=("mnist_resnet18", "mnist_wrn"))
