"""The one registry behind attacks, models, data sources and training methods."""

import pytest

from krylov_adv import attacks, data, models, training
from krylov_adv.registry import Registry


def test_registry_adds_gets_lists_and_refuses_duplicates():
  r = Registry("widget")
  r.add("b", 2)
  r.add("a", 1)
  assert r.get("a") == 1 and r.names() == ["a", "b"] and "b" in r and "c" not in r
  with pytest.raises(ValueError, match=r"widget 'a' registered twice"):
    r.add("a", 3)
  with pytest.raises(ValueError, match=r"unknown widget 'c'; available: \['a', 'b'\]"):
    r.get("c")
  assert r.pop("b") == 2 and r.names() == ["a"]


@pytest.mark.parametrize("module,kind", [(attacks, "attack"), (models, "model"),
                                         (data, "data source"), (training, "training method")])
def test_every_registry_fails_the_same_way(module, kind):
  with pytest.raises(ValueError, match=rf"unknown {kind} 'nope'; available: \["):
    module.get("nope")
  assert module.available() == sorted(module.available()) and module.available()
