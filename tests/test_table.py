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


def _count_evaluations(monkeypatch) -> list:
  """Records the entries of every ``evaluation.evaluate_attacks`` call (what a resumed table
  re-attacks) in the returned list."""
  calls = []
  real = evaluation.evaluate_attacks

  def counting(logits_fn, x, y, cfgs, key, **kwargs):
    calls.append(list(cfgs))
    return real(logits_fn, x, y, cfgs, key, **kwargs)

  monkeypatch.setattr(evaluation, "evaluate_attacks", counting)
  return calls


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
  steps = round(costs.soat_gradient_equivalents(config.train.soat.to_dict(), 10,
                                                payload["hvp_cost"]["hvp_cost"]))
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
  # A resumed row's wall times keep the load they ran under, not the load at resume time.
  monkeypatch.setattr(table_lib.os, "getloadavg", lambda: (99.0, 99.0, 99.0))
  again = table_lib.run_table(config, workdir, progress=False)
  for row in payload["rows"]:
    assert open(os.path.join(workdir, row, "metrics.jsonl")).read() == metrics[row]
    for entry, res in payload["rows"][row]["results"].items():
      assert again["rows"][row]["results"][entry]["accuracy"] == res["accuracy"]
    stored = [r["load_average"] for r in payload["rows"][row]["results"].values()
              if "load_average" in r]
    assert stored and again["rows"][row]["load_average"] == list(np.max(stored, axis=0))
    assert again["rows"][row]["load_average"][0] < 99.0
  assert again["metadata"]["machine"]["load_average"] == [99.0, 99.0, 99.0]


@pytest.mark.slow
def test_interrupted_evaluation_resumes_at_the_missing_attack(run, monkeypatch):
  config, workdir, payload = run
  path = os.path.join(workdir, "standard", table_lib.EVAL_FILE)
  stored = json.load(open(path))
  del stored["results"]["pgd_l2"]  # as if killed during PGD L2
  with open(path, "w") as f:
    json.dump(stored, f)
  calls = _count_evaluations(monkeypatch)
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
  header = "| training | clean | PGD-2 | SOAE | PGD at SOAE's cost (steps) | worst case |"
  assert md[ours_linf:ours_l2].count(header) == 1
  paper_part = md[paper:md.index("## Cost")]
  # The paper's SOAT row (its Table I, ResNet-18) and no paper numbers for our variant rows.
  assert "| STD | 97.78 | 0.07 | 0.06 | 0.01 | 0.01 | 0.01 |" in paper_part
  assert "| PGD-AT at SOAT's cost | - | - | - | - | - | - |" in paper_part
  assert "87.62" not in md[:paper]  # the paper's numbers only under the paper's label
  # A row's name, "[collapsed]" after it when it is (the tiny models are, at 2 epochs).
  label = {r: v["label"] + (" [collapsed]" if v["collapsed"]["collapsed"] else "")
           for r, v in payload["rows"].items()}
  for row in label.values():
    assert md[ours_linf:ours_l2].count(f"| {row} |") == 1
  std = payload["rows"]["standard"]["results"]["clean_linf"]
  lo, hi = std["ci95"]
  assert (f"| {label['standard']} | {100 * std['accuracy']:.1f} ({100 * lo:.1f}-{100 * hi:.1f}) |"
          in md[ours_linf:ours_l2])
  assert "- **Training**:" in md and "count one exact HVP as 1.40 gradients" in md


# Slow: it was the only fast test that needed the tiny table run (`run`: 10 of the fast tier's
# 175 CPU-seconds), which the slow tests above share. The fast tier still runs run_table (and
# plot_table in it) in test_cached_results_are_keyed_by_the_model_and_every_setting.
@pytest.mark.slow
def test_table_figure_is_titled_labelled_and_has_no_gap_beside_the_legend(run, monkeypatch):
  """table.png from the tiny run's payload: a figure title naming the data and model, robust
  accuracy on the y axis, the training method on the x axis, one panel per norm, and the
  legend right beside the panels (constrained layout: no blank column between them)."""
  from experiments import outputs
  _, workdir, payload = run
  saved = {}

  def keep(fig, path):
    fig.canvas.draw()
    saved["fig"], saved["path"] = fig, path
    return os.path.basename(path)

  monkeypatch.setattr(outputs, "save_figure", keep)
  assert table_lib.plot_table(payload, workdir, "digits, tiny_cnn") == "table.png"
  fig = saved["fig"]
  assert fig.get_suptitle().startswith("Robust accuracy (%) per training method and attack")
  assert fig.get_suptitle().endswith("digits, tiny_cnn")
  assert len(fig.axes) == 2
  for ax, norm in zip(fig.axes, ("Linf eps=0.1", "L2 eps=1")):
    assert ax.get_ylabel() == "robust accuracy (%)" and ax.get_xlabel() == "training method"
    assert ax.get_title() == f"attacks in {norm}"
  legend = fig.legends[0]
  renderer = fig.canvas.get_renderer()
  panels_right = max(ax.get_tightbbox(renderer).x1 for ax in fig.axes)
  legend_box = legend.get_window_extent(renderer)
  width = fig.bbox.width
  # Beside the panels, not on them, with a gap of at most 5% of the figure's width.
  assert panels_right <= legend_box.x0 <= panels_right + 0.05 * width
  assert [t.get_text() for t in legend.get_texts()][0] == "clean"


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
  # 1 outer iteration x (1 gradient + c x (min(m, K - 1) = 9 + 1 + 1) products), c the measured
  # HVP cost the table passes (hvp_cost.json): 16.4 at c = 1.4, 21.9 at c = 1.9.
  assert costs.soat_gradient_equivalents(soat.to_dict(), 10, 1.4) == pytest.approx(16.4)
  assert c.table.variants.pgd_eqcost.equal_cost_to == "soat"
  for hvp_cost, steps in ((1.4, 16), (1.9, 22)):
    eq = table_lib.row_config(c, "pgd_eqcost", hvp_cost).train
    assert eq.method == "pgd" and eq.pgd.steps == steps
    assert eq.pgd.step_size == pytest.approx(2.5 * 0.1 / steps)
  four = dict(soat.to_dict(), steps=4, m=15)
  assert costs.soat_gradient_equivalents(four, 10, 1.4) == pytest.approx(4 * (1 + 1.4 * 11))
  fd = dict(four, hvp="fd_forward")
  assert costs.soat_gradient_equivalents(fd, 10, 1.4) == pytest.approx(4 * (1 + 17))
  tr = dict(four, direction="trust_region")
  assert costs.soat_gradient_equivalents(tr, 10, 1.4) == pytest.approx(4 * (1 + 1.4 * 10))


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
  # Issue 25: SOAR and SCORPIO at their authors' settings, ours kept as named rows.
  soar = table_lib.row_config(c, "soar_authors").train
  assert soar.method == "soar" and (soar.soar.lam, soar.soar.h, soar.soar.grad_clip) == (
      0.5, 0.03, 30.0)
  assert tuple(soar.soar.norm_clip) == (0.0, 10.0) and soar.soar.init == "pgd1"
  ours = table_lib.row_config(c, "soar").train.soar
  assert (ours.lam, ours.h, ours.grad_clip, tuple(ours.norm_clip)) == (1.0, 0.01, 1.0, ())
  sc = table_lib.row_config(c, "scorpio").train
  assert (sc.method, sc.scorpio.step_rule, sc.scorpio.steps) == ("scorpio", "classic", 3)
  sc_ours = table_lib.row_config(c, "scorpio_ours").train
  assert (sc_ours.method, sc_ours.scorpio.step_rule) == ("scorpio", "line_search")
  for row in ("soar", "soar_authors", "scorpio", "scorpio_ours"):
    assert row in table_lib.rows_of(c) and row in table_lib.rows_of(table_digits.get_config())
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


def test_cached_results_are_keyed_by_the_model_and_every_setting(tmp_path, monkeypatch):
  """Issue 28, item 1: a result in table_eval.json is reused only for the same model
  (checkpoint checksum), key and eval.batch_size. (b): ConfigDict orders eval.table by name, so
  the AutoAttack entries come first; numbering the entries after eval.skip gave PGD another key
  when AutoAttack was skipped, and the cache then reused whichever result came first."""
  import jax
  from experiments import pipeline
  c = _tiny_config("standard")
  c.table.equal_cost = False
  only = "fgsm,second_order,soae,l2"  # clean, PGD and AutoAttack under Linf: the cheapest
  c.eval.skip = only + ",autoattack"
  w = str(tmp_path)
  keys = {}
  real = evaluation.evaluate_attacks

  def spy(logits_fn, x, y, cfgs, key, **kwargs):
    (entry,) = cfgs
    keys[entry] = np.asarray(jax.random.key_data(key)).tolist()
    return real(logits_fn, x, y, cfgs, key, **kwargs)

  monkeypatch.setattr(evaluation, "evaluate_attacks", spy)
  first = table_lib.run_table(c, w, progress=False)["rows"]["standard"]["results"]
  assert sorted(keys) == ["clean_linf", "pgd_linf"]
  # (b) PGD's key is its place in the whole suite, skipped entries or not.
  full = pipeline.suite_key_indices(c, "table")
  assert full["pgd_linf"] == 7  # autoattack_l2, autoattack_linf, clean_l2, ... pgd_linf
  whole = jax.random.fold_in(jax.random.PRNGKey(int(c.seed) + 2), full["pgd_linf"])
  assert keys["pgd_linf"] == np.asarray(jax.random.key_data(whole)).tolist()
  setting = first["pgd_linf"]["setting"]
  assert setting["key_index"] == 7 and setting["batch_size"] == 32
  ckpt = setting["checkpoint"]
  assert ckpt == dict(step=2, checksum=json.load(open(tmp_path / "standard" /
                                                      "checksums.json"))["2"])
  # Without the skip the same PGD result is reused and only AutoAttack runs.
  keys.clear()
  c.eval.skip = only
  again = table_lib.run_table(c, w, progress=False)["rows"]["standard"]["results"]
  assert sorted(keys) == ["autoattack_linf"]
  assert again["pgd_linf"] == first["pgd_linf"]
  # (c) Another eval.batch_size: each batch has its own key, so every entry runs again.
  keys.clear()
  c.eval.batch_size = 16
  table_lib.run_table(c, w, progress=False)
  assert sorted(keys) == ["autoattack_linf", "clean_linf", "pgd_linf"]
  stored = json.load(open(tmp_path / "standard" / table_lib.EVAL_FILE))["results"]
  assert {e: r["setting"]["batch_size"] for e, r in stored.items()} == {
      "autoattack_linf": 16, "clean_linf": 16, "pgd_linf": 16}
  # (a) The row retrained with another learning rate (its checkpoints moved away, as the
  # restore error advises) is another model: nothing of the old one is reused.
  os.rename(tmp_path / "standard" / "checkpoints", tmp_path / "old_checkpoints")
  keys.clear()
  c.train.learning_rate = 0.5
  new = table_lib.run_table(c, w, progress=False)["rows"]["standard"]["results"]
  assert sorted(keys) == ["autoattack_linf", "clean_linf", "pgd_linf"]
  assert new["pgd_linf"]["setting"]["checkpoint"]["checksum"] != ckpt["checksum"]
  meta = json.load(open(tmp_path / "table.json"))["metadata"]["training"]["STD"]
  assert meta["checkpoint"] == new["pgd_linf"]["setting"]["checkpoint"]
  assert meta["optimizer"]["learning_rate"] == 0.5


# ---------------------------------------------------------------------------------------------
# Issue 25: intervals, per-example flags, worst case, paired tests, collapse flag


def test_tiny_table_json_has_intervals_flags_worst_case_paired_and_collapse(run):
  """The tiny run's table.json and robust_flags.npz: every result has its Wilson ci95 and
  flags whose mean is its accuracy; worst_case_<norm> is the AND of the norm's flags; the
  paired list holds the within-row McNemar tests; every row has its collapse verdict."""
  from scipy import stats as scipy_stats
  from experiments import outputs
  from krylov_adv import stats
  _, workdir, payload = run
  on_disk = json.load(open(os.path.join(workdir, "table.json")))
  for row, r in on_disk["rows"].items():
    flags, indices = outputs.read_flags(os.path.join(workdir, row, "robust_flags.npz"))
    n = r["results"]["clean_linf"]["num_examples"]
    np.testing.assert_array_equal(indices, np.arange(n))
    assert set(flags) == set(r["results"])
    for entry, res in r["results"].items():
      k = int(flags[entry].sum())
      assert res["accuracy"] == pytest.approx(k / n)
      want = scipy_stats.binomtest(k, n).proportion_ci(method="wilson")
      np.testing.assert_allclose(res["ci95"], (want.low, want.high), atol=1e-9)
    for norm in ("linf", "l2"):
      worst = r["results"][f"worst_case_{norm}"]
      parts = [e for e in r["results"] if e.endswith(norm) and not e.startswith("worst")]
      assert sorted(worst["components"]) == sorted(parts) and f"clean_{norm}" in parts
      np.testing.assert_array_equal(flags[f"worst_case_{norm}"],
                                    np.logical_and.reduce([flags[e] for e in parts]))
    c = r["collapsed"]
    assert set(c) >= {"collapsed", "reasons", "clean_accuracy", "chance"}
    assert c["clean_accuracy"] == pytest.approx(r["results"]["clean_linf"]["accuracy"])
  pairs = {(t["row"], t["a"], t["b"]): t for t in on_disk["paired"]}
  for row in on_disk["rows"]:
    for norm in ("linf", "l2"):
      for a, b in (("soae", "pgd"), ("soae", table_lib.EQUAL_COST)):
        t = pairs[(row, f"{a}_{norm}", f"{b}_{norm}")]
        flags, _ = outputs.read_flags(os.path.join(workdir, row, "robust_flags.npz"))
        want = stats.mcnemar_exact(flags[f"{a}_{norm}"], flags[f"{b}_{norm}"])
        assert (t["n"], t["only_a_robust"], t["only_b_robust"], t["p_value"]) == (
            want["n"], want["only_a"], want["only_b"], want["p_value"])
  md = open(os.path.join(workdir, "table.md")).read()
  assert "## Claims (exact two-sided McNemar tests on the same points)" in md
  assert "Rows marked [collapsed] (collapsed: clean accuracy <= 1/K + 5 points" in md
  std = on_disk["rows"]["standard"]["results"]["clean_linf"]
  assert f"| {outputs.interval_text(std['accuracy'], std['ci95'])} |" in md
  assert on_disk["hvp_cost"]["hvp_cost"] == 1.4
  assert json.load(open(os.path.join(workdir, "hvp_cost.json")))["hvp_cost"] == 1.4
  assert len(on_disk["metadata"]["machine"]["load_average"]) == 3


@pytest.mark.slow
def test_resume_keeps_flags_and_reruns_an_attack_whose_flags_are_missing(run, monkeypatch):
  """A crash between the flags file and table_eval.json (flags written first) or a flags file
  from before this existed: the entry without matching flags runs again, the others keep
  theirs."""
  from experiments import outputs
  config, workdir, payload = run
  path = os.path.join(workdir, "standard", outputs.FLAGS_FILE)
  flags, indices = outputs.read_flags(path)
  del flags["soae_linf"]
  outputs.write_flags(path, flags, indices)
  calls = _count_evaluations(monkeypatch)
  table_lib.run_table(config, workdir, progress=False)
  assert calls == [["soae_linf"]]
  again, _ = outputs.read_flags(path)
  assert set(again) == set(flags) | {"soae_linf"}
  for entry, f in flags.items():
    np.testing.assert_array_equal(again[entry], f)


def _fake_rows(flags_by_row, methods):
  rows = {}
  for row, flags in flags_by_row.items():
    rows[row] = dict(label=row.upper(), method=methods[row], results={
        e: dict(label=e, attack=e.rsplit("_", 1)[0], norm=e.rsplit("_", 1)[1], eps=0.1,
                accuracy=float(f.mean()), num_examples=f.size,
                setting=dict(test_points="same"))
        for e, f in flags.items()})
  return rows


def test_paired_tests_within_and_across_rows_by_hand():
  from scipy import stats as scipy_stats
  rng = np.random.default_rng(0)
  n = 60
  mk = lambda p: rng.random(n) < p
  names = ("clean_linf", "pgd_linf", "soae_linf", "autoattack_linf", "second_order_linf")
  flags = {row: {e: mk(p) for e, p in zip(names, (0.9, 0.5, 0.7, 0.4, 0.55))}
           for row in ("pgd", "soat", "soat_tr", "standard")}
  # Hand-made: SOAT variant robust on 12 points PGD-AT is not under PGD-20, the reverse on 1.
  base = flags["pgd"]["pgd_linf"] = np.zeros(n, bool)
  base[:20] = True
  soat = flags["soat_tr"]["pgd_linf"] = base.copy()
  soat[20:32] = True
  soat[0] = False
  methods = dict(pgd="pgd", soat="soat", soat_tr="soat", standard="standard")
  rows = _fake_rows(flags, methods)
  out = table_lib.paired_tests(rows, flags)
  within = [(t["row"], t["a"], t["b"]) for t in out if t["kind"] == "attacks"]
  assert within == [(row, a, b) for row in flags for a, b in (
      ("soae_linf", "pgd_linf"), ("soae_linf", "autoattack_linf"),
      ("second_order_linf", "pgd_linf"))]
  across = {(t["a"], t["b"], t["entry"]): t for t in out if t["kind"] == "rows"}
  assert sorted(across) == sorted((r, "pgd", e) for r in ("soat", "soat_tr")
                                  for e in ("autoattack_linf", "pgd_linf"))
  t = across[("soat_tr", "pgd", "pgd_linf")]
  assert (t["n"], t["only_a_robust"], t["only_b_robust"]) == (n, 12, 1)
  assert t["p_value"] == pytest.approx(scipy_stats.binomtest(12, 13).pvalue, rel=1e-12)
  # Other test points (another digest): no cross-row pair.
  rows["soat"]["results"]["pgd_linf"]["setting"]["test_points"] = "other"
  assert ("soat", "pgd", "pgd_linf") not in {
      (t["a"], t["b"], t.get("entry")) for t in table_lib.paired_tests(rows, flags)}
  # The claims: p = 0.0034 < 1% is claimed, a p of 1 is not.
  payload = dict(rows={r: dict(v, collapsed=dict(collapsed=False)) for r, v in rows.items()},
                 paired=[t, dict(t, only_a_robust=0, only_b_robust=0, p_value=1.0,
                                 b_accuracy=t["a_accuracy"])])
  md = table_lib.claims_markdown(payload)
  assert "SOAT_TR is more robust than PGD at 1%" in md
  assert md.count("not distinguishable at 1%") == 1


def test_worst_case_entries_are_the_and_over_each_norm():
  f = {"clean_linf": np.array([1, 1, 1, 0], bool), "pgd_linf": np.array([1, 0, 1, 1], bool),
       "soae_linf": np.array([1, 1, 0, 1], bool), "clean_l2": np.array([1, 1, 1, 1], bool),
       "pgd_l2": np.array([0, 1, 1, 1], bool)}
  results = {e: dict(label=e, attack=e.rsplit("_", 1)[0], norm=e.rsplit("_", 1)[1], eps=0.1,
                     accuracy=float(v.mean()), num_examples=4) for e, v in f.items()}
  records, flags = table_lib.worst_case_entries(results, f)
  np.testing.assert_array_equal(flags["worst_case_linf"], [True, False, False, False])
  np.testing.assert_array_equal(flags["worst_case_l2"], [False, True, True, True])
  assert records["worst_case_linf"]["accuracy"] == 0.25
  assert records["worst_case_l2"]["components"] == ["clean_l2", "pgd_l2"]
  assert records["worst_case_l2"]["ci95"] == pytest.approx(list(
      __import__("krylov_adv").stats.wilson_interval(3, 4)))


def test_fashion_mnist_full_describes_the_thousand_point_table():
  """Issue 25, item 7's config: >= 1,000 test points, AutoAttack standard (all four components)
  in both norms, the full training set, every row."""
  c = table_fashion_mnist.get_config("full")
  assert c.eval.num_examples >= 1000 and c.data.max_train == 0
  for norm in ("linf", "l2"):
    aa = c.eval.table[f"autoattack_{norm}"]
    assert aa.version == "standard" and "attacks" not in aa
  assert table_lib.rows_of(c) == list(config_common.TABLE_METHODS)
  table_lib.validate(c)


@pytest.mark.slow
def test_hvp_cost_is_measured_once_per_model_and_reused(tmp_path, monkeypatch):
  """table.hvp_cost = 0: the exact HVP's cost is measured once on the table's model and stored
  in hvp_cost.json with the machine's load average; a rerun reads it back; pgd_eqcost's steps
  use it."""
  from krylov_adv import data as data_lib
  c = _tiny_config()
  c.table.hvp_cost = 0.0
  dataset = data_lib.load(c.data)
  m = table_lib.hvp_cost_of(c, str(tmp_path), dataset, progress=False)
  saved = json.load(open(tmp_path / "hvp_cost.json"))
  assert saved["hvp_cost"] == m["hvp_cost"] > 0 and not saved["fixed"]
  assert len(saved["load_average"]) == 3 and "tiny_cnn" in saved["source"]
  monkeypatch.setattr(costs, "measure_hvp_cost", lambda *a, **k: pytest.fail("re-measured"))
  assert table_lib.hvp_cost_of(c, str(tmp_path), dataset, progress=False) == saved
  steps = max(1, round(costs.soat_gradient_equivalents(c.train.soat.to_dict(), 10,
                                                       saved["hvp_cost"])))
  assert table_lib.row_config(c, "pgd_eqcost", saved["hvp_cost"]).train.pgd.steps == steps
