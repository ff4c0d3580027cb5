"""Builders for the paper configs (MNIST, Fashion-MNIST, CIFAR-10); the per-experiment files
only pick dataset, model and method."""

from __future__ import annotations

import ml_collections

from configs import common

# S-O paper Sec. 5: ||delta||_inf <= 0.3 and ||delta||_2 <= 4.0 on MNIST-sized images in [0, 1].
MNIST_EPS_LINF, MNIST_EPS_L2 = 0.3, 4.0
# SOAE paper Sec. IV-A: eps = 8/255, step 2/255 on CIFAR-10; 0.5 is the usual L2 budget there.
CIFAR_EPS_LINF, CIFAR_EPS_L2 = 8 / 255, 0.5


def mnist_like(data: dict, model: str, method: str, **model_options) -> ml_collections.ConfigDict:
  """MNIST / Fashion-MNIST (28x28x1): Linf 0.3 training with Madry's PGD-40 (step 0.01);
  evaluation under Linf 0.3 and L2 4.0 with PGD-20 steps of 2.5 eps / 20."""
  c = common.base_config()
  c.data.update(data)
  c.model.name = model
  c.model.options.update(model_options)
  t = c.train
  t.method = method
  t.eps, t.norm = MNIST_EPS_LINF, "linf"
  t.pgd.update(dict(steps=40, step_size=0.01))
  t.trades.update(dict(steps=40, step_size=0.01))
  t.soat.alpha = MNIST_EPS_LINF
  t.mixed.update(dict(eps_linf=MNIST_EPS_LINF, eps_l2=MNIST_EPS_L2, step_size_linf=0.01,
                      step_size_l2=0.1, steps=40))
  t.second_order.update(dict(steps=40, step_size=0.01, sigma=0.1))
  if model == "madry_cnn":
    # No BatchNorm: lr 0.1 with momentum 0.9 diverges on this CNN; 0.01 is the stable choice.
    t.learning_rate = 0.01
  c.eval.attacks = common.attack_suite(
      eps_linf=MNIST_EPS_LINF, eps_l2=MNIST_EPS_L2, step_linf=2.5 * MNIST_EPS_LINF / 20,
      step_l2=2.5 * MNIST_EPS_L2 / 20,
      second_order=dict(steps=20, samples=8, sigma=0.1))
  return c


def cifar10(model: str, method: str, *, source: str = "tfds", root: str = "",
            **model_options) -> ml_collections.ConfigDict:
  """CIFAR-10 with the SOAE paper's setup (Sec. IV-A): eps 8/255, PGD-7 step 2/255 training,
  TRADES beta 6, SGD lr 0.1 momentum 0.9 weight decay 3e-4, batch 128, 300 epochs; crop+flip."""
  c = common.base_config()
  c.data.update(dict(source=source, name="cifar10", root=root, augment=True))
  c.model.name = model
  c.model.options.update(model_options)
  c.train.method = method
  c.eval.attacks = common.attack_suite(eps_linf=CIFAR_EPS_LINF, eps_l2=CIFAR_EPS_L2,
                                       step_linf=2 / 255, step_l2=CIFAR_EPS_L2 / 4)
  return c
