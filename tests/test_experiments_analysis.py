"""The analysis experiments (ablation_hvp, krylov_dims, iterations, perceptual, grad_norms, report)
end to end on their tiny configs, plus the pieces they compute with, against references."""

from __future__ import annotations

import importlib
import json
import math
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common as config_common
from experiments import datasets, grad_norms, krylov_dims, pipeline, report, trained_models
from krylov_adv import attacks, hvp, krylov, losses, projections

EXPERIMENTS = ("ablation_hvp", "krylov_dims", "iterations", "perceptual", "grad_norms")


def _config(name, scale="tiny"):
  return importlib.import_module(f"configs.{name}").get_config(scale)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """One workdir for every experiment, so models shared by experiments are trained once."""
  return str(tmp_path_factory.mktemp("analysis"))


@pytest.fixture(scope="module")
def results(workdir):
  """Runs every experiment's tiny config once; ``{name: results dict}``."""
  out = {}
  for name in EXPERIMENTS:
    module = importlib.import_module(f"experiments.{name}")
    out[name] = module.run(_config(name), workdir, progress=False)
  return out


def _stored(workdir, name):
  with open(os.path.join(workdir, name, "results.json")) as f:
    return json.load(f)


def _finite(v):
  return v is not None and math.isfinite(v)


# ---------------------------------------------------------------------------------------------
# Configs


@pytest.mark.parametrize("name", EXPERIMENTS)
@pytest.mark.parametrize("scale", config_common.SCALES)
def test_configs_build_at_every_scale(name, scale):
  c = _config(name, scale)
  assert c.experiment and c.data.source
  if scale == "paper":
    assert c.model.name == "madry_cnn" and c.data.name == "mnist"
  # The reduced sweeps are subsets of the full ones (Fig. 1's etas, Table IV's taus), with
  # both ends kept; the paper scale runs them all.
  e = c.experiment
  if name == "krylov_dims":
    assert set(e.attack_taus) <= set(e.taus) and max(e.attack_taus) == max(e.taus)
    assert min(e.attack_taus) == min(e.taus) and (scale != "paper" or e.attack_taus == e.taus)
  if name == "ablation_hvp" and scale != "tiny":
    assert set(e.effect_etas) <= set(e.etas)
    assert (min(e.effect_etas), max(e.effect_etas)) == (min(e.etas), max(e.etas))
    if scale == "paper":
      assert tuple(e.effect_etas) == tuple(e.etas)


def test_unknown_scale_is_a_clear_error():
  with pytest.raises(ValueError, match="unknown scale"):
    _config("krylov_dims", "huge")


def test_mnist_test_split_loads_real_images():
  root = os.path.join(datasets.ROOT, "..", "shared", "data", "mnist")
  if not os.path.exists(os.path.join(root, "t10k-images-idx3-ubyte.gz")):
    pytest.skip("MNIST test set not available")
  ds = datasets.load_data(_config("perceptual", "small").data)
  assert ds.x_train.shape == (8000, 28, 28, 1) and ds.x_test.shape == (2000, 28, 28, 1)
  assert 0.0 <= ds.x_test.min() and ds.x_test.max() <= 1.0
  assert set(np.unique(ds.y_test)) == set(range(10))


# ---------------------------------------------------------------------------------------------
# Building blocks


@pytest.mark.slow
def test_models_train_data_parallel_like_soat():
  """The analyses train on the config's mesh (every device by default) as experiments.soat
  does; that equals training on one device within float tolerance."""
  pytest.importorskip("sklearn")
  cfg = _config("iterations")
  cfg.train.epochs = 1
  dataset = datasets.load_data(cfg.data)
  _, sharded = pipeline.train_in_memory(cfg, dataset)
  leaf = jax.tree_util.tree_leaves(sharded.params)[0]
  assert len(leaf.sharding.device_set) == jax.device_count() and leaf.sharding.is_fully_replicated
  cfg.parallel.mesh_shape = (1,)
  _, single = pipeline.train_in_memory(cfg, dataset)
  assert len(jax.tree_util.tree_leaves(single.params)[0].sharding.device_set) == 1
  for a, b in zip(jax.tree_util.tree_leaves(sharded.params),
                  jax.tree_util.tree_leaves(single.params), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  assert int(sharded.step) == int(single.step) == len(dataset.y_train) // cfg.train.batch_size


def test_model_cache_is_npz_without_pickle(tmp_path):
  """The model cache round-trips nested variables (an empty batch_stats included) through a
  plain .npz that loads with allow_pickle=False, written via a temporary file."""
  variables = {"params": {"conv": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3),
                                   "bias": np.zeros(3, np.float32)}},
               "batch_stats": {}}
  path = str(tmp_path / "m.npz")
  trained_models.save_variables(path, variables, 1.5)
  assert os.listdir(tmp_path) == ["m.npz"]
  with np.load(path, allow_pickle=False) as z:
    assert all(z[k].dtype != object for k in z.files)
  got, seconds = trained_models.load_variables(path)
  assert seconds == 1.5 and got["batch_stats"] == {}
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(variables),
                  strict=True):
    np.testing.assert_array_equal(a, b)
    assert a.dtype == b.dtype


def test_configs_import_only_ml_collections_and_configs_common():
  """Configs are data: none imports experiments/, or anything but ml_collections and
  configs/common.py."""
  import ast
  import glob
  allowed = {"__future__", "ml_collections", "configs", "configs.common"}
  for path in glob.glob(os.path.join(datasets.ROOT, "configs", "*.py")):
    tree = ast.parse(open(path).read())
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        mods = {a.name for a in node.names}
      elif isinstance(node, ast.ImportFrom):
        mods = {f"{node.module}.{a.name}" if node.module == "configs" else node.module
                for a in node.names}
      else:
        continue
      assert mods <= allowed, (path, mods)


@pytest.mark.slow
def test_dims_per_tau_matches_gmres_stopped_at_each_tau(digits_model):
  """m(tau) read off one run's residual history equals the dimension of a run stopped at tau."""
  x = jnp.asarray(digits_model.x_test[:6])
  y = jnp.asarray(digits_model.y_test[:6])
  logits_fn = digits_model.logits_fn
  taus = (1e-1, 1e-3)
  res = krylov_dims.newton_residual_histories(logits_fn, x, y, method="exact", eta=1e-3,
                                              tol=min(taus), max_dim=20)
  dims, conv = krylov_dims.dims_per_tau(np.asarray(res.residual_history),
                                        np.asarray(res.initial_residual_norm), taus, 20)
  loss_fn = lambda z: losses.cross_entropy(logits_fn(z), y)
  op = hvp.make_hvp(loss_fn, x, method="exact")
  for ti, tau in enumerate(taus):
    direct = krylov.gmres(op.matvec, op.grad, op.grad, tol=tau, max_dim=20)
    np.testing.assert_array_equal(dims[ti], np.asarray(direct.num_iters))
    np.testing.assert_array_equal(conv[ti], np.asarray(direct.converged))


def test_dims_per_tau_unconverged_and_zero_residual():
  hist = np.array([[0.5, 0.2, np.nan], [0.9, 0.8, 0.7]])
  dims, conv = krylov_dims.dims_per_tau(hist, np.array([1.0, 1.0]), (0.3,), 3)
  np.testing.assert_array_equal(dims[0], [2, 3])
  np.testing.assert_array_equal(conv[0], [True, False])
  dims, conv = krylov_dims.dims_per_tau(np.full((1, 3), np.nan), np.array([0.0]), (0.1,), 3)
  assert dims[0, 0] == 0 and conv[0, 0]


def test_relu_hessian_rank_at_most_k_minus_1(digits_model, smooth_digits_model):
  """J^T (diag p - p p^T) J has rank <= K - 1 for a piecewise-linear net; not for softplus."""
  x, y = digits_model.x_test[:3], digits_model.y_test[:3]
  assert krylov_dims.hessian_ranks(digits_model.logits_fn, x, y, rtol=1e-5).max() <= 9
  assert krylov_dims.hessian_ranks(smooth_digits_model.logits_fn, x, y, rtol=1e-5).min() > 9


def _pgd_reference(logits_fn, x, y, *, eps, norm, steps, step_size):
  """Plain Python PGD (no random start) recording ||grad|| means, written independently."""
  loss_sum = lambda z: jnp.sum(losses.cross_entropy(logits_fn(z), y))
  xt, norms = x, []
  for _ in range(steps + 1):
    g = jax.grad(loss_sum)(xt)
    norms.append(float(jnp.mean(jnp.sqrt(jnp.sum(g.reshape(len(x), -1) ** 2, axis=1)))))
    flat_norm = jnp.sqrt(jnp.sum(g.reshape(len(x), -1) ** 2, axis=1)).reshape(-1, 1, 1, 1)
    if norm == "linf":
      xt_next = jnp.clip(x + jnp.clip(xt + step_size * jnp.sign(g) - x, -eps, eps), 0, 1)
    else:
      d = xt + step_size * g / flat_norm - x
      n = jnp.sqrt(jnp.sum(d.reshape(len(x), -1) ** 2, axis=1)).reshape(-1, 1, 1, 1)
      xt_next = jnp.clip(x + d * jnp.minimum(1.0, eps / n), 0, 1)
    xt = xt_next
  return np.array(norms)


@pytest.mark.slow
@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 1.0)])
def test_traced_pgd_matches_reference(digits_model, norm, eps):
  x = jnp.asarray(digits_model.x_test[:8])
  y = jnp.asarray(digits_model.y_test[:8])
  tr = grad_norms.trace_attack(digits_model.logits_fn, x, y, jax.random.PRNGKey(0), attack="pgd",
                               eps=eps, norm=norm, steps=3, step_size=eps / 3)
  ref = _pgd_reference(digits_model.logits_fn, x, y, eps=eps, norm=norm, steps=3,
                       step_size=eps / 3)
  # The reference's last xt is after 4 steps; compare the recorded norms t = 0..3.
  np.testing.assert_allclose(np.asarray(tr.grad_norm), ref, rtol=1e-4)
  dist = np.asarray(projections.per_example_norm(tr.x_adv - x, norm))
  assert dist.max() <= eps + 1e-5
  assert tr.accuracy[-1] <= tr.accuracy[0]


def test_traced_second_order_without_noise_is_pgd(digits_model):
  """S-O's averaged gradient at sigma = 0 is the gradient itself: the traces coincide."""
  x = jnp.asarray(digits_model.x_test[:8])
  y = jnp.asarray(digits_model.y_test[:8])
  kw = dict(eps=0.1, norm="linf", steps=3, step_size=0.04)
  a = grad_norms.trace_attack(digits_model.logits_fn, x, y, jax.random.PRNGKey(1), attack="pgd",
                              **kw)
  b = grad_norms.trace_attack(digits_model.logits_fn, x, y, jax.random.PRNGKey(1),
                              attack="second_order", samples=3, sigma=0.0, **kw)
  np.testing.assert_allclose(np.asarray(a.grad_norm), np.asarray(b.grad_norm), rtol=1e-5)
  c = grad_norms.trace_attack(digits_model.logits_fn, x, y, jax.random.PRNGKey(1),
                              attack="second_order", samples=3, sigma=0.3, **kw)
  assert not np.allclose(np.asarray(c.x_adv), np.asarray(a.x_adv))
  with pytest.raises(ValueError, match="unknown attack"):
    grad_norms.trace_attack(digits_model.logits_fn, x, y, jax.random.PRNGKey(1), attack="fab",
                            **kw)


# ---------------------------------------------------------------------------------------------
# End to end on the tiny configs


@pytest.mark.slow
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_writes_results_report_and_figures(results, workdir, name):
  out = os.path.join(workdir, name)
  stored = _stored(workdir, name)
  assert stored["config"]["experiment"]
  with open(os.path.join(out, "report.md")) as f:
    text = f.read()
  assert text.startswith("## ")
  figures = [f for f in os.listdir(out) if f.endswith(".png")]
  rows = stored["results"].get("rows", [])
  all_skipped = bool(rows) and all("skipped" in q for q in rows)
  assert figures or all_skipped  # no figure only when no attack of the sweep is registered yet
  for f in figures:
    assert f"({f})" in text
    with open(os.path.join(out, f), "rb") as fh:
      assert fh.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_ablation_numbers(results):
  r = results["ablation_hvp"]
  rows = r["accuracy"]
  assert {(q["activation"], q["dtype"]) for q in rows} == {
      (a, d) for a in ("relu", "softplus") for d in ("float32", "float64")}
  for q in rows:
    assert _finite(q["median"]) and 0 <= q["median"] <= q["max"]
  med = {(q["activation"], q["dtype"], q["direction"], q["scheme"], q["eta"]): q["median"]
         for q in rows}
  # float64, smooth model: central difference at eta = 1e-4 has truncation ~1e-8 relative.
  assert med[("softplus", "float64", "random", "central", 1e-4)] < 1e-6
  # eta = 1e-7 moves pixels near 0.5 by about one float32 ulp (6e-8): the float32 difference
  # is rounding noise (error of order 1), while float64 is still accurate there.
  for act in ("relu", "softplus"):
    assert med[(act, "float32", "random", "forward", 1e-7)] > 0.5
    assert med[(act, "float64", "random", "forward", 1e-7)] < 1e-4
  cost = r["cost"]["relative_to_gradient"]
  assert cost["gradient"] == 1.0 and all(_finite(v) and v > 0 for v in cost.values())
  assert r["conclusions"] and any("float32" in c and "1e-5" in c for c in r["conclusions"])
  if "rows" in r["effect"]:
    for q in r["effect"]["rows"]:
      assert 0.0 <= q["robust_accuracy"] <= 1.0


@pytest.mark.slow
def test_krylov_dims_numbers(results):
  r = results["krylov_dims"]
  max_dim = _config("krylov_dims").experiment.max_dim
  for q in r["dims"]:
    assert 0 <= q["m_mean"] <= q["m_max"] <= max_dim and 0 <= q["converged"] <= 1
  relu_exact = [q for q in r["dims"] if q["activation"] == "relu" and q["hvp"] == "exact"]
  assert max(q["m_max"] for q in relu_exact) <= r["ranks"]["num_classes"] - 1
  # m grows (weakly) as tau shrinks.
  for key in {(q["activation"], q["hvp"]) for q in r["dims"]}:
    sel = sorted((q for q in r["dims"] if (q["activation"], q["hvp"]) == key),
                 key=lambda q: -q["tau"])
    assert all(a["m_mean"] <= b["m_mean"] for a, b in zip(sel, sel[1:]))
  assert r["ranks"]["relu"]["max"] <= 9 < r["ranks"]["softplus"]["max"]
  if "rows" in r["soae"]:
    for q in r["soae"]["rows"]:
      assert 0.0 <= q["robust_accuracy"] <= 1.0 and q["seconds"] > 0
      # Timed by repeats: the median lies within the recorded spread.
      assert q["seconds_min"] <= q["seconds"] <= q["seconds_max"] and q["timing_repeats"] >= 2
      assert 0 <= q["attack_m_mean"] <= q["attack_m_max"] <= max_dim
      assert 0.0 <= q["fallback_rate"] <= 1.0


@pytest.mark.slow
def test_iterations_numbers(results):
  r = results["iterations"]
  cfg = _config("iterations").experiment
  assert r["rows"]
  for q in r["rows"]:
    if "skipped" not in q:
      assert 0.0 <= q["robust_accuracy"] <= 1.0 and q["seconds"] > 0
  for key in {(q["model"], q["attack"]) for q in r["rows"] if "skipped" not in q}:
    ns = sorted(q["iterations"] for q in r["rows"] if (q["model"], q["attack"]) == key)
    assert ns == sorted(cfg.iterations)


@pytest.mark.slow
def test_perceptual_numbers(results):
  r = results["perceptual"]
  done = [q for q in r["rows"] if "skipped" not in q]
  assert done  # AutoAttack is registered already
  for q in done:
    if q["psnr"] is not None:
      # An Linf eps perturbation can not have a PSNR below 20 log10(1 / eps).
      assert q["psnr"] >= 20 * math.log10(1 / r["eps"]) - 1e-3
      assert abs(q["psnr_255"] - q["psnr"] - 20 * math.log10(255)) < 1e-6
      assert -1.0 <= q["ssim"] <= 1.0
    assert 0.0 <= q["success_rate"] <= 1.0 and q["mean_linf"] <= r["eps"] + 1e-5


@pytest.mark.slow
def test_grad_norm_numbers(results):
  r = results["grad_norms"]
  steps = _config("grad_norms").experiment.steps
  assert {(q["model"], q["attack"]) for q in r["rows"]} == {
      (m, a) for m in ("standard", "trades") for a in ("pgd", "second_order")}
  for q in r["rows"]:
    assert len(q["grad_norm"]) == steps + 1
    assert all(_finite(v) and v >= 0 for v in q["grad_norm"])
    assert all(0.0 <= v <= 1.0 for v in q["accuracy"])


@pytest.mark.slow
def test_report_collects_every_section(results, workdir):
  path = report.build_report(workdir)
  with open(path) as f:
    text = f.read()
  for name in EXPERIMENTS:
    assert f'<a id="{name}"></a>' in text
  links = [l.split("](")[1].rstrip(")") for l in text.splitlines() if l.startswith("![")]
  assert len(links) >= len(EXPERIMENTS)
  for link in links:
    assert os.path.exists(os.path.join(workdir, link)), link


def test_report_without_results_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="no experiment results"):
    report.build_report(str(tmp_path))


# ---------------------------------------------------------------------------------------------
# Figures: a title, the legend outside every panel, repeated timings; the perceptual data choice


def _assert_titled_with_legend_outside(fig, *, legend=True):
  """The figure has a (super)title, no legend inside a panel, and (when ``legend``) one figure
  legend whose drawn box overlaps no panel."""
  assert fig._suptitle is not None and fig._suptitle.get_text().strip()
  assert all(ax.get_legend() is None for ax in fig.axes)
  if not legend:
    return
  assert len(fig.legends) == 1 and fig.legends[0].get_texts()
  fig.canvas.draw()
  box = fig.legends[0].get_window_extent()
  for ax in fig.axes:
    assert not box.overlaps(ax.get_window_extent()), ax.get_title()


FIGURES = {"ablation_hvp": {"fd_relative_error.png", "soae_accuracy_vs_eta.png", "hvp_cost.png"},
           "krylov_dims": {"m_per_tau.png", "soae_accuracy_time_per_tau.png"},
           "iterations": {"accuracy_vs_iterations.png"},
           "grad_norms": {"grad_norms.png"}}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FIGURES))
def test_figures_have_a_title_and_the_legend_outside_the_panels(results, name):
  from experiments import outputs
  module = importlib.import_module(f"experiments.{name}")
  figs = module.make_figures(results[name])
  assert set(figs) == FIGURES[name]
  for fig in figs.values():
    _assert_titled_with_legend_outside(fig)
    outputs.pyplot().close(fig)


@pytest.mark.slow
def test_m_per_tau_legend_is_short_and_says_mean_and_max(results):
  (fig,) = [f for n, f in krylov_dims.make_figures(results["krylov_dims"]).items()
            if n == "m_per_tau.png"]
  labels = [t.get_text() for t in fig.legends[0].get_texts()]
  hvps = {q["hvp"] for q in results["krylov_dims"]["dims"]}
  # One entry per HVP method, K - 1, and one per statistic: not one per line.
  assert len(labels) == len(hvps) + 3
  assert "mean over examples" in labels and "max over examples" in labels


def test_perceptual_examples_figure_has_a_title():
  from experiments import outputs, perceptual
  x = np.random.default_rng(0).uniform(size=(3, 12, 12, 1)).astype(np.float32)
  figs = perceptual.make_figures(x, {"fgsm": x, "pgd": x}, title="Examples")
  _assert_titled_with_legend_outside(figs["examples.png"], legend=False)
  assert [ax.get_ylabel() for ax in figs["examples.png"].axes[::3]] == ["clean", "fgsm", "pgd"]
  outputs.pyplot().close(figs["examples.png"])


def test_series_style_keeps_one_colour_per_series_and_variants_apart():
  from experiments import outputs
  mean, mx = outputs.series_style(1, 0), outputs.series_style(1, 1)
  assert mean["color"] == mx["color"] and mean["marker"] == mx["marker"]
  assert mean["ls"] != mx["ls"] and mx["markerfacecolor"] == "none"
  a, b = outputs.series_style(0), outputs.series_style(1)
  assert a["color"] != b["color"] and a["marker"] != b["marker"]
  # The later series is drawn on top, thinner: both stay visible where they coincide.
  assert b["lw"] < a["lw"] and b["markersize"] < a["markersize"] and b["zorder"] > a["zorder"]


def test_measure_reports_median_and_spread_of_repeats():
  from experiments import timing
  calls = []
  t, out = timing.measure(lambda: calls.append(1) or jnp.ones(3) * len(calls), repeats=4,
                          warmup=1)
  assert len(calls) == 5 and t.repeats == 4 and float(out[0]) == 5.0
  assert 0 <= t.min <= t.median <= t.max


def test_perceptual_small_config_runs_without_shared_data(tmp_path):
  """A fresh clone has no ../shared: the small config then trains on upsampled digits, and says
  so in one line that names the missing files and the override."""
  c = _config("perceptual", "small")
  c.data.root = str(tmp_path / "no_mnist_here")
  chosen, note = datasets.choose_data(c)
  assert chosen.data.source == "digits" and chosen.data.upsample == 2
  assert "data_fallback" not in chosen and chosen.train.epochs == c.data_fallback.train.epochs
  assert "\n" not in note and "t10k-images-idx3-ubyte" in note and "--config.data.root" in note
  ds = datasets.load_data(chosen.data)
  # Large enough for SSIM's 11 x 11 window; pixel values unchanged by the upsampling.
  assert ds.x_test.shape[1:] == (16, 16, 1) and 0.0 <= ds.x_test.min() <= ds.x_test.max() <= 1.0
  np.testing.assert_array_equal(ds.x_test[:, ::2, ::2], ds.x_test[:, 1::2, 1::2])
  # The trained-model cache is keyed by the data actually used.
  assert trained_models._cache_key(chosen) != trained_models._cache_key(c)


def test_perceptual_small_config_keeps_real_mnist_when_present(tmp_path):
  for stem in datasets.IDX_TEST_FILES:
    (tmp_path / (stem + ".gz")).write_bytes(b"")
  c = _config("perceptual", "small")
  c.data.root = str(tmp_path)
  chosen, note = datasets.choose_data(c)
  assert chosen is c and chosen.data.source == "idx" and "idx" in note
  # Configs without a fallback are returned as they are.
  c2 = _config("krylov_dims", "small")
  assert datasets.choose_data(c2)[0] is c2


# ---------------------------------------------------------------------------------------------
# Smoke tests: every analysis entry point on a micro config (fast tier)
#
# The tiny configs above cost 4-13 CPU seconds each (slow tier); these micro versions of them
# (one epoch on 64 digits, 2 attacked points, one setting per sweep) run each command's `run`
# end to end in the fast tier, mostly compiling. The numbers are checked by the slow tests.

# Overrides of each tiny config's `experiment` block: one setting per sweep, 2 examples, the
# smallest batch, m and step counts. Every model is the standard ReLU TinyCNN (perceptual: on its
# synthetic 12x12 images), trained once in the shared workdir's model cache.
MICRO = {
    "ablation_hvp": dict(accuracy_examples=2, etas=(1e-4,), dtypes=("float32",),
                         activations=("relu",), directions=("random",),
                         hvp_methods=("fd_forward",), effect_etas=(1e-4,), effect_examples=2,
                         batch_size=2, soae=dict(m=2), timing_batch=2, timing_repeats=1),
    "grad_norms": dict(model_methods=("standard",), steps=1, samples=1, num_examples=2,
                       batch_size=2),
    "iterations": dict(iterations=(1,), num_examples=2, batch_size=2,
                       attacks=dict(soae=dict(m=2))),
    "krylov_dims": dict(taus=(1e-1,), max_dim=4, activations=("relu",), num_examples=2,
                        rank_examples=1, attack_taus=(1e-1,), attack_examples=2, batch_size=2,
                        timing_repeats=1),
    "perceptual": dict(num_examples=2, batch_size=2, num_shown=2),
    "soae_direction": dict(activations=("relu",), num_examples=2, norms=("linf",),
                           attack_examples=2, batch_size=2, soae=dict(m=2)),
}


def _micro_config(name):
  c = _config(name)
  c.train.epochs = 1
  c.data.max_train, c.data.max_test = 64, 16
  if c.data.source == "synthetic":
    c.data.num_train, c.data.num_test = 64, 16
  c.experiment.update(MICRO[name])
  return c


@pytest.fixture(scope="module")
def micro_workdir(tmp_path_factory):
  """One workdir for the micro runs: the standard ReLU model they share is trained once."""
  return str(tmp_path_factory.mktemp("micro"))


def _numbers(tree):
  if isinstance(tree, dict):
    tree = list(tree.values())
  if isinstance(tree, (list, tuple)):
    return [v for t in tree for v in _numbers(t)]
  return [tree] if isinstance(tree, (int, float)) and not isinstance(tree, bool) else []


# The keys of each micro run's results dict (a subset of what `run` returns) that hold numbers.
MICRO_KEYS = {
    "ablation_hvp": ("accuracy", "effect", "cost", "models"),
    "grad_norms": ("rows", "steps", "models"),
    "iterations": ("rows", "eps", "num_examples", "models"),
    "krylov_dims": ("dims", "ranks", "soae", "models"),
    "perceptual": ("rows", "eps", "clean_accuracy"),
    "soae_direction": ("directions", "attacks", "hvp_cost", "models"),
}


@pytest.mark.parametrize("name", sorted(MICRO))
def test_entry_point_runs_on_a_micro_config(micro_workdir, name):
  """`experiments.<name>.run` end to end: results.json, report.md and a figure written, the
  expected keys there, each with finite numbers."""
  res = importlib.import_module(f"experiments.{name}").run(_micro_config(name), micro_workdir,
                                                           progress=False)
  out = os.path.join(micro_workdir, name)
  stored = _stored(micro_workdir, name)
  assert set(stored["results"]) == set(res) >= set(MICRO_KEYS[name])
  with open(os.path.join(out, "report.md")) as f:
    assert f.read().startswith("## ")
  assert any(f.endswith(".png") for f in os.listdir(out))
  for key in MICRO_KEYS[name]:
    numbers = _numbers(res[key])
    assert numbers and all(math.isfinite(v) for v in numbers), (key, numbers)
