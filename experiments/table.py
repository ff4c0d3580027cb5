"""The SOAE paper's Table I matrix in one command: every training method, every attack, both
norms, the paper's numbers beside ours.

  python -m experiments.table --config configs/table_fashion_mnist.py --workdir /tmp/table_fm
  python -m experiments.table --config configs/table_digits.py --workdir /tmp/table_digits
  python -m experiments.table --config configs/table_mnist.py --workdir DIR        # accelerator
  python -m experiments.table --config configs/table_cifar10.py:wrn28_10 --workdir DIR

Trains every row of ``table.methods`` (STD, PGD, TRADES, SOAR (ours and ``soar_authors``),
STN = ``second_order``, SCORPIO (the authors' step rule; ``scorpio_ours``), SOAT, and issue
14's SOAT variants: ``soat_paper`` with the paper's forward-difference HVP, ``soat_tr`` with the
trust-region direction, ``pgd_eqcost`` PGD-AT at SOAT's training cost) into ``workdir/<row>``
with ``experiments.pipeline.train`` (orbax checkpoints, resumable, the run fingerprint of
``experiments.workdir``), then attacks each with the papers' columns
(``eval.table``: clean, FGSM, PGD-20, AutoAttack, ASOD = S-O, SOAE; Linf and L2) and, with
``table.equal_cost``, PGD run at SOAE's measured cost. Every attack's result is saved in
``workdir/<row>/table_eval.json`` as soon as it is done, so an interrupted run resumes
attack by attack: a finished row is neither retrained nor re-attacked.

Writes (after every row, so a partial run shows what it has):
  ``table.md``    the metadata header (``pipeline.run_metadata``), our table per norm in the
                  paper's layout (rows = training methods, columns = attacks; each cell with
                  its 95% interval), the paper's own numbers beside it (labelled as the
                  paper's, with its dataset and model), the cost of each attack counted by
                  construction (``experiments.costs``) and the wall time of each row's
                  training and evaluation, labelled as wall time, with the load average.
  ``table.png``   robust accuracy per row and attack, one panel per norm (at the end).
  ``table.json``  ``{"metadata" (with "machine": load average, CPUs; "collapse_rule"),
                  "hvp_cost", "rows": {row: {label, method, train, collapsed, load_average,
                  flags_file, results: {entry: {label, attack, norm, eps, accuracy, ci95,
                  num_examples, seconds, cost, cost_counts, diagnostics, setting,
                  flags_digest, load_average}}}}, "paired", "paper"}``; a row's
                  ``load_average`` is :func:`row_load_average` of its results; ``ci95`` is
                  the 95% Wilson interval ``[lo, hi]`` (``krylov_adv.stats``),
                  ``worst_case_<norm>`` entries count a point robust only under every attack
                  of the norm (:func:`worst_case_entries`),
                  ``collapsed`` is ``krylov_adv.stats.collapse_check`` of the row's clean
                  predictions, ``paired`` the exact McNemar tests of :func:`paired_tests`.
  ``<row>/robust_flags.npz``  one ``(n,)`` bool per results entry (point ``i`` still correct),
                  keyed by the entry's name, and the test-point ``indices``; written before
                  ``table_eval.json`` after every attack (crash-safe, see :func:`evaluate_row`).
  ``hvp_cost.json``  the exact HVP's cost in gradients: ONE number per table (model),
                  measured once (:func:`hvp_cost_of`) and reused on resume; every cost and
                  ``pgd_eqcost``'s steps use it.

``table.md`` adds a "Claims" section (each paired test, "not distinguishable at 1%" unless
p < 0.01) and marks collapsed rows ``[collapsed]``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from experiments import cli, costs, outputs, pipeline
from experiments import workdir as workdir_lib
from krylov_adv import data as data_lib
from krylov_adv import evaluation, parallel, stats, training

# ---------------------------------------------------------------------------------------------
# The paper's numbers (SOAE paper, Tables I-III; robust accuracy in %, Linf eps = 8/255 for
# every attack, PGD-20 step 2/255; training 300 epochs, see its Sec. IV-A). Table III has no
# FGSM and no ASOD column.

_PAPER_COLUMNS = ("clean", "fgsm", "pgd", "autoattack", "second_order", "soae")
_PAPER_ROWS = ("standard", "pgd", "trades", "soar", "second_order", "scorpio", "soat")


def _paper(rows: list[tuple], columns=_PAPER_COLUMNS) -> dict[str, dict[str, float]]:
  return {method: dict(zip(columns, values)) for method, values in zip(_PAPER_ROWS, rows)
          if values is not None}


PAPER_TABLES: dict[str, dict[str, Any]] = {
    "mnist_resnet18": dict(title="paper (MNIST, ResNet-18; SOAE paper Table I)", rows=_paper([
        (97.78, 0.07, 0.06, 0.01, 0.01, 0.01),
        (86.34, 63.40, 55.89, 49.10, 20.20, 30.85),
        (85.98, 65.05, 53.87, 40.27, 39.76, 38.32),
        (87.95, 67.15, 56.06, 18.25, 29.12, 20.14),
        (86.26, 66.77, 54.90, 29.81, 48.74, 25.25),
        (87.92, 68.18, 58.44, 41.01, 47.62, 39.03),
        (87.62, 70.89, 60.13, 39.10, 49.45, 47.53)])),
    "mnist_wrn": dict(title="paper (MNIST, WideResNet; SOAE paper Table I)", rows=_paper([
        (99.90, 0.08, 0.05, 0.01, 0.02, 0.01),
        (84.55, 66.50, 57.12, 44.51, 21.76, 29.84),
        (80.56, 68.32, 56.49, 42.79, 41.37, 32.15),
        (86.99, 68.64, 57.80, 19.13, 33.90, 27.60),
        (87.42, 66.81, 53.21, 33.91, 46.25, 30.45),
        (89.01, 67.43, 55.02, 39.88, 43.69, 38.24),
        (85.23, 69.98, 57.73, 45.22, 45.96, 43.47)])),
    "cifar10_resnet18": dict(title="paper (CIFAR-10, ResNet-18; SOAE paper Table II)",
                             rows=_paper([
        (92.54, 30.59, 0.14, 0.05, 0.12, 0.08),
        (80.64, 50.96, 42.86, 40.59, 40.32, 38.19),
        (85.61, 53.06, 45.38, 41.34, 43.49, 40.26),
        (87.95, 55.70, 56.06, 19.66, 45.08, 35.45),
        (83.03, 54.83, 52.34, 38.00, 48.15, 37.98),
        (86.58, 55.07, 49.56, 39.27, 46.82, 38.75),
        (85.47, 56.24, 54.72, 45.98, 47.73, 49.27)])),
    "cifar10_wrn": dict(title="paper (CIFAR-10, WideResNet; SOAE paper Table II)", rows=_paper([
        (93.79, 44.77, 0.03, 0.01, 0.13, 0.09),
        (81.83, 51.15, 43.66, 42.62, 41.86, 39.14),
        (86.54, 54.66, 45.70, 43.70, 44.22, 41.21),
        (88.02, 67.15, 57.92, 20.41, 47.31, 39.35),
        (84.11, 58.59, 53.16, 38.95, 49.27, 38.02),
        (86.99, 61.37, 50.50, 41.28, 47.33, 40.11),
        (86.38, 62.33, 57.67, 47.53, 50.50, 51.46)])),
    "imagenet100_resnet18": dict(
        title="paper (ImageNet-100, ResNet-18; SOAE paper Table III)",
        rows=_paper([(91.33, 0.02, 0.0, 0.0), (78.26, 55.37, 48.66, 40.31),
                     (82.91, 56.09, 47.25, 40.05), (80.80, 61.68, 45.12, 42.35), None, None,
                     (84.50, 62.84, 52.99, 47.90)],
                    columns=("clean", "pgd", "autoattack", "soae"))),
}

# Row labels in the paper's words (STN is the S-O paper's training with its attack, ASOD).
ROW_LABELS = {"standard": "STD", "pgd": "PGD", "trades": "TRADES", "soar": "SOAR (ours)",
              "soar_authors": "SOAR (authors' settings)", "second_order": "STN",
              "scorpio": "SCORPIO (authors' FW step, 3 it.)",
              "scorpio_ours": "SCORPIO (ours: line search)", "soat": "SOAT (exact HVP)",
              "soat_paper": "SOAT (paper-literal FD HVP)", "soat_tr": "SOAT (trust region)",
              "pgd_eqcost": "PGD-AT at SOAT's cost", "mixed": "mixed"}
# Columns in the paper's order: Clean, FGSM, PGD, AutoAttack, ASOD (= S-O), SOAE.
COLUMN_ORDER = _PAPER_COLUMNS
COLUMN_LABELS = {"second_order": "ASOD (S-O)"}
EVAL_FILE = "table_eval.json"
EQUAL_COST = "pgd_at_soae_cost"


# ---------------------------------------------------------------------------------------------
# Rows


def rows_of(config) -> list[str]:
  """The rows of ``config.table.methods`` (comma-separated)."""
  rows = [m.strip() for m in str(config.table.methods).split(",") if m.strip()]
  if not rows:
    raise ValueError("table.methods is empty")
  if len(set(rows)) != len(rows):
    raise ValueError(f"table.methods repeats a row: {config.table.methods}")
  return rows


def row_config(config, row: str, hvp_cost: float | None = None) -> ml_collections.ConfigDict:
  """The single-method config of ``row``: ``config`` without its ``table`` block (so that a row's
  run fingerprint does not depend on the other rows), ``train.method`` the row's registered
  method and, for a variant of ``table.variants``, its ``train`` fields overridden.

  A variant with ``equal_cost_to = m`` (``pgd_eqcost``: ``"soat"``) trains PGD-AT with
  ``max(1, round(G))`` steps of ``2.5 eps / steps``, ``G`` the gradient-equivalents of method
  ``m``'s inner attack (``costs.soat_gradient_equivalents``) at ``hvp_cost`` gradients per
  exact HVP: the measured one (:func:`hvp_cost_of`); ``None`` (validation, before anything is
  measured) uses ``table.hvp_cost`` when positive, else ``costs.DOCUMENTED_HVP_COST``."""
  d = config.to_dict()
  table = d.pop("table")
  c = ml_collections.ConfigDict(d)
  variant = table.get("variants", {}).get(row)
  if variant is None:
    c.train.method = row
    return c
  c.train.method = variant["method"]
  for block, fields in variant.get("train", {}).items():
    c.train[block].update(fields)
  if variant.get("equal_cost_to"):
    if hvp_cost is None:
      hvp_cost = float(table.get("hvp_cost", 0.0)) or costs.DOCUMENTED_HVP_COST
    target = c.train[variant["equal_cost_to"]].to_dict()
    steps = max(1, int(round(costs.soat_gradient_equivalents(target, int(c.data.num_classes),
                                                             float(hvp_cost)))))
    c.train.pgd.update(dict(steps=steps, step_size=2.5 * float(c.train.eps) / steps))
  return c


def validate(config) -> None:
  """``pipeline.validate_config`` of every row's config; ``ValueError`` naming the row."""
  if "table" not in config:
    raise ValueError("the config has no table block (configs.common.add_table); use a "
                     "configs/table_*.py config")
  for row in rows_of(config):
    try:
      pipeline.validate_config(row_config(config, row))
    except ValueError as e:
      raise ValueError(f"table row {row!r}: {e}") from None


# ---------------------------------------------------------------------------------------------
# Evaluation, resumable attack by attack


def _read_json(path: str) -> dict | None:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _write_json(path: str, payload) -> None:
  if parallel.is_primary():
    workdir_lib.atomic_write_text(path, json.dumps(outputs.to_jsonable(payload), indent=1))


def _setting(entry_cfg: dict, n: int, epochs: int, seed: int, **measured) -> dict:
  """What a stored result was measured with: a stored result is reused only when it matches.
  ``measured``: the rest of what decides the result (:func:`evaluate_row`)."""
  return outputs.to_jsonable(dict(entry_cfg, num_examples=n, epochs=epochs, seed=seed,
                                  **measured))


def _points_digest(x: np.ndarray, y: np.ndarray) -> str:
  """sha256 of the attacked test points (images and labels): the data side of a cached
  result (``data.*`` settings, ``eval.num_examples``)."""
  h = hashlib.sha256()
  for a in (np.ascontiguousarray(x), np.ascontiguousarray(y)):
    h.update(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())
  return h.hexdigest()


def evaluate_row(exp, state, cfg, row_dir: str, *, epochs: int, hvp_cost: float,
                 equal_cost: bool, progress: bool = True, label: str = "",
                 checkpoint: dict | None = None) -> dict[str, dict]:
  """Attacks one trained row with ``eval.table`` (and PGD at SOAE's cost per norm), skipping
  the attacks whose results ``row_dir/table_eval.json`` already holds for the same settings;
  saves that file after every attack. Returns ``({entry: result record}, {entry: (n,) bool
  flags})``.

  A stored result is reused only when everything that decides it matches (its ``setting``):
  the entry's attack settings, the model attacked (``checkpoint``: step and checksum,
  ``pipeline.checkpoint_of``; a row retrained with another config is another model), the test
  points (their sha256), ``eval.batch_size`` (each batch has its own key), the seed, the
  entry's key index and, for SOAE, the HVP cost its reported cost uses.

  The attack key of an entry is ``fold_in(PRNGKey(seed + 2), i)`` with ``i`` its position in
  the whole ``eval.table`` (``pipeline.suite_key_indices``; ``ConfigDict`` orders entries by
  name, so the AutoAttack entries come first), the same whether the run is resumed or not and
  whatever ``eval.skip`` leaves out; PGD at SOAE's cost takes ``len(eval.table)`` plus its SOAE
  entry's index.

  Per-example results: every record's flags (``(n,)`` bool, point ``i`` still correct) are
  saved in ``row_dir/robust_flags.npz`` (``outputs.write_flags``, with the test-point indices
  ``arange(n)``) before ``table_eval.json``, and the record holds their ``flags_digest``; a
  stored record is reused only with flags of that digest (a record from before flags existed,
  or whose flags a crash left behind, is run again).
  """
  path = os.path.join(row_dir, EVAL_FILE)
  flags_path = os.path.join(row_dir, outputs.FLAGS_FILE)
  stored = (_read_json(path) or {}).get("results", {})
  stored_flags, _ = outputs.read_flags(flags_path)
  flags: dict[str, np.ndarray] = {}
  n = min(int(cfg.eval.num_examples), len(exp.dataset.y_test))
  x, y = exp.dataset.x_test[:n], exp.dataset.y_test[:n]
  suite = pipeline.eval_suite(cfg, "table")
  key_index = pipeline.suite_key_indices(cfg, "table")
  points = _points_digest(x, y)
  if checkpoint is None:
    checkpoint = pipeline.checkpoint_of(exp, state, row_dir)
  logits_fn = None
  results: dict[str, dict] = {}
  mesh = pipeline.make_mesh(cfg)
  base_key = jax.random.PRNGKey(int(cfg.seed) + 2)

  def run(i: int, entry: str, c: dict) -> dict:
    nonlocal logits_fn
    setting = _setting(c, n, epochs, int(cfg.seed), key_index=i,
                       batch_size=int(cfg.eval.batch_size), checkpoint=checkpoint,
                       test_points=points,
                       **({"hvp_cost": hvp_cost} if c["name"] == "soae" else {}))
    old = stored.get(entry)
    old_flags = stored_flags.get(entry)
    if (old is not None and old.get("setting") == setting and old_flags is not None
        and old_flags.shape == (n,) and old.get("flags_digest") == outputs.flags_digest(old_flags)):
      flags[entry] = old_flags
      return dict(old, ci95=outputs.result_interval(old["accuracy"], old["num_examples"]))
    if logits_fn is None:  # parameters traced: every row of one architecture shares compiles
      logits_fn = training.inference_logits_fn(exp.model, state.params, state.batch_stats)
    [r] = evaluation.evaluate_attacks(
        logits_fn, x, y, {entry: c}, jax.random.fold_in(base_key, i),
        batch_size=int(cfg.eval.batch_size), mesh=mesh, reports=evaluation.FREE_REPORTS)
    flags[entry] = np.asarray(r.correct, bool)
    record = dict(label=r.label, attack=r.attack, norm=r.norm, eps=r.eps, accuracy=r.accuracy,
                  ci95=stats.ci95(int(flags[entry].sum()), r.num_examples),
                  num_examples=r.num_examples, seconds=r.seconds,
                  cost=costs.attack_cost(c, r.extras, hvp_cost),
                  cost_counts=costs.attack_cost_counts(c, r.extras),
                  diagnostics=evaluation.summarize_reports(r.extras), setting=setting,
                  flags_digest=outputs.flags_digest(flags[entry]),
                  # Beside the wall time it qualifies, so a resumed row keeps the load its
                  # attacks ran under instead of the load at resume time.
                  load_average=list(os.getloadavg()))
    if progress:
      cost = "" if record["cost"] is None else f", {record['cost']:.1f} grad-eq."
      print(f"[{label}] {r.label} {r.norm} eps={r.eps:g}: {100 * r.accuracy:.2f}% "
            f"({r.seconds:.1f} s{cost})", flush=True)
    return record

  def save():
    # Flags first: a run killed between the two writes leaves flags without a record (the
    # attack runs again), never a record whose flags are missing or stale (the digest).
    outputs.write_flags(flags_path, {**{e: f for e, f in stored_flags.items()
                                        if f.shape == (n,)}, **flags}, np.arange(n))
    _write_json(path, dict(results={**stored, **results}))

  for entry, c in suite.items():
    results[entry] = run(key_index[entry], entry, c)
    save()
  if equal_cost:
    for entry, c in list(suite.items()):
      if c["name"] != "soae" or results[entry]["cost"] is None:
        continue
      steps = max(1, int(round(results[entry]["cost"])))
      eq = dict(label=f"PGD at SOAE's cost", name="pgd", norm=c["norm"], eps=c["eps"],
                steps=steps, step_size=2.5 * c["eps"] / steps, random_start=True)
      results[f"{EQUAL_COST}_{c['norm']}"] = run(len(key_index) + key_index[entry],
                                                 f"{EQUAL_COST}_{c['norm']}", eq)
      save()
  return results, flags


# ---------------------------------------------------------------------------------------------
# The HVP's cost


def hvp_cost_of(config, workdir: str, dataset, progress: bool = True) -> dict:
  """The exact HVP's cost in gradients for this table: ONE number per model, read from
  ``workdir/hvp_cost.json`` when it is there (so a resumed table keeps it), else measured
  (``costs.measure_hvp_cost``, the median wall-time ratio of a jitted exact HVP to a jitted
  input gradient on the first ``eval.batch_size`` test points) on the table's architecture at
  its initial parameters (the ratio is a property of the architecture, batch and machine; the
  parameters' values do not change the operations), or ``table.hvp_cost`` when positive (the
  tiny test config: no measurement). Written to ``hvp_cost.json`` with its source, the machine's
  platform and load average (``os.getloadavg``) at the time. Every cost of the table (SOAE's
  gradient-equivalents, PGD at SOAE's cost, ``pgd_eqcost``'s steps) uses this number."""
  path = os.path.join(workdir, "hvp_cost.json")
  fixed = float(config.table.hvp_cost)
  stored = _read_json(path)
  if stored is not None and "hvp_cost" in stored and (
      (fixed <= 0 and not stored.get("fixed"))
      or (fixed > 0 and stored.get("fixed") and stored["hvp_cost"] == fixed)):
    return stored
  meta = dict(model=str(config.model.name), platform=jax.devices()[0].platform,
              load_average=list(os.getloadavg()))
  if fixed > 0:
    m = dict(hvp_cost=fixed, fixed=True, source="config (table.hvp_cost), not measured", **meta)
  else:
    cfg = row_config(config, rows_of(config)[0])
    exp = pipeline.build(cfg, dataset)
    state = pipeline.initial_state(exp)
    logits_fn = training.inference_logits_fn(exp.model, state.params, state.batch_stats)
    b = min(int(config.eval.batch_size), len(dataset.y_test))
    m = costs.measure_hvp_cost(logits_fn, dataset.x_test[:b], dataset.y_test[:b])
    m.update(meta, fixed=False, source=f"measured on {config.model.name} at its initial "
             f"parameters (batch {b}, {meta['platform']})")
  _write_json(path, m)
  if progress:
    print(f"exact HVP = {m['hvp_cost']:.2f} gradients ({m['source']})", flush=True)
  return m


def row_load_average(results: dict[str, dict]) -> list[float]:
  """The load average (1 / 5 / 15 min) that qualifies a row's wall times: the elementwise
  maximum of the loads recorded at the end of each of its attacks (stored in
  ``table_eval.json`` with the attack, so a resumed row keeps the load its attacks ran under),
  or the current ``os.getloadavg()`` when no result records one (results of older runs)."""
  loads = [r["load_average"] for r in results.values() if r.get("load_average")]
  if not loads:
    return list(os.getloadavg())
  return [float(v) for v in np.max(np.asarray(loads, float), axis=0)]


# ---------------------------------------------------------------------------------------------
# The command


def run_table(config, workdir: str, *, progress: bool = True) -> dict:
  """Trains and evaluates every row (module docstring), holding the workdir's lock
  (``experiments.workdir.workdir_lock``); returns the ``table.json`` payload."""
  with workdir_lib.config_errors():
    validate(config)
  pipeline.start_distributed(config)
  progress = progress and parallel.is_primary()
  os.makedirs(workdir, exist_ok=True)
  with workdir_lib.workdir_lock(workdir, process_index=jax.process_index(),
                                subfolders=tuple(rows_of(config))):
    return _run_table(config, workdir, progress)


def _run_table(config, workdir: str, progress: bool) -> dict:
  rows = rows_of(config)
  with workdir_lib.config_errors():
    workdir_lib.check_data_root(config.data)
    dataset = data_lib.load(config.data)
  payload: dict[str, Any] = dict(rows={})
  meta_state = None
  hvp = hvp_cost_of(config, workdir, dataset, progress)
  all_flags: dict[str, dict[str, np.ndarray]] = {}
  for k, row in enumerate(rows):
    cfg = row_config(config, row, float(hvp["hvp_cost"]))
    sub = os.path.join(workdir, row)
    label = ROW_LABELS.get(row, row)
    if progress:
      print(f"== [{k + 1}/{len(rows)}] {label} ({row}): training {cfg.train.epochs} epochs "
            f"into {sub}", flush=True)
    start = time.perf_counter()
    exp, state = pipeline.train(cfg, sub, dataset=dataset, progress=progress)
    train_seconds, epochs = pipeline._training_seconds(sub)
    eval_start = time.perf_counter()
    ckpt = pipeline.checkpoint_of(exp, state, sub)  # the model the row's results measure
    results, flags = evaluate_row(exp, state, cfg, sub, epochs=ckpt["step"], checkpoint=ckpt,
                                  hvp_cost=float(hvp["hvp_cost"]),
                                  equal_cost=bool(config.table.equal_cost), progress=progress,
                                  label=label)
    eval_seconds = sum(float(r["seconds"]) for r in results.values())
    worst, worst_flags = worst_case_entries(results, flags)
    results.update(worst)
    flags.update(worst_flags)
    n = len(next(iter(flags.values())))
    outputs.write_flags(os.path.join(sub, outputs.FLAGS_FILE), flags, np.arange(n))
    all_flags[row] = flags
    collapsed = row_collapse(exp, state, cfg, n)
    meta = pipeline.run_metadata(cfg, exp, state, {cfg.train.method: sub}, "table",
                                 checkpoints={cfg.train.method: ckpt})
    train_md = meta["training"][cfg.train.method]
    payload["rows"][row] = dict(
        label=label, method=cfg.train.method, train=dict(
            train_md, seconds=train_seconds, epochs_recorded=epochs,
            seconds_per_epoch=train_seconds / epochs if epochs else None),
        eval_seconds=eval_seconds, results=results, collapsed=collapsed,
        flags_file=os.path.join(row, outputs.FLAGS_FILE),
        this_run_seconds=time.perf_counter() - start,
        eval_this_run_seconds=time.perf_counter() - eval_start,
        load_average=row_load_average(results))
    if meta_state is None:
      meta_state = meta
    payload["metadata"] = dict(meta_state, training={
        ROW_LABELS.get(r, r): v["train"] for r, v in payload["rows"].items()},
        machine=dict(load_average=list(os.getloadavg()), cpus=os.cpu_count(),
                     platform=jax.devices()[0].platform),
        collapse_rule=COLLAPSE_RULE)
    payload["hvp_cost"] = hvp
    payload["paired"] = paired_tests(payload["rows"], all_flags)
    payload["paper"] = {key: PAPER_TABLES[key] for key in config.table.paper}
    write_table(workdir, payload, f"{dataset.name}: {config.model.name}")
    if progress:
      print(f"== {label}: trained in {train_seconds:.1f} s ({epochs} epochs), attacks "
            f"{eval_seconds:.1f} s; {os.path.join(workdir, 'table.md')} updated", flush=True)
  if parallel.is_primary():
    plot_table(payload, workdir, f"{dataset.name}, {config.model.name}")
  if progress:
    print(table_markdown(payload, ""), flush=True)
  return payload


# ---------------------------------------------------------------------------------------------
# Per-example analysis: worst case, collapse, paired tests

WORST_CASE = "worst_case"
COLLAPSE_RULE = (f"collapsed: clean accuracy <= 1/K + {100 * stats.COLLAPSE_MARGIN:g} points "
                 "(krylov_adv.stats.collapse_check), or one predicted class for every test point")
# Within each row (per norm): (a, b) entry prefixes compared on the same points.
WITHIN_ROW_PAIRS = (("soae", "pgd"), ("soae", "autoattack"), ("second_order", "pgd"),
                    ("soae", EQUAL_COST))
# Across rows: each SOAT variant (rows whose method is soat) against this row, under these
# attacks.
ACROSS_ROWS_BASELINE = "pgd"
ACROSS_ROWS_ATTACKS = ("pgd", "autoattack")
# Significance level of the claims in table.md.
CLAIM_LEVEL = 0.01


def worst_case_entries(results: dict[str, dict], flags: dict[str, np.ndarray]
                       ) -> tuple[dict[str, dict], dict[str, np.ndarray]]:
  """One ``worst_case_<norm>`` entry per norm of ``results``: point ``i`` counts as robust only
  if it is correct under every entry of that norm, clean included (AutoAttack's rule, its
  issue #45; ``krylov_adv.stats.worst_case``, the AND of the ``(n,)`` bool flags).

  Returns ``({entry: record}, {entry: (n,) bool})``; a record holds ``label``, ``attack``
  (``"worst_case"``), ``norm``, ``eps``, ``accuracy``, ``ci95``, ``num_examples``,
  ``components`` (the entries ANDed) and zero ``seconds``."""
  records, out = {}, {}
  norms = []
  for entry, r in results.items():
    if r["attack"] != WORST_CASE and r["norm"] not in norms:
      norms.append(r["norm"])
  for norm in norms:
    parts = [e for e, r in results.items() if r["norm"] == norm and r["attack"] != WORST_CASE
             and e in flags]
    if not parts:
      continue
    f = stats.worst_case([flags[e] for e in parts])
    n = int(f.size)
    entry = f"{WORST_CASE}_{norm}"
    out[entry] = f
    records[entry] = dict(
        label="worst case", attack=WORST_CASE, norm=norm, eps=results[parts[0]]["eps"],
        accuracy=float(f.mean()) if n else 0.0, ci95=stats.ci95(int(f.sum()), n),
        num_examples=n, seconds=0.0, cost=None, diagnostics=None, components=parts,
        flags_digest=outputs.flags_digest(f))
  return records, out


def row_collapse(exp, state, cfg, n: int) -> dict:
  """:func:`krylov_adv.stats.collapse_check` of the row's model on the first ``n`` test points
  (clean predictions, one batched pass)."""
  logits_fn = training.inference_logits_fn(exp.model, state.params, state.batch_stats)
  x, y = exp.dataset.x_test[:n], exp.dataset.y_test[:n]
  pred = evaluation.predictions(logits_fn, x, batch_size=int(cfg.eval.batch_size),
                                mesh=pipeline.make_mesh(cfg))
  return stats.collapse_check(pred, y, int(cfg.data.num_classes))


def _pair(a_flags: np.ndarray, b_flags: np.ndarray, **where) -> dict:
  t = stats.mcnemar_exact(a_flags, b_flags)
  return dict(where, n=t["n"], only_a_robust=t["only_a"], only_b_robust=t["only_b"],
              p_value=t["p_value"], a_accuracy=float(np.mean(a_flags)),
              b_accuracy=float(np.mean(b_flags)))


def paired_tests(rows: dict[str, dict], flags: dict[str, dict[str, np.ndarray]]) -> list[dict]:
  """The exact two-sided McNemar tests (``krylov_adv.stats.mcnemar_exact``) of the table.

  Within each row and norm, attack against attack on the same points
  (:data:`WITHIN_ROW_PAIRS`: SOAE vs PGD-20, SOAE vs AutoAttack, S-O vs PGD-20, SOAE vs PGD at
  SOAE's cost): ``{"kind": "attacks", "row", "norm", "a", "b"}`` with ``a``/``b`` the entries.
  Across rows, each SOAT variant (a row whose ``method`` is ``soat``) against the PGD-AT row
  under PGD-20 and AutoAttack (:data:`ACROSS_ROWS_ATTACKS`), on the same points (same
  test-point digest and count): ``{"kind": "rows", "row": None, "entry", "norm", "a", "b"}``
  with ``a``/``b`` the row names. Each record adds ``n``, ``only_a_robust`` (points robust
  under ``a`` and not ``b``), ``only_b_robust``, ``p_value`` and both accuracies. A pair is
  left out when either side was not run.

  Args:
    rows: ``table.json``'s rows (their ``results`` and ``method``).
    flags: ``{row: {entry: (n,) bool}}``.
  """
  out = []
  for row, r in rows.items():
    f = flags.get(row, {})
    norms = sorted({res["norm"] for res in r["results"].values()},
                   key=lambda n: ("linf", "l2").index(n) if n in ("linf", "l2") else 2)
    for norm in norms:
      for a, b in WITHIN_ROW_PAIRS:
        ea, eb = f"{a}_{norm}", f"{b}_{norm}"
        if ea in f and eb in f:
          out.append(_pair(f[ea], f[eb], kind="attacks", row=row, norm=norm, a=ea, b=eb))
  base = rows.get(ACROSS_ROWS_BASELINE)
  if base is not None:
    for row, r in rows.items():
      if row == ACROSS_ROWS_BASELINE or r.get("method") != "soat":
        continue
      for entry in sorted(set(r["results"]) & set(base["results"])):
        ra, rb = r["results"][entry], base["results"][entry]
        if ra["attack"] not in ACROSS_ROWS_ATTACKS or entry.startswith(EQUAL_COST):
          continue
        fa, fb = flags.get(row, {}).get(entry), flags.get(ACROSS_ROWS_BASELINE, {}).get(entry)
        same_points = ((ra.get("setting") or {}).get("test_points")
                       == (rb.get("setting") or {}).get("test_points"))
        if fa is None or fb is None or fa.shape != fb.shape or not same_points:
          continue
        out.append(_pair(fa, fb, kind="rows", row=None, entry=entry, norm=ra["norm"], a=row,
                         b=ACROSS_ROWS_BASELINE))
  return out


def claims_markdown(payload: dict) -> str:
  """table.md's claims: one line per paired test (:func:`paired_tests`) with both robust
  accuracies, the discordant counts and the exact McNemar p-value; a difference is claimed only
  at ``p < 0.01``, else the line says "not distinguishable at 1%"."""
  rows = payload["rows"]
  lines = []
  for t in payload.get("paired", []):
    if t["kind"] == "attacks":
      r = rows[t["row"]]
      name = lambda e: _entry_label(r["results"], e)
      a, b = name(t["a"]), name(t["b"])
      where = f"{r['label']}, {_NORM_NAMES.get(t['norm'], t['norm'])}"
      better = "leaves more points robust than"   # the weaker attack
    else:
      a, b = rows[t["a"]]["label"], rows[t["b"]]["label"]
      where = (f"{_entry_label(rows[t['a']]['results'], t['entry'])}, "
               f"{_NORM_NAMES.get(t['norm'], t['norm'])}")
      better = "is more robust than"
    flag = " (collapsed row)" if any(rows.get(x, {}).get("collapsed", {}).get("collapsed")
                                     for x in (t.get("row"), t["a"], t["b"])) else ""
    stat = (f"{a} {_pct(t['a_accuracy'])}% vs {b} {_pct(t['b_accuracy'])}% (n = {t['n']}; "
            f"only {a}: {t['only_a_robust']}, only {b}: {t['only_b_robust']}; "
            f"p = {t['p_value']:.2g})")
    if t["p_value"] < CLAIM_LEVEL and t["a_accuracy"] != t["b_accuracy"]:
      hi, lo = (a, b) if t["a_accuracy"] > t["b_accuracy"] else (b, a)
      verdict = f"{hi} {better} {lo} at 1%"
    else:
      verdict = "not distinguishable at 1%"
    lines.append(f"- {where}{flag}: {stat}: {verdict}.")
  if not lines:
    return ""
  return ("\n## Claims (exact two-sided McNemar tests on the same points)\n\n"
          "Each line pairs two results point by point (`table.json[\"paired\"]`, flags in "
          "`<row>/robust_flags.npz`): only the points robust under one and not the other count. "
          "Between attacks, the one that leaves more points robust is the weaker attack; between "
          "rows, the model. A difference is claimed at p < 0.01 only.\n\n" + "\n".join(lines)
          + "\n")


# ---------------------------------------------------------------------------------------------
# The files


def _pct(v) -> str:
  return "-" if v is None else f"{100 * v:.1f}"


_NORM_NAMES = {"linf": "Linf", "l2": "L2"}


def _cell(res: dict) -> str:
  """``49.0 (39.4-58.7)``: accuracy and 95% Wilson interval in percent."""
  ci = res.get("ci95") or outputs.result_interval(res["accuracy"], res["num_examples"])
  return outputs.interval_text(res["accuracy"], ci)


def _entry_label(results: dict, entry: str) -> str:
  """How table.md names an entry: ``PGD-20``, ``AutoAttack``, ``ASOD (S-O)``, ``PGD at SOAE's
  cost (43 steps)``."""
  res = results.get(entry)
  if res is None:
    return entry
  if entry.startswith(EQUAL_COST):
    return f"PGD at SOAE's cost ({res['setting']['steps']} steps)"
  return COLUMN_LABELS.get(res["attack"], res["label"])


def _row_label(r: dict) -> str:
  return r["label"] + (" [collapsed]" if r.get("collapsed", {}).get("collapsed") else "")


def _norm_columns(rows: dict, norm: str) -> list[str]:
  """The entries of one norm present in any row, in the paper's column order."""
  entries: list[tuple[int, str]] = []
  for r in rows.values():
    for entry, res in r["results"].items():
      if res["norm"] != norm or entry.startswith(EQUAL_COST) or res["attack"] == WORST_CASE:
        continue
      rank = COLUMN_ORDER.index(res["attack"]) if res["attack"] in COLUMN_ORDER else 99
      if (rank, entry) not in entries:
        entries.append((rank, entry))
  return [e for _, e in sorted(entries)]


def _column_label(rows: dict, entry: str) -> str:
  for r in rows.values():
    if entry in r["results"]:
      res = r["results"][entry]
      return COLUMN_LABELS.get(res["attack"], res["label"])
  return entry


def accuracy_table(payload: dict, norm: str) -> str:
  """Our robust accuracy (%) for one norm with its 95% Wilson interval, ``49.0 (39.4-58.7)``:
  rows = training methods (``[collapsed]`` after a collapsed row's name), columns = attacks in
  the paper's order, then PGD at SOAE's cost (its steps in brackets) and the worst case over
  every attack of the norm."""
  rows = payload["rows"]
  entries = _norm_columns(rows, norm)
  eq = f"{EQUAL_COST}_{norm}"
  worst = f"{WORST_CASE}_{norm}"
  has_eq = any(eq in r["results"] for r in rows.values())
  has_worst = any(worst in r["results"] for r in rows.values())
  header = ["training"] + [_column_label(rows, e) for e in entries]
  if has_eq:
    header.append("PGD at SOAE's cost (steps)")
  if has_worst:
    header.append("worst case")
  body = []
  for r in rows.values():
    res = r["results"]
    line = [_row_label(r)] + [_cell(res[e]) if e in res else "-" for e in entries]
    if has_eq:
      line.append(f"{_cell(res[eq])} ({res[eq]['setting']['steps']})" if eq in res else "-")
    if has_worst:
      line.append(_cell(res[worst]) if worst in res else "-")
    body.append(line)
  return outputs.markdown_table(header, body)


def paper_table(paper: dict, row_names: list[str]) -> str:
  """The paper's numbers (%) for our rows (``-`` for rows the paper does not have)."""
  columns = [c for c in COLUMN_ORDER if any(c in v for v in paper["rows"].values())]
  names = {"clean": "clean", "fgsm": "FGSM", "pgd": "PGD-20", "soae": "SOAE",
           "autoattack": "AutoAttack", **COLUMN_LABELS}
  header = [paper["title"]] + [names[c] for c in columns]
  body = []
  for row in row_names:
    v = paper["rows"].get(row)
    # The paper's SOAT is its own (forward-difference HVP), not our exact-HVP default.
    label = "SOAT (the paper's)" if row == "soat" else ROW_LABELS.get(row, row)
    body.append([label] + [f"{v[c]:.2f}" if v and c in v else "-" for c in columns])
  return outputs.markdown_table(header, body)


def cost_table(payload: dict) -> str:
  """Per row: SOAE's cost per norm counted by construction (gradients + HVPs, from its
  diagnostics, and the gradient-equivalents they make at the table's one HVP cost, with the
  Krylov dimension mean/max), then the wall times, labelled as such (they depend on the
  machine's load: the row's :func:`row_load_average` is the last column)."""
  rows = payload["rows"]
  c = float(payload["hvp_cost"]["hvp_cost"])
  norms = [n for n in ("linf", "l2") if any(res["norm"] == n for r in rows.values()
                                            for res in r["results"].values())]
  header = ["training"]
  header += [f"SOAE {_NORM_NAMES.get(n, n)}: gradients + HVPs = grad-eq. (Krylov mean/max)"
             for n in norms]
  header += ["wall s: training (s/epoch)", "wall s: attacks"]
  header += [f"wall s: AutoAttack {_NORM_NAMES.get(n, n)}" for n in norms]
  header += ["load average (1 min)"]
  body = []
  for r in rows.values():
    t = r["train"]
    line = [_row_label(r)]
    for n in norms:
      soae = [res for res in r["results"].values() if res["attack"] == "soae"
              and res["norm"] == n]
      counts = soae[0].get("cost_counts") if soae else None
      if counts:
        line.append(f"{counts['gradients']:g} + {counts['products']:.1f} x {c:.2f} = "
                    f"{counts['gradients'] + c * counts['products']:.1f} "
                    f"({counts['krylov_dim_mean']:.1f}/{counts['krylov_dim_max']})")
      elif soae and soae[0]["cost"] is not None:
        d = soae[0]["diagnostics"] or {}
        line.append(f"{soae[0]['cost']:.1f} ({d.get('krylov_dim_mean', float('nan')):.1f}/"
                    f"{d.get('krylov_dim_max', '-')})")
      else:
        line.append("-")
    per = "-" if t["seconds_per_epoch"] is None else f"{t['seconds_per_epoch']:.1f}"
    line += [f"{t['seconds']:.0f} ({per})", f"{r['eval_seconds']:.0f}"]
    for n in norms:
      aa = [res for res in r["results"].values() if res["attack"] == "autoattack"
            and res["norm"] == n]
      line.append(f"{aa[0]['seconds']:.0f}" if aa else "-")
    load = r.get("load_average")
    line.append(f"{load[0]:.1f}" if load else "-")
    body.append(line)
  return outputs.markdown_table(header, body)


def _fixed_costs(payload: dict) -> str:
  seen = {}
  for r in payload["rows"].values():
    for res in r["results"].values():
      if res["attack"] in ("fgsm", "pgd", "second_order") and res["cost"] is not None and \
          not res["setting"].get("label", "").startswith("PGD at"):
        seen.setdefault(res["label"], res["cost"])
  return ", ".join(f"{k} {v:g}" for k, v in seen.items())


def table_markdown(payload: dict, title: str) -> str:
  """``table.md``: header, our table per norm (with 95% intervals, the worst case and the
  collapsed rows marked), the claims of the paired tests, the paper's numbers beside, costs
  counted by construction and wall times."""
  rows = payload["rows"]
  first = next(iter(rows.values()))
  eps = {res["norm"]: res["eps"] for res in first["results"].values()}
  hvp = payload["hvp_cost"]
  names = _NORM_NAMES
  parts = [f"# Table I matrix: {title}\n" if title else "",
           outputs.metadata_markdown(payload["metadata"]) if payload.get("metadata") else "",
           "Robust accuracy (%, higher is better) on our data and model, each with its 95% "
           "Wilson interval in brackets (`ci95` in table.json); 'worst case' counts a point as "
           "robust only if it is correct under every attack of the norm, clean included. The "
           "paper's numbers below are for ITS datasets and models (MNIST / CIFAR-10 / "
           "ImageNet-100, ResNet-18 and WideResNet, Linf 8/255, 300 epochs), not for this run: "
           "they sit beside ours for the ranking, not for the values.\n"]
  collapsed = [r for r in rows.values() if r.get("collapsed", {}).get("collapsed")]
  rule = payload.get("metadata", {}).get("collapse_rule", COLLAPSE_RULE)
  parts.append(f"Rows marked [collapsed] ({rule}): "
               + ("; ".join(f"{r['label']}: {', '.join(r['collapsed']['reasons'])}"
                            for r in collapsed) if collapsed else "none") + ".\n")
  for norm in ("linf", "l2"):
    if norm in eps:
      parts.append(f"\n## Ours: {names[norm]} eps={eps[norm]:g}\n\n"
                   + accuracy_table(payload, norm))
  parts.append(claims_markdown(payload))
  for key, paper in payload.get("paper", {}).items():
    parts.append(f"\n## {paper['title']}: the paper's numbers, Linf 8/255 (not ours)\n\n"
                 + paper_table(paper, list(rows)))
  machine = payload.get("metadata", {}).get("machine", {})
  load = machine.get("load_average")
  parts.append(
      "\n## Cost\n\nCounted by construction, per example (experiments.costs): input gradients "
      "and Hessian-vector products, which do not depend on the machine; gradient-equivalents "
      f"count one exact HVP as {hvp['hvp_cost']:.2f} gradients, this table's one measured "
      f"ratio (hvp_cost.json: {hvp['source']}). {_fixed_costs(payload)}; "
      "SOAE: per batch, each outer iteration pays a gradient plus (slowest example's Krylov "
      "dimension + 1 + Newton's H g) products; AutoAttack stops on fooled points, so only its "
      "wall time is given. 'PGD at SOAE's cost' runs round(SOAE's cost) PGD steps of "
      "2.5 eps / steps from a random start. Wall times (labelled 'wall s') are on this machine, "
      "compilation included, and grow with its load"
      + (f": load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min) on "
         f"{machine.get('cpus')} CPUs when this file was written, each row's highest at the "
         "end of its attacks in the last column" if load else "") + ".\n\n"
      + cost_table(payload))
  return "\n".join(p for p in parts if p)


def plot_table(payload: dict, out_dir: str, title: str = "") -> str:
  """``table.png``: robust accuracy (%) per row (training method, x axis) under each attack
  (one bar per attack, ``clean`` = no attack), one panel per norm, the figure titled with
  ``title`` (e.g. ``"digits: tiny_cnn"``) and one legend beside the panels
  (``outputs.finish_figure``; constrained layout leaves no gap around it). Returns the file
  name."""
  rows = payload["rows"]
  norms = [n for n in ("linf", "l2") if _norm_columns(rows, n)]
  fig, axes = outputs.figure(1, len(norms), panel_size=(max(4.0, 0.55 * len(rows) + 1.5), 3.8))
  for ax, norm in zip(axes[0], norms):
    entries = _norm_columns(rows, norm) + [f"{EQUAL_COST}_{norm}"]
    width = 0.8 / len(entries)
    for j, entry in enumerate(entries):
      vals = [100 * r["results"][entry]["accuracy"] if entry in r["results"] else np.nan
              for r in rows.values()]
      name = ("PGD at SOAE's cost" if entry.startswith(EQUAL_COST)
              else _column_label(rows, entry))
      ax.bar(np.arange(len(rows)) + j * width, vals, width, label=name)
    ax.set_xticks(np.arange(len(rows)) + 0.4 - width / 2)
    ax.set_xticklabels([r["label"] for r in rows.values()], rotation=35, ha="right",
                       fontsize=7)
    eps = next(res["eps"] for r in rows.values() for res in r["results"].values()
               if res["norm"] == norm)
    ax.set_title(f"attacks in {outputs.threat_text(norm, eps)}", fontsize=9)
    ax.set_ylabel("robust accuracy (%)")
    ax.set_xlabel("training method")
    ax.set_ylim(0, 100)
  # One legend beside the panels (inside, it would hide bars).
  outputs.finish_figure(fig, "Robust accuracy (%) per training method and attack "
                        "(clean = no attack; higher = more robust)"
                        + (f": {title}" if title else ""))
  return outputs.save_figure(fig, os.path.join(out_dir, "table.png"))


def write_table(workdir: str, payload: dict, title: str) -> str:
  """Writes ``table.json`` and ``table.md`` (process 0); returns the markdown."""
  md = table_markdown(payload, title)
  outputs.write_results(workdir, payload, md, json_name="table.json", markdown_name="table.md")
  return md


if __name__ == "__main__":
  cli.main(run_table, "folder for every row's checkpoints and the table")
