"""Fashion-MNIST, `madry_cnn`, read offline from the Debian package's raw IDX files.

  apt-get install dataset-fashion-mnist  # 60k + 10k images, /usr/share/datasets/fashion-mnist
  python -m experiments.soat --workdir /tmp/fmnist --config configs/fashion_mnist_madry_cnn.py:soat
"""

from __future__ import annotations

from configs import common

ROOT = "/usr/share/datasets/fashion-mnist"


def get_config(method: str = "soat"):
  return common.mnist_like(dict(source="idx", name="fashion_mnist", root=ROOT), "madry_cnn", method)
