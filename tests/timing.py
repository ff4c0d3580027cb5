"""pytest plugin: wall time, CPU time and XLA compilations per test module.

  python -m pytest -q -n 2 --dist loadfile tests -p tests.timing

Prints one row per test module at the end (wall seconds of its tests' setup, call and teardown,
CPU seconds of the process running them plus the subprocesses they waited for, XLA compilations,
seconds spent in them, and persistent-cache hits), sorted by CPU time, and writes the rows as JSON
to ``$KRYLOV_TIMING_JSON`` when that is set, with one entry per test (wall, CPU, compilations,
marked slow). Works with pytest-xdist (each worker reports its
rows to the controller). Compilations are counted with a ``jax.monitoring`` listener, as
``tests/compile_events.py`` does. CPU time is the better measure on a shared machine: wall time
grows with the load, CPU time much less.
"""

from __future__ import annotations

import collections
import json
import os
import resource
import time

import jax
import pytest

from tests.compile_events import BACKEND_COMPILE

CACHE_HIT = "/jax/compilation_cache/cache_hits"
_FIELDS = ("wall", "cpu", "compiles", "compile_s", "cache_hits", "tests")
_rows: dict[str, dict[str, float]] = collections.defaultdict(lambda: dict.fromkeys(_FIELDS, 0.0))
_current: list[str] = []
_tests: dict[str, list] = {}  # nodeid: [wall, cpu, compiles, slow]


def _cpu() -> float:
  s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
  return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def _duration(event, duration, **kwargs):
  del kwargs
  if event == BACKEND_COMPILE and _current:
    row = _rows[_current[-1]]
    row["compiles"] += 1
    row["compile_s"] += duration


def _event(event, **kwargs):
  del kwargs
  if event == CACHE_HIT and _current:
    _rows[_current[-1]]["cache_hits"] += 1


def pytest_configure(config):
  jax.monitoring.register_event_duration_secs_listener(_duration)
  jax.monitoring.register_event_listener(_event)


def _module(item) -> str:
  return item.nodeid.split("::", 1)[0]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
  _current.append(_module(item))
  wall, cpu = time.perf_counter(), _cpu()
  compiles = _rows[_module(item)]["compiles"]
  try:
    return (yield)
  finally:
    row = _rows[_module(item)]
    row["wall"] += time.perf_counter() - wall
    row["cpu"] += _cpu() - cpu
    row["tests"] += 1
    _current.pop()
    _tests[item.nodeid] = [time.perf_counter() - wall, _cpu() - cpu,
                           row["compiles"] - compiles, item.get_closest_marker("slow") is not None]


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
  """xdist controller: merge a worker's rows."""
  _tests.update(node.workeroutput.get("krylov_timing_tests", {}))
  for module, row in node.workeroutput.get("krylov_timing", {}).items():
    for k in _FIELDS:
      _rows[module][k] += row[k]


def pytest_sessionfinish(session, exitstatus):
  workeroutput = getattr(session.config, "workeroutput", None)
  if workeroutput is not None:  # an xdist worker: hand the rows to the controller
    workeroutput["krylov_timing"] = {m: dict(r) for m, r in _rows.items()}
    workeroutput["krylov_timing_tests"] = _tests


def pytest_terminal_summary(terminalreporter, exitstatus, config):
  if not _rows:
    return
  rows = sorted(_rows.items(), key=lambda kv: -kv[1]["cpu"])
  w = terminalreporter.write_line
  w(f"{'module':42s} {'tests':>5s} {'wall s':>7s} {'CPU s':>7s} {'compiles':>8s} "
    f"{'compile s':>9s} {'cache hits':>10s}")
  total = dict.fromkeys(_FIELDS, 0.0)
  for module, r in rows:
    for k in _FIELDS:
      total[k] += r[k]
    w(f"{module:42s} {int(r['tests']):5d} {r['wall']:7.1f} {r['cpu']:7.1f} {int(r['compiles']):8d} "
      f"{r['compile_s']:9.1f} {int(r['cache_hits']):10d}")
  w(f"{'total':42s} {int(total['tests']):5d} {total['wall']:7.1f} {total['cpu']:7.1f} "
    f"{int(total['compiles']):8d} {total['compile_s']:9.1f} {int(total['cache_hits']):10d}")
  if os.environ.get("KRYLOV_TIMING_JSON"):
    with open(os.environ["KRYLOV_TIMING_JSON"], "w") as f:
      json.dump({"modules": {m: r for m, r in rows}, "tests": _tests}, f, indent=1,
                sort_keys=True)
