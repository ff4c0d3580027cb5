"""One job: turn results into files — JSON, PNG figures, markdown tables — written by process 0.

Every entry point writes through :func:`write_results` (one JSON file plus one markdown file)
and renders tables with :func:`markdown_table`; the robust-accuracy table of ``experiments.soat``
and ``experiments.evaluate`` is :func:`robustness_table`, built on it.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from krylov_adv import parallel
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
  """
  path = os.path.join(out_dir, json_name)
  if not parallel.is_primary():
    return path
  payload = to_jsonable(results)
  if config is not None:
    payload = {"config": json.loads(config.to_json()), "results": payload}
  with open(path, "w") as f:
    json.dump(payload, f, indent=2)
  with open(os.path.join(out_dir, markdown_name), "w") as f:
    f.write(markdown)
  return path


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
  """Saves ``fig`` as ``path`` (process 0 only) and closes it; returns the file name."""
  if parallel.is_primary():
    if fig.get_layout_engine() is None:
      fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
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


# Row order of the papers' tables; attacks not listed follow in order of appearance.
ROW_ORDER = ("clean", "fgsm", "pgd", "second_order", "soae", "autoattack")
_NORM_ORDER = {"linf": 0, "l2": 1}


def robustness_table(results_by_model: Mapping[str, Sequence[AttackResult]]) -> str:
  """The papers' table: rows are attack labels, columns ``<model> <norm> eps=...``.

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
  body = [[label] + [f"{100 * cells[(label, c)]:.2f}%" if (label, c) in cells else "-"
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
