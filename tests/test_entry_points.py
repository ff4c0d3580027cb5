"""The argparse command lines that no other test runs: experiments.krylov_demo and
experiments.report, each called as its ``python -m`` line calls it (tiny arguments)."""

from __future__ import annotations

import os
import re

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest

from experiments import krylov_demo, report


def test_krylov_demo_prints_one_consistent_row_per_example(capsys):
  pytest.importorskip("sklearn")
  tau, max_dim, batch = 1e-2, 4, 3
  krylov_demo.main(["--batch", str(batch), "--steps", "5", "--max-dim", str(max_dim),
                    "--tau", str(tau)])
  out = capsys.readouterr().out
  assert re.search(r"test accuracy (0|1)\.\d{3}", out), out
  assert f"GMRES on H d = g, tau={tau}, max_dim={max_dim}, input dim 64" in out
  rows = re.findall(r"^\s*(\d+)\s+(\d)\s+(\d+)\s+(\S+)\s+(True|False)\s+(\S+)$", out, re.M)
  assert [int(r[0]) for r in rows] == list(range(batch)), out
  dims = [int(r[2]) for r in rows]
  assert all(1 <= d <= max_dim for d in dims)
  for _, _, dim, rel, converged, cos in rows:
    # Converged means the (true) relative residual is within tau, printed to 3 digits.
    if converged == "True":
      assert float(rel) <= tau * 1.01
    assert -1.0 <= float(cos) <= 1.0
  n_conv = sum(r[4] == "True" for r in rows)
  assert (f"Krylov dimension: mean {sum(dims) / batch:.1f}, max {max(dims)}; "
          f"converged {n_conv}/{batch}") in out


def test_report_command_line_without_results_is_the_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="no experiment results under"):
    report.main(["--workdir", str(tmp_path)])
  with pytest.raises(SystemExit):
    report.main([])  # --workdir is required
