"""MNIST, `madry_cnn`: S-O paper threat models (Linf 0.3, L2 4.0),
trained with the SOAE paper's recipe.

  python -m experiments.soat --config configs/mnist_madry_cnn.py:soat --workdir /tmp/mnist_madry_cnn
  (method after the colon: standard | pgd | trades | soat | soat_paper | mixed | second_order;
   soat_paper is SOAT with the paper's forward-difference HVP, eta = 1e-5)
"""

from __future__ import annotations

from configs import common


def get_config(method: str = "soat"):
  return common.mnist_like(dict(source="tfds", name="mnist"), "madry_cnn", method)
