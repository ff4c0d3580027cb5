"""Shared pieces of the experiment configs: the full config schema with defaults and the
papers' attack suite. Every experiment file calls ``base_config()`` and overrides fields.

Schema (all fields always present so that command-line overrides such as
``--config.train.soat.steps=5`` work for every method):

  seed                     run seed (init, data order, attack noise)
  data.source              tfds | idx | cifar10_python | digits | synthetic
  data.name/root/...       source options (see krylov_adv.data.load); data.augment: crop+flip
  model.name/activation    krylov_adv.models registry name and activation name
  model.options            architecture keyword arguments (width, depth, widen)
  train.method             standard | pgd | trades | soat | mixed | second_order, or several
                           separated by commas (each trained in workdir/<method>)
  train.eps/norm           training threat model (all methods but mixed and standard)
  train.<method>           that method's attack hyperparameters
  eval.attacks             {entry: {label, name, norm, eps, hyperparameters}}
  eval.num_examples        test points attacked; eval.batch_size: per attack call
  parallel.mesh_shape      device mesh over the "data" axis ((-1,) = all devices);
  parallel.distributed     multi-host start-up via jax.distributed (coordinator fields or env)
"""

from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  """The full schema with the SOAE paper's CIFAR-10 training defaults (Sec. IV-A)."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = ml_collections.ConfigDict(dict(
      source="digits", name="digits", root="", data_dir="", num_train=256, num_test=397,
      shape=(8, 8, 1), num_classes=10, max_train=0, max_test=0, augment=False, seed=0))

  c.model = ml_collections.ConfigDict(dict(name="tiny_cnn", activation="relu"))
  c.model.options = ml_collections.ConfigDict()

  t = c.train = ml_collections.ConfigDict()
  t.method = "soat"
  t.epochs = 300
  t.batch_size = 128
  t.learning_rate = 0.1
  t.lr_schedule = "piecewise"
  t.lr_boundaries = (0.5, 0.75)
  t.lr_decay = 0.1
  t.momentum = 0.9
  t.nesterov = False
  t.weight_decay = 3e-4
  t.eps = 8 / 255
  t.norm = "linf"
  t.pgd = ml_collections.ConfigDict(dict(steps=7, step_size=2 / 255, random_start=True))
  t.trades = ml_collections.ConfigDict(dict(beta=6.0, steps=10, step_size=2 / 255))
  # SOAE paper Sec. IV-D: N < 4 iterations suffice, m = 15, 1e-4 <= tau <= 1e-3, eta <= 1e-5
  # with the forward difference of Algorithm 1 step 3.
  t.soat = ml_collections.ConfigDict(dict(steps=4, m=15, tau=1e-3, hvp="fd_forward", eta=1e-5,
                                          alpha=8 / 255))
  t.mixed = ml_collections.ConfigDict(dict(eps_linf=8 / 255, eps_l2=0.5, step_size_linf=2 / 255,
                                           step_size_l2=0.125, steps=7))
  t.second_order = ml_collections.ConfigDict(dict(steps=7, samples=4, sigma=0.05,
                                                  step_size=2 / 255))

  c.eval = ml_collections.ConfigDict(dict(num_examples=1000, batch_size=256))
  c.eval.attacks = attack_suite(eps_linf=8 / 255, eps_l2=0.5)
  c.checkpoint = ml_collections.ConfigDict(dict(max_to_keep=2))
  # Data parallelism (krylov_adv.parallel): mesh_shape (-1,) puts every visible device on the
  # "data" axis; train.batch_size must divide by the device count. Multi-host: set
  # distributed=True (and the coordinator fields, or the standard JAX_* environment variables).
  c.parallel = ml_collections.ConfigDict(dict(
      mesh_shape=(-1,), distributed=False, coordinator_address="", num_processes=0,
      process_id=-1))
  return c


def attack_suite(*, eps_linf: float, eps_l2: float, pgd_steps: int = 20,
                 step_linf: float | None = None, step_l2: float | None = None,
                 soae: dict | None = None, second_order: dict | None = None,
                 autoattack: dict | None = None,
                 include=("clean", "fgsm", "pgd", "second_order", "soae", "autoattack"),
                 norms=("linf", "l2")) -> ml_collections.ConfigDict:
  """The papers' table: clean, FGSM, PGD-``pgd_steps``, S-O, SOAE, AutoAttack under each norm.

  PGD step sizes default to ``eps / 4`` (2/255 for 8/255, the SOAE paper's setting).
  """
  eps = {"linf": eps_linf, "l2": eps_l2}
  step = {"linf": step_linf or eps_linf / 4, "l2": step_l2 or eps_l2 / 4}
  # Evaluation uses the exact HVP: in float32 the paper's forward difference with eta = 1e-5 is
  # mostly rounding noise and makes SOAE far weaker (e.g. 84% vs 6% robust accuracy on the
  # digits test model, Linf 0.3), which would overstate robustness. N, m, tau are the paper's.
  soae = dict(steps=4, m=15, tau=1e-3, hvp="exact") if soae is None else soae
  so = dict(steps=pgd_steps, samples=8, sigma=0.05) if second_order is None else second_order
  aa = dict(version="standard") if autoattack is None else autoattack
  suite = ml_collections.ConfigDict()
  for norm in norms:
    e = eps[norm]
    entries = {
        "clean": dict(label="clean", name="clean"),
        "fgsm": dict(label="FGSM", name="fgsm"),
        "pgd": dict(label=f"PGD-{pgd_steps}", name="pgd", steps=pgd_steps, step_size=step[norm],
                    random_start=True),
        "second_order": dict(label="S-O", name="second_order", step_size=step[norm], **so),
        "soae": dict(label="SOAE", name="soae", alpha=e, **soae),
        "autoattack": dict(label="AutoAttack", name="autoattack", **aa),
    }
    for key in include:
      suite[f"{key}_{norm}"] = ml_collections.ConfigDict(dict(entries[key], norm=norm, eps=e))
  return suite
