"""Any JAX model as an attack's ``logits_fn`` with its parameters as data.

Attacks take ``logits_fn: (B, ...) -> (B, K)`` and pass it to their jitted steps as a *traced*
argument (:func:`krylov_adv.attacks.toolkit.as_model`): the arrays among its pytree leaves are
traced, the rest (the function, the module's structure) is static. :func:`as_logits_fn` builds
such a pytree callable, in inference mode, for each model family:

  logits_fn = as_logits_fn(module, variables, train=False)   # Flax linen (kwargs to apply)
  logits_fn = as_logits_fn(nnx_model)                         # Flax NNX
  logits_fn = as_logits_fn(eqx_model)                         # Equinox (per-example model)

Each returns ``jax.tree_util.Partial(apply, arrays)``: ``apply`` holds the static part and
compares by value, ``arrays`` are the leaves. Attacking a second parameter set of the same
architecture and shapes (another checkpoint, another seed) reuses every compiled attack; a new
architecture, input shape or batch size compiles once.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Callable

import flax.linen as nn
import jax
from flax import nnx

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class _LinenApply:
  """``(variables, x) -> module.apply(variables, x, **kwargs)``, nothing mutable; compared by
  the module's fields and the keyword arguments (equal modules share compiled code)."""
  module: nn.Module
  kwargs: tuple[tuple[str, Any], ...]

  def __call__(self, variables, x):
    return self.module.apply(variables, x, **dict(self.kwargs))


@dataclasses.dataclass(frozen=True)
class _NNXApply:
  """``(state, x) -> nnx.merge(graphdef, state)(x)``: the NNX functional API, the graph
  definition static and the state (parameters, batch statistics) traced."""
  graphdef: Any

  def __call__(self, state, x):
    return nnx.merge(self.graphdef, state)(x)


@dataclasses.dataclass(frozen=True)
class _EquinoxApply:
  """``(arrays, x) -> vmap(eqx.combine(arrays, static))(x)``: an Equinox model maps one
  example; the batch is ``vmap``-ed over it. ``static`` holds every non-array leaf."""
  static: Any

  def __call__(self, arrays, x):
    import equinox as eqx  # only reached with an Equinox model, so equinox is installed
    return jax.vmap(eqx.combine(arrays, self.static))(x)


def _is_equinox(model) -> bool:
  eqx = sys.modules.get("equinox")
  return eqx is not None and isinstance(model, eqx.Module)


def as_logits_fn(model, variables=None, **apply_kwargs) -> Callable[[Array], Array]:
  """The attack-ready ``logits_fn`` of a Flax linen, Flax NNX or Equinox model, in inference
  mode, its arrays traced by the attacks (module docstring).

  Args:
    model: a ``flax.linen.Module`` (with ``variables``), an ``nnx.Module``, or an
      ``equinox.Module`` that maps ONE example (e.g. ``(H, W, C) -> (K,)``; the batch is
      vmapped).
    variables: linen only: the variables dict (``{"params": ..., "batch_stats": ...}``), all
      collections passed, none mutable.
    **apply_kwargs: linen only: keyword arguments of ``module.apply`` selecting inference mode,
      e.g. ``train=False`` or ``deterministic=True`` (hashable values).

  Returns:
    ``jax.tree_util.Partial`` ``f(x (B, ...)) -> logits (B, K)``. NNX: the model is split
    after ``.eval()`` on a copy (the caller's model is left as it is), so Dropout is off and
    BatchNorm uses its running averages. Equinox: ``equinox.nn.inference_mode`` is applied.

  Raises:
    TypeError: an unknown model type, ``variables`` missing for linen or given for NNX /
      Equinox, or ``apply_kwargs`` for NNX / Equinox.
  """
  if isinstance(model, nn.Module):
    if variables is None:
      raise TypeError("as_logits_fn(linen_module, variables, **apply_kwargs): a Flax linen "
                      "module needs its variables")
    return jax.tree_util.Partial(_LinenApply(model, tuple(sorted(apply_kwargs.items()))),
                                 variables)
  if variables is not None or apply_kwargs:
    raise TypeError(f"as_logits_fn({type(model).__name__}) takes the model alone (variables "
                    f"and apply keyword arguments are for Flax linen modules)")
  if isinstance(model, nnx.Module):
    copy = nnx.clone(model)
    copy.eval()
    graphdef, state = nnx.split(copy)
    return jax.tree_util.Partial(_NNXApply(graphdef), state)
  if _is_equinox(model):
    import equinox as eqx
    arrays, static = eqx.partition(eqx.nn.inference_mode(model), eqx.is_array)
    return jax.tree_util.Partial(_EquinoxApply(static), arrays)
  raise TypeError(f"as_logits_fn: unknown model type {type(model).__name__}; pass a Flax linen "
                  f"module with its variables, an nnx.Module or an equinox.Module (any other "
                  f"callable x -> logits can be given to the attacks directly, e.g. "
                  f"jax.tree_util.Partial(apply_fn, params))")
