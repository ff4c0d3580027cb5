"""pytest plugin: which modules of ``krylov_adv/`` and which entry points the selected tests run.

  python -m pytest -q -m "not slow" -n 2 --dist loadfile tests -p tests.touched

A module counts as touched when a function defined in it runs (importing it is not enough); an
entry point (an ``experiments`` module with a command line) when the function its command line
calls runs in the test process, or a test starts ``python -m experiments.<name>``. Prints both
lists at the end and makes the session fail (exit code 1) when something was not touched, so the
fast tier can be checked to still reach every module. A profiling hook sees every Python call:
runs are slower with it, so time the tiers without it.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import threading

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBRARY = os.path.join(ROOT, "krylov_adv")
# The function each `python -m experiments.<name>` command line calls (cli.main(run) and the
# argparse mains).
ENTRY_POINTS = {
    "ablation_hvp": "run", "attack_docs": "main", "evaluate": "evaluate_workdir",
    "grad_norms": "run", "iterations": "run", "krylov_demo": "main", "krylov_dims": "run",
    "perceptual": "run", "report": "main", "soae_direction": "run",
    "soat": "train_and_evaluate", "table": "run_table",
}

_files: set[str] = set()
_entries: set[str] = set()


def _profile(frame, event, arg):
  if event == "call":
    code = frame.f_code
    _files.add(code.co_filename)
    if code.co_filename.startswith(ROOT + os.sep + "experiments" + os.sep):
      name = os.path.basename(code.co_filename)[:-3]
      if ENTRY_POINTS.get(name) == code.co_name:
        _entries.add(name)


_popen_init = subprocess.Popen.__init__


def _recording_popen_init(self, args, *a, **kw):
  argv = [str(x) for x in args] if isinstance(args, (list, tuple)) else str(args).split()
  for i, x in enumerate(argv[:-1]):
    if x == "-m" and argv[i + 1].startswith("experiments."):
      _entries.add(argv[i + 1].split(".", 1)[1])
  _popen_init(self, args, *a, **kw)


def pytest_configure(config):
  subprocess.Popen.__init__ = _recording_popen_init
  sys.setprofile(_profile)
  threading.setprofile(_profile)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
  """pytest-xdist controller: add what a worker's tests touched."""
  _files.update(node.workeroutput.get("touched_files", ()))
  _entries.update(node.workeroutput.get("touched_entries", ()))


def pytest_sessionfinish(session, exitstatus):
  sys.setprofile(None)
  threading.setprofile(None)
  subprocess.Popen.__init__ = _popen_init
  workeroutput = getattr(session.config, "workeroutput", None)
  if workeroutput is not None:  # a pytest-xdist worker: the controller reports
    workeroutput["touched_files"] = sorted(_files)
    workeroutput["touched_entries"] = sorted(_entries)
    return
  modules = sorted(p for p in glob.glob(os.path.join(LIBRARY, "**", "*.py"), recursive=True)
                   if os.path.getsize(p) and not p.endswith("__init__.py"))
  missed = [os.path.relpath(p, ROOT) for p in modules if p not in _files]
  missed_entries = sorted(set(ENTRY_POINTS) - _entries)
  lines = [f"touched: {len(modules) - len(missed)}/{len(modules)} krylov_adv modules, "
           f"{len(_entries & set(ENTRY_POINTS))}/{len(ENTRY_POINTS)} entry points"]
  if missed:
    lines.append("modules not touched: " + ", ".join(missed))
  if missed_entries:
    lines.append("entry points not touched: " + ", ".join(f"experiments.{e}"
                                                          for e in missed_entries))
  session.config._touched_report = lines
  if (missed or missed_entries) and session.exitstatus == 0:
    session.exitstatus = 1


def pytest_terminal_summary(terminalreporter, exitstatus, config):
  for line in getattr(config, "_touched_report", []):
    terminalreporter.write_line(line)
