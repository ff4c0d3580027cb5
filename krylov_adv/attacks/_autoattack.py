"""AutoAttack: the parameter-free ensemble of APGD-CE, APGD-T, FAB-T and Square.

Croce and Hein, ICML 2020, "Reliable evaluation of adversarial robustness with an ensemble of
diverse parameter-free attacks", Sec. 5; versions and component settings follow the reference
implementation (fra31/auto-attack, ``set_version``):

  standard: APGD-CE (1 restart), APGD-T (9 targets, 1 restart), FAB-T (9 targets, 1 restart),
            Square (5000 queries, ``steps``). L1: APGD-CE with 5 restarts and APGD-T with 5
            targets, both with ``use_largereps`` (the 3 eps, 2 eps, eps schedule), FAB-T and
            Square as above (``L1_STANDARD``).
  plus:     APGD-CE (5 restarts), APGD-DLR (5 restarts), FAB (5 restarts), Square (5000),
            APGD-T (9 targets), FAB-T (9 targets).
  rand:     APGD-CE and APGD-DLR, 1 restart each, 20 EoT samples per gradient
            (``eot_samples``; the reference's ``eot_iter = 20``), for a randomized model
            (``attacks.stochastic``); the other versions' FAB and Square refuse one.
  custom:   any sequence of components: registered attacks that take ``example_index``
            (``apgd_ce``, ``apgd_dlr``, ``apgd_t``, ``fab``, ``fab_t``, ``square``), looked up
            in the registry (:func:`krylov_adv.attacks.get`).

Components run in order, each only on the points still classified correctly, and an example keeps
the first adversarial point found. The ensemble is a short Python loop over components with
concrete bookkeeping in between; APGD and FAB drive their iterations from the host, one jitted
call per iteration (:func:`krylov_adv.attacks._apgd.apgd_batch` says why), Square is one jitted
loop. The still-robust subset is padded to a bucket size (:func:`_bucket`: the next power of two
or the next multiple of ``ceil(batch / 8)``, whichever is smaller), so that shrinking subsets
reuse a bounded set of compiled shapes, the same in every batch of a batched evaluation (for a
batch of 1000: 1, 2, 4, ..., 512 and 125, 250, ..., 1000), while the padding stays under both
the subset's size and an eighth of the batch (710 points run as 750; the next power of two
alone ran them as 1024). Randomness is keyed by each example's index in the full batch, so a
component gives an example the same result inside the ensemble as alone.

A randomized model's still-robust checks (the clean one and the one after each component) use
one draw per example, as the reference's one forward pass per check: check ``j`` (0 the clean
one, ``c + 1`` after component ``c``) draws with keys ``fold_in(fold_in(fold_in(k_i,
CHECK_STREAM), 1 + j))``, ``k_i`` the example's key (:mod:`krylov_adv.attacks._eot`). The
report's accuracies are those single draws; ``krylov_adv.evaluation`` judges ``x_adv`` again as
the mean over its ``draws``.

Data parallel: for a batch sharded over a device mesh (``krylov_adv.parallel.shard_batch``,
several hosts included) the subsets are padded to a multiple of the number of shards and laid
out with the batch's sharding, ``x_adv`` is assembled on the devices with that sharding, and only
per-example predictions (``B`` integers) reach the host for the bookkeeping.
"""

from __future__ import annotations

import functools
import inspect
import time
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from krylov_adv import parallel
from krylov_adv.attacks import (_eot, available, get, register, register_test_set_runner,
                                summaries, toolkit)
from krylov_adv.attacks.toolkit import Array, LogitsFn

VERSIONS: dict[str, tuple[tuple[str, dict[str, Any]], ...]] = {
    "standard": (("apgd_ce", {}), ("apgd_t", {}), ("fab_t", {}), ("square", {})),
    "plus": (("apgd_ce", {"restarts": 5}), ("apgd_dlr", {"restarts": 5}),
             ("fab", {"restarts": 5}), ("square", {}), ("apgd_t", {}), ("fab_t", {})),
    "rand": (("apgd_ce", {"restarts": 1, "eot_samples": 20}),
             ("apgd_dlr", {"restarts": 1, "eot_samples": 20})),
}
# The reference's set_version('standard') for norm 'L1'.
L1_STANDARD: tuple[tuple[str, dict[str, Any]], ...] = (
    ("apgd_ce", {"restarts": 5, "use_largereps": True}),
    ("apgd_t", {"n_target_classes": 5, "use_largereps": True}),
    ("fab_t", {}), ("square", {}))


class AutoAttackReport(NamedTuple):
  """What an AutoAttack run measured on a batch of ``B`` points.

  components: names of the components in the order they ran.
  clean_accuracy: fraction of the ``B`` points classified correctly before any attack.
  robust_accuracy_after: ``robust_accuracy_after[j]`` is the fraction still correct after
    components ``0..j`` (nonincreasing).
  robust_accuracy: the final robust accuracy (the last entry, or the clean accuracy when no
    component ran).
  seconds: wall time of each component, compilation included (0 when no point was left).
  robust: ``(B,)`` bool, the points no component fooled.
  """
  components: tuple[str, ...]
  clean_accuracy: float
  robust_accuracy_after: tuple[float, ...]
  robust_accuracy: float
  seconds: tuple[float, ...]
  robust: np.ndarray

  def summary(self) -> str:
    """A few lines: clean accuracy, accuracy after each component (with its time), robust."""
    return summaries.autoattack_summary(self)

  def __repr__(self) -> str:  # one line, not the ``robust`` mask (krylov_adv.attacks.summaries)
    return summaries.autoattack_repr(self)


def version_components(version: str, attacks: Sequence | None = None,
                       hyperparameters: Mapping[str, Mapping[str, Any]] | None = None,
                       norm: str = "linf") -> tuple[tuple[str, dict[str, Any]], ...]:
  """The ``(name, keyword arguments)`` of each component of an AutoAttack version.

  Args:
    version: ``"standard" | "plus" | "rand" | "custom"``; ``"standard"`` with ``norm="l1"`` is
      :data:`L1_STANDARD` (``"rand"`` is the same in every norm, as in the reference).
    attacks: for ``"custom"`` only: component names, or ``(name, kwargs)`` pairs.
    hyperparameters: ``{name: kwargs}`` overriding the version's settings for every run of that
      component (e.g. ``{"square": {"steps": 500}}``).

  Raises:
    ValueError: unknown version or component, ``attacks`` given for a fixed version or missing
      for ``"custom"``, or a hyperparameter the component does not take.
  """
  if version in VERSIONS:
    if attacks is not None:
      raise ValueError(f"attacks is only used with version='custom', not {version!r}")
    components_ = L1_STANDARD if (version == "standard" and norm == "l1") else VERSIONS[version]
    plan = [(name, dict(kw)) for name, kw in components_]
  elif version == "custom":
    if not attacks:
      raise ValueError("version='custom' needs a non-empty list of attacks")
    plan = []
    for item in attacks:
      name, kw = (item, {}) if isinstance(item, str) else (item[0], dict(item[1]))
      plan.append((name, kw))
  else:
    raise ValueError(f"unknown AutoAttack version {version!r}; use one of "
                     f"{(*VERSIONS, 'custom')}")
  hyperparameters = dict(hyperparameters or {})
  for name in hyperparameters:
    _component(name)
  out = []
  for name, kw in plan:
    kw.update(hyperparameters.get(name, {}))
    allowed = set(inspect.signature(_component(name)).parameters) - {
        "logits_fn", "x", "y", "key", "eps", "norm", "example_index", "bounds"}
    unknown = set(kw) - allowed
    if unknown:
      raise ValueError(f"component {name!r} takes no hyperparameter(s) {sorted(unknown)}; "
                       f"it takes {sorted(allowed)}")
    out.append((name, kw))
  return tuple(out)


def components() -> list[str]:
  """Names of the registered attacks that can be AutoAttack components: those taking
  ``example_index`` (their randomness is keyed per example, so a component gives an example the
  same result inside the ensemble as alone)."""
  return [name for name in available()
          if "example_index" in inspect.signature(get(name)).parameters]


def _component(name: str) -> Callable[..., Array]:
  if name not in components():
    raise ValueError(f"unknown AutoAttack component {name!r}; available: {components()}")
  return get(name)


def _bucket(n: int, batch: int, multiple: int = 1) -> int:
  """Size of the padded subset for ``1 <= n <= batch`` still-robust points: the smaller of the
  next power of two and the next multiple of ``g = ceil(batch / 8)`` (so padding is under
  ``min(n, g)`` and the sizes a batch size can give are powers of two and the 8 multiples of
  ``g``: a batched evaluation compiles each component for a few shapes, shared by
  all its batches), at most ``batch``, rounded up to a multiple of the number of batch shards so
  it splits evenly."""
  g = -(-batch // 8)
  b = min(1 << (n - 1).bit_length(), -(-n // g) * g, batch)
  return min(-(-b // multiple) * multiple, batch)


@jax.jit
def _predict(logits_fn: LogitsFn, x: Array) -> Array:
  return jnp.argmax(logits_fn(x), axis=1)


def _check_model(logits_fn: LogitsFn, key: Array, check: int, example_index,
                 sharding=None) -> LogitsFn:
  """The model still-robust check ``check`` predicts with (0 the clean check, ``c + 1`` after
  component ``c``): ``logits_fn``, or one draw per example of a randomized one, keys
  ``fold_in(fold_in(fold_in(k_i, CHECK_STREAM), 1 + check)`` for the examples' keys ``k_i``
  (module docstring), laid out with ``sharding`` (the batch's, over its first axis)."""
  if not _eot.is_stochastic(logits_fn):
    return logits_fn
  keys = _eot.fold(toolkit.example_keys(key, jnp.asarray(example_index)), _eot.CHECK_STREAM,
                   1 + check)
  return _eot.Drawn(logits_fn, keys if sharding is None else jax.device_put(keys, sharding))


def _check_randomized(logits_fn: LogitsFn, version: str, plan) -> None:
  """``ValueError`` for ``version="rand"`` on a deterministic model, and, before anything runs,
  for a randomized model given a component that refuses one (FAB, Square)."""
  stochastic = _eot.is_stochastic(logits_fn)
  if version == "rand" and not stochastic:
    raise ValueError("version='rand' attacks a randomized model with EoT: declare it with "
                     "attacks.stochastic(fn), fn(x, key) -> logits (a deterministic model takes "
                     "version='standard')")
  if stochastic:
    for name, _ in plan:
      try:
        _eot.check_supported(get(name), logits_fn)
      except ValueError as e:
        raise ValueError(f"AutoAttack component {name!r} on a randomized model: {e}; use "
                         f"version='rand'") from None


@functools.partial(jax.jit, static_argnames="sharding")
def _take(x: Array, index: Array, *, sharding=None) -> Array:
  # Gathering the subset re-batches the still-robust points across devices (once per
  # component); inside a component every per-example computation stays on its device.
  out = x[index]
  return out if sharding is None else jax.lax.with_sharding_constraint(out, sharding)


@jax.jit
def _put(x_adv: Array, xa: Array, target: Array) -> Array:
  # Padding slots and unfooled points target index B, out of range, and are dropped.
  return x_adv.at[target].set(xa, mode="drop")


@register("autoattack")
@toolkit.attack_entry
@_eot.supports_randomized
def autoattack(logits_fn: LogitsFn, x, y, key, *, eps, norm: str, version: str = "standard",
               attacks: Sequence | None = None,
               hyperparameters: Mapping[str, Mapping[str, Any]] | None = None,
               bounds=None) -> Array:
  """Runs AutoAttack (Croce and Hein 2020, Sec. 5): each component on the points still robust.

  Args:
    logits_fn: ``(B, H, W, C)`` in ``[0, 1]`` -> logits ``(B, K)``, model in inference mode.
    x: ``(B, H, W, C)`` float images in ``[0, 1]``; y: ``(B,)`` int labels; key: PRNG key.
    eps: budget ``>= 0``. norm: ``"linf" | "l2" | "l1"``.
    version: ``"standard" | "plus" | "rand" | "custom"`` (see the module docstring); a
      randomized model (``attacks.stochastic``) takes ``"rand"`` (or ``"custom"`` APGD
      components with ``eot_samples``).
    attacks: components for ``"custom"``: names or ``(name, kwargs)`` pairs.
    hyperparameters: ``{component: kwargs}`` overrides (e.g. fewer iterations in tests).
    bounds: the input box ``(lo, hi)`` (default ``(0, 1)``), passed to every component.

  Returns:
    ``x_adv`` ``(B, H, W, C)``: for each fooled point the first adversarial point found, the
    clean point elsewhere (within the eps-ball and box); for a randomized model, a point no
    check found fooled keeps the last component's point (it is judged over many draws
    afterwards; the reference returns its clean point, which made ``"rand"`` weaker than its
    own APGD-CE with EoT). :func:`autoattack_with_report` also returns the
    :class:`AutoAttackReport`.
  """
  return _autoattack(logits_fn, x, y, key, eps=eps, norm=norm, version=version, attacks=attacks,
                     hyperparameters=hyperparameters, bounds=bounds).x_adv


@toolkit.report_entry
@_eot.supports_randomized
def autoattack_with_report(logits_fn: LogitsFn, x, y, key,
                           **hyperparameters) -> toolkit.WithReport:
  """:func:`autoattack` and its report: ``WithReport(x_adv, AutoAttackReport)``, ``x_adv`` the
  same as :func:`autoattack`'s; takes :func:`autoattack`'s keyword arguments, with its
  defaults."""
  return _autoattack(logits_fn, x, y, key,
                     **toolkit.keyword_arguments(autoattack, hyperparameters))


@register_test_set_runner("autoattack")
@toolkit.report_entry
@_eot.supports_randomized
def autoattack_batched(logits_fn: LogitsFn, x, y, key, *, batch_size: int,
                       **hyperparameters) -> toolkit.WithReport:
  """:func:`autoattack_with_report` over a test set attacked in batches of ``batch_size``,
  component by component over the whole set: THE way a batched evaluation runs AutoAttack
  (``krylov_adv.evaluation.run_attack``).

  Example ``i`` gets the randomness it would get as example ``i % batch_size`` of batch
  ``b = i // batch_size`` attacked alone with key ``fold_in(key, b)`` (per-example keys
  ``fold_in(fold_in(key, b), i % batch_size)``, :func:`toolkit.example_keys`), but each
  component runs on the still-robust points of all batches together, split evenly into as few
  calls of at most ``batch_size`` points as it takes, all padded to one :func:`_bucket` size
  (:func:`_chunks`). So each component compiles one shape, from the bucket sizes of
  ``batch_size``, whatever the number of batches (instead of each batch's own subset bucket),
  and the padding of a last partial batch is never attacked.
  With ``len(x) <= batch_size`` it is :func:`autoattack_with_report` on ``fold_in(key, 0)``.

  Args:
    x: ``(N, H, W, C)``; y: ``(N,)``; key: the key of the whole set (batch ``b`` folds in ``b``).
    batch_size: points per attack call (``>= 1``), the memory bound.
    **hyperparameters: :func:`autoattack`'s keyword arguments (``eps``, ``norm``, ...).

  Returns:
    ``WithReport(x_adv (N, ...), AutoAttackReport)`` over the ``N`` points.
  """
  if int(batch_size) < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  n = int(np.shape(x)[0])
  kw = toolkit.keyword_arguments(autoattack, hyperparameters)
  if n <= int(batch_size):
    # One batch: exactly the API call on batch 0's key (positions as example indices, whose
    # keys cost one fold_in each instead of two).
    return _autoattack(logits_fn, x, y, jax.random.fold_in(key, 0), **kw)
  pos = np.arange(n)
  example_index = np.stack([pos // int(batch_size), pos % int(batch_size)], 1).astype(np.int32)
  return _autoattack(logits_fn, x, y, key, **kw, chunk=int(batch_size),
                     example_index=example_index)


def _chunks(index: np.ndarray, chunk: int, multiple: int):
  """``(part, padded)``: ``index`` (``n >= 1`` points) in ``k = ceil(n / chunk)`` consecutive
  parts of ``ceil(n / k)`` points (the last one possibly fewer), each padded by repeating its
  first point to the one size ``_bucket(ceil(n / k), chunk, multiple)``: a still-robust set
  larger than ``chunk`` runs as ``k`` calls of a single shape (one compile), not as full chunks
  plus a tail of another shape. ``n <= chunk`` is one part padded to ``_bucket(n, ...)``."""
  k = -(-index.size // chunk)
  per = -(-index.size // k)
  size = _bucket(per, chunk, multiple)
  for lo in range(0, index.size, per):
    part = index[lo:lo + per]
    yield part, np.concatenate([part, np.full(size - part.size, part[0])]).astype(np.int32)


def _autoattack(logits_fn: LogitsFn, x, y, key, *, eps, norm: str, version: str,
                attacks: Sequence | None,
                hyperparameters: Mapping[str, Mapping[str, Any]] | None,
                bounds=None, chunk: int | None = None,
                example_index: np.ndarray | None = None) -> toolkit.WithReport:
  """The ensemble behind :func:`autoattack`, :func:`autoattack_with_report` and
  :func:`autoattack_batched`: ``chunk`` points per component call (default: all of ``x``);
  ``example_index`` ``(B,)`` or ``(B, 2)`` keys each example's randomness (default
  ``arange(B)``, its position)."""
  if any(isinstance(a, jax.core.Tracer) for a in (x, y, key, eps)):
    # Otherwise a ConcretizationTypeError from deep inside the host loop.
    raise ValueError("autoattack cannot run under jax.jit, vmap or grad: its loop over the "
                     "components runs on the host (it picks the still-robust points between "
                     "attacks); call it outside jit (each component is compiled on its own)")
  x, y, _, _, bounds = toolkit.validate_inputs(logits_fn, x, y, eps, norm,
                                               example_index=example_index, bounds=bounds)
  plan = version_components(version, attacks, hyperparameters, norm=norm)
  _check_randomized(logits_fn, version, plan)
  bsz = x.shape[0]
  chunk = bsz if chunk is None else int(chunk)
  index_np = np.arange(bsz, dtype=np.int32) if example_index is None else np.asarray(
      example_index, np.int32)
  # A batch sharded over a mesh stays sharded: subsets are padded to a multiple of the number
  # of shards and laid out like x, and x_adv is assembled on the devices. Only the per-example
  # predictions (B ints) travel to the host for the bookkeeping.
  sharding, shards = parallel.batch_sharding(x)
  index_sharding = None if sharding is None else jax.sharding.NamedSharding(
      sharding.mesh, jax.sharding.PartitionSpec(sharding.spec[0]))
  y_np = parallel.to_host(y)
  if chunk >= bsz:
    robust = parallel.to_host(_predict(
        _check_model(logits_fn, key, 0, index_np, index_sharding), x)) == y_np
  else:  # in chunks, the shape every component call starts with
    robust = np.zeros(bsz, bool)
    for part, padded in _chunks(np.arange(bsz), chunk, shards):
      pred = parallel.to_host(_predict(
          _check_model(logits_fn, key, 0, index_np[padded], index_sharding),
          _take(x, padded, sharding=sharding)))
      robust[part] = pred[:part.size] == y_np[part]
  clean_accuracy = float(robust.mean()) if bsz else 0.0
  x_adv = x
  stochastic = _eot.is_stochastic(logits_fn)
  after, seconds = [], []
  for component, (name, kw) in enumerate(plan):
    idx = np.nonzero(robust)[0]
    if idx.size == 0:
      after.append(0.0)
      seconds.append(0.0)
      continue
    start = time.perf_counter()
    for part, padded in _chunks(idx, chunk, shards):
      keys_of = index_np[padded]
      sub_index = jnp.asarray(keys_of) if index_sharding is None else jax.device_put(
          keys_of, index_sharding)
      xa = get(name)(logits_fn, _take(x, padded, sharding=sharding),
                     _take(y, padded, sharding=index_sharding), key, eps=eps, norm=norm,
                     example_index=sub_index, bounds=bounds, **kw)
      pred = parallel.to_host(_predict(
          _check_model(logits_fn, key, 1 + component, keys_of, index_sharding), xa))
      fooled = np.zeros(padded.size, bool)
      fooled[:part.size] = pred[:part.size] != y_np[part]
      # A randomized model: every attacked point keeps the component's point, not only those
      # the check's one draw found fooled; a point that survived one draw is judged afterwards
      # over many (evaluation's draws), and its clean x would throw the attack's work away.
      keep = (np.arange(padded.size) < part.size) if stochastic else fooled
      x_adv = _put(x_adv, xa, np.where(keep, padded, bsz).astype(np.int32))
      robust[part[fooled[:part.size]]] = False
    seconds.append(time.perf_counter() - start)
    after.append(float(robust.mean()))
  report = AutoAttackReport(
      components=tuple(name for name, _ in plan), clean_accuracy=clean_accuracy,
      robust_accuracy_after=tuple(after),
      robust_accuracy=after[-1] if after else clean_accuracy, seconds=tuple(seconds),
      robust=robust)
  return toolkit.WithReport(x_adv, report)
