"""experiments.table: the Table I command on digits (tiny), its resume behaviour, the table's
layout with the paper's labelled numbers, and the equal-cost accounting against hand
computations."""

from __future__ import annotations

import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np
import pytest

from configs import common as config_common
from configs import table_digits, table_fashion_mnist
from experiments import costs
from experiments import table as table_lib
from krylov_adv import attacks, evaluation

ROWS = "standard,pgd_eqcost"


def _tiny_config(rows: str = ROWS):
  pytest.importorskip("sklearn.datasets")
  c = table_digits.get_config()
  c.table.methods = rows
  # Test size: the layout needs both norms and SOAE (for the equal-cost column), not every
  # attack; S-O and AutoAttack run in the full configs.
  c.eval.skip = "fgsm,second_order,autoattack"
  return c


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """One tiny table run; ``(config, workdir, payload)``."""
  workdir = str(tmp_path_factory.mktemp("table"))
  config = _tiny_config()
  payload = table_lib.run_table(config, workdir, progress=False)
  return config, workdir, payload


@pytest.mark.slow
def test_command_trains_every_row_and_attacks_both_norms(run):
  config, workdir, payload = run
  assert list(payload["rows"]) == ["standard", "pgd_eqcost"]
  for row, r in payload["rows"].items():
    assert os.path.isdir(os.path.join(workdir, row, "checkpoints"))
    assert r["train"]["epochs_recorded"] == config.train.epochs
    res = r["results"]
    for norm in ("linf", "l2"):
      for name in ("clean", "pgd", "soae"):
        assert 0.0 <= res[f"{name}_{norm}"]["accuracy"] <= 1.0
      # PGD at SOAE's cost: round(SOAE's measured cost) steps.
      eq = res[f"{table_lib.EQUAL_COST}_{norm}"]
      assert eq["setting"]["steps"] == max(1, round(res[f"soae_{norm}"]["cost"]))
      assert eq["cost"] == eq["setting"]["steps"]
    assert not any(e.startswith(("fgsm", "second_order", "autoattack")) for e in res)
  # A variant row's config: pgd_eqcost trains PGD-AT with SOAT's cost in steps.
  eq = json.load(open(os.path.join(workdir, "pgd_eqcost", "config.json")))
  steps = round(config_common.soat_gradient_equivalents(config.train.soat.to_dict(), 10))
  assert eq["train"]["method"] == "pgd" and eq["train"]["pgd"]["steps"] == steps
  assert "table" not in eq
  assert os.path.getsize(os.path.join(workdir, "table.png")) > 0
  on_disk = json.load(open(os.path.join(workdir, "table.json")))
  assert set(on_disk["rows"]) == set(payload["rows"])


@pytest.mark.slow
def test_rerun_neither_retrains_nor_reattacks(run, monkeypatch):
  config, workdir, payload = run
  metrics = {row: open(os.path.join(workdir, row, "metrics.jsonl")).read()
             for row in payload["rows"]}

  def refuse(*args, **kwargs):
    raise AssertionError("a finished attack was run again")

  monkeypatch.setattr(evaluation, "evaluate_attacks", refuse)
  again = table_lib.run_table(config, workdir, progress=False)
  for row in payload["rows"]:
    assert open(os.path.join(workdir, row, "metrics.jsonl")).read() == metrics[row]
    for entry, res in payload["rows"][row]["results"].items():
      assert again["rows"][row]["results"][entry]["accuracy"] == res["accuracy"]


@pytest.mark.slow
def test_interrupted_evaluation_resumes_at_the_missing_attack(run, monkeypatch):
  config, workdir, payload = run
  path = os.path.join(workdir, "standard", table_lib.EVAL_FILE)
  stored = json.load(open(path))
  del stored["results"]["pgd_l2"]  # as if killed during PGD L2
  with open(path, "w") as f:
    json.dump(stored, f)
  calls = []
  real = evaluation.evaluate_attacks

  def counting(logits_fn, x, y, cfgs, key, **kwargs):
    calls.append(list(cfgs))
    return real(logits_fn, x, y, cfgs, key, **kwargs)

  monkeypatch.setattr(evaluation, "evaluate_attacks", counting)
  again = table_lib.run_table(config, workdir, progress=False)
  assert calls == [["pgd_l2"]]
  # Same key for the entry whether resumed or not: the same result.
  assert (again["rows"]["standard"]["results"]["pgd_l2"]["accuracy"]
          == payload["rows"]["standard"]["results"]["pgd_l2"]["accuracy"])


@pytest.mark.slow
def test_table_layout_has_both_norms_and_the_papers_labelled_numbers(run):
  _, workdir, payload = run
  md = open(os.path.join(workdir, "table.md")).read()
  ours_linf = md.index("## Ours: Linf eps=0.1")
  ours_l2 = md.index("## Ours: L2 eps=1")
  paper = md.index("## paper (MNIST, ResNet-18; SOAE paper Table I): the paper's numbers")
  assert ours_linf < ours_l2 < paper
  header = "| training | clean | PGD-2 | SOAE | PGD at SOAE's cost (steps) |"
  assert md[ours_linf:ours_l2].count(header) == 1
  paper_part = md[paper:md.index("## Cost")]
  # The paper's SOAT row (its Table I, ResNet-18) and no paper numbers for our variant rows.
  assert "| STD | 97.78 | 0.07 | 0.06 | 0.01 | 0.01 | 0.01 |" in paper_part
  assert "| PGD-AT at SOAT's cost | - | - | - | - | - | - |" in paper_part
  assert "87.62" not in md[:paper]  # the paper's numbers only under the paper's label
  for row in ("STD", "PGD-AT at SOAT's cost"):
    assert md[ours_linf:ours_l2].count(f"| {row} |") == 1
  std = payload["rows"]["standard"]["results"]
  assert f"| STD | {100 * std['clean_linf']['accuracy']:.1f} |" in md[ours_linf:ours_l2]
  assert "- **Training**:" in md and "exact HVP = 1.40" in md


def test_paper_tables_are_the_papers():
  # Spot checks against the SOAE paper's Tables I-III (000_c9c6f7ce0458e3de.txt).
  t = table_lib.PAPER_TABLES
  assert t["mnist_resnet18"]["rows"]["pgd"]["autoattack"] == 49.10
  assert t["mnist_resnet18"]["rows"]["pgd"]["soae"] == 30.85
  assert t["mnist_wrn"]["rows"]["scorpio"]["second_order"] == 43.69
  assert t["cifar10_resnet18"]["rows"]["soat"]["soae"] == 49.27
  assert t["cifar10_wrn"]["rows"]["soar"]["fgsm"] == 67.15
  assert t["imagenet100_resnet18"]["rows"]["soar"] == dict(clean=80.80, pgd=61.68,
                                                           autoattack=45.12, soae=42.35)
  for key, paper in t.items():
    for row, values in paper["rows"].items():
      assert row in table_lib._PAPER_ROWS and all(0 <= v <= 100 for v in values.values())


def test_soae_cost_by_hand():
  diag = attacks.SOAEDiagnostics(
      num_iters=np.array([[2, 5, 9], [4, 1, 9]]), residual_norm=None,
      initial_residual_norm=None, converged=None, status=None, fallback=None,
      num_iters_total=None, fallback_count=None)
  # Two real examples (the third is padding): slowest 5 then 4; Newton pays k + 1 + 1 products.
  assert costs.soae_batch_cost(diag, 1.4, valid=2) == pytest.approx(
      (1 + 1.4 * (5 + 2)) + (1 + 1.4 * (4 + 2)))
  assert costs.soae_batch_cost(diag, 1.4, newton=False, valid=2) == pytest.approx(
      (1 + 1.4 * 6) + (1 + 1.4 * 5))
  assert costs.soae_batch_cost(diag, 1.4) == pytest.approx(2 * (1 + 1.4 * 11))
  assert costs.soae_batch_cost(diag, 1.4, valid=2, hvp="fd_forward") == pytest.approx(
      (1 + 7) + (1 + 6))
  entry = dict(name="soae", hvp="exact", direction="newton")
  assert costs.attack_cost(entry, [(diag, 2), (diag, 3)], 2.0) == pytest.approx(
      ((1 + 2 * 7) + (1 + 2 * 6) + 2 * (1 + 2 * 11)) / 2)
  assert costs.attack_cost(entry, ()) is None


def test_fixed_attack_costs_by_hand():
  assert costs.attack_cost(dict(name="clean")) == 0
  assert costs.attack_cost(dict(name="fgsm")) == 1
  assert costs.attack_cost(dict(name="pgd", steps=20)) == 20
  assert costs.attack_cost(dict(name="second_order", steps=20, samples=8)) == 160
  assert costs.attack_cost(dict(name="second_order", steps=7, samples=8, form="power")) == 7
  assert costs.attack_cost(dict(name="autoattack", version="standard")) is None


def test_equal_training_cost_row_by_hand():
  c = table_fashion_mnist.get_config()
  soat = c.train.soat
  assert (soat.steps, soat.m, soat.hvp, soat.direction) == (1, 10, "exact", "newton")
  # 1 outer iteration x (1 gradient + 1.4 x (min(m, K - 1) = 9 + 1 + 1) products) = 16.4.
  assert config_common.soat_gradient_equivalents(soat.to_dict(), 10) == pytest.approx(16.4)
  eq = c.table.variants.pgd_eqcost.train.pgd
  assert eq.steps == 16 and eq.step_size == pytest.approx(2.5 * 0.1 / 16)
  four = dict(soat.to_dict(), steps=4, m=15)
  assert config_common.soat_gradient_equivalents(four, 10) == pytest.approx(4 * (1 + 1.4 * 11))
  fd = dict(four, hvp="fd_forward")
  assert config_common.soat_gradient_equivalents(fd, 10) == pytest.approx(4 * (1 + 17))
  tr = dict(four, direction="trust_region")
  assert config_common.soat_gradient_equivalents(tr, 10) == pytest.approx(4 * (1 + 1.4 * 10))


def test_row_configs_and_validation():
  c = table_fashion_mnist.get_config()
  assert table_lib.rows_of(c) == list(config_common.TABLE_METHODS)
  paper = table_lib.row_config(c, "soat_paper")
  assert (paper.train.method, paper.train.soat.hvp, paper.train.soat.eta) == (
      "soat", "fd_forward", 1e-5)
  assert "table" not in paper
  assert table_lib.row_config(c, "soat").train.soat.hvp == "exact"
  tr = table_lib.row_config(c, "soat_tr").train
  assert (tr.method, tr.soat.direction, tr.soat.hvp) == ("soat", "trust_region", "exact")
  assert table_lib.row_config(c, "second_order").train.method == "second_order"
  table_lib.validate(c)
  c.table.methods = "standard,nonsense"
  with pytest.raises(ValueError, match="table row 'nonsense'"):
    table_lib.validate(c)
  c.table.methods = "pgd,pgd"
  with pytest.raises(ValueError, match="repeats"):
    table_lib.validate(c)


def test_set_method_variants():
  c = config_common.base_config()
  config_common.set_method(c, "soat_tr")
  assert (c.train.method, c.train.soat.direction, c.train.soat.hvp) == (
      "soat", "trust_region", "exact")
