"""One job: turn results into files — JSON, PNG figures, markdown tables — written by process 0.

Every entry point writes through :func:`write_results` (one JSON file plus one markdown file)
and renders tables with :func:`markdown_table`; the robust-accuracy table of ``experiments.soat``
and ``experiments.evaluate`` is :func:`robustness_table`, built on it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from experiments import workdir as workdir_lib
from krylov_adv import krylov, parallel, stats
from krylov_adv.evaluation import AttackResult


def to_jsonable(obj):
  """NumPy / JAX scalars and arrays to plain Python. Non-finite floats are kept (``json`` writes
  ``NaN`` / ``Infinity``, which Python reads back), so nothing is silently hidden."""
  if isinstance(obj, dict):
    return {str(k): to_jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [to_jsonable(v) for v in obj]
  if isinstance(obj, (np.ndarray, jax.Array)):
    return to_jsonable(np.asarray(obj).tolist())
  if isinstance(obj, np.generic):
    return obj.item()
  return obj


def output_dir(workdir: str, name: str) -> str:
  """``workdir/name``, created by process 0 (the only one that writes there)."""
  path = os.path.join(workdir, name)
  if parallel.is_primary():
    os.makedirs(path, exist_ok=True)
  return path


def write_results(out_dir: str, results: Any, markdown: str, *, config=None,
                  json_name: str = "results.json", markdown_name: str = "report.md") -> str:
  """Writes ``out_dir/json_name`` and ``out_dir/markdown_name`` on process 0; returns the JSON
  path.

  The JSON holds ``results`` (made plain by :func:`to_jsonable`), or ``{"config", "results"}``
  when ``config`` (a ``ConfigDict``) is given, so that a results file says what produced it.
  Each file is written atomically (``experiments.workdir.atomic_write_text``: a temporary file
  in ``out_dir``, then a rename), so a full disk or a kill leaves the previous file whole, and a
  symlink planted under either name is replaced, never written through.
  """
  path = os.path.join(out_dir, json_name)
  if not parallel.is_primary():
    return path
  payload = to_jsonable(results)
  if config is not None:
    payload = {"config": json.loads(config.to_json()), "results": payload}
  workdir_lib.atomic_write_text(path, json.dumps(payload, indent=2))
  workdir_lib.atomic_write_text(os.path.join(out_dir, markdown_name), markdown)
  return path


# ---------------------------------------------------------------------------------------------
# Per-example results: one boolean per test point and results entry


FLAGS_FILE = "robust_flags.npz"
# The key of the test-point indices in a flags file (no results entry has this name).
INDICES_KEY = "indices"


def flags_digest(flags: np.ndarray) -> str:
  """sha256 (first 16 hex digits) of one entry's ``(n,)`` bool flags: a results record stores
  it, so that flags and record are reused together or not at all."""
  flags = np.asarray(flags, bool).reshape(-1)
  return hashlib.sha256(np.packbits(flags).tobytes() + str(flags.size).encode()).hexdigest()[:16]


def write_flags(path: str, flags: Mapping[str, np.ndarray], indices: np.ndarray) -> None:
  """Writes ``{entry: (n,) bool}`` and the ``(n,)`` int64 test-point ``indices`` they refer to
  (key :data:`INDICES_KEY`) as one ``.npz`` (process 0 only), atomically
  (``experiments.workdir.atomic_write_bytes``): a run killed mid-write leaves the old file."""
  if not parallel.is_primary():
    return
  indices = np.asarray(indices, np.int64).reshape(-1)
  arrays = {INDICES_KEY: indices}
  for entry, f in flags.items():
    if entry == INDICES_KEY:
      raise ValueError(f"a results entry may not be called {INDICES_KEY!r}")
    f = np.asarray(f, bool).reshape(-1)
    if f.shape != indices.shape:
      raise ValueError(f"flags of {entry!r} have {f.size} points, the indices {indices.size}")
    arrays[entry] = f
  buf = io.BytesIO()
  np.savez_compressed(buf, **arrays)
  workdir_lib.atomic_write_bytes(path, buf.getvalue())


def read_flags(path: str) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
  """``({entry: (n,) bool}, (n,) int64 indices)`` from :func:`write_flags`'s file;
  ``({}, None)`` when it is missing or unreadable."""
  try:
    with np.load(path) as z:
      arrays = {k: np.asarray(z[k]) for k in z.files}
  except (OSError, ValueError, EOFError):
    return {}, None
  indices = arrays.pop(INDICES_KEY, None)
  return {k: v.astype(bool) for k, v in arrays.items()}, indices


def interval_text(accuracy: float, ci95: Sequence[float] | None, digits: int = 1) -> str:
  """``49.0 (39.4-58.7)``: an accuracy and its 95% interval in percent (just the accuracy when
  ``ci95`` is ``None``)."""
  text = f"{100 * accuracy:.{digits}f}"
  if ci95 is None:
    return text
  return f"{text} ({100 * ci95[0]:.{digits}f}-{100 * ci95[1]:.{digits}f})"


def result_interval(accuracy: float, num_examples: int) -> list[float]:
  """``ci95`` of a result from its accuracy and size (:func:`krylov_adv.stats.ci95` of
  ``round(accuracy * n)`` successes in ``n``)."""
  n = int(num_examples)
  return stats.ci95(int(round(float(accuracy) * n)), n)


def pyplot():
  """matplotlib's pyplot on the non-interactive Agg backend (no display needed)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


# ---------------------------------------------------------------------------------------------
# Figures: every analysis figure is made by :func:`figure`, its lines styled by
# :func:`series_style`, and finished by :func:`finish_figure` (title, one legend outside).

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
VARIANT_LINESTYLES = ("-", "--", ":", "-.")


def figure(nrows: int = 1, ncols: int = 1, *, panel_size=(4.6, 3.4)):
  """``(fig, axes)``: a grid of ``nrows x ncols`` panels (``axes`` always 2-D) with matplotlib's
  constrained layout, which keeps room for the title and for a legend outside the panels."""
  plt = pyplot()
  return plt.subplots(nrows, ncols, figsize=(panel_size[0] * ncols, panel_size[1] * nrows),
                      squeeze=False, layout="constrained")


def series_style(index: int, variant: int = 0) -> dict:
  """Line keywords for series ``index``: its own colour and marker, so that series stay apart
  in colour and still visible where they overlap. ``variant`` separates two statistics of one
  series (e.g. 0 = mean, 1 = max): same colour and marker, solid with filled markers vs dashed
  with hollow, slightly larger markers, so a variant drawn on top leaves the other visible."""
  # Later series are drawn thinner and with smaller markers, on top of earlier ones: where two
  # series coincide both colours and both markers still show.
  style = dict(color=f"C{index % 10}", marker=MARKERS[index % len(MARKERS)],
               ls=VARIANT_LINESTYLES[variant % len(VARIANT_LINESTYLES)],
               lw=max(3.0 - 0.8 * index, 1.0), markersize=max(10.0 - 2.5 * index, 4.0) +
               4 * min(variant, 1), zorder=2 + 0.1 * index + 0.05 * min(variant, 1))
  if variant:
    # A ring around the filled marker of variant 0: visible even where the two coincide.
    style.update(markerfacecolor="none", markeredgewidth=1.5)
  return style


def plain_log_ticks(axis) -> None:
  """Plain numbers (``2``, ``10``, ``20``) instead of ``2 x 10^0`` on a log ``axis``
  (``ax.xaxis`` or ``ax.yaxis``)."""
  from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
  axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
  axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
  axis.set_minor_formatter(NullFormatter())


def variant_handles(names: Sequence[str]) -> list:
  """Legend entries (grey) that explain :func:`series_style`'s variants: ``names[i]`` for
  variant ``i`` (e.g. ``("mean", "max")``)."""
  from matplotlib.lines import Line2D
  return [Line2D([], [], label=name, **dict(series_style(0, i), color="0.35"))
          for i, name in enumerate(names)]


def finish_figure(fig, title: str, *, extra_handles: Sequence = (), legend: bool = True,
                  ncols: int = 1):
  """Gives ``fig`` its title and one legend outside every panel (to the right of the figure's
  panels, vertically centred): the labelled lines of all panels, each label once, then ``extra_handles`` (e.g.
  :func:`variant_handles`). Returns the legend (``None`` when there is nothing to show)."""
  import textwrap
  # Wrapped to the figure's width; the legend sits beside the panels' middle, clear of it.
  fig.suptitle(textwrap.fill(title, width=max(36, int(9.5 * fig.get_figwidth()))), fontsize=11)
  handles, labels = [], []
  for ax in fig.axes:
    for h, lbl in zip(*ax.get_legend_handles_labels()):
      if lbl not in labels and not lbl.startswith("_"):
        handles.append(h)
        labels.append(lbl)
  for h in extra_handles:
    handles.append(h)
    labels.append(h.get_label())
  if not legend or not handles:
    return None
  return fig.legend(handles, labels, loc="outside right center", fontsize=8, ncols=ncols,
                    frameon=False)


def save_figure(fig, path: str) -> str:
  """Saves ``fig`` as ``path`` (process 0 only) and closes it; returns the file name. Written
  through a temporary file in the same folder and renamed, like :func:`write_results`."""
  if parallel.is_primary():
    if fig.get_layout_engine() is None:
      fig.tight_layout()
    ext = os.path.splitext(path)[1][1:] or "png"
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)),
                               prefix=f".{os.path.basename(path)}.", suffix=f".{ext}")
    os.close(fd)
    try:
      fig.savefig(tmp, format=ext, dpi=110, bbox_inches="tight")
      os.chmod(tmp, 0o644)
      os.replace(tmp, path)
    except BaseException:
      if os.path.exists(tmp):
        os.unlink(tmp)
      raise
  pyplot().close(fig)
  return os.path.basename(path)


def save_figures(figures: Mapping[str, Any], out_dir: str) -> list[str]:
  """:func:`save_figure` for each ``{file name: figure}``; returns the file names."""
  return [save_figure(fig, os.path.join(out_dir, name)) for name, fig in figures.items()]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A markdown table; floats printed with 4 significant digits, everything else with ``str``."""
  def cell(v):
    if isinstance(v, float):
      return f"{v:.4g}"
    return str(v)
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
  return "\n".join(lines) + "\n"


def _eps_text(eps: float) -> str:
  """``8/255`` for budgets that are small multiples of 1/255 (CIFAR style), ``0.3`` otherwise."""
  k = eps * 255
  if 0 < eps < 0.2 and abs(k - round(k)) < 1e-6:
    return f"{round(k)}/255"
  return f"{eps:g}"


def threat_text(norm: str, eps: float) -> str:
  """``Linf eps=0.1``, ``L2 eps=1``, ``Linf eps=8/255``: a threat model as headers and progress
  lines name it."""
  return f"{_NORM_NAMES.get(norm, norm)} eps={_eps_text(eps)}"


def training_text(training: Mapping[str, Any]) -> str:
  """What a model was trained against, from one method's entry of
  ``experiments.pipeline.run_metadata``'s ``training``: ``trained Linf eps=0.1`` (its threat
  model), ``trained Linf eps=8/255 + L2 eps=0.5`` (``mixed``: both), or ``no adversarial
  training`` (``standard``, the undefended baseline)."""
  tm = training.get("threat_model")
  if tm:
    return f"trained {threat_text(tm['norm'], tm['eps'])}"
  h = training.get("hyperparameters") or {}
  if "eps_linf" in h and "eps_l2" in h:  # mixed
    return f"trained {threat_text('linf', h['eps_linf'])} + {threat_text('l2', h['eps_l2'])}"
  return "no adversarial training"


# Row order of the papers' tables; attacks not listed follow in order of appearance.
ROW_ORDER = ("clean", "fgsm", "pgd", "second_order", "soae", "autoattack")
_NORM_ORDER = {"linf": 0, "l2": 1}


def robustness_table(results_by_model: Mapping[str, Sequence[AttackResult]],
                     trained: Mapping[str, str] | None = None) -> str:
  """The papers' table: rows are attack labels, one column per model and attack threat model.

  A column names the model, what it was trained against (``trained[model]``, e.g.
  :func:`training_text`), and the threat model the row's attack ran in, kept apart:
  ``soat (trained Linf eps=0.1) / attack L2 eps=1``. Without ``trained`` the column is
  ``soat / attack L2 eps=1`` (just ``attack L2 eps=1`` for a single model). Rows follow
  ``ROW_ORDER`` (clean, FGSM, PGD, S-O, SOAE, AutoAttack), columns Linf before L2. Cells are
  accuracies in percent with their 95% Wilson interval (``72.04% (58.3-82.6)``,
  :func:`result_interval`); ``-`` where an attack was not run for that threat model.
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
      cells[(r.label, col)] = (r.accuracy, r.num_examples)
  model_rank = {m: i for i, m in enumerate(results_by_model)}
  columns.sort(key=lambda c: (model_rank[c[0]], _NORM_ORDER.get(c[1], 2), c[2]))
  rows.sort()
  single = len(results_by_model) == 1
  trained = trained or {}

  def model_text(m):
    if m in trained:
      return f"{m} ({trained[m]}) / "
    return "" if single else f"{m} / "

  heads = [f"{model_text(m)}attack {threat_text(n, e)}" for m, n, e in columns]

  def cell(acc, n):
    lo, hi = result_interval(acc, n)
    return f"{100 * acc:.2f}% ({100 * lo:.1f}-{100 * hi:.1f})"

  body = [[label] + [cell(*cells[(label, c)]) if (label, c) in cells else "-"
                     for c in columns] for _, _, label in rows]
  return markdown_table(["attack"] + heads, body)


def write_analysis(out_dir: str, config, results: dict, markdown: str, *,
                   progress: bool = True) -> str:
  """An analysis' files: ``results.json`` (with its config) and ``report.md`` through
  :func:`write_results`; prints ``results["conclusions"]`` when there are any and ``progress``
  is set. Returns the JSON path."""
  path = write_results(out_dir, results, markdown, config=config)
  if progress and results.get("conclusions"):
    print("\n".join(results["conclusions"]), flush=True)
  return path


# ---------------------------------------------------------------------------------------------
# The header above a robustness table and the diagnostics under it


_NORM_NAMES = {"linf": "Linf", "l2": "L2"}
# krylov_adv.data's sources, as the header names them.
_SOURCES = {"digits": "scikit-learn's bundled 8x8 digits", "synthetic": "synthetic images",
            "tfds": "tensorflow-datasets", "idx": "IDX files", "cifar10_python":
            "CIFAR-10 python batches"}


def _num(v) -> str:
  """A hyperparameter for prose: floats with 4 significant digits, the rest with ``str``."""
  if isinstance(v, float):
    return f"{v:.4g}"
  return str(v)


def _kwargs_text(d: Mapping[str, Any]) -> str:
  return ", ".join(f"{k}={_num(v)}" for k, v in d.items())


def attack_settings_text(name: str, s: Mapping[str, Any]) -> str:
  """One sentence on what an attack with settings ``s`` (its full keyword arguments) does."""
  if name == "clean":
    return "no attack (clean accuracy)"
  if name == "fgsm":
    return (f"one gradient step of size {_num(s['step_size'])} (sign of the gradient for Linf, "
            f"unit L2 gradient for L2)")
  if name == "pgd":
    return (f"PGD (Madry et al.): {s['steps']} steps of size {_num(s['step_size'])}, "
            f"{'random start, ' if s.get('random_start') else ''}{s.get('restarts', 1)} "
            f"restart(s), {s.get('loss', 'ce')} loss")
  if name == "second_order":
    return (f"the S-O attack (paper 004, Li et al.'s second-order attack): PGD whose gradient "
            f"is averaged over {s['samples']} Gaussian-perturbed inputs (sigma="
            f"{_num(s['sigma'])}), {s['steps']} steps of size {_num(s['step_size'])}")
  if name == "soae":
    return (f"SOAE (paper 000, Algorithm 1): N={s['steps']} Krylov-Newton steps (GMRES on "
            f"H d = g, at most m={s['m']} Krylov vectors, tau={_num(s['tau'])}, HVP "
            f"{s['hvp']}{'' if str(s['hvp']).startswith('exact') else ' eta=' + _num(s['eta'])}"
            f"), total distance alpha={_num(s['alpha'])}, {s.get('step')} steps")
  if name == "autoattack":
    extra = {k: v for k, v in s.items() if k != "version" and v is not None}
    return (f"AutoAttack (Croce and Hein 2020), version {s['version']}"
            + (f" ({_kwargs_text(extra)})" if extra else ""))
  return f"{name}: {_kwargs_text(s)}"


def metadata_markdown(meta: Mapping[str, Any]) -> str:
  """The header of a results file from ``experiments.pipeline.run_metadata``: model, data,
  each method's training, the test points, each attack's settings, the code version."""
  m, d, ev = meta["model"], meta["data"], meta["evaluation"]
  opts = f", {_kwargs_text(m['options'])}" if m["options"] else ""
  lines = [f"- **Model**: {m['name']} ({m['activation']}{opts}), {m['parameters']:,} parameters",
           f"- **Data**: {d['name']} ({_SOURCES.get(d['source'], d['source'])}"
           f"{' in ' + d['root'] if d.get('root') else ''}), {d['train_examples']} training / "
           f"{d['test_examples']} test images{', crop+flip' if d['augment'] else ''}",
           "- **Training**:"]
  for method, t in meta["training"].items():
    tm = t.get("threat_model")
    threat = (f"{_NORM_NAMES.get(tm['norm'], tm['norm'])} eps={_num(tm['eps'])}, "
              if tm else "")
    hyper = f" ({_kwargs_text(t['hyperparameters'])})" if t.get("hyperparameters") else ""
    o = t["optimizer"]
    lines.append(
        f"  - `{method}`: {threat}{t.get('attack', method)}{hyper}; {t['epochs']} epochs, batch "
        f"{t['batch_size']}, SGD lr {_num(o['learning_rate'])} ({o['lr_schedule']}), momentum "
        f"{_num(o['momentum'])}, weight decay {_num(o['weight_decay'])}; trained in "
        f"{t['seconds']:.1f} s over {t['epochs_recorded']} recorded epochs"
        + (f"; checkpoint {t['checkpoint']['step']} (sha256 "
           f"{(t['checkpoint']['checksum'] or 'unknown')[:16]})" if t.get("checkpoint") else ""))
  lines.append(f"- **Evaluation** (`{ev['suite']}`): the first {ev['test_points']} test points, "
               f"batches of {ev['batch_size']}, attack seed {ev['seed']}; attacks:")
  seen = set()
  for a in sorted(ev["attacks"].values(), key=lambda a: (
      ROW_ORDER.index(a["name"]) if a["name"] in ROW_ORDER else len(ROW_ORDER),
      _NORM_ORDER.get(a["norm"], 2))):
    text = attack_settings_text(a["name"], a["settings"])
    key = (a["label"], a["norm"], text)
    if key in seen:
      continue
    seen.add(key)
    lines.append(f"  - {a['label']}, {_NORM_NAMES.get(a['norm'], a['norm'])} "
                 f"eps={_num(a['eps'])}: {text}")
  lines.append(f"- **Code**: {'git ' + meta['code_version'] if meta.get('code_version') else 'unknown (no git checkout)'}")
  return "\n".join(lines) + "\n\n"


# One column per GMRES exit code, in krylov.Status order (read from the enum so it cannot drift).
_STATUS_COLUMNS = tuple(s.name for s in krylov.Status)


def diagnostics_markdown(diagnostics: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
  """The attacks' diagnostics under the table (``evaluation.summarize_reports`` per result):
  SOAE's Krylov dimension, fallback and convergence rates and the count of solves per GMRES
  exit status (``-`` for a summary written before ``status_counts`` existed); AutoAttack's
  accuracy after each component. Empty when no attack reported any."""
  soae_rows, aa_rows = [], []
  single = len(diagnostics) == 1
  for method, rows in diagnostics.items():
    for r in sorted(rows, key=lambda r: (_NORM_ORDER.get(r["norm"], 2), r["eps"])):
      where = ("" if single else f"{method} / ") + f"attack {threat_text(r['norm'], r['eps'])}"
      if "krylov_dim_mean" in r:
        counts = r.get("status_counts", {})
        soae_rows.append([where, f"{r['krylov_dim_mean']:.2f}", r["krylov_dim_max"],
                          f"{100 * r['fallback_rate']:.1f}%", f"{100 * r['converged_rate']:.1f}%",
                          r["solves"]] + [counts.get(name, "-") for name in _STATUS_COLUMNS])
      elif "components" in r:
        aa_rows.append((where, r))
  out = ""
  if soae_rows:
    out += ("\nSOAE diagnostics (per GMRES solve, over examples and outer iterations): Krylov "
            "dimension reached (mean, max), share of solves whose Newton direction was replaced "
            "by the gradient (fallback), share meeting tau (converged), and the number of "
            "solves per GMRES exit status (`krylov.Status`: CONVERGED meets tau, MAX_DIM_REACHED "
            "used all m Krylov steps, BREAKDOWN stopped early without meeting tau, NONFINITE saw "
            "NaN/inf).\n\n"
            + markdown_table(["model / attack", "Krylov dim mean", "max", "fallback",
                              "converged", "solves"] + list(_STATUS_COLUMNS), soae_rows))
  if aa_rows:
    comps = list(aa_rows[0][1]["components"])
    same = all(list(r["components"]) == comps for _, r in aa_rows)
    body = [[where] + [f"{100 * r['clean_accuracy']:.2f}%"]
            + [f"{100 * a:.2f}%" for a in r["accuracy_after"]] for where, r in aa_rows]
    if same:
      out += ("\nAutoAttack: robust accuracy after each component (cumulative, each one runs on "
              "the points still robust)" + (" (approximate: the last batch was padded)" if any(
                  r.get("padded") for _, r in aa_rows) else "") + ".\n\n"
              + markdown_table(["model / attack", "clean"] + [f"+{c}" for c in comps], body))
    else:
      out += "\nAutoAttack: robust accuracy after each component.\n\n" + "".join(
          f"- {where}: " + ", ".join(f"{c} {100 * a:.2f}%" for c, a in
                                     zip(r["components"], r["accuracy_after"])) + "\n"
          for where, r in aa_rows)
  return out
