"""Adversarial attacks with one API, and the registry that picks them by name.

Every attack is a function of the package, ``attacks.NAME(logits_fn, x, y, key, *, eps, norm,
**hyperparameters) -> x_adv``, where ``logits_fn`` maps images ``(B, H, W, C)`` in ``[0, 1]`` to
logits ``(B, K)`` (model in inference mode), ``y`` is ``(B,)`` int, ``key`` a PRNG key.
Models are data: the arrays among ``logits_fn``'s pytree leaves (``jax.tree_util.Partial(apply,
params)``, ``krylov_adv.models.as_logits_fn(...)``) are traced arguments of every attack's jitted
steps (:func:`toolkit.as_model`), so another parameter set of the same architecture and shapes
compiles nothing; a plain function is static (compiled once per function object). The
result is the adversarial batch alone and satisfies ``||x_adv_i - x_i|| <= eps`` and
``0 <= x_adv <= 1``, finite even for a model that returns NaN or inf (an example keeps its last
finite iterate, or its clean ``x``). ``x`` in float16 / bfloat16 is attacked in float32 and
``x_adv`` returned in ``x``'s dtype; an empty batch is returned unchanged; integer ``x``, or
``x`` of a shape the model cannot take, raises ``ValueError`` (each rule in one place, the
toolkit's ``attack_entry`` and ``validate_inputs``). Attacks with a report or diagnostics
have a second entry, ``attacks.NAME_with_report(...)`` with the same arguments and defaults
(read from ``NAME``'s signature by :func:`krylov_adv.attacks.toolkit.keyword_arguments`),
returning
``WithReport(x_adv, report)`` (:class:`krylov_adv.attacks.toolkit.WithReport`, ``x_adv`` the
same array ``NAME`` returns): ``pgd_with_report`` and ``second_order_with_report`` (per-iterate
trace), ``soae_with_report`` (:class:`SOAEDiagnostics`), ``autoattack_with_report``
(:class:`AutoAttackReport`); ``autoattack_batched`` is ``autoattack_with_report`` over a test
set in batches, component by component over the whole set (what a batched evaluation runs).

Randomized models (dropout at test time, input noise, randomized defences) are declared as
``attacks.stochastic(fn)`` with ``fn(x, key) -> logits`` (a pytree like any model: its arrays are
traced). FGSM, PGD and APGD (``apgd``, ``apgd_ce``, ``apgd_dlr``, ``apgd_t``) attack them with
Expectation over Transformation (``eot_samples`` draws per gradient), AutoAttack with
``version="rand"`` (APGD-CE and APGD-DLR, 20 draws); the other attacks refuse them with the reason
(:mod:`krylov_adv.attacks._eot`), and ``krylov_adv.evaluation`` reports their accuracy as the
mean over ``draws`` draws.

Registered attacks: ``fgsm``, ``pgd``, ``second_order`` (S-O), ``soae``, ``trades``, ``apgd_ce``,
``apgd_dlr``, ``apgd_t``, ``fab``, ``fab_t``, ``square``, ``autoattack``.

One name per concept across attacks:

* ``steps``: iterations of the attack's loop (PGD/S-O/TRADES/APGD/FAB iterations, SOAE's outer
  Newton iterations ``N``, Square's queries); ``restarts``: random restarts (per target class
  for the targeted attacks); ``n_target_classes``: target classes of APGD-T / FAB-T.
* ``step_size``: the length ``a`` of one step in the threat model's norm (PGD, FGSM, S-O,
  TRADES; default ``2.5 eps / steps``). SOAE instead takes ``alpha``, the paper's symbol for
  the *total* distance of its ``N`` steps (each ``alpha / N``). APGD adapts its own step.
* ``eta``: SOAE's finite-difference step of the Hessian-vector product (with ``hvp``, the HVP
  method); FAB's overshoot factor is ``overshoot`` (the FAB paper's ``eta``).
* ``loss``: ``"ce" | "dlr"``; ``random_start``: start at a uniform point of the ball.

Each default lives once: in the signature of the attack ``NAME`` (``NAME_with_report`` reads
them from there); SOAE's in its module constants ``DEFAULT_STEPS``, ``DEFAULT_M``,
``DEFAULT_TAU``, ``DEFAULT_HVP``, ``DEFAULT_ETA``, shared by ``soae`` and ``soae_direction`` (the
last two are :data:`krylov_adv.hvp.DEFAULT_METHOD` and :data:`krylov_adv.hvp.DEFAULT_ETA`, the
library's one default HVP method and FD step).
The ``*_step_size`` default ``2.5 eps / steps`` is :func:`toolkit.default_step_size`. Config
files use these names as keys.

Registry: ``get("pgd")`` returns the attack function (the same object as ``attacks.pgd``);
``from_config(cfg)`` binds the hyperparameters of an ``ml_collections.ConfigDict`` (``cfg.name``
plus keyword arguments) and returns a :class:`BoundAttack`, ``f(logits_fn, x, y, key) ->
x_adv``; an attack that can take a whole test set at once (AutoAttack) registers that form with
:func:`register_test_set_runner`, and ``BoundAttack.test_set_runner`` gives it. The parts
attacks are built from are in :mod:`krylov_adv.attacks.toolkit`; the implementations in the
private modules ``_first_order``, ``_second_order``, ``_soae``, ``_trades``, ``_apgd``,
``_fab``, ``_square``, ``_autoattack``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

from krylov_adv.registry import Registry

_REGISTRY: Registry[Callable[..., Any]] = Registry("attack")


def register(name: str):
  """Decorator adding an attack to the registry under ``name``."""

  def wrap(fn):
    _REGISTRY.add(name, fn)
    return fn

  return wrap


def get(name: str) -> Callable[..., Any]:
  """The attack registered under ``name``; ``ValueError`` listing the known names otherwise."""
  return _REGISTRY.get(name)


def available() -> list[str]:
  """Sorted names of all registered attacks."""
  return _REGISTRY.names()


# Attacks that can take a whole test set at once, batched inside: {name: runner}, each runner
# ``runner(logits_fn, x (N, ...), y, key, *, batch_size, **keywords) -> WithReport``.
_TEST_SET_RUNNERS: dict[str, Callable[..., Any]] = {}


def register_test_set_runner(name: str):
  """Decorator recording ``runner`` as the whole-test-set form of the attack ``name``: given
  ``N`` points and a ``batch_size`` it returns what attacking batch ``b`` (points
  ``b * batch_size ...``) with ``fold_in(key, b)`` returns, per example, but is free to group
  the work across batches (AutoAttack runs each component on the still-robust points of every
  batch at once). :func:`krylov_adv.evaluation.run_attack` uses it for a :class:`BoundAttack`
  of ``name``."""

  def wrap(runner):
    _TEST_SET_RUNNERS[name] = runner
    return runner

  return wrap


@dataclasses.dataclass(frozen=True)
class BoundAttack:
  """A registered attack with its hyperparameters bound: ``f(logits_fn, x, y, key) -> x_adv``
  (what :func:`from_config` returns).

  name: the registry name; keywords: the bound keyword arguments; report: call the
  ``NAME_with_report`` entry instead (returns ``WithReport(x_adv, report)``).
  """
  name: str
  keywords: Mapping[str, Any]
  report: bool = False

  @property
  def func(self) -> Callable[..., Any]:
    """The entry called: ``attacks.NAME``, or ``attacks.NAME_with_report`` with ``report``
    (``functools.partial``'s attribute name, as ``from_config`` returned before)."""
    return globals()[f"{self.name}_with_report"] if self.report else get(self.name)

  def __call__(self, logits_fn, x, y, key):
    return self.func(logits_fn, x, y, key, **self.keywords)

  def with_report(self) -> "BoundAttack":
    """The same attack through its ``NAME_with_report`` entry (``AttributeError`` where the
    attack has none)."""
    if f"{self.name}_with_report" not in globals():
      raise AttributeError(f"attack {self.name!r} has no {self.name}_with_report entry")
    return dataclasses.replace(self, report=True)

  @property
  def test_set_runner(self) -> Callable[..., Any] | None:
    """``runner(logits_fn, x, y, key, *, batch_size) -> WithReport`` with the hyperparameters
    bound, for an attack registered with :func:`register_test_set_runner`; else ``None``."""
    runner = _TEST_SET_RUNNERS.get(self.name)
    return None if runner is None else functools.partial(runner, **self.keywords)


def from_config(cfg) -> BoundAttack:
  """Binds an attack's hyperparameters from a config.

  Args:
    cfg: mapping or ``ConfigDict`` with ``name`` and the attack's keyword arguments (``eps``,
      ``norm``, ...).

  Returns:
    A :class:`BoundAttack`, ``f(logits_fn, x, y, key) -> x_adv``.
  """
  params = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
  name = params.pop("name")
  get(name)
  return BoundAttack(name, params)


# Attack modules register themselves on import; keep this list at the bottom.
# pylint: disable=wrong-import-position
from krylov_adv.attacks._apgd import apgd, apgd_ce, apgd_dlr, apgd_t  # noqa: E402
from krylov_adv.attacks._fab import fab, fab_t  # noqa: E402
from krylov_adv.attacks._square import square  # noqa: E402
from krylov_adv.attacks._first_order import fgsm, pgd, pgd_with_report  # noqa: E402
from krylov_adv.attacks._second_order import (second_order,  # noqa: E402
                                              second_order_with_report, smoothed_gradient)
from krylov_adv.attacks._soae import (SOAEDiagnostics, SOAEDirection, soae,  # noqa: E402
                                      soae_direction, soae_with_report)
from krylov_adv.attacks._trades import trades  # noqa: E402
from krylov_adv.attacks._autoattack import (AutoAttackReport, autoattack,  # noqa: E402
                                            autoattack_batched, autoattack_with_report)
from krylov_adv.attacks.toolkit import TracedModel, WithReport, as_model  # noqa: E402
from krylov_adv.attacks._eot import Stochastic, is_stochastic, stochastic  # noqa: E402
