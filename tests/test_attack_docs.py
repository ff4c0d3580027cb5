"""docs/attacks.md against the attack registry: every attack has its line and the listed
defaults are its signature's, so the page cannot drift from the code."""

from __future__ import annotations

import ast
import inspect
import re

import numpy as np
import pytest

from experiments import attack_docs
from krylov_adv import attacks


def _page_lines() -> dict[str, str]:
  with open(attack_docs.PATH) as f:
    text = f.read()
  return {m.group(1): line for line in text.splitlines()
          if (m := re.match(r"- \*\*`(\w+)`\*\*", line))}


def test_committed_page_is_the_generated_one():
  with open(attack_docs.PATH) as f:
    assert f.read() == attack_docs.page(), "run python -m experiments.attack_docs"


def test_every_registered_attack_has_one_line():
  assert sorted(_page_lines()) == attacks.available()


def test_listed_defaults_are_the_signature_defaults():
  for name, line in _page_lines().items():
    listed = dict(re.findall(r"`(\w+)=([^`]+)`", line.split("Hyperparameters (defaults):")[1]
                             .split("Cost")[0]))
    params = inspect.signature(attacks.get(name)).parameters
    want = {k: p.default for k, p in params.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is not p.empty
            and k not in ("example_index", "bounds")}  # bounds: the threat-model section
    assert {k: ast.literal_eval(v) for k, v in listed.items()} == want, name


def test_unregistered_entry_is_an_error():
  attacks._REGISTRY.add("new_attack", attacks.pgd)  # pylint: disable=protected-access
  try:
    with pytest.raises(KeyError, match="new_attack"):
      attack_docs.page()
  finally:
    attacks._REGISTRY.pop("new_attack")  # pylint: disable=protected-access


def test_check_flag(tmp_path, monkeypatch):
  path = tmp_path / "attacks.md"
  path.write_text("stale\n")
  monkeypatch.setattr(attack_docs, "PATH", str(path))
  assert attack_docs.main(["--check"]) == 1
  assert attack_docs.main([]) == 0 and attack_docs.main(["--check"]) == 0


def test_every_code_block_of_the_page_runs():
  """The page's examples run as written: the model families (linen, NNX, Equinox), the
  standardised model attacked in its box and the randomized model attacked with EoT."""
  with open(attack_docs.PATH) as f:
    blocks = re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)
  assert len(blocks) == 5
  for block in blocks[:3]:
    scope: dict = {}
    exec(compile(block, attack_docs.PATH, "exec"), scope)  # pylint: disable=exec-used
    assert scope["x_adv"].shape == (8, 28, 28, 1)
  scope = {}
  exec(compile(blocks[3], attack_docs.PATH, "exec"), scope)  # pylint: disable=exec-used
  z_adv, mu, s = np.asarray(scope["z_adv"]), scope["mu"], scope["s"]
  assert z_adv.shape == (4, 8, 8, 3)
  assert np.all(z_adv >= (0 - mu) / s - 1e-6) and np.all(z_adv <= (1 - mu) / s + 1e-6)
  scope = {}
  exec(compile(blocks[4], attack_docs.PATH, "exec"), scope)  # pylint: disable=exec-used
  x, x_adv, acc = np.asarray(scope["x"]), np.asarray(scope["x_adv"]), scope["acc"]
  assert scope["attacks"].is_stochastic(scope["model"])
  assert x_adv.shape == (8, 28, 28, 1)
  assert np.max(np.abs(x_adv - x)) <= 0.1 + 1e-6 and x_adv.min() >= 0.0 and x_adv.max() <= 1.0
  assert 0.0 <= acc <= 1.0 and acc * 8 * 10 == pytest.approx(round(acc * 8 * 10))  # 10 draws
