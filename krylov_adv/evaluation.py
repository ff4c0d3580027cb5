"""Robust-accuracy evaluation: clean accuracy, and configured attacks run over a test set.

One batched attack runner (:func:`run_attack`: fixed-size padded batches, one PRNG key per
batch, the threat-model check) serves the robust-accuracy table (:func:`evaluate_attacks`) and
every experiment that needs adversarial examples or an attack's diagnostics over a test set.
Clean accuracy is :func:`accuracy`. Every attack sees the model in inference mode. (The table's
markdown rendering, presentation rather than library, is ``experiments.outputs``.)

A randomized model (``attacks.stochastic(fn)``, ``fn(x, key)``) is judged as the mean over
``draws`` draws (default :data:`DEFAULT_DRAWS`): example ``i``'s correctness is the fraction of
its draws that classify it correctly, so a robust accuracy is the mean over examples and draws,
and the number of draws is recorded with it (``AttackRun.draws``, ``AttackResult.draws``,
``AccuracyReport.draws``). Draw ``d`` of the ``i``-th example of batch ``b`` has the key
``fold_in(fold_in(fold_in(fold_in(key, b), JUDGE_STREAM), i), d)``: independent of the draws the
attack ascended (``krylov_adv.attacks._eot``). A deterministic model is judged once, as before
(``draws`` is then 1 and its compiled code is unchanged).
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from krylov_adv import attacks, parallel, projections
from krylov_adv.attacks import _eot, summaries, toolkit

Array = jax.Array
LogitsFn = Callable[[Array], Array]

# Slack for the threat-model check: attacks project in float32.
_BUDGET_ATOL = 1e-5
# Draws a randomized model's accuracy is averaged over when the caller states none.
DEFAULT_DRAWS = 10


class AttackResult(NamedTuple):
  """One cell of the robustness table.

  label: the row (``"PGD-20"``); attack: the registry name (``"clean"`` for no attack);
  norm / eps: the threat model; accuracy: fraction of examples still classified correctly;
  num_examples: how many were evaluated; seconds: wall time of the attack; extras: for an
  attack run through its ``NAME_with_report`` entry (``evaluate_attacks(reports=...)``), one
  ``(report, valid)`` per batch as in :class:`AttackRun` (summarised by
  :func:`summarize_reports`), else ``()``; correct: ``(num_examples,)`` bool, point ``i`` still
  classified correctly (after the attack; for ``"clean"``, without one), so that
  ``accuracy == correct.mean()`` and two results on the same points can be paired
  (:func:`krylov_adv.stats.mcnemar_exact`); for a randomized model ``(num_examples,)``
  float64, the fraction of the ``draws`` draws classifying point ``i`` correctly (still
  ``accuracy == correct.mean()``, but not flags to pair or AND: those take a deterministic
  model's bools); ``None`` when not recorded; entry: the suite key the result was run under
  (``"pgd_linf"``), ``""`` when not known; draws: the model draws ``accuracy`` is the mean
  over (1 for a deterministic model; module docstring).
  """
  label: str
  attack: str
  norm: str
  eps: float
  accuracy: float
  num_examples: int
  seconds: float
  extras: tuple = ()
  correct: np.ndarray | None = None
  entry: str = ""
  draws: int = 1


def _padded_batches(n: int, batch_size: int):
  """Index arrays of fixed size ``batch_size`` covering ``range(n)``; the last one is padded by
  repeating index 0 (shapes stay static, so each jitted attack compiles once)."""
  for start in range(0, n, batch_size):
    idx = np.arange(start, min(start + batch_size, n))
    pad = batch_size - idx.size
    yield np.concatenate([idx, np.zeros(pad, idx.dtype)]), idx.size


def _batch_size(batch_size: int, n: int, mesh) -> int:
  """``min(batch_size, n)``, rounded up to a multiple of the mesh's data axis when sharding.

  Padding rule: the extra slots repeat example 0 and are excluded from every count, so a test
  set of any size can be evaluated on any number of devices.
  """
  b = max(1, min(batch_size, n))
  if mesh is not None:
    d = mesh.shape[parallel.DATA_AXIS]
    b = -(-b // d) * d
  return b


def _place(arrays, mesh):
  """Device arrays: sharded over the mesh's data axis when given, else on the default device."""
  if mesh is None:
    return tuple(jnp.asarray(a) for a in arrays)
  return parallel.shard_batch(tuple(arrays), mesh)


@functools.partial(jax.jit, static_argnames="norm")
def _admissibility(x_adv: Array, x: Array, lo, hi, *, norm: str) -> tuple[Array, Array, Array]:
  """``(max_i ||x_adv_i - x_i||, max (lo - x_adv), max (x_adv - hi))``, reduced on the devices
  (a batch sharded over several hosts cannot be fetched whole; these scalars are replicated)."""
  return (jnp.max(projections.per_example_norm(x_adv - x, norm), initial=0.0),
          jnp.max(lo - x_adv), jnp.max(x_adv - hi))


# The predicted label of an example whose logits are not all finite: never a class, so it is
# never counted correct (argmax over NaN logits would say class 0).
NONFINITE_PREDICTION = -1


@jax.jit
def predicted_labels(logits: Array) -> Array:
  """``argmax_k logits_k`` per row, ``NONFINITE_PREDICTION`` (-1) for a row with a NaN or inf
  logit. ``(B, K)`` -> ``(B,)`` int32."""
  finite = jnp.all(jnp.isfinite(logits), axis=1)
  return jnp.where(finite, jnp.argmax(logits, axis=1), NONFINITE_PREDICTION).astype(jnp.int32)


@jax.jit
def _model_predictions(model: attacks.TracedModel, x: Array) -> Array:
  # The model is traced like every attack's: one compile per architecture and batch shape.
  return predicted_labels(model(x))


def model_predictions(logits_fn: LogitsFn, x: Array) -> Array:
  """:func:`predicted_labels` of ``logits_fn(x)``, jitted with ``logits_fn``'s arrays traced
  (:func:`krylov_adv.attacks.toolkit.as_model`). ``(B, ...)`` -> ``(B,)`` int32."""
  _deterministic_only(logits_fn, "model_predictions")
  return _model_predictions(attacks.as_model(logits_fn), x)


def _deterministic_only(logits_fn: LogitsFn, what: str) -> None:
  if attacks.is_stochastic(logits_fn):
    raise ValueError(f"{what} takes a deterministic model; a randomized one "
                     f"(attacks.stochastic) predicts per draw: use draw_predictions, or "
                     f"accuracy / run_attack with key and draws")


@functools.partial(jax.jit, static_argnames="draws")
def _draw_predictions(model: attacks.TracedModel, x: Array, keys: Array, *, draws: int) -> Array:
  return jax.lax.map(lambda d: predicted_labels(_eot.draw(model, x, _eot.fold(keys, d))),
                     jnp.arange(draws))


def draw_predictions(logits_fn: LogitsFn, x: Array, key: Array, *, draws: int) -> Array:
  """:func:`predicted_labels` of ``draws`` draws of a randomized model (``attacks.stochastic``):
  ``(draws, B)`` int32, row ``d`` the draw with per-example keys ``fold_in(fold_in(key, i), d)``
  for the ``i``-th example of ``x (B, ...)`` (:func:`krylov_adv.attacks._eot.draw`; jitted, the
  model's arrays traced). A draw at a time (``lax.map``): memory of one forward pass."""
  _check_draws(draws)
  keys = toolkit.example_keys(key, jnp.arange(x.shape[0], dtype=jnp.int32))
  sharding, _ = parallel.batch_sharding(x)
  if sharding is not None:  # the keys laid out like the batch
    keys = jax.device_put(keys, jax.sharding.NamedSharding(
        sharding.mesh, jax.sharding.PartitionSpec(sharding.spec[0])))
  return _draw_predictions(attacks.as_model(logits_fn), x, keys, draws=int(draws))


def _check_draws(draws) -> None:
  """Raises ``ValueError`` unless ``draws`` is an integer ``>= 1``."""
  if int(draws) != draws or draws < 1:
    raise ValueError(f"draws must be an integer >= 1, got {draws}")


def _draws(logits_fn: LogitsFn, draws: int | None) -> int | None:
  """The draws a model is judged with: ``None`` for a deterministic model (judged once, whatever
  ``draws``), ``draws`` (default :data:`DEFAULT_DRAWS`) for a randomized one."""
  if not attacks.is_stochastic(logits_fn):
    return None
  draws = DEFAULT_DRAWS if draws is None else draws
  _check_draws(draws)
  return int(draws)


def _draw_correct(logits_fn: LogitsFn, x: Array, y: np.ndarray, batch_key: Array,
                  draws: int) -> np.ndarray:
  """``(B,)`` float64: the fraction of ``draws`` draws classifying each example of the padded
  batch ``x`` as ``y``, keys from ``batch_key`` (module docstring); a non-finite row is wrong."""
  pred = parallel.to_host(draw_predictions(
      logits_fn, x, jax.random.fold_in(batch_key, _eot.JUDGE_STREAM), draws=draws))
  return np.mean(pred == np.asarray(y)[None], axis=0)


def _accuracy_of(correct: np.ndarray, n: int) -> float:
  """``mean(correct)`` over ``n`` examples: a count of bools (exact, as before), or the mean of
  a randomized model's per-example fractions."""
  if correct.dtype == bool:
    return int(correct.sum()) / n
  return float(correct.sum()) / n


def predictions(logits_fn: LogitsFn, x: np.ndarray, *, batch_size: int = 256,
                mesh=None) -> np.ndarray:
  """:func:`predicted_labels` of every example, in batches. x ``(N, ...)`` -> ``(N,)`` int32:
  ``argmax_k logits_fn(x)_k``, or -1 where a logit is NaN or inf (a model that overflows
  predicts no class rather than class 0).

  With ``mesh`` every batch is sharded over its ``"data"`` axis (padding rule in
  ``_batch_size``). A deterministic model only (a randomized one: :func:`draw_predictions`)."""
  _deterministic_only(logits_fn, "predictions")
  out = []
  model = attacks.as_model(logits_fn)
  for idx, valid in _padded_batches(len(x), _batch_size(batch_size, len(x), mesh)):
    (xb,) = _place((x[idx],), mesh)
    out.append(parallel.to_host(_model_predictions(model, xb))[:valid])
  return np.concatenate(out) if out else np.zeros((0,), np.int32)


class AccuracyReport(NamedTuple):
  """Clean accuracy over ``num_examples`` examples; ``nonfinite`` of them had a NaN or inf
  logit and count as wrong (their prediction is -1, :func:`predictions`); a randomized model's
  accuracy is the mean over ``draws`` draws (``nonfinite``: examples with a non-finite logit in
  some draw), a deterministic model's ``draws`` is 1."""
  accuracy: float
  nonfinite: int
  num_examples: int
  draws: int = 1


def accuracy_report(logits_fn: LogitsFn, x: np.ndarray, y: np.ndarray, *,
                    batch_size: int = 256, mesh=None, key: Array | None = None,
                    draws: int | None = None) -> AccuracyReport:
  """Clean accuracy ``mean(pred_i == y_i)`` (``pred`` from :func:`predictions`: a non-finite
  prediction is wrong) and how many predictions were non-finite. ``0.0`` for an empty set.

  A randomized model (``attacks.stochastic``) needs ``key``: its accuracy is the mean over
  ``draws`` draws (default :data:`DEFAULT_DRAWS`), batch ``b`` drawn from ``fold_in(key, b)``
  as in :func:`run_attack` (module docstring); ``key`` and ``draws`` are unused for a
  deterministic model."""
  draws = _draws(logits_fn, draws)
  if draws is not None:
    return _stochastic_accuracy(logits_fn, x, y, batch_size=batch_size, mesh=mesh, key=key,
                                draws=draws)
  pred = predictions(logits_fn, x, batch_size=batch_size, mesh=mesh)
  acc = float(np.mean(pred == np.asarray(y))) if len(pred) else 0.0
  return AccuracyReport(acc, int(np.sum(pred == NONFINITE_PREDICTION)), len(pred))


def _stochastic_correct(logits_fn: LogitsFn, x: np.ndarray, y: np.ndarray, *, batch_size: int,
                        mesh, key: Array | None, draws: int) -> tuple[np.ndarray, int]:
  """A randomized model's clean ``(N,)`` float64 fraction of ``draws`` draws classifying each
  example correctly (batch ``b`` drawn from ``fold_in(key, b)``, module docstring) and how many
  examples had a non-finite logit in some draw."""
  if key is None:
    raise ValueError("a randomized model (attacks.stochastic) is judged over draws: pass key=")
  correct, nonfinite = [], 0
  for b, (idx, valid) in enumerate(_padded_batches(len(x), _batch_size(batch_size, len(x),
                                                                         mesh))):
    (xb,) = _place((x[idx],), mesh)
    pred = parallel.to_host(draw_predictions(
        logits_fn, xb, jax.random.fold_in(jax.random.fold_in(key, b), _eot.JUDGE_STREAM),
        draws=draws))[:, :valid]
    correct.append(np.mean(pred == np.asarray(y)[idx][None, :valid], axis=0))
    nonfinite += int(np.sum(np.any(pred == NONFINITE_PREDICTION, axis=0)))
  return (np.concatenate(correct) if correct else np.zeros((0,), np.float64)), nonfinite


def _stochastic_accuracy(logits_fn: LogitsFn, x: np.ndarray, y: np.ndarray, *, batch_size: int,
                         mesh, key: Array | None, draws: int) -> AccuracyReport:
  correct, nonfinite = _stochastic_correct(logits_fn, x, y, batch_size=batch_size, mesh=mesh,
                                           key=key, draws=draws)
  acc = float(np.mean(correct)) if correct.size else 0.0
  return AccuracyReport(acc, nonfinite, len(x), draws)


def accuracy(logits_fn: LogitsFn, x: np.ndarray, y: np.ndarray, *, batch_size: int = 256,
             mesh=None, key: Array | None = None, draws: int | None = None) -> float:
  """Clean accuracy ``mean(argmax f(x_i) == y_i)``, an example with a NaN or inf logit counted
  wrong; :func:`accuracy_report` also says how many there were (and takes a randomized
  model's ``key`` and ``draws``)."""
  return accuracy_report(logits_fn, x, y, batch_size=batch_size, mesh=mesh, key=key,
                         draws=draws).accuracy


class AttackRun(NamedTuple):
  """What :func:`run_attack` measured over a test set of ``N`` examples.

  correct: ``(N,)`` bool, ``argmax f(x_adv_i) == y_i``; for a randomized model ``(N,)``
  float64, the fraction of its ``draws`` draws for which it holds; x_adv: ``(N, H, W, C)``
  NumPy when asked for (``keep_examples``), else ``None``; extras: one ``(aux, valid)`` per
  batch for an attack returning ``WithReport(x_adv, aux)``, ``aux`` as the attack returned it
  for the whole padded batch and ``valid`` the number of real examples at its front; draws:
  the model draws ``correct`` averages (1 for a deterministic model).
  """
  correct: np.ndarray
  x_adv: np.ndarray | None
  extras: list
  draws: int = 1


def check_admissible(x_adv: Array, x: Array, *, eps: float, norm: str, bounds=None) -> None:
  """Raises ``ValueError`` unless every ``||x_adv_i - x_i|| <= eps`` and ``x_adv`` lies in the
  box ``bounds = (lo, hi)`` (default ``[0, 1]``), up to the float32 slack of the projections;
  NaN is never admissible."""
  lo, hi = projections.DEFAULT_BOUNDS if bounds is None else bounds
  dist, below, above = (float(v) for v in _admissibility(
      x_adv, x, jnp.asarray(lo, x_adv.dtype), jnp.asarray(hi, x_adv.dtype), norm=norm))
  # Written so that NaN fails too: a NaN adversarial point is not admissible.
  inside_box = below <= _BUDGET_ATOL and above <= _BUDGET_ATOL
  if not (dist <= eps + _BUDGET_ATOL * max(1.0, eps) and inside_box):
    box = "[0, 1]" if bounds is None else "bounds (lo, hi)"
    raise ValueError(f"attack returned points outside the {norm} ball of radius {eps} or the "
                     f"box {box} (max distance {dist})")


def run_attack(logits_fn: LogitsFn, attack_fn: Callable[..., Any], x: np.ndarray,
               y: np.ndarray, key: Array, *, eps: float, norm: str, batch_size: int = 256,
               mesh=None, keep_examples: bool = False, bounds=None,
               draws: int | None = None) -> AttackRun:
  """Runs ``attack_fn`` over a test set in fixed-size batches: THE batched attack runner.

  Every batch has the same shape (the last one padded, see ``_batch_size``), so a jitted attack
  compiles once; batch ``b`` gets ``fold_in(key, b)``; every adversarial batch must pass
  :func:`check_admissible` (a robust accuracy from an inadmissible point would be meaningless).

  An attack with a whole-test-set form (a :class:`krylov_adv.attacks.BoundAttack` whose
  ``test_set_runner`` is registered: AutoAttack, ``attacks.autoattack_batched``) runs through
  it on one device instead: the same per-example keys as batch by batch, but each component on
  the still-robust points of all batches at once, so it compiles one shape per component (each
  batch's own subset sizes would each compile) and never attacks the padding; its one report
  covers all ``N`` points (``extras = [(report, N)]``).

  Args:
    logits_fn: ``(B, H, W, C) -> (B, K)`` in inference mode; a pytree callable such as
      ``krylov_adv.models.as_logits_fn(model, variables, train=False)`` has its parameters
      traced, so another parameter set of the same architecture compiles nothing (a plain
      closure compiles once per function object).
    attack_fn: ``f(logits_fn, x, y, key) -> x_adv`` (a registered attack, or a
      :class:`krylov_adv.attacks.BoundAttack`) or a ``NAME_with_report`` entry returning
      ``WithReport(x_adv, report)`` (the reports are returned in ``extras``).
    x: ``(N, H, W, C)`` float32 in the box; y: ``(N,)`` int32.
    key: PRNG key, folded with the batch number.
    eps, norm: the threat model every ``x_adv`` is checked against.
    bounds: the input box ``(lo, hi)`` every ``x_adv`` is checked against (default ``[0, 1]``;
      the attack must be told the same box, e.g. through its config, as
      :func:`evaluate_attacks` does).
    batch_size: examples per attack call.
    mesh: optional device mesh; each batch is then sharded over its ``"data"`` axis and the
      attack runs data-parallel.
    keep_examples: also return the adversarial examples (gathered to the host).
    draws: for a randomized model (``attacks.stochastic``), the draws each ``x_adv_i`` is judged
      with (default :data:`DEFAULT_DRAWS`; module docstring); unused for a deterministic model.

  Returns:
    An :class:`AttackRun`.
  """
  draws = _draws(logits_fn, draws)
  runner = getattr(attack_fn, "test_set_runner", None)
  if runner is not None and len(x) and (mesh is None or mesh.devices.size == 1):
    return _run_test_set(logits_fn, runner, bool(attack_fn.report), x, y, key, eps=eps,
                         norm=norm, batch_size=_batch_size(batch_size, len(x), None),
                         keep_examples=keep_examples, bounds=bounds, draws=draws)
  correct, kept, extras = [], [], []
  for b, (idx, valid) in enumerate(_padded_batches(len(x), _batch_size(batch_size, len(x),
                                                                         mesh))):
    xb, yb = _place((x[idx], y[idx]), mesh)
    batch_key = jax.random.fold_in(key, b)
    out = attack_fn(logits_fn, xb, yb, batch_key)
    # A NAME_with_report entry returns WithReport(x_adv, report); a plain attack x_adv alone.
    x_adv, aux = out if isinstance(out, attacks.WithReport) else (out, None)
    _judge_batch(logits_fn, x_adv, xb, y[idx], valid, eps=eps, norm=norm, correct=correct,
                 kept=kept if keep_examples else None, bounds=bounds, batch_key=batch_key,
                 draws=draws)
    if aux is not None:
      extras.append((aux, valid))
  return AttackRun(np.concatenate(correct) if correct else np.zeros((0,), bool),
                   np.concatenate(kept) if keep_examples and kept else None, extras,
                   draws or 1)


def _judge_batch(logits_fn: LogitsFn, x_adv: Array, xb: Array, yb: np.ndarray, valid: int, *,
                 eps: float, norm: str, correct: list, kept: list | None,
                 bounds=None, batch_key: Array | None = None,
                 draws: int | None = None) -> None:
  """Judges one padded batch's adversarial points (both runners): :func:`check_admissible`
  (the ball and the box ``bounds``, whatever the model), then appends the first ``valid`` rows'
  correctness (``x_adv`` ``(B, ...)`` against labels ``yb`` ``(B,)``) to ``correct`` and, when
  ``kept`` is a list, the points themselves. A randomized model (``draws`` not ``None``) is
  judged over ``draws`` draws from ``batch_key`` (the batch's key; module docstring)."""
  check_admissible(x_adv, xb, eps=eps, norm=norm, bounds=bounds)
  if draws is not None:
    correct.append(_draw_correct(logits_fn, x_adv, yb, batch_key, draws)[:valid])
  else:
    pred = parallel.to_host(model_predictions(logits_fn, x_adv))  # a NaN row is -1: wrong
    correct.append((pred == yb)[:valid])
  if kept is not None:
    kept.append(parallel.to_host(x_adv)[:valid])


def _run_test_set(logits_fn: LogitsFn, runner: Callable[..., Any], with_report: bool,
                  x: np.ndarray, y: np.ndarray, key: Array, *, eps: float, norm: str,
                  batch_size: int, keep_examples: bool, bounds=None,
                  draws: int | None = None) -> AttackRun:
  """:func:`run_attack` for an attack with a whole-test-set form (``runner``, e.g.
  ``attacks.autoattack_batched`` with its hyperparameters bound) on one device: the runner
  gives every example what batch ``b`` attacked with ``fold_in(key, b)`` gives it, grouping the
  work across batches. The check and the predictions then run per padded batch, like every
  attack's. ``extras`` holds one ``(report, N)`` for the whole set when ``with_report``."""
  out = runner(logits_fn, jnp.asarray(x), jnp.asarray(y), key, batch_size=batch_size)
  correct, kept = [], []
  for b, (idx, valid) in enumerate(_padded_batches(len(x), batch_size)):
    # The padded indices keep every batch at one shape (one compile of each check).
    xb, xa = jnp.asarray(x[idx]), jnp.take(out.x_adv, jnp.asarray(idx), axis=0)
    _judge_batch(logits_fn, xa, xb, y[idx], valid, eps=eps, norm=norm, correct=correct,
                 kept=kept if keep_examples else None, bounds=bounds,
                 batch_key=None if draws is None else jax.random.fold_in(key, b), draws=draws)
  return AttackRun(np.concatenate(correct), np.concatenate(kept) if keep_examples else None,
                   [(out.report, len(x))] if with_report else [], draws or 1)


def robust_accuracy(logits_fn: LogitsFn, attack_fn: Callable[..., Any], x: np.ndarray,
                    y: np.ndarray, key: Array, *, eps: float, norm: str,
                    batch_size: int = 256, mesh=None, bounds=None,
                    draws: int | None = None) -> float:
  """Accuracy on ``attack_fn``'s adversarial examples, ``mean(argmax f(x_adv_i) == y_i)`` (for a
  randomized model also the mean over ``draws`` draws).

  Arguments as for :func:`run_attack`; a point outside the threat model raises ``ValueError``.
  """
  run = run_attack(logits_fn, attack_fn, x, y, key, eps=eps, norm=norm, batch_size=batch_size,
                   mesh=mesh, bounds=bounds, draws=draws)
  return _accuracy_of(run.correct, len(x))


# Attacks whose NAME_with_report entry costs nothing over NAME (PGD's and S-O's traces cost a
# gradient per iterate, so they are not here).
FREE_REPORTS = ("soae", "autoattack")


def evaluate_attacks(logits_fn: LogitsFn, x: np.ndarray, y: np.ndarray,
                     attack_cfgs: Mapping[str, Any], key: Array, *,
                     batch_size: int = 256, mesh=None,
                     reports: tuple[str, ...] = (),
                     key_indices: Mapping[str, int] | None = None,
                     on_result: Callable[[int, int, AttackResult], None] | None = None,
                     bounds=None, draws: int | None = None) -> list[AttackResult]:
  """Runs every configured attack and returns one :class:`AttackResult` per entry.

  Args:
    attack_cfgs: ``{entry: cfg}`` where ``cfg`` has ``label`` (the table row), ``name`` (a
      registered attack, or ``"clean"``), ``norm``, ``eps`` and the attack's hyperparameters.
    mesh: optional device mesh for data-parallel evaluation (see :func:`robust_accuracy`).
    reports: attack names to run through their ``attacks.NAME_with_report`` entry (the same
      ``x_adv``); their per-batch reports land in ``AttackResult.extras``. E.g.
      :data:`FREE_REPORTS`.
    key_indices: ``{entry: i}``; the entry's attack runs with ``jax.random.fold_in(key, i)``.
      Default: its position in ``attack_cfgs``. Pass the positions in the full suite when some
      entries are left out, so that an entry's randomness (and result) does not depend on which
      others run.
    on_result: called as ``on_result(i, n, result)`` after entry ``i`` of ``n`` (0-based) has
      run, e.g. to print a progress line (the library itself prints nothing).
    bounds: the input box ``(lo, hi)`` of ``x`` (e.g. a standardised model's ``((0 - mu) / s,
      (1 - mu) / s)``), given to every attack and checked on every ``x_adv``; default
      ``[0, 1]``.
    draws: for a randomized model (``attacks.stochastic``), the draws every accuracy is the
      mean over (default :data:`DEFAULT_DRAWS`, recorded in ``AttackResult.draws``; the clean
      entry draws from the entry's key like an attack's judging); unused for a deterministic
      model.
  """
  judged_draws = _draws(logits_fn, draws)
  results = []
  for position, (entry, cfg) in enumerate(attack_cfgs.items()):
    i = position if key_indices is None else int(key_indices[entry])
    c = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    label = c.pop("label", entry)
    name, norm, eps = c["name"], c["norm"], float(c["eps"])
    start = time.perf_counter()
    extras: tuple = ()
    if name == "clean":
      if judged_draws is None:
        # A non-finite prediction (-1) is wrong, as in accuracy().
        correct = predictions(logits_fn, x, batch_size=batch_size, mesh=mesh) == np.asarray(y)
      else:
        correct, _ = _stochastic_correct(logits_fn, x, y, batch_size=batch_size, mesh=mesh,
                                         key=jax.random.fold_in(key, i), draws=judged_draws)
    else:
      if bounds is not None:
        c["bounds"] = bounds
      attack = attacks.from_config(c)
      if name in reports:
        attack = attack.with_report()
      run = run_attack(logits_fn, attack, x, y, jax.random.fold_in(key, i), eps=eps, norm=norm,
                       batch_size=batch_size, mesh=mesh, bounds=bounds, draws=judged_draws)
      correct = run.correct
      extras = tuple(run.extras)
    acc = _accuracy_of(correct, len(x)) if len(x) else 0.0
    results.append(AttackResult(label, name, norm, eps, acc, len(x),
                                time.perf_counter() - start, extras,
                                correct if judged_draws is not None
                                else np.asarray(correct, bool), entry, judged_draws or 1))
    if on_result is not None:
      on_result(position, len(attack_cfgs), results[-1])
  return results


def summarize_reports(extras) -> dict[str, Any] | None:
  """Plain numbers from the per-batch reports of one attack (``AttackResult.extras``), over the
  real examples of each batch; ``None`` when there are none or their type is not known.

  SOAE (:class:`attacks.SOAEDiagnostics`): ``krylov_dim_mean`` / ``krylov_dim_max`` (Krylov
  dimension per GMRES solve, over examples and outer iterations), ``fallback_rate`` (solves
  whose Newton direction was replaced by the gradient), ``converged_rate`` (solves meeting
  tau), ``solves``, and ``status_counts``: ``{name: count}`` of the solves' exit codes, one
  key per :class:`krylov_adv.krylov.Status` name (``CONVERGED``, ``MAX_DIM_REACHED``,
  ``BREAKDOWN``, ``NONFINITE``; zero counts included), summing to ``solves``.
  AutoAttack (:class:`attacks.AutoAttackReport`): ``components`` and
  ``accuracy_after`` (robust accuracy after each component, cumulative) and ``clean_accuracy``;
  these are the batches' fractions weighted by their real examples, exact unless the last batch
  was padded (``padded`` True: its padding copies of example 0 count in its fractions).
  """
  if not extras:
    return None
  first = extras[0][0]
  if isinstance(first, attacks.SOAEDiagnostics):
    dims, fallback, converged, status = [], [], [], []
    for diag, valid in extras:
      # Fields are (N, B): columns past ``valid`` are the padding of the last batch.
      dims.append(np.asarray(parallel.to_host(diag.num_iters))[:, :valid].reshape(-1))
      fallback.append(np.asarray(parallel.to_host(diag.fallback))[:, :valid].reshape(-1))
      converged.append(np.asarray(parallel.to_host(diag.converged))[:, :valid].reshape(-1))
      status.append(np.asarray(parallel.to_host(diag.status))[:, :valid].reshape(-1))
    # The same statistics SOAEDiagnostics.summary() prints for one batch.
    return summaries.soae_stats(*(np.concatenate(a) for a in (dims, fallback, converged,
                                                               status)))
  if isinstance(first, attacks.AutoAttackReport):
    n = sum(valid for _, valid in extras)
    after = np.zeros(len(first.components))
    clean = 0.0
    for report, valid in extras:
      after += np.asarray(report.robust_accuracy_after, float) * valid
      clean += report.clean_accuracy * valid
    return dict(components=list(first.components), accuracy_after=(after / n).tolist(),
                clean_accuracy=clean / n,
                padded=any(len(r.robust) != valid for r, valid in extras))
  return None
