"""The Table I matrix (experiments.table) on MNIST at the papers' settings, for accelerators.

  python -m experiments.table --config configs/table_mnist.py --workdir DIR            # Madry CNN
  python -m experiments.table --config configs/table_mnist.py:resnet18 --workdir DIR

configs.common.mnist_like: the S-O paper's threat models (Linf 0.3 training with PGD-40 of step
0.01; evaluation Linf 0.3 and L2 4.0) with the SOAE paper's recipe (300 epochs, batch 128, SGD
momentum 0.9, weight decay 3e-4; lr 0.01 for the BatchNorm-free Madry CNN), SOAT N = 4, m = 15,
tau = 1e-3 (Sec. IV-D), the papers' full table on all 10,000 test points. The paper's own
Table I (MNIST, ResNet-18 and WideResNet) is printed beside ours; note that it attacks at Linf
8/255, not 0.3.
"""

from __future__ import annotations

from configs import common


def get_config(model: str = "madry_cnn"):
  if model not in ("madry_cnn", "resnet18"):
    raise ValueError(f"unknown model {model!r}; use madry_cnn or resnet18")
  c = common.mnist_like(dict(source="tfds", name="mnist"), model, "standard")
  c.eval.num_examples = 10000
  c.eval.batch_size = 500
  return common.add_table(c, paper=("mnist_resnet18", "mnist_wrn"))
