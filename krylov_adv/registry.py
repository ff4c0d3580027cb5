"""Name -> entry tables: the one registry behind attacks, models, data sources and training
methods (big_vision's habit: parts are picked by name from the config).

Each of those modules keeps its own ``register`` decorator (whose signature says what an entry
is) and exposes ``get(name)`` and ``available()`` from a :class:`Registry`, so an unknown name
fails the same way everywhere: one ``ValueError`` that lists the known names.
"""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
  """Entries of one ``kind`` (e.g. ``"attack"``) by name.

  Args:
    kind: the word used in error messages (``unknown attack 'pgdd'; available: [...]``).
  """

  def __init__(self, kind: str):
    self.kind = kind
    self._entries: dict[str, T] = {}

  def add(self, name: str, entry: T) -> None:
    """Adds ``entry`` under ``name``; ``ValueError`` if the name is taken (two modules defining
    the same name would otherwise shadow each other silently)."""
    if name in self._entries:
      raise ValueError(f"{self.kind} {name!r} registered twice")
    self._entries[name] = entry

  def get(self, name: str) -> T:
    """The entry under ``name``; ``ValueError`` listing the known names otherwise."""
    try:
      return self._entries[name]
    except KeyError:
      raise ValueError(f"unknown {self.kind} {name!r}; available: {self.names()}") from None

  def names(self) -> list[str]:
    """Sorted names of all entries."""
    return sorted(self._entries)

  def pop(self, name: str) -> T:
    """Removes and returns the entry under ``name`` (for tests that register a temporary
    entry)."""
    return self._entries.pop(name)

  def __contains__(self, name: object) -> bool:
    return name in self._entries
