"""The parts every attack is composed from: validated input, the attacked loss, per-example keys
and selection, random starts, and the one "ascent step then project" update and loop.

Each attack module (``_first_order``, ``_second_order``, ``_soae``, ``_trades``, ``_apgd``,
``_fab``, ``_square``, ``_autoattack``) imports from here and from :mod:`krylov_adv.projections`
(the threat-model geometry); no attack module imports another one's helpers.

The update of PGD, the S-O attack, SOAE and TRADES (and of APGD's inner step) is
``x_{t+1} = Proj(x_t + a * step(d_t))`` (:func:`ascent_step`), ``step`` the steepest-ascent unit
step of the norm (:func:`krylov_adv.projections.normalize_step`: ``sign`` for Linf, ``d / ||d||_2``
for L2) and ``Proj`` the eps-ball around the clean ``x`` then the box ``[0, 1]``; only the
direction ``d_t`` differs between attacks. :func:`ascend` runs it for ``steps`` iterations and,
on request, records a per-iterate statistic (the trace of ``pgd_with_report`` and
``second_order_with_report``).

The parts of the attack contract that are the same for every attack live in one wrapper,
:func:`attack_entry` (``NAME``) / :func:`report_entry` (``NAME_with_report``), applied to every
public entry: half-precision ``x`` (float16, bfloat16) is attacked in float32 and ``x_adv``
returned in ``x``'s dtype; an empty batch is returned unchanged without calling the model; and
``x_adv`` is finite and inside the threat model even when the model returns NaN or inf
(:func:`finite_or`: the example's clean ``x`` where its ``x_adv`` is not finite). Inside the
loop, :func:`ascent_step` keeps the last finite iterate, so a model that overflows only in part
of the ball costs the example the steps after, not the whole attack.

A randomized model (``attacks.stochastic(fn)``, ``fn(x, key)``) and the Expectation over
Transformation of the attacks that take one are in :mod:`krylov_adv.attacks._eot`.

Examples never interact: attacks see the model in inference mode, so the gradient of the summed
loss w.r.t. the batch holds every example's own gradient (the block-diagonal assumption of
:mod:`krylov_adv.hvp`).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from krylov_adv import hvp, losses, projections
from krylov_adv.attacks import _eot, checks

Array = jax.Array
LogitsFn = Callable[[Array], Array]
LossFn = Callable[[Array], Array]

LOSSES = ("ce", "dlr")
# Attacked in float32 and returned in their own dtype: JAX's loop carries and the attacks'
# step arithmetic (eps / steps, FD steps) are not meaningful in 8-10 bits of mantissa.
HALF_PRECISION = (jnp.float16, jnp.bfloat16)

bcast = projections.bcast


# ----------------------------------------------------------------------------------------------
# Models are data.


def _is_array(leaf) -> bool:
  return isinstance(leaf, (jax.Array, np.ndarray, np.generic))


class _Static:
  """A non-array leaf of a model's pytree, compared by value where it is hashable (functions,
  Flax modules, numbers) and by identity otherwise, so that it can key jit's cache."""
  __slots__ = ("value", "_hash")

  def __init__(self, value):
    self.value = value
    try:
      self._hash = hash(value)
    except TypeError:
      self._hash = None

  def __hash__(self):
    return hash(id(self.value)) if self._hash is None else self._hash

  def __eq__(self, other):
    if not isinstance(other, _Static):
      return NotImplemented
    if self._hash is None or other._hash is None:
      return self.value is other.value
    return self.value is other.value or bool(self.value == other.value)


@jax.tree_util.register_pytree_node_class
class TracedModel:
  """A logits function split into traced arrays and static structure: what every attack's
  jitted core receives as its (non-static) ``model`` argument.

  Built by :func:`as_model` from any callable ``logits_fn``: its pytree leaves that are arrays
  (``jax.Array``, NumPy arrays; e.g. the parameters of ``jax.tree_util.Partial(apply, params)``)
  are the pytree children, traced by ``jit`` like any argument; the tree structure and every
  other leaf (the function itself, a Flax module, an activation function) are static, compared
  by value where hashable. Calling it rebuilds ``logits_fn`` and calls it: ``model(x) ==
  logits_fn(x)``. So a second parameter set of the same architecture and shapes hits the same
  compiled code, and a plain Python function (a pytree leaf itself, so all static) compiles once
  per function object, as a static argument would.
  """
  __slots__ = ("treedef", "static", "arrays", "__weakref__")

  def __init__(self, treedef, static: tuple, arrays: tuple):
    self.treedef = treedef
    self.static = static  # one entry per leaf: a _Static, or None where an array goes
    self.arrays = arrays

  def unwrap(self) -> Callable[..., Array]:
    """The original ``logits_fn`` (with the current, possibly traced, arrays)."""
    it = iter(self.arrays)
    leaves = [next(it) if s is None else s.value for s in self.static]
    return jax.tree_util.tree_unflatten(self.treedef, leaves)

  def __call__(self, *args, **kwargs):
    return self.unwrap()(*args, **kwargs)

  def tree_flatten(self):
    return self.arrays, (self.treedef, self.static)

  @classmethod
  def tree_unflatten(cls, aux, arrays):
    return cls(aux[0], aux[1], tuple(arrays))

  def __repr__(self):
    return f"TracedModel({self.unwrap()!r}, {len(self.arrays)} traced arrays)"


def as_model(logits_fn: Callable[[Array], Array]) -> TracedModel:
  """``logits_fn`` as a :class:`TracedModel` (idempotent): the form every attack passes to its
  jitted steps, parameters traced.

  Accepts any callable ``(B, ...) -> (B, K)``: a pytree callable such as
  ``jax.tree_util.Partial(apply_fn, params)`` (its arrays become traced arguments: attacking a
  second parameter set of the same shapes compiles nothing), what
  :func:`krylov_adv.models.as_logits_fn` returns for a Flax linen, Flax NNX or Equinox model,
  or a plain Python function (static: compiled once per function object; a closure over
  parameters bakes them into the compiled code as constants).
  """
  if isinstance(logits_fn, TracedModel):
    return logits_fn
  if not callable(logits_fn):
    raise TypeError(f"logits_fn must be callable (x -> logits), got {type(logits_fn).__name__}")
  leaves, treedef = jax.tree_util.tree_flatten(logits_fn)
  static = tuple(None if _is_array(leaf) else _Static(leaf) for leaf in leaves)
  arrays = tuple(leaf for leaf in leaves if _is_array(leaf))
  return TracedModel(treedef, static, arrays)


# ----------------------------------------------------------------------------------------------
# Input.


class AttackInputs(NamedTuple):
  """Validated attack input: ``x (B, ...)`` float, ``y (B,)`` int, ``num_classes`` ``K``,
  ``example_index (B,)`` int32 (``arange(B)`` unless given) and the box ``bounds = (lo, hi)``,
  two arrays in ``x``'s dtype broadcastable to ``x`` (:func:`checks.check_bounds`)."""
  x: Array
  y: Array
  num_classes: int
  example_index: Array
  bounds: tuple


def validate_inputs(logits_fn: LogitsFn, x, y, eps, norm: str, *, loss: str | None = None,
                    example_index=None, bounds=None) -> AttackInputs:
  """Checks an attack's input once and returns it as arrays.

  Raises ``ValueError`` for an unknown norm or loss, ``eps < 0`` or not finite, a non-float
  ``x``, mismatched batch sizes, labels outside ``[0, K)``, a bad box, ``x`` that is non-finite
  or outside the box ``bounds`` (value checks only when the arrays are concrete, see
  :mod:`krylov_adv.attacks.checks`), an ``example_index`` of the wrong shape, and a DLR loss
  with ``K < 3``; warns once per parameter set about a model that looks wrong
  (:func:`krylov_adv.attacks.checks.check_model`).

  Args:
    logits_fn: ``(B, ...) -> (B, K)``; only its abstract output shape is evaluated.
    x: ``(B, H, W, C)`` float images. y: ``(B,)`` int labels. eps: budget. norm: ``"linf" |
      "l2" | "l1"``. loss: ``"ce" | "dlr"``, or ``None`` for attacks without a loss choice.
    bounds: the input box ``(lo, hi)``, scalars or arrays broadcastable to ``x``; ``None`` is
      ``[0, 1]``.
    example_index: ``(B,)`` ints keying each example's randomness, ``(B, 2)`` ``(batch,
      index)`` pairs (:func:`example_keys`), or ``None``.
  """
  x = jnp.asarray(x)
  y = jnp.asarray(y)
  if loss is not None:
    checks.check_choice("loss", loss, LOSSES)
  k = checks.check_attack_inputs(x, y, eps, norm, logits_fn=logits_fn, bounds=bounds)
  if loss == "dlr" and k < 3:
    raise ValueError(f"the DLR loss needs at least 3 classes, got K={k}")
  if example_index is None:
    example_index = jnp.arange(x.shape[0], dtype=jnp.int32)
  example_index = jnp.asarray(example_index)
  if example_index.shape not in ((x.shape[0],), (x.shape[0], 2)):
    raise ValueError(f"example_index must have shape ({x.shape[0]},) or ({x.shape[0]}, 2), got "
                     f"{example_index.shape}")
  return AttackInputs(x, y, k, example_index, checks.check_bounds(bounds, x))


def make_loss_fn(logits_fn: LogitsFn, y: Array, loss: str = "ce") -> LossFn:
  """The per-example loss the attacks ascend, as a function of the input batch.

  ``"ce"``: ``-log softmax(f(x))_y``; ``"dlr"``: the untargeted DLR loss (Croce and Hein 2020,
  Eq. 6). Returns ``loss_fn: (B, ...) -> (B,)``.
  """
  checks.check_choice("loss", loss, LOSSES)
  if loss == "ce":
    return lambda z: losses.cross_entropy(logits_fn(z), y)
  return lambda z: losses.dlr_loss(logits_fn(z), y)


def default_step_size(eps, steps: int):
  """Madry et al.'s rule of thumb ``a = 2.5 eps / steps``: enough to cross the ball and still
  move along its boundary. The default ``step_size`` of PGD, S-O and TRADES."""
  return 2.5 * eps / steps


# ----------------------------------------------------------------------------------------------
# The contract every public entry keeps: working precision, empty batches, finite output.


def all_finite(a: Array) -> Array:
  """``(B,)`` bool: every entry of example ``i`` of ``a (B, ...)`` is finite."""
  return jnp.all(jnp.isfinite(a.reshape(a.shape[0], -1)), axis=1)


def finite_or(x_adv: Array, fallback: Array) -> Array:
  """``x_adv`` where an example is finite, ``fallback`` (e.g. the clean ``x``, or the previous
  iterate) elsewhere; both ``(B, ...)``. The guard behind the ``[0, 1]`` promise for models
  that return NaN or inf."""
  return select(all_finite(x_adv), x_adv, fallback)


def _working_precision(x):
  """``(x in the dtype the attack computes in, x's own dtype)``: half precision -> float32."""
  x = jnp.asarray(x)
  checks.check_x_dtype(x)
  if x.dtype in HALF_PRECISION:
    return x.astype(jnp.float32), x.dtype
  return x, x.dtype


def _is_empty(x: Array) -> bool:
  return x.ndim >= 1 and x.shape[0] == 0


def attack_entry(attack: Callable[..., Array]) -> Callable[..., Array]:
  """Decorates a public attack ``NAME(logits_fn, x, y, key, **hyperparameters) -> x_adv`` with
  the contract shared by every attack (module docstring):

  * ``x`` in float16 / bfloat16 is attacked in float32; ``x_adv`` has ``x``'s dtype;
  * an empty batch (``B = 0``) is checked (dtype, shapes, labels, ``eps``, ``norm``) and
    returned unchanged, without calling the model (``x.reshape(B, -1)`` cannot run at ``B = 0``);
  * an example whose ``x_adv`` is not finite gets its clean ``x`` (:func:`finite_or`);
  * ``logits_fn`` becomes a :class:`TracedModel` (:func:`as_model`): the attack's jitted core
    takes it as a traced argument, so its arrays (the parameters) are data, not constants;
  * a randomized model (``attacks.stochastic``) is refused, with the reason, by an attack not
    marked ``_eot.supports_randomized`` (:func:`krylov_adv.attacks._eot.check_supported`).

  Everything else (input and hyperparameter checks) stays in the attack, through
  :func:`validate_inputs`.
  """

  @functools.wraps(attack)
  def entry(logits_fn, x, y, key, **hyperparameters):
    logits_fn = as_model(logits_fn)
    _eot.check_supported(attack, logits_fn)
    x, dtype = _working_precision(x)
    if _is_empty(x):
      kw = keyword_arguments(attack, hyperparameters)
      checks.check_attack_inputs(x, jnp.asarray(y), kw["eps"], kw["norm"],
                                 bounds=kw.get("bounds"))
      return x.astype(dtype)
    x_adv = attack(logits_fn, x, y, key, **hyperparameters)
    return finite_or(x_adv, x).astype(dtype)

  return entry


def report_entry(attack_with_report: Callable[..., "WithReport"]) -> Callable[..., "WithReport"]:
  """:func:`attack_entry` for ``NAME_with_report`` entries (returning :class:`WithReport`): the
  same precision and finiteness rules on ``x_adv``; an empty batch raises ``ValueError`` (a
  report of nothing has no shape to give; ``NAME`` returns the empty ``x`` unchanged)."""

  @functools.wraps(attack_with_report)
  def entry(logits_fn, x, y, key, **hyperparameters):
    logits_fn = as_model(logits_fn)
    _eot.check_supported(attack_with_report, logits_fn)
    x, dtype = _working_precision(x)
    if _is_empty(x):
      raise ValueError(f"{attack_with_report.__name__} needs at least one example, got an empty "
                       f"batch x of shape {x.shape} (the attack without report returns it "
                       f"unchanged)")
    out = attack_with_report(logits_fn, x, y, key, **hyperparameters)
    return WithReport(finite_or(out.x_adv, x).astype(dtype), out.report)

  return entry


# ----------------------------------------------------------------------------------------------
# Per-example randomness and selection.


def example_keys(key: Array, example_index: Array) -> Array:
  """One PRNG key per example, ``fold_in(key, example_index[i])``; ``(B,)`` ints -> ``(B, ...)``.

  Keying randomness by the example's index (not its position in the batch) gives an example the
  same result whatever else is in the batch (AutoAttack relies on it). A ``(B, 2)`` index holds
  ``(batch, index)`` pairs and gives ``fold_in(fold_in(key, batch), index)``: the key of example
  ``index`` of a batch attacked with ``fold_in(key, batch)`` (``evaluation.run_attack``'s
  scheme), so that points of several batches can be attacked together with their own keys.
  """
  return _example_keys(key, jnp.asarray(example_index))


@jax.jit
def _example_keys(key: Array, example_index: Array) -> Array:
  # One compiled function per shape: run eagerly, each fold_in (and each index of a pair) would
  # compile on its own for every subset size AutoAttack gives its components.
  if example_index.ndim == 2:
    return jax.vmap(lambda e: jax.random.fold_in(jax.random.fold_in(key, e[0]), e[1]))(
        example_index)
  return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, example_index)


def fold_keys(keys: Array, data) -> Array:
  """``fold_in(keys[i], data)`` for every per-example key: ``(B, ...)`` -> ``(B, ...)``."""
  return jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, data)


def is_traced(*values) -> bool:
  """Whether any of ``values`` is a JAX tracer (the call runs under a caller's ``jit``,
  ``vmap`` or ``grad``): host-driven loops (APGD, FAB) then fall back to their in-graph form,
  since a traced value cannot steer Python control flow."""
  return any(isinstance(v, jax.core.Tracer) for v in values)


def select(mask: Array, a: Array, b: Array) -> Array:
  """Per-example ``where``: ``mask (B,)`` picks rows of ``a`` over ``b``."""
  return jnp.where(bcast(mask, a), a, b)


def target_order(logits: Array, y: Array) -> Array:
  """Non-true classes sorted by decreasing logit, ``(B, K - 1)``: column ``j`` is the target of
  the ``j``-th targeted run. For a correctly classified point these are the 2nd, 3rd, ... highest
  logits, AutoAttack's choice of targets."""
  masked = jnp.where(jax.nn.one_hot(y, logits.shape[1], dtype=bool), -jnp.inf, logits)
  return jnp.argsort(-masked, axis=1)[:, :-1]


@jax.jit
def model_target_order(logits_fn: LogitsFn, x: Array, y: Array) -> Array:
  """:func:`target_order` of the clean logits ``logits_fn(x)`` (a :class:`TracedModel`), jitted:
  the targets of APGD-T's and FAB-T's runs, ``(B, K - 1)``."""
  return target_order(logits_fn(x), y)


# ----------------------------------------------------------------------------------------------
# Random starts.

ball_start = projections.random_start  # uniform in the ball (PGD, FGSM, S-O, SOAE)


def sphere_start(keys: Array, x: Array, radius, norm: str,
                 bounds=projections.DEFAULT_BOUNDS) -> Array:
  """A random point at distance ``radius`` from ``x``, clipped to the box ``[lo, hi]``,
  per-example keys.

  ``x + radius * t / ||t||`` with ``t ~ U[-1, 1]^n`` (linf) or ``N(0, I)`` (l2, l1). APGD starts
  at ``radius = eps`` (Croce and Hein 2020, reference code; APGD's L1 start is its own,
  ``_apgd.initial_point``), FAB's restarts at ``0.5 eps`` (reference ``fab_base.py``: L1 too).
  ``keys`` is ``(B, ...)``.
  """
  shape = x.shape[1:]
  if norm == "linf":
    t = jax.vmap(lambda k: jax.random.uniform(k, shape, x.dtype, -1.0, 1.0))(keys)
  else:
    t = jax.vmap(lambda k: jax.random.normal(k, shape, x.dtype))(keys)
  nrm = projections.per_example_norm(t, norm)
  delta = t * bcast(jnp.asarray(radius, x.dtype) / jnp.maximum(nrm, 1e-12), t)
  return projections.clip_box(x + delta, bounds)


# ----------------------------------------------------------------------------------------------
# The ascent step and loop.


def ascent_step(xt: Array, direction: Array, x: Array, eps, step_size, norm: str,
                bounds=projections.DEFAULT_BOUNDS) -> Array:
  """``Proj(x_t + a * step(d))``: a steepest-ascent step of length ``a`` (``step_size``, a scalar
  or ``(B,)``) in the norm's geometry, projected onto the eps-ball around ``x`` and the box
  ``bounds = (lo, hi)``.

  An example whose step is not finite (a model returning NaN or inf, so ``d`` is NaN) stays at
  ``x_t``: the iterates are always the last finite one."""
  step_size = jnp.asarray(step_size)
  if step_size.ndim:
    step_size = bcast(step_size, xt)
  x_next = projections.project(xt + step_size * projections.normalize_step(direction, norm), x,
                               eps, norm, bounds)
  return finite_or(x_next, xt)


def ascend(direction_fn: Callable[[Array, Array], Array], x: Array, x0: Array, eps, step_size, *,
           norm: str, steps: int, record: Callable[[Array], Any] | None = None,
           bounds=projections.DEFAULT_BOUNDS):
  """``steps`` iterations of :func:`ascent_step` from ``x0``: ``d_t = direction_fn(t, x_t)``,
  inside the box ``bounds = (lo, hi)``.

  Traceable; call it under ``jit``. ``x``, ``x0``: ``(B, ...)``.

  Returns:
    The last iterate ``(B, ...)``; with ``record`` (``x_t -> pytree``), ``(x_last, records)``
    where ``records`` stacks ``record(x_t)`` for ``t = 0..steps`` (``steps + 1`` entries).
  """

  def step(t, xt):
    return ascent_step(xt, direction_fn(t, xt), x, eps, step_size, norm, bounds)

  if record is None:
    return lax.fori_loop(0, steps, step, x0)

  def body(xt, t):
    return step(t, xt), record(xt)

  x_last, recs = lax.scan(body, x0, jnp.arange(steps))
  last = record(x_last)
  return x_last, jax.tree_util.tree_map(lambda r, l: jnp.concatenate([r, l[None]]), recs, last)


class StepRecord(NamedTuple):
  """Per-example statistics of one iterate ``x_t`` of an ascent (``B`` examples).

  loss: ``(B,)`` the attacked loss; grad_norm: ``(B,)`` ``||grad_x loss(x_t)||_2``;
  correct: ``(B,)`` bool, ``argmax f(x_t) == y``. Stacked over ``t = 0..steps`` in a trace.
  """
  loss: Array
  grad_norm: Array
  correct: Array


def step_record(logits_fn: LogitsFn, y: Array, loss: str = "ce") -> Callable[[Array], StepRecord]:
  """``x_t -> StepRecord`` for :func:`ascend`'s ``record`` (one extra gradient per iterate)."""
  loss_fn = make_loss_fn(logits_fn, y, loss)

  def record(xt):
    g = hvp.input_grad(loss_fn, xt)
    logits = logits_fn(xt)
    return StepRecord(loss=make_loss_fn(lambda _: logits, y, loss)(xt),
                      grad_norm=projections.per_example_norm(g, "l2"),
                      correct=jnp.argmax(logits, axis=1) == y)

  return record


class WithReport(NamedTuple):
  """What every ``NAME_with_report`` entry returns: the attack's ``x_adv`` (the same array
  ``NAME`` returns) and its report (a NamedTuple of the attack's diagnostics)."""
  x_adv: Array
  report: Any

  def __repr__(self) -> str:  # x_adv's dtype and shape, not its values; the report's own repr
    x = self.x_adv
    shown = (f"{x.dtype}{list(x.shape)}" if hasattr(x, "shape") and hasattr(x, "dtype")
             else type(x).__name__)
    return f"WithReport(x_adv={shown}, report={self.report!r})"


def keyword_arguments(attack: Callable[..., Any], given: Mapping[str, Any]) -> dict[str, Any]:
  """``attack``'s keyword-only arguments with its defaults, overridden by ``given``.

  Lets ``NAME_with_report(logits_fn, x, y, key, **given)`` take exactly ``NAME``'s
  hyperparameters with ``NAME``'s defaults, so that each default is written once (in ``NAME``'s
  signature). ``TypeError`` for an unknown or a missing (``eps``, ``norm``) argument, as a call of
  ``attack`` would raise.
  """
  params = {n: p.default for n, p in inspect.signature(attack).parameters.items()
            if p.kind is p.KEYWORD_ONLY}
  unknown = sorted(set(given) - set(params))
  if unknown:
    raise TypeError(f"{attack.__name__}() got unexpected keyword argument(s) {unknown}")
  out = {**params, **given}
  missing = [n for n, v in out.items() if v is inspect.Parameter.empty]
  if missing:
    raise TypeError(f"{attack.__name__}() missing keyword argument(s) {missing}")
  return out
