"""Adversarial attacks with one API, and the registry that picks them by name.

Every attack is ``attack(logits_fn, x, y, key, *, eps, norm, **hyperparameters) -> x_adv`` where
``logits_fn`` maps images ``(B, H, W, C)`` in ``[0, 1]`` to logits ``(B, K)`` (model in inference
mode), ``y`` is ``(B,)`` int, ``key`` a PRNG key. The result satisfies ``||x_adv_i - x_i|| <= eps``
and ``0 <= x_adv <= 1``.

Registry: ``get("pgd")`` returns the attack function; ``from_config(cfg)`` binds the
hyperparameters of an ``ml_collections.ConfigDict`` (``cfg.name`` plus keyword arguments) and
returns ``f(logits_fn, x, y, key) -> x_adv``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

_REGISTRY: dict[str, Callable[..., Any]] = {}


def register(name: str):
  """Decorator adding an attack to the registry under ``name``."""

  def wrap(fn):
    if name in _REGISTRY:
      raise ValueError(f"attack {name!r} registered twice")
    _REGISTRY[name] = fn
    return fn

  return wrap


def get(name: str) -> Callable[..., Any]:
  """The attack registered under ``name``; ``ValueError`` listing the known names otherwise."""
  try:
    return _REGISTRY[name]
  except KeyError:
    raise ValueError(f"unknown attack {name!r}; available: {sorted(_REGISTRY)}") from None


def available() -> list[str]:
  """Sorted names of all registered attacks."""
  return sorted(_REGISTRY)


def from_config(cfg) -> Callable[..., Any]:
  """Binds an attack's hyperparameters from a config.

  Args:
    cfg: mapping or ``ConfigDict`` with ``name`` and the attack's keyword arguments (``eps``,
      ``norm``, ...).

  Returns:
    ``f(logits_fn, x, y, key) -> x_adv``.
  """
  params = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
  name = params.pop("name")
  return functools.partial(get(name), **params)


# Attack modules register themselves on import; keep this list at the bottom.
from krylov_adv.attacks import apgd  # noqa: E402,F401  (apgd_ce, apgd_dlr, apgd_t)
from krylov_adv.attacks import fab  # noqa: E402,F401  (fab, fab_t)
from krylov_adv.attacks import square  # noqa: E402,F401  (square)
from krylov_adv.attacks import autoattack  # noqa: E402,F401  (autoattack)
from krylov_adv.attacks import first_order  # noqa: E402,F401  (fgsm, pgd)
from krylov_adv.attacks import second_order  # noqa: E402,F401  (second_order)
from krylov_adv.attacks import soae  # noqa: E402,F401  (soae)
