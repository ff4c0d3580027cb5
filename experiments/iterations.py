"""Robust accuracy against the number of iterations N for SOAE and PGD (SOAE paper Fig. 3).

  python -m experiments.iterations --config configs/iterations.py --workdir /tmp/analysis
  python -m experiments.iterations --config configs/iterations.py:paper --workdir DIR

For every N of the sweep, SOAE with N outer iterations (Algorithm 1: each step is alpha / N, so
a run with N iterations is a different attack for each N, not a prefix of a longer one) and PGD
with N steps are run from scratch on the same test points, on a standard and a PGD-trained
model. Each attack's wall time is recorded next to its accuracy, since one SOAE iteration costs
one gradient plus up to m + 2 HVPs (step 3's ``H g``, m Krylov steps, the true residual).
"""

from __future__ import annotations

import functools
import os
import time

import jax

from experiments import cli, datasets, outputs, trained_models
from krylov_adv import attacks, evaluation

NAME = "iterations"


def sweep(config, dataset, models_by_method) -> list[dict]:
  e = config.experiment
  x, y = datasets.first_examples(dataset, e.num_examples)
  rows = []
  for method, model in models_by_method.items():
    for label, acfg in e.attacks.items():
      c = dict(acfg.to_dict())
      name = c.pop("name")
      steps_field = c.pop("steps_field")
      if name not in attacks.available():
        rows.append(dict(model=method, attack=label, skipped=f"attack {name!r} not registered"))
        continue
      for n in e.iterations:
        kw = dict(c)
        kw[steps_field] = int(n)
        attack = functools.partial(attacks.get(name), eps=float(e.eps), norm=e.norm, **kw)
        start = time.perf_counter()
        acc = evaluation.robust_accuracy(model.logits_fn, attack, x, y,
                                         jax.random.PRNGKey(config.seed + 5), eps=float(e.eps),
                                         norm=e.norm, batch_size=int(e.batch_size))
        rows.append(dict(model=method, attack=label, iterations=int(n), robust_accuracy=acc,
                         clean_accuracy=model.clean_accuracy,
                         seconds=time.perf_counter() - start))
  return rows


def conclusions(rows: list[dict]) -> list[str]:
  out = []
  done = [r for r in rows if "skipped" not in r]
  for method in dict.fromkeys(r["model"] for r in done):
    for attack in dict.fromkeys(r["attack"] for r in done if r["model"] == method):
      sel = sorted((r for r in done if (r["model"], r["attack"]) == (method, attack)),
                   key=lambda r: r["iterations"])
      final = sel[-1]["robust_accuracy"]
      # First N within one percentage point of the longest run's accuracy.
      reach = next(r["iterations"] for r in sel if r["robust_accuracy"] <= final + 0.01)
      out.append(f"{method} model, {attack}: robust accuracy {100 * sel[0]['robust_accuracy']:.1f}%"
                 f" at N = {sel[0]['iterations']}, {100 * final:.1f}% at N = "
                 f"{sel[-1]['iterations']}; within 1 point of that from N = {reach}.")
  return out


def make_figures(results: dict) -> dict:
  """``{"accuracy_vs_iterations.png": figure}`` (empty when every attack was skipped); no
  timing (each cell is one unrepeated run: its seconds are in the table only)."""
  rows = results["rows"]
  done = [r for r in rows if "skipped" not in r]
  methods = list(dict.fromkeys(r["model"] for r in done))
  if not methods:
    return {}
  from matplotlib.ticker import MaxNLocator
  attack_names = list(dict.fromkeys(r["attack"] for r in done))
  fig, axes = outputs.figure(1, len(methods))
  for ax, method in zip(axes[0], methods):
    for i, attack in enumerate(attack_names):
      sel = sorted((r for r in done if (r["model"], r["attack"]) == (method, attack)),
                   key=lambda r: r["iterations"])
      if sel:
        ax.plot([r["iterations"] for r in sel], [100 * r["robust_accuracy"] for r in sel],
                label=attack, **outputs.series_style(i))
    clean = next(r["clean_accuracy"] for r in done if r["model"] == method)
    ax.set_title(f"{method} model (clean {100 * clean:.1f}%)", fontsize=10)
    ax.set_xlabel("iterations N")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("robust accuracy (%)")
    ax.grid(True, alpha=0.3)
  outputs.finish_figure(
      fig, f"Robust accuracy against iterations N ({results['num_examples']} test points, "
      f"{results['norm']} eps={results['eps']:g})")
  return {"accuracy_vs_iterations.png": fig}


def plot(results: dict, out_dir: str) -> list[str]:
  return outputs.save_figures(make_figures(results), out_dir)


def markdown(results: dict, figures: list[str]) -> str:
  rows = results["rows"]
  done = [r for r in rows if "skipped" not in r]
  ns = sorted({r["iterations"] for r in done})
  lines = ["## Robust accuracy against iterations N (iterations, Fig. 3)", "",
           f"{results['num_examples']} test points, {results['norm']} eps={results['eps']:g}; "
           f"cells: robust accuracy (seconds of one unrepeated run, compilation included).", ""]
  table = []
  for key in dict.fromkeys((r["model"], r["attack"]) for r in done):
    by_n = {r["iterations"]: r for r in done if (r["model"], r["attack"]) == key}
    table.append(list(key) + [f"{100 * by_n[n]['robust_accuracy']:.1f}% "
                              f"({by_n[n]['seconds']:.1f}s)" if n in by_n else "-" for n in ns])
  lines.append(outputs.markdown_table(["model", "attack"] + [f"N={n}" for n in ns], table))
  for r in rows:
    if "skipped" in r:
      lines.append(f"- {r['model']}, {r['attack']}: skipped ({r['skipped']}).")
  lines += ["", "Findings:", ""] + [f"- {c}" for c in results["conclusions"]] + [""]
  lines += [f"![{f}]({f})" for f in figures] + [""]
  return "\n".join(lines)


def run(config, workdir: str, *, progress: bool = True) -> dict:
  """Writes ``workdir/iterations/{results.json, report.md, *.png}``."""
  out_dir = outputs.output_dir(workdir, NAME)
  e = config.experiment
  dataset = datasets.load_data(config.data)
  by_method = trained_models.by_method(config, dataset, e.model_methods, workdir,
                                       progress=progress)
  rows = sweep(config, dataset, by_method)
  results = {"rows": rows, "eps": float(e.eps), "norm": e.norm,
             "num_examples": int(min(e.num_examples, len(dataset.y_test))),
             "models": {m.label: m.clean_accuracy for m in by_method.values()},
             "conclusions": conclusions(rows)}
  figures = plot(results, out_dir)
  outputs.write_analysis(out_dir, config, results, markdown(results, figures),
                         progress=progress)
  return results


if __name__ == "__main__":
  cli.main(run)
