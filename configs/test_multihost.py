"""The multi-host test's config: PGD-AT of TinyCNN on scikit-learn's digits, evaluated with
clean, PGD, SOAE (GMRES) and AutoAttack (APGD-CE, APGD-T) under Linf at test size.

  python -m experiments.soat --config configs/test_multihost.py --workdir /tmp/mh \\
      --config.parallel.distributed=True --config.parallel.coordinator_address=localhost:1234 \\
      --config.parallel.num_processes=2 --config.parallel.process_id=0   # and =1 on host 2
"""

from __future__ import annotations

from configs import common


def get_config(method: str = "pgd"):
  c = common.tiny_config(method)
  c.data = common.base_config().data
  c.data.update(dict(source="digits", name="digits", num_test=397, seed=0))
  c.train.epochs = 3
  c.train.batch_size = 64
  c.train.learning_rate = 0.1
  c.eval.num_examples = 32
  c.eval.batch_size = 16
  c.eval.attacks = _suite()
  c.eval.table = _suite()
  return c


def _suite():
  return common.attack_suite(
      pgd_steps=3, soae=dict(steps=1, m=3, tau=1e-2, hvp="exact"),
      autoattack=dict(version="custom", attacks=("apgd_ce", "apgd_t"),
                      hyperparameters=dict(apgd_ce=dict(steps=3),
                                           apgd_t=dict(steps=3, n_target_classes=2))),
      include=("clean", "pgd", "soae", "autoattack"), norms=("linf",))
