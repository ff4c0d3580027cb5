"""Collects every analysis result in a workdir into one markdown report with the plots embedded.

  python -m experiments.report --workdir /tmp/analysis

Reads ``workdir/<experiment>/results.json`` for each experiment that has run (ablation_hvp,
krylov_dims, iterations, perceptual, grad_norms, soae_direction), re-renders its section from the
JSON with the experiment's own ``markdown`` function (so the report always matches the numbers
on disk), points the figure links at ``<experiment>/<figure>.png`` and writes
``workdir/report.md``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import re

EXPERIMENTS = ("ablation_hvp", "krylov_dims", "iterations", "perceptual", "grad_norms",
               "soae_direction")


def _figures(out_dir: str) -> list[str]:
  return sorted(f for f in os.listdir(out_dir) if f.endswith(".png"))


def section(workdir: str, name: str) -> str | None:
  """The markdown section of experiment ``name``, figure links relative to ``workdir``; ``None``
  when the experiment has not written results there."""
  out_dir = os.path.join(workdir, name)
  path = os.path.join(out_dir, "results.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    stored = json.load(f)
  module = importlib.import_module(f"experiments.{name}")
  text = module.markdown(stored["results"], _figures(out_dir))
  # Figures are written next to results.json; the report sits one level up.
  return re.sub(r"!\[([^\]]*)\]\(([^)/]+\.png)\)", rf"![\1]({name}/\2)", text)


def build_report(workdir: str) -> str:
  """Writes ``workdir/report.md`` and returns its path.

  Raises:
    FileNotFoundError: no experiment has written results in ``workdir``.
  """
  sections = {n: section(workdir, n) for n in EXPERIMENTS}
  found = {n: s for n, s in sections.items() if s is not None}
  if not found:
    raise FileNotFoundError(f"no experiment results under {workdir} (expected "
                            f"<workdir>/<experiment>/results.json for one of {EXPERIMENTS})")
  missing = [n for n in EXPERIMENTS if n not in found]
  lines = ["# Analysis report", "",
           f"Generated {datetime.datetime.now().isoformat(timespec='seconds')} from `{workdir}`.",
           ""]
  lines += [f"- [{n}](#{n})" for n in found]
  if missing:
    lines += ["", "Not run: " + ", ".join(missing) + "."]
  lines.append("")
  for name, text in found.items():
    lines += [f'<a id="{name}"></a>', "", text.strip(), ""]
  path = os.path.join(workdir, "report.md")
  with open(path, "w") as f:
    f.write("\n".join(lines))
  return path


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  args = parser.parse_args(argv)
  print(build_report(args.workdir))


if __name__ == "__main__":
  main()
