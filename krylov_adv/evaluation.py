"""Robust-accuracy evaluation: run configured attacks over a test set and tabulate the results.

The table follows the papers: one row per attack (clean, FGSM, PGD-20, S-O, SOAE, AutoAttack),
one column per threat model (Linf and L2 budgets), so that robustness in one norm can be read
against the other (the S-O paper's point). Every attack sees the model in inference mode.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from krylov_adv import attacks, parallel, projections

Array = jax.Array
LogitsFn = Callable[[Array], Array]

# Slack for the threat-model check: attacks project in float32.
_BUDGET_ATOL = 1e-5


class AttackResult(NamedTuple):
  """One cell of the robustness table.

  label: the row (``"PGD-20"``); attack: the registry name (``"clean"`` for no attack);
  norm / eps: the threat model; accuracy: fraction of examples still classified correctly;
  num_examples: how many were evaluated; seconds: wall time of the attack.
  """
  label: str
  attack: str
  norm: str
  eps: float
  accuracy: float
  num_examples: int
  seconds: float


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
def _admissibility(x_adv: Array, x: Array, *, norm: str) -> tuple[Array, Array, Array]:
  """``(max_i ||x_adv_i - x_i||, min x_adv, max x_adv)``, reduced on the devices (a batch
  sharded over several hosts cannot be fetched whole; these scalars are replicated)."""
  return (jnp.max(projections.per_example_norm(x_adv - x, norm), initial=0.0), jnp.min(x_adv),
          jnp.max(x_adv))


def predictions(logits_fn: LogitsFn, x: np.ndarray, *, batch_size: int = 256,
                mesh=None) -> np.ndarray:
  """``argmax_k logits_fn(x)_k`` for every example, in batches. x ``(N, ...)`` -> ``(N,)`` int.

  With ``mesh`` every batch is sharded over its ``"data"`` axis (padding rule in
  ``_batch_size``)."""
  out = []
  for idx, valid in _padded_batches(len(x), _batch_size(batch_size, len(x), mesh)):
    (xb,) = _place((x[idx],), mesh)
    out.append(parallel.to_host(jnp.argmax(logits_fn(xb), axis=1))[:valid])
  return np.concatenate(out) if out else np.zeros((0,), np.int32)


def accuracy(logits_fn: LogitsFn, x: np.ndarray, y: np.ndarray, *, batch_size: int = 256,
             mesh=None) -> float:
  """Clean accuracy ``mean(argmax f(x_i) == y_i)``."""
  return float(np.mean(predictions(logits_fn, x, batch_size=batch_size, mesh=mesh)
                       == np.asarray(y)))


def robust_accuracy(logits_fn: LogitsFn, attack_fn: Callable[..., Any], x: np.ndarray,
                    y: np.ndarray, key: Array, *, eps: float, norm: str,
                    batch_size: int = 256, mesh=None) -> float:
  """Accuracy on ``attack_fn``'s adversarial examples, ``mean(argmax f(x_adv_i) == y_i)``.

  Args:
    logits_fn: ``(B, H, W, C) -> (B, K)`` in inference mode; reuse one function object across
      calls (attacks jit with ``logits_fn`` static, so a new closure means a recompile).
    attack_fn: ``f(logits_fn, x, y, key) -> x_adv`` (every registered attack).
    x: ``(N, H, W, C)`` float32 in ``[0, 1]``; y: ``(N,)`` int32.
    key: PRNG key, folded with the batch number.
    eps, norm: the threat model, used to verify that every ``x_adv`` is admissible
      (``||x_adv - x|| <= eps`` and ``[0, 1]``); a robust accuracy from an inadmissible point
      would be meaningless, so a violation raises ``ValueError``.
    batch_size: examples per attack call.
    mesh: optional device mesh; each batch is then sharded over its ``"data"`` axis and the
      attack runs data-parallel (padding rule in ``_batch_size``).
  """
  correct = 0
  for b, (idx, valid) in enumerate(_padded_batches(len(x), _batch_size(batch_size, len(x),
                                                                         mesh))):
    xb, yb = _place((x[idx], y[idx]), mesh)
    x_adv = attack_fn(logits_fn, xb, yb, jax.random.fold_in(key, b))
    dist, lo, hi = (float(v) for v in _admissibility(x_adv, xb, norm=norm))
    # Written so that NaN fails too: a NaN adversarial point is not admissible.
    inside_box = lo >= -_BUDGET_ATOL and hi <= 1 + _BUDGET_ATOL
    if not (dist <= eps + _BUDGET_ATOL * max(1.0, eps) and inside_box):
      raise ValueError(f"attack returned points outside the {norm} ball of radius {eps} or the "
                       f"box [0, 1] (max distance {dist})")
    pred = parallel.to_host(jnp.argmax(logits_fn(x_adv), axis=1))
    correct += int(np.sum((pred == y[idx])[:valid]))
  return correct / len(x)


def evaluate_attacks(logits_fn: LogitsFn, x: np.ndarray, y: np.ndarray,
                     attack_cfgs: Mapping[str, Any], key: Array, *,
                     batch_size: int = 256, mesh=None) -> list[AttackResult]:
  """Runs every configured attack and returns one :class:`AttackResult` per entry.

  Args:
    attack_cfgs: ``{entry: cfg}`` where ``cfg`` has ``label`` (the table row), ``name`` (a
      registered attack, or ``"clean"``), ``norm``, ``eps`` and the attack's hyperparameters.
    mesh: optional device mesh for data-parallel evaluation (see :func:`robust_accuracy`).
  """
  results = []
  for i, (entry, cfg) in enumerate(attack_cfgs.items()):
    c = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    label = c.pop("label", entry)
    name, norm, eps = c["name"], c["norm"], float(c["eps"])
    start = time.perf_counter()
    if name == "clean":
      acc = accuracy(logits_fn, x, y, batch_size=batch_size, mesh=mesh)
    else:
      attack = attacks.from_config(c)
      acc = robust_accuracy(logits_fn, attack, x, y, jax.random.fold_in(key, i), eps=eps,
                            norm=norm, batch_size=batch_size, mesh=mesh)
    results.append(AttackResult(label, name, norm, eps, acc, len(x),
                                time.perf_counter() - start))
  return results


def _eps_text(eps: float) -> str:
  """``8/255`` for budgets that are small multiples of 1/255 (CIFAR style), ``0.3`` otherwise."""
  k = eps * 255
  if 0 < eps < 0.2 and abs(k - round(k)) < 1e-6:
    return f"{round(k)}/255"
  return f"{eps:g}"


# Row order of the papers' tables; attacks not listed follow in order of appearance.
ROW_ORDER = ("clean", "fgsm", "pgd", "second_order", "soae", "autoattack")
_NORM_ORDER = {"linf": 0, "l2": 1}


def markdown_table(results_by_model: Mapping[str, Sequence[AttackResult]]) -> str:
  """A markdown table: rows are attack labels, columns ``<model> <norm> eps=...``.

  Rows follow ``ROW_ORDER`` (clean, FGSM, PGD, S-O, SOAE, AutoAttack), columns Linf before L2;
  with one model the column names are just the threat models (``Linf eps=0.3``). Cells are
  accuracies in percent; ``-`` where an attack was not run for that threat model.
  """
  columns: list[tuple[str, str, float]] = []
  rows: list[tuple[int, int, str]] = []
  cells: dict[tuple[str, tuple[str, str, float]], float] = {}
  for model, results in results_by_model.items():
    for r in results:
      col = (model, r.norm, r.eps)
      if col not in columns:
        columns.append(col)
      rank = ROW_ORDER.index(r.attack) if r.attack in ROW_ORDER else len(ROW_ORDER)
      if r.label not in [lbl for _, _, lbl in rows]:
        rows.append((rank, len(rows), r.label))
      cells[(r.label, col)] = r.accuracy
  model_rank = {m: i for i, m in enumerate(results_by_model)}
  columns.sort(key=lambda c: (model_rank[c[0]], _NORM_ORDER.get(c[1], 2), c[2]))
  rows.sort()
  single = len(results_by_model) == 1
  names = {"linf": "Linf", "l2": "L2"}
  heads = [("" if single else f"{m} ") + f"{names.get(n, n)} eps={_eps_text(e)}"
           for m, n, e in columns]
  lines = ["| attack | " + " | ".join(heads) + " |", "|---" * (len(heads) + 1) + "|"]
  for _, _, label in rows:
    vals = [f"{100 * cells[(label, c)]:.2f}%" if (label, c) in cells else "-" for c in columns]
    lines.append(f"| {label} | " + " | ".join(vals) + " |")
  return "\n".join(lines) + "\n"
