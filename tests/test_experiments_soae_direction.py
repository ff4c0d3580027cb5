"""experiments.soae_direction end to end at tiny scale, and its margin-gain ratio against a
hand computation."""

from __future__ import annotations

import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax.numpy as jnp
import numpy as np
import pytest

from configs import common as config_common
from configs import soae_direction as config
from experiments import report, soae_direction


def test_gain_ratio_by_hand():
  gm = np.array([[1.0, -2.0], [0.0, 0.0]])
  d = np.array([[-1.0, 1.0], [1.0, 1.0]])
  # Linf: -gm . sign(d) = 1 + 2 = 3 = ||gm||_1, the best; the zero gradient gives NaN.
  r = soae_direction.gain_ratio(gm, d, "linf")
  assert r[0] == pytest.approx(1.0) and np.isnan(r[1])
  # L2: -gm . d / ||d|| = 3 / sqrt(2) against ||gm||_2 = sqrt(5).
  assert soae_direction.gain_ratio(gm, d, "l2")[0] == pytest.approx(3 / np.sqrt(10))
  assert soae_direction.gain_ratio(gm, -d, "linf")[0] == pytest.approx(-1.0)


def test_margin_grad_is_true_minus_runner_up():
  w = jnp.asarray(np.arange(12.0).reshape(4, 3) / 10)
  logits_fn = lambda x: x.reshape(len(x), -1) @ w
  x = jnp.ones((1, 4))
  y = jnp.asarray([0])   # logits increase with the class, so the runner-up of 0 is class 2
  np.testing.assert_allclose(soae_direction.margin_grad(logits_fn, x, y)[0],
                             np.asarray(w[:, 0] - w[:, 2]))


@pytest.mark.parametrize("scale", config_common.SCALES)
def test_config_builds(scale):
  c = config.get_config(scale)
  assert c.experiment.m >= 1 and set(c.experiment.norms) == {"linf", "l2"}


@pytest.mark.slow
def test_tiny_run_writes_results_and_the_proposition_holds(tmp_path):
  workdir = str(tmp_path)
  res = soae_direction.run(config.get_config("tiny"), workdir, progress=False)
  with open(os.path.join(workdir, "soae_direction", "results.json")) as f:
    stored = json.load(f)["results"]
  assert stored["directions"] and stored["attacks"]
  k = 10
  for r in res["directions"]:
    for name in ("newton", "gradient", "trust_region"):
      assert -1.0 - 1e-6 <= r[f"{name}_gain_mean"] <= 1.0 + 1e-6
    if r["activation"] == "relu":
      assert r["m_exact_max"] <= k - 1            # the proposition: rank(H) <= K - 1
  for r in res["attacks"]:
    assert 0 <= r["soae_robust_accuracy"] <= 1 and r["pgd_steps"] >= 1
  assert "margin_gain.png" in os.listdir(os.path.join(workdir, "soae_direction"))
  assert report.section(workdir, "soae_direction").startswith("## SOAE's direction")


def test_margin_gain_figure_has_a_title_and_the_legend_outside():
  """margin_gain.png follows the analyses' figure rules: a title, no legend inside the panel,
  one figure legend whose box overlaps no panel (hand-made results, no model needed)."""
  from experiments import outputs
  rows = [dict(activation=a, norm=n, eps=e, num_examples=8, newton_gain_mean=0.5,
               gradient_gain_mean=0.9, trust_region_gain_mean=0.95)
          for a in ("relu", "softplus") for n, e in (("linf", 0.1), ("l2", 1.0))]
  fig = soae_direction.make_figure({"directions": rows})
  assert fig._suptitle is not None and "8 clean test points" in fig._suptitle.get_text()
  assert all(ax.get_legend() is None for ax in fig.axes)
  assert len(fig.legends) == 1
  assert {t.get_text() for t in fig.legends[0].get_texts()} >= {
      "newton direction", "gradient direction", "trust_region direction"}
  fig.canvas.draw()
  box = fig.legends[0].get_window_extent()
  assert not any(box.overlaps(ax.get_window_extent()) for ax in fig.axes)
  outputs.pyplot().close(fig)
