"""CIFAR-10, `wrn28_10`: the SOAE paper's setup (eps 8/255, PGD-7 step 2/255 training,
TRADES beta 6, SGD 0.1 / momentum 0.9 / weight decay 3e-4, batch 128, 300 epochs, crop + flip).

  python -m experiments.soat --config configs/cifar10_wrn28_10.py:soat --workdir /tmp/cifar_wrn28_10
  # offline from the python batches: --config.data.source=cifar10_python --config.data.root=DIR
"""

from __future__ import annotations

from configs import common


def get_config(method: str = "soat"):
  return common.cifar10("wrn28_10", method)
