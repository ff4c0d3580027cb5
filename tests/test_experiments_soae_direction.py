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
