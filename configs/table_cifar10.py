"""The Table II matrix (experiments.table) on CIFAR-10 at the SOAE paper's settings, for
accelerators.

  python -m experiments.table --config configs/table_cifar10.py --workdir DIR          # ResNet-18
  python -m experiments.table --config configs/table_cifar10.py:wrn34_10 --workdir DIR
  # offline from the python batches: --config.data.source=cifar10_python --config.data.root=DIR

configs.common.cifar10: eps 8/255, PGD-7 step 2/255 training, TRADES beta 6, SGD 0.1 / momentum
0.9 / weight decay 3e-4, batch 128, 300 epochs, crop + flip; evaluation Linf 8/255 (PGD-20
step 2/255) and L2 0.5 on all 10,000 test points. Model after the colon: resnet18 (default),
wrn28_10, wrn34_10. The paper's Table II (CIFAR-10, ResNet-18 and WideResNet) is printed beside
ours.
"""

from __future__ import annotations

from configs import common

MODELS = ("resnet18", "wrn28_10", "wrn34_10")


def get_config(model: str = "resnet18"):
  if model not in MODELS:
    raise ValueError(f"unknown model {model!r}; use one of {MODELS}")
  c = common.cifar10(model, "standard")
  c.eval.num_examples = 10000
  c.eval.batch_size = 500
  return common.add_table(c, paper=("cifar10_resnet18", "cifar10_wrn"))
