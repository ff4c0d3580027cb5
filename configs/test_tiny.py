"""Tiny configs for tests: any method, a few steps on synthetic 8x8 data with TinyCNN.

  python -m experiments.soat --config configs/test_tiny.py:pgd --workdir /tmp/tiny
"""

from __future__ import annotations

from configs import common


def get_config(method: str = "standard"):
  """``common.tiny_config(method)``."""
  return common.tiny_config(method)


def full_eval_attacks(include=("clean", "fgsm", "pgd", "second_order", "soae", "autoattack")):
  """The papers' attack table at test size (2 PGD steps, 1 SOAE iteration, APGD-CE only)."""
  return common.tiny_eval_attacks(include)
