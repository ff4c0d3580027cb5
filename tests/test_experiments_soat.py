"""End to end: configs load and validate, every training method trains and is evaluated,
a stopped run resumes to the uninterrupted result, and the command lines work."""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import subprocess
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import ml_collections
import numpy as np
import pytest

from configs import test_tiny
from experiments import evaluate as evaluate_lib
from experiments import pipeline
from experiments import soat
from krylov_adv import attacks, training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEEDS = {"pgd": "pgd", "mixed": "pgd", "soat": "soae", "second_order": "second_order"}


def _require(*names):
  missing = [n for n in names if n not in attacks.available()]
  if missing:
    pytest.skip(f"attacks not registered yet: {missing}")


def _tiny(method, eval_attacks=("clean", "pgd")):
  c = test_tiny.get_config(method)
  c.eval.attacks = ml_collections.ConfigDict(
      {k: v for k, v in c.eval.attacks.items() if k.rsplit("_", 1)[0] in eval_attacks})
  return c


def _config_files():
  return sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                if not os.path.basename(p).startswith(("_", "common")))


def _load(path):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


@pytest.mark.parametrize("path", _config_files(), ids=os.path.basename)
def test_every_config_loads_and_validates(path):
  _require("fgsm", "pgd", "soae", "second_order")
  config = _load(path).get_config()
  pipeline.validate_config(config)
  for method in pipeline.methods_of(config):
    assert method in ("standard", "pgd", "trades", "soat", "mixed", "second_order")


def test_paper_configs_follow_the_papers():
  cifar = _load(os.path.join(ROOT, "configs", "cifar10_resnet18.py")).get_config("pgd")
  t = cifar.train
  assert (t.eps, t.pgd.steps, t.pgd.step_size) == (8 / 255, 7, 2 / 255)
  assert (t.learning_rate, t.momentum, t.weight_decay, t.batch_size, t.epochs) == (
      0.1, 0.9, 3e-4, 128, 300)
  assert t.trades.beta == 6.0 and cifar.data.augment
  mnist = _load(os.path.join(ROOT, "configs", "mnist_madry_cnn.py")).get_config()
  assert mnist.train.eps == 0.3 and mnist.model.name == "madry_cnn"
  for suite in pipeline.SUITES:
    assert {(a["norm"], a["eps"]) for a in pipeline.eval_suite(mnist, suite).values()} == {
        ("linf", 0.3), ("l2", 4.0)}
  fm = _load(os.path.join(ROOT, "configs", "fashion_mnist_madry_cnn.py")).get_config()
  assert (fm.data.source, fm.data.root) == ("idx", "/usr/share/datasets/fashion-mnist")


@pytest.mark.parametrize("field,value,match", [
    ("train.method", "adversarial", "unknown training method 'adversarial'"),
    ("train.method", "pgd,nope", "unknown training method 'nope'"),
    ("data.source", "imagenet", "unknown data source 'imagenet'"),
    ("train.eps", -0.5, "eps must be >= 0"),
    ("model.name", "vgg16", "unknown model 'vgg16'"),
    ("model.activation", "sine", "unknown activation 'sine'"),
    ("eval.attacks.clean_linf.eps", -1.0, "eps must be >= 0"),
    ("eval.attacks.clean_l2.name", "deepfool", "unknown attack 'deepfool'"),
    # Every eval attack's hyperparameters, in both suites, before anything runs (issue 15.4).
    ("eval.attacks.pgd_linf.steps", 0,
     r"^eval\.attacks\.pgd_linf\.steps must be an integer >= 1, got 0$"),
    ("eval.attacks.pgd_l2.step_size", -0.1,
     r"^eval\.attacks\.pgd_l2\.step_size must be >= 0, got -0\.1$"),
    ("eval.table.soae_linf.tau", 0.0, r"^eval\.table\.soae_linf\.tau must be > 0, got 0\.0$"),
    ("eval.table.soae_l2.m", 0, r"^eval\.table\.soae_l2\.m must be an integer >= 1, got 0$"),
    ("eval.table.soae_l2.hvp", "fd", r"^eval\.table\.soae_l2\.hvp: unknown HVP method 'fd'"),
    ("eval.table.second_order_linf.samples", 0,
     r"^eval\.table\.second_order_linf\.samples must be an integer >= 1, got 0$"),
    ("eval.table.second_order_l2.sigma", -1.0,
     r"^eval\.table\.second_order_l2\.sigma must be >= 0, got -1\.0$"),
    ("eval.table.pgd_linf.eps", -0.2, r"^eval\.table\.pgd_linf\.eps must be >= 0, got -0\.2$"),
    ("eval.table.fgsm_l2.norm", "l0", r"^eval\.table\.fgsm_l2\.norm: unknown norm 'l0'"),
    ("eval.table.autoattack_linf.version", "strong",
     r"^eval\.table\.autoattack_linf: unknown AutoAttack version 'strong'"),
    ("eval.eps_linf", -0.1, r"^eval\.eps_linf must be >= 0, got -0\.1$"),
    ("eval.eps_l2", -1.0, r"^eval\.eps_l2 must be >= 0, got -1\.0$"),
    # Non-finite budgets and steps (issue 28.7): today accepted, and eps=inf reported robust
    # accuracy 1.00.
    ("eval.eps_linf", float("inf"), r"^eval\.eps_linf must be a finite number, got inf$"),
    ("eval.eps_l2", float("nan"), r"^eval\.eps_l2 must be a finite number, got nan$"),
    ("train.eps", float("inf"), r"^train\.eps must be a finite number, got inf$"),
    ("eval.table.pgd_linf.eps", float("inf"),
     r"^eval\.table\.pgd_linf\.eps must be a finite number, got inf$"),
    ("eval.attacks.pgd_l2.step_size", float("inf"),
     r"^eval\.attacks\.pgd_l2\.step_size must be a finite number, got inf$"),
    ("eval.table.soae_linf.alpha", float("inf"),
     r"^eval\.table\.soae_linf\.alpha must be a finite number, got inf$"),
    ("eval.table.second_order_l2.sigma", float("nan"),
     r"^eval\.table\.second_order_l2\.sigma must be a finite number, got nan$"),
])
def test_bad_configs_give_clear_errors(field, value, match):
  c = test_tiny.get_config("pgd")
  node = c
  *path, last = field.split(".")
  for p in path:
    node = node[p]
  node[last] = value
  with pytest.raises(ValueError, match=match):
    pipeline.validate_config(c)


def test_bad_tfds_dataset_name():
  c = test_tiny.get_config("standard")
  c.data.source, c.data.name = "tfds", "imagenet2012"
  with pytest.raises(ValueError, match="unknown dataset 'imagenet2012'"):
    pipeline.validate_config(c)


def _results_ok(workdir, methods, labels):
  with open(os.path.join(workdir, "results.json")) as f:
    res = json.load(f)["results"]
  assert sorted(res) == sorted(methods)
  for rows in res.values():
    assert {r["label"] for r in rows} == set(labels)
    for r in rows:
      assert 0.0 <= r["accuracy"] <= 1.0 and r["num_examples"] == 16
  md = open(os.path.join(workdir, "results.md")).read()
  assert "| attack |" in md and "Linf eps=0.1" in md and "L2 eps=0.5" in md
  return res


@pytest.mark.slow
def test_two_methods_train_and_compare(tmp_path, capsys):
  _require("pgd")
  c = _tiny("standard,pgd")
  c.train.epochs = 1
  results = soat.train_and_evaluate(c, str(tmp_path))
  assert list(results) == ["standard", "pgd"]
  _results_ok(str(tmp_path), ["standard", "pgd"], ["clean", "PGD-2"])
  records = {}
  for m in ("standard", "pgd"):
    lines = open(tmp_path / m / "metrics.jsonl").read().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["method"] == m
    records[m] = json.loads(lines[0])
    assert os.path.exists(tmp_path / m / "results.md")
  # Each column names the training threat and the attack's threat apart.
  md = open(tmp_path / "results.md").read()
  header = next(ln for ln in md.splitlines() if ln.startswith("| attack |"))
  assert header.split(" | ")[1:] == [
      "standard (no adversarial training) / attack Linf eps=0.1",
      "standard (no adversarial training) / attack L2 eps=0.5",
      "pgd (trained Linf eps=0.1) / attack Linf eps=0.1",
      "pgd (trained Linf eps=0.1) / attack L2 eps=0.5 |"]
  # The log says which batches the train accuracy is measured on, and prints one line per
  # attack as it prints one per epoch.
  out = capsys.readouterr().out
  assert records["pgd"]["train_accuracy_on"] == "adversarial"
  assert records["standard"]["train_accuracy_on"] == "clean"
  assert (f"[pgd] epoch 1/1: loss {records['pgd']['train_loss']:.4f}, train acc on adversarial "
          f"batches {records['pgd']['train_accuracy']:.4f}, clean test acc ") in out
  assert "[standard] epoch 1/1: loss " in out and "train acc on clean batches" in out
  progress = [ln for ln in out.splitlines() if "] attack " in ln]
  names = {"linf": "Linf", "l2": "L2"}
  assert [ln.split(" (")[0] for ln in progress] == [
      f"[{m}] attack {i}/4 {r.label} {names[r.norm]} eps={r.eps:g}: {100 * r.accuracy:.2f}% "
      f"{'clean' if r.attack == 'clean' else 'robust'} accuracy"
      for m in ("standard", "pgd") for i, r in enumerate(results[m], start=1)]
  assert {(r.label, r.norm) for r in results["pgd"]} == {
      (lbl, n) for lbl in ("clean", "PGD-2") for n in ("linf", "l2")}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["trades", "soat", "mixed", "second_order"])
def test_each_method_trains_and_evaluates(tmp_path, method):
  _require("pgd", *([NEEDS[method]] if method in NEEDS else []))
  c = _tiny(method)
  c.train.epochs = 1
  soat.train_and_evaluate(c, str(tmp_path), progress=False)
  _results_ok(str(tmp_path), [method], ["clean", "PGD-2"])
  rec = json.loads(open(tmp_path / "metrics.jsonl").read())
  assert rec["epoch"] == 1 and rec["step"] == 4 and np.isfinite(rec["train_loss"])


def _leaves(state):
  return [np.asarray(a) for a in jax.tree_util.tree_leaves((state.params, state.opt_state))]


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory):
  """A 2-epoch PGD run stopped after epoch 1 and resumed, and the same run uninterrupted."""
  _require("pgd")
  c = _tiny("pgd", eval_attacks=("clean",))
  a, b = str(tmp_path_factory.mktemp("stopped")), str(tmp_path_factory.mktemp("straight"))
  soat.train_and_evaluate(c, a, stop_after_epoch=1, progress=False)
  assert not os.path.exists(os.path.join(a, "results.json"))
  soat.train_and_evaluate(c, a, progress=False)
  soat.train_and_evaluate(c, b, progress=False)
  return c, a, b


@pytest.mark.slow
def test_resume_reproduces_uninterrupted_run(resumed_run):
  c, a, b = resumed_run
  _, sa, _ = pipeline.load_trained(c, a)
  _, sb, epochs = pipeline.load_trained(c, b)
  assert epochs == 2 and int(sa.step) == int(sb.step) == 8
  for x, y in zip(_leaves(sa), _leaves(sb)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
  la = [json.loads(s) for s in open(os.path.join(a, "metrics.jsonl"))]
  lb = [json.loads(s) for s in open(os.path.join(b, "metrics.jsonl"))]
  assert [r["epoch"] for r in la] == [1, 2]
  for ra, rb in zip(la, lb):
    assert np.isclose(ra["train_loss"], rb["train_loss"], rtol=1e-5)
  # A different seed gives a different run (the comparison above is not vacuous).
  c2 = ml_collections.ConfigDict(c.to_dict())
  c2.seed = 1
  d = os.path.join(a, "other_seed")
  pipeline.train(c2, d, stop_after_epoch=1, progress=False)
  _, s2, _ = pipeline.load_trained(c2, d)
  assert not np.allclose(_leaves(s2)[0], _leaves(sa)[0])


@pytest.mark.slow
def test_evaluate_runs_the_full_table_with_autoattack_by_default(resumed_run, capsys):
  """evaluate's default suite is eval.table, the papers' full table with AutoAttack, whatever
  the training-time suite eval.attacks is (here clean, FGSM, PGD-2 only)."""
  _require("fgsm", "pgd", "soae", "second_order", "autoattack")
  c, a, _ = resumed_run
  c = test_tiny.get_config("pgd")
  assert {v.name for v in c.eval.attacks.values()} == {"clean", "fgsm", "pgd"}
  results = evaluate_lib.evaluate_workdir(c, a)
  labels = [r.label for r in results["pgd"]]
  assert {(r.label, r.norm) for r in results["pgd"]} == {
      (lbl, n) for lbl in ("clean", "FGSM", "PGD-2", "S-O", "SOAE", "AutoAttack")
      for n in ("linf", "l2")}
  assert len(labels) == 12
  table = capsys.readouterr().out
  # One progress line per attack, in the suite's order, before the table.
  progress = [ln for ln in table.splitlines() if ln.startswith("[pgd] attack ")]
  assert [ln.split(":")[0] for ln in progress] == [
      f"[pgd] attack {i}/12 {r.label} {'Linf' if r.norm == 'linf' else 'L2'} eps="
      f"{r.eps:g}" for i, r in enumerate(results["pgd"], start=1)]
  rows = [ln for ln in table.splitlines() if ln.startswith("| ")][1:]
  assert [r.split("|")[1].strip() for r in rows] == ["clean", "FGSM", "PGD-2", "S-O", "SOAE",
                                                     "AutoAttack"]
  acc = {(r.label, r.norm): r.accuracy for r in results["pgd"]}
  for norm in ("linf", "l2"):
    assert acc[("AutoAttack", norm)] <= acc[("clean", norm)]
  md = open(os.path.join(a, "evaluation.md")).read()
  assert "(`eval.table`)" in md and "AutoAttack (Croce and Hein 2020), version custom" in md
  # Diagnostics under the table, from the _with_report entries of the same run.
  assert md.index("| attack |") < md.index("SOAE diagnostics") < md.index("AutoAttack: robust")
  with open(os.path.join(a, "evaluation.json")) as f:
    saved = json.load(f)
  diag = {(d["attack"], d["norm"]): d for d in saved["diagnostics"]["pgd"]}
  assert diag[("soae", "linf")]["krylov_dim_max"] <= c.eval.table.soae_linf.m
  assert 0 <= diag[("soae", "l2")]["fallback_rate"] <= 1 and diag[("soae", "l2")]["solves"] == 16
  aa = diag[("autoattack", "linf")]
  assert aa["components"] == ["apgd_ce"]
  assert aa["accuracy_after"][-1] == pytest.approx(acc[("AutoAttack", "linf")])
  assert saved["metadata"]["evaluation"]["suite"] == "eval.table"
  # Issue 25: every result's interval, the per-example flags beside the JSON, the worst case.
  from experiments import outputs
  flags, indices = outputs.read_flags(os.path.join(a, saved["flags_file"]))
  np.testing.assert_array_equal(indices, np.arange(16))
  for r in saved["results"]["pgd"]:
    assert r["ci95"][0] <= r["accuracy"] <= r["ci95"][1]
    assert flags[r["entry"]].mean() == pytest.approx(r["accuracy"])
  worst = {w["norm"]: w for w in saved["worst_case"]["pgd"]}
  assert worst["linf"]["accuracy"] <= acc[("AutoAttack", "linf")]


@pytest.mark.slow
def test_results_header_says_what_was_measured(resumed_run):
  """results.md's header and results.json's metadata: model, data, training, test points, each
  attack's settings, code version, with the config's values."""
  c, a, _ = resumed_run
  md = open(os.path.join(a, "results.md")).read()
  with open(os.path.join(a, "results.json")) as f:
    meta = json.load(f)["metadata"]
  header = md[:md.index("| attack |")]
  for field in ("**Model**", "**Data**", "**Training**", "**Evaluation**", "**Code**"):
    assert field in header
  assert f"{c.model.name} ({c.model.activation})" in header
  assert f"the first {c.eval.num_examples} test points" in header
  assert "`pgd`: Linf eps=0.1, pgd (random_start=True, step_size=0.05, steps=2); 2 epochs, " \
      "batch 16, SGD lr 0.05 (cosine)" in header
  assert "synthetic (synthetic images), 64 training / 32 test images" in header
  assert meta["model"]["name"] == c.model.name and meta["model"]["parameters"] > 0
  assert meta["data"] == dict(source="synthetic", name="synthetic", train_examples=64,
                              test_examples=32, augment=False)
  t = meta["training"]["pgd"]
  assert t["threat_model"] == {"norm": "linf", "eps": 0.1}
  assert t["hyperparameters"] == c.train.pgd.to_dict()
  assert t["epochs"] == 2 and t["epochs_recorded"] == 2 and t["seconds"] > 0
  assert meta["evaluation"]["test_points"] == 16 and meta["evaluation"]["suite"] == "eval.attacks"
  assert meta["evaluation"]["attacks"]["clean_linf"]["eps"] == 0.1
  commit = pipeline.git_commit()
  if commit:
    assert meta["code_version"] == commit and f"git {commit}" in header


def test_attack_settings_in_the_header():
  """Each attack's line: PGD steps and step size, S-O samples and sigma (explained), SOAE's N,
  m, tau, HVP, AutoAttack's version."""
  from experiments import outputs
  pgd = outputs.attack_settings_text("pgd", dict(steps=20, step_size=0.0125, random_start=True,
                                                 restarts=1, loss="ce"))
  assert "20 steps of size 0.0125" in pgd
  so = outputs.attack_settings_text("second_order", dict(steps=20, step_size=0.0125,
                                                         samples=8, sigma=0.05))
  assert "S-O attack" in so and "averaged over 8 Gaussian-perturbed inputs (sigma=0.05)" in so
  soae = outputs.attack_settings_text("soae", dict(steps=4, m=15, tau=1e-3, hvp="exact",
                                                   eta=1e-5, alpha=0.1, step="normalized"))
  assert "N=4" in soae and "m=15" in soae and "tau=0.001" in soae and "HVP exact" in soae
  aa = outputs.attack_settings_text("autoattack", dict(version="standard", attacks=None,
                                                       hyperparameters=None))
  assert aa == "AutoAttack (Croce and Hein 2020), version standard"


def _parse(config_file: str, *overrides: str):
  """The config as the command line builds it (ml_collections config_flags, locked)."""
  from absl import flags
  from ml_collections import config_flags
  fv = flags.FlagValues()
  argv = ["prog", f"--config={config_file}", *overrides]
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  fv(argv)
  return fv.config


def test_one_override_moves_every_eps_of_a_norm():
  path = os.path.join(ROOT, "configs", "quickstart.py")
  base = _parse(path)
  moved = _parse(path, "--config.eval.eps_linf=0.05")
  for suite in pipeline.SUITES:
    before, after = pipeline.eval_suite(base, suite), pipeline.eval_suite(moved, suite)
    assert before.keys() == after.keys()
    assert {e["eps"] for e in before.values() if e["norm"] == "linf"} == {0.1}
    assert {e["eps"] for e in after.values() if e["norm"] == "linf"} == {0.05}
    assert {e["eps"] for e in after.values() if e["norm"] == "l2"} == {1.0}
    # Step sizes and SOAE's alpha are the attacks' eps-relative defaults, so they follow.
    assert after["pgd_linf"]["step_size"] is None and after["soae_linf"]["alpha"] is None
  # One entry can still be set on its own; the other entries keep eval.eps_linf.
  one = _parse(path, "--config.eval.eps_l2=2.0", "--config.eval.table.soae_linf.eps=0.2",
               "--config.eval.table.pgd_linf.step_size=0.01")
  table = pipeline.eval_suite(one, "table")
  assert table["soae_linf"]["eps"] == 0.2 and table["pgd_linf"]["eps"] == 0.1
  assert table["pgd_linf"]["step_size"] == 0.01
  assert {e["eps"] for e in table.values() if e["norm"] == "l2"} == {2.0}
  assert pipeline.eval_suite(one, "attacks")["soae_linf"]["eps"] == 0.1
  # eval.skip leaves entries, attacks or norms out.
  skip = pipeline.eval_suite(_parse(path, "--config.eval.skip=autoattack,l2"), "table")
  assert sorted(skip) == ["clean_linf", "fgsm_linf", "pgd_linf", "second_order_linf",
                          "soae_linf"]


def test_quickstart_table_is_the_papers_and_training_suite_unchanged():
  c = _parse(os.path.join(ROOT, "configs", "quickstart.py"))
  table = pipeline.eval_suite(c, "table")
  assert {(e["label"], e["norm"]) for e in table.values()} == {
      (lbl, n) for lbl in ("clean", "FGSM", "PGD-20", "S-O", "SOAE", "AutoAttack")
      for n in ("linf", "l2")}
  assert table["autoattack_linf"]["version"] == "standard"
  after_training = pipeline.eval_suite(c, "attacks")
  assert {e["label"] for e in after_training.values()} == {"clean", "FGSM", "PGD-10", "S-O",
                                                            "SOAE"}


def test_quickstart_trains_the_undefended_baseline_first():
  """configs/quickstart.py compares SOAT and PGD-AT with the standard (undefended) model, which
  results.md then labels as not adversarially trained, also under the CI smoke overrides."""
  c = _parse(os.path.join(ROOT, "configs", "quickstart.py"))
  assert pipeline.methods_of(c) == ["standard", "soat", "pgd"]
  smoke = _parse(os.path.join(ROOT, "configs", "quickstart.py"), "--config.train.epochs=1",
                 "--config.data.num_test=64", "--config.eval.num_examples=32",
                 "--config.eval.batch_size=32", "--config.train.soat.steps=1")
  assert pipeline.methods_of(smoke) == ["standard", "soat", "pgd"]
  pipeline.validate_config(smoke)


def test_columns_name_the_training_and_the_attack_threat_apart():
  """outputs.robustness_table with run_metadata's training entries: the threat a model was
  trained against (or none) and the threat the attack ran in, in every column."""
  from experiments import outputs
  from krylov_adv.evaluation import AttackResult
  res = lambda norm, eps: [AttackResult("PGD-10", "pgd", norm, eps, 0.5, 10, 1.0)]
  results = {"standard": res("l2", 1.0), "soat": res("l2", 1.0) + res("linf", 8 / 255),
             "mixed": res("linf", 0.1)}
  training = {"standard": dict(epochs=1),
              "soat": dict(threat_model=dict(norm="linf", eps=0.1), attack="soae"),
              "mixed": dict(hyperparameters=dict(eps_linf=8 / 255, eps_l2=0.5, steps=7))}
  trained = {m: outputs.training_text(t) for m, t in training.items()}
  assert trained == {"standard": "no adversarial training", "soat": "trained Linf eps=0.1",
                     "mixed": "trained Linf eps=8/255 + L2 eps=0.5"}
  header = outputs.robustness_table(results, trained).splitlines()[0]
  assert header == ("| attack | standard (no adversarial training) / attack L2 eps=1 | "
                    "soat (trained Linf eps=0.1) / attack Linf eps=8/255 | "
                    "soat (trained Linf eps=0.1) / attack L2 eps=1 | "
                    "mixed (trained Linf eps=8/255 + L2 eps=0.5) / attack Linf eps=0.1 |")
  # Without the training entries a single model's columns are the attack's threat alone.
  assert outputs.robustness_table({"soat": res("l2", 1.0)}).splitlines()[0] == \
      "| attack | attack L2 eps=1 |"


def test_results_files_carry_intervals_and_per_example_flags(tmp_path):
  """pipeline.write_robustness (evaluate's and experiments.soat's results): every JSON result
  has its Wilson ci95, the markdown cell shows it, the flags go to <name>_robust_flags.npz and
  the worst case per norm is the AND of the norm's flags."""
  from scipy import stats as scipy_stats
  from experiments import outputs
  from krylov_adv.evaluation import AttackResult
  clean = np.array([1] * 9 + [0], bool)
  pgd = np.array([1] * 4 + [0] * 5 + [1], bool)
  res = [AttackResult("clean", "clean", "linf", 0.1, 0.9, 10, 0.1, (), clean, "clean_linf"),
         AttackResult("PGD-10", "pgd", "linf", 0.1, 0.5, 10, 1.0, (), pgd, "pgd_linf")]
  table = pipeline.write_robustness(str(tmp_path), {"pgd": res}, "t", name="evaluation")
  saved = json.load(open(tmp_path / "evaluation.json"))
  for r, k in zip(saved["results"]["pgd"], (9, 5)):
    want = scipy_stats.binomtest(k, 10).proportion_ci(method="wilson")
    np.testing.assert_allclose(r["ci95"], (want.low, want.high), atol=1e-9)
    assert "correct" not in r
  assert saved["flags_file"] == "evaluation_robust_flags.npz"
  flags, indices = outputs.read_flags(str(tmp_path / saved["flags_file"]))
  np.testing.assert_array_equal(flags["pgd_linf"], pgd)
  np.testing.assert_array_equal(indices, np.arange(10))
  assert saved["worst_case"]["pgd"][0]["accuracy"] == pytest.approx(0.4)  # (clean AND pgd)
  lo, hi = saved["results"]["pgd"][1]["ci95"]
  assert f"| 50.00% ({100 * lo:.1f}-{100 * hi:.1f}) |" in table


def test_evaluate_without_checkpoint_is_a_clear_error(tmp_path):
  from experiments import workdir as workdir_lib
  with pytest.raises(workdir_lib.ConfigError, match="no checkpoint"):
    pipeline.load_trained(test_tiny.get_config("standard"), str(tmp_path))
  assert os.listdir(tmp_path) == []  # nothing created


@pytest.mark.slow
def test_command_line_with_overrides(tmp_path):
  _require("fgsm", "pgd")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "experiments.soat", "--config", "configs/test_tiny.py:standard",
         "--workdir", str(tmp_path), "--config.train.epochs=1", "--config.eval.num_examples=16"]
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "| clean |" in out.stdout
  saved = json.load(open(tmp_path / "config.json"))
  assert saved["train"]["epochs"] == 1
  assert len(open(tmp_path / "metrics.jsonl").read().splitlines()) == 1
  bad = subprocess.run(cmd[:-2] + ["--config.train.method=bogus"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
  assert bad.returncode != 0 and "unknown training method 'bogus'" in bad.stderr


@pytest.mark.slow
def test_skipping_an_entry_leaves_the_other_entries_seeds(monkeypatch):
  """eval.skip: an entry's attack key is folded with its position in the whole suite, so a
  random-start PGD entry after a skipped FGSM entry returns the same adversarial examples
  (hence the same accuracy) as without the skip; with nothing skipped the indices are the
  plain positions (the quickstart's results do not move)."""
  from krylov_adv import evaluation
  c = test_tiny.get_config("standard")
  # clean, FGSM, PGD (random start) under Linf; the L2 half would only double the cost.
  c.eval.attacks = ml_collections.ConfigDict(
      {k: v for k, v in c.eval.attacks.items() if k.endswith("_linf")})
  assert pipeline.suite_key_indices(c) == {e: i for i, e in enumerate(pipeline.eval_suite(c))}
  exp = pipeline.build(c)
  state = pipeline.initial_state(exp)
  real = evaluation.run_attack

  def run(skip):
    c.eval.skip = skip
    seen = {}

    def spy(logits_fn, attack_fn, x, y, key, **kw):
      out = real(logits_fn, attack_fn, x, y, key, **{**kw, "keep_examples": True})
      seen[(attack_fn.func.__name__, kw["norm"])] = out.x_adv
      return out

    monkeypatch.setattr(evaluation, "run_attack", spy)
    results = {(r.attack, r.norm): r.accuracy for r in pipeline.evaluate(exp, state, c)}
    return results, seen

  full, full_adv = run("")
  skipped, skipped_adv = run("fgsm")
  assert ("fgsm", "linf") in full and ("fgsm", "linf") not in skipped
  np.testing.assert_array_equal(skipped_adv[("pgd", "linf")], full_adv[("pgd", "linf")])
  assert skipped[("pgd", "linf")] == full[("pgd", "linf")]
  # The check can fail: numbered by position in the skipped suite (the old way), PGD's random
  # start, hence its points, move.
  seen_old = {}
  monkeypatch.setattr(evaluation, "run_attack", lambda *a, **kw: seen_old.setdefault(
      (a[1].func.__name__, kw["norm"]), real(*a, **{**kw, "keep_examples": True})))
  logits_fn = jax.jit(training.inference_logits_fn(exp.model, state.params, state.batch_stats))
  evaluation.evaluate_attacks(logits_fn, exp.dataset.x_test[:16], exp.dataset.y_test[:16],
                              pipeline.eval_suite(c), jax.random.PRNGKey(c.seed + 2),
                              batch_size=16)
  assert not np.array_equal(seen_old[("pgd", "linf")].x_adv, full_adv[("pgd", "linf")])


def test_non_finite_budget_and_bad_data_are_one_line_on_the_command_line(tmp_path):
  # Issue 28.7: both used to start a run (eps=inf reported robust accuracy 1.00; NaN pixels
  # trained on).
  import struct  # pylint: disable=import-outside-toplevel
  img = np.random.default_rng(0).uniform(size=(6, 4, 4)).astype(np.float32)
  img.flat[5] = np.nan
  lbl = (np.arange(6) % 10).astype(np.uint8)
  for split in ("train", "t10k"):  # IDX: 0, 0, type code (0x0D float32, 0x08 uint8), rank
    for kind, a, code in (("images-idx3", img, 0x0D), ("labels-idx1", lbl, 0x08)):
      with open(tmp_path / f"{split}-{kind}-ubyte", "wb") as f:
        f.write(bytes([0, 0, code, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape)
                + a.astype(a.dtype.newbyteorder(">")).tobytes())
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "experiments.soat", "--config", "configs/test_tiny.py:standard",
         "--workdir", str(tmp_path / "w")]
  for extra, line in (
      (["--config.eval.eps_linf=inf"],
       "soat: error: eval.eps_linf must be a finite number, got inf"),
      (["--config.data.source=idx", f"--config.data.root={tmp_path}"],
       f"soat: error: {tmp_path}/train-images-idx3-ubyte: images contain NaN or inf")):
    out = subprocess.run(cmd + extra, cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    lines = [ln for ln in out.stderr.splitlines() if not ln.startswith(("WARNING", "I0", "W0"))]
    assert out.returncode == 2 and lines == [line], out.stderr[-2000:]
