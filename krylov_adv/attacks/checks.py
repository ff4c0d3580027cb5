"""Input validation shared by every attack's public entry point.

Shape and hyperparameter checks always run (they are static under ``jit``). Value checks (labels
in range, ``x`` finite and inside the box ``bounds``, default ``[0, 1]``) run when the arrays are concrete, i.e. when an attack
is called eagerly from user code; inside an outer ``jit`` (a training step) the values are
tracers and only the static checks apply.
"""

from __future__ import annotations

import collections
import functools
import math
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from krylov_adv import projections
from krylov_adv.attacks import _eot


def is_concrete(a) -> bool:
  return not isinstance(a, jax.core.Tracer)


@jax.jit
def _range_stats(a):
  # Reduced on the devices: a batch sharded over several hosts cannot be fetched whole, but
  # these scalars come back replicated on every host.
  a = a.reshape(-1)
  return jnp.all(jnp.isfinite(a)), jnp.min(a), jnp.max(a)


def _host_stats(fn, *args):
  """``fn(*args)`` (a jitted reduction) as NumPy values, or ``None`` under a caller's ``jit``:
  arrays closed over by the caller's function are concrete, but a jitted call inside its trace
  returns tracers, whose values do not exist yet (the value checks are then skipped)."""
  out = fn(*args)
  if any(isinstance(v, jax.core.Tracer) for v in out):
    return None
  return tuple(np.asarray(v) for v in out)


def _unbound_apply(fn) -> bool:
  """Whether ``fn`` is a Flax linen ``module.apply`` (which takes ``(variables, x)``)."""
  unwrap = getattr(fn, "unwrap", None)
  fn = unwrap() if callable(unwrap) else fn
  linen = sys.modules.get("flax.linen")
  return (linen is not None and getattr(fn, "__name__", "") == "apply"
          and isinstance(getattr(fn, "__self__", None), linen.Module))


def num_classes(logits_fn, x) -> int:
  """``K`` from the abstract output shape of ``logits_fn`` on ``x`` (no FLOPs spent).

  A ``logits_fn`` that is a Flax ``module.apply`` (it takes the variables first) raises
  ``TypeError`` saying how to bind them; one that cannot take ``x`` (e.g. a CNN given rank-3 or
  rank-5 ``x``, or a function of other arguments) raises ``ValueError`` naming ``x``'s shape and
  dtype, with the model's own message after it."""
  if _eot.is_stochastic(logits_fn):  # fn(x, key): its output shape for one key
    logits_fn = functools.partial(logits_fn, key=jax.random.PRNGKey(0))
  if _unbound_apply(logits_fn):
    raise TypeError("logits_fn is a Flax module's apply, which takes (variables, x); attacks call "
                    "logits_fn(x): pass krylov_adv.models.as_logits_fn(module, variables, "
                    "train=False) instead")
  try:
    out = jax.eval_shape(logits_fn, jax.ShapeDtypeStruct(x.shape, x.dtype))
  except (TypeError, ValueError, IndexError, ZeroDivisionError, AttributeError) as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ValueError(f"logits_fn cannot take x of shape {x.shape} and dtype {x.dtype} (attacks "
                     f"call logits_fn(x) on the model's input batch, e.g. (B, H, W, C), with the "
                     f"parameters bound: see krylov_adv.models.as_logits_fn): "
                     f"{type(e).__name__}: {first}") from e
  if len(out.shape) != 2 or out.shape[0] != x.shape[0]:
    raise ValueError(f"logits_fn must map (B, ...) to logits (B, K), got shape {out.shape}")
  if not jnp.issubdtype(out.dtype, jnp.floating):
    # Attacks differentiate the loss of the logits; JAX refuses gradients of integer outputs
    # with a TypeError deep inside the attack.
    raise ValueError(f"logits_fn must return floating-point logits, got dtype {out.dtype} "
                     f"(cast them, e.g. logits.astype(jnp.float32))")
  return int(out.shape[1])


class ModelWarning(UserWarning):
  """A model handed to an attack looks wrong (the checks of the reference AutoAttack's
  ``checks.py``): probabilities instead of logits, or a randomized model not declared as such."""


# Models already checked: {(structure, static leaves, ids of the arrays, input shape)}, newest
# last. Identity, not values: a model is checked once per parameter set without hashing it.
_CHECKED: "collections.OrderedDict[tuple, None]" = collections.OrderedDict()
_CHECKED_SIZE = 64
# Examples of the probe batch the checks evaluate.
_PROBE = 8


def check_model(logits_fn, x) -> None:
  """Warns (:class:`ModelWarning`, one line each) about a model that looks wrong, by calling
  it eagerly twice on the first ``min(B, 8)`` examples of the concrete batch ``x``:

  * logits that look like probabilities (every row non-negative and summing to 1 within
    1e-4): a softmax output, on which the attacks' losses are wrong;
  * two calls on the same input that differ: a randomized model not declared with
    ``attacks.stochastic`` (attacks trace it once, so they would attack one fixed draw of it).
    A declared one (:func:`krylov_adv.attacks._eot.is_stochastic`) gets only the first check,
    on one draw.

  Runs once per model and parameter arrays (by identity) and input shape; nothing under a
  caller's ``jit`` (tracers) or when the model's arrays are tracers.
  """
  leaves, treedef = jax.tree_util.tree_flatten(logits_fn)
  if not is_concrete(x) or not all(is_concrete(a) for a in leaves):
    return
  try:
    memo = (treedef, tuple(id(a) for a in leaves), tuple(x.shape[1:]))
    hash(memo)
  except TypeError:
    return
  if memo in _CHECKED:
    return
  _CHECKED[memo] = None
  while len(_CHECKED) > _CHECKED_SIZE:
    _CHECKED.popitem(last=False)
  probe = x[:_PROBE]
  if _eot.is_stochastic(logits_fn):  # declared randomized: only the softmax check, on one draw
    first = second = np.asarray(jax.device_get(logits_fn(probe, jax.random.PRNGKey(0))),
                                np.float64)
  else:
    first, second = (np.asarray(jax.device_get(logits_fn(probe)), np.float64) for _ in range(2))
  if not np.array_equal(first, second, equal_nan=True):
    warnings.warn("logits_fn gives different outputs for the same input (a randomized model?): "
                  "attacks trace it once and attack one fixed draw; declare it as "
                  "attacks.stochastic(fn) with fn(x, key) -> logits and attack it with EoT "
                  "(eot_samples, autoattack(version='rand'))", ModelWarning, stacklevel=4)
  if first.size and np.all(first >= 0) and np.allclose(first.sum(axis=1), 1.0, atol=1e-4):
    warnings.warn("logits_fn returns probabilities (rows are non-negative and sum to 1): attacks "
                  "need logits; remove the final softmax", ModelWarning, stacklevel=4)


def warn_target_classes(n_target_classes: int, k: int) -> None:
  """Warns (:class:`ModelWarning`) when more target classes are requested than the ``K - 1``
  a ``K``-class model has (the targeted attacks then use ``K - 1``)."""
  if n_target_classes > k - 1:
    warnings.warn(f"n_target_classes={n_target_classes} but the model has only K={k} classes: "
                  f"{k - 1} target classes are attacked", ModelWarning, stacklevel=4)


def check_x_dtype(x) -> None:
  """Raises ``ValueError`` unless ``x`` is a floating-point array (images in ``[0, 1]``; an
  integer ``uint8`` image must be divided by 255 first)."""
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"x must be a floating-point array of images in [0, 1], got dtype "
                     f"{x.dtype} (divide uint8 images by 255)")


def check_bounds(bounds, x) -> tuple:
  """Validates the input box ``bounds = (lo, hi)`` of an attack on ``x (B, ...)`` and returns it
  as two arrays in ``x``'s dtype (their own shapes, e.g. ``()`` or ``(C,)``: the box is a traced
  argument of the attacks' jitted steps, so another box of the same shapes compiles nothing).

  ``lo`` and ``hi`` are scalars or arrays broadcastable to ``x`` (``(C,)`` per channel, one
  example's shape, or ``x``'s); ``ValueError`` when they are not a pair, do not broadcast, are
  NaN, or (when concrete) ``lo > hi`` somewhere. Infinite bounds are allowed (an open side).
  """
  if bounds is None:
    bounds = projections.DEFAULT_BOUNDS
  try:
    lo, hi = bounds
  except (TypeError, ValueError):
    raise ValueError(f"bounds must be a pair (lo, hi) of scalars or arrays broadcastable to x, "
                     f"got {bounds!r}") from None
  lo = jnp.asarray(lo, x.dtype)
  hi = jnp.asarray(hi, x.dtype)
  for name, b in (("lo", lo), ("hi", hi)):
    try:
      ok = jnp.broadcast_shapes(b.shape, x.shape) == tuple(x.shape)
    except ValueError:
      ok = False
    if not ok:
      raise ValueError(f"bounds {name} of shape {b.shape} does not broadcast to x of shape "
                       f"{x.shape} (use a scalar, (C,) per channel, or one example's shape)")
  if is_concrete(lo) and is_concrete(hi):
    lo_np, hi_np = np.asarray(lo), np.asarray(hi)
    if np.isnan(lo_np).any() or np.isnan(hi_np).any():
      raise ValueError("bounds contain NaN")
    if np.any(lo_np > hi_np):
      raise ValueError(f"bounds must have lo <= hi everywhere, got lo in [{lo_np.min()}, "
                       f"{lo_np.max()}] and hi in [{hi_np.min()}, {hi_np.max()}]")
  return lo, hi


def _box_slack(b, dtype):
  """The rounding slack of the box check: a few ulps of the bound (at least of 1). A box
  computed as ``(0 - mu) / s`` in float64 (Python floats) and data standardised in float32 can
  put an exact 0 pixel ~4e-8 outside; the projections then clip ``x_adv`` into the box."""
  return 8 * float(np.finfo(np.dtype(dtype)).eps) * jnp.maximum(1.0, jnp.abs(b))


@jax.jit
def _outside_box(x, lo, hi):
  below = jnp.broadcast_to(x < lo - _box_slack(lo, x.dtype), x.shape)
  above = jnp.broadcast_to(x > hi + _box_slack(hi, x.dtype), x.shape)
  return jnp.any(below | above), jnp.max(jnp.where(below, lo - x, 0.0)), jnp.max(
      jnp.where(above, x - hi, 0.0))


def check_attack_inputs(x, y, eps, norm: str, logits_fn=None, bounds=None) -> int | None:
  """Raises ``ValueError`` with a clear message for bad attack input; returns ``K``.

  Args:
    x: ``(B, H, W, C)`` float images inside the box (any ``(B, ...)`` the model takes).
    y: ``(B,)`` integer labels in ``[0, K)``.
    eps: budget, a finite number ``>= 0``.
    norm: ``"linf"``, ``"l2"`` or ``"l1"``.
    bounds: the box ``(lo, hi)`` (:func:`check_bounds`); ``None`` is ``[0, 1]``.
    logits_fn: the model; when given, ``K`` is read from its abstract output shape (after the
      shape checks, so that a bad batch is reported as such) and the labels are range-checked.

  Returns:
    ``K``, or ``None`` without ``logits_fn``.
  """
  projections.check_norm(norm)
  check_x_dtype(x)
  check_nonnegative("eps", eps)
  if x.ndim < 2:
    raise ValueError(f"x must be a batch (B, ...), got shape {x.shape}")
  if y.ndim != 1:
    raise ValueError(f"labels y must have shape (B,), got {y.shape}")
  if x.shape[0] != y.shape[0]:
    raise ValueError(f"batch sizes differ: x has {x.shape[0]} examples, y has {y.shape[0]}")
  if not np.issubdtype(np.dtype(y.dtype), np.integer):
    raise ValueError(f"labels y must be integers, got dtype {y.dtype}")
  stats = _host_stats(_range_stats, x) if is_concrete(x) and x.size else None
  if stats is not None:
    finite, lo, hi = stats
    if not finite:
      raise ValueError("x contains NaN or inf")
    box = check_bounds(bounds, x)
    if bounds is None or all(np.ndim(b) == 0 for b in bounds):
      b_lo, b_hi = (float(np.asarray(b)) for b in box)
      slack = lambda b: float(_box_slack(b, x.dtype))
      if lo < b_lo - slack(b_lo) or hi > b_hi + slack(b_hi):
        raise ValueError(f"x must lie in the box [{b_lo:g}, {b_hi:g}] (bounds), got range "
                         f"[{lo}, {hi}]")
    else:
      out, below, above = _host_stats(_outside_box, x, *box)
      if out:
        raise ValueError(f"x must lie in the box bounds=(lo, hi): it is below lo by up to "
                         f"{below} and above hi by up to {above}")
  elif bounds is not None:
    check_bounds(bounds, x)
  if logits_fn is None:
    return None
  k = num_classes(logits_fn, x)
  if x.size:
    check_model(logits_fn, x)
  stats = _host_stats(_range_stats, y) if is_concrete(y) and y.size else None
  if stats is not None:
    _, lo, hi = stats
    if lo < 0 or hi >= k:
      raise ValueError(f"labels must lie in [0, {k}), got range [{lo}, {hi}]")
  return k


def check_finite(name: str, value) -> None:
  """Raises ``ValueError`` unless the (concrete) real hyperparameter ``value`` is finite.

  A budget or step of ``inf`` or ``NaN`` makes an attack report nonsense rather than fail
  (``eps=inf`` reported robust accuracy 1.00 for FGSM, S-O and SOAE, 0.00 at ``eps=1e6``)."""
  if is_concrete(value) and not math.isfinite(float(np.asarray(value))):
    raise ValueError(f"{name} must be a finite number, got {value}")


def check_positive(name: str, value) -> None:
  """Raises ``ValueError`` unless the (concrete) hyperparameter ``value`` is finite and > 0."""
  check_finite(name, value)
  if is_concrete(value) and not float(np.asarray(value)) > 0:
    raise ValueError(f"{name} must be > 0, got {value}")


def check_nonnegative(name: str, value) -> None:
  """Raises ``ValueError`` unless the (concrete) hyperparameter ``value`` is finite and >= 0."""
  check_finite(name, value)
  if is_concrete(value) and not float(np.asarray(value)) >= 0:
    raise ValueError(f"{name} must be >= 0, got {value}")


def check_choice(what: str, value, choices) -> None:
  """Raises ``ValueError`` unless ``value`` is one of ``choices``."""
  if value not in choices:
    raise ValueError(f"unknown {what} {value!r}; use one of {tuple(choices)}")


def check_at_least(name: str, value, lower: int) -> None:
  """Raises ``ValueError`` unless the integer hyperparameter ``value`` is >= ``lower``."""
  if int(value) != value or value < lower:
    raise ValueError(f"{name} must be an integer >= {lower}, got {value}")


def check_eot_samples(logits_fn, eot_samples) -> None:
  """Raises ``ValueError`` unless ``eot_samples`` is an integer ``>= 1``, and for
  ``eot_samples > 1`` on a model not declared randomized (``attacks.stochastic``): every draw of
  a deterministic model is the same, so EoT would pay ``eot_samples`` gradients for one (and an
  undeclared randomized model would be attacked at one fixed draw, not in expectation)."""
  check_at_least("eot_samples", eot_samples, 1)
  if eot_samples > 1 and not _eot.is_stochastic(logits_fn):
    raise ValueError(f"eot_samples={eot_samples} needs a randomized model declared with "
                     f"attacks.stochastic(fn), fn(x, key) -> logits; a deterministic model takes "
                     f"eot_samples=1")
