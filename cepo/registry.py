"""A name -> object table, so a YAML option can name a function (``estimator: rloo``).

Every component family (advantage estimators, policy losses, KL estimators, loss aggregations, dataset
adapters, scoring networks) keeps one :class:`Registry`; adding a component is one function plus one ``@REGISTRY.register("name")`` line, and the
matching ``Literal`` type the configuration uses is derived from the registry (:meth:`Registry.literal`), so
``--help`` lists the new name and the parser accepts it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, Literal, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries of one kind (``kind`` appears in error messages)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that files the decorated object under ``name`` (a name may be used once)."""

        def add(entry: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = entry
            return entry

        return add

    def remove(self, name: str) -> T:
        """Take the entry ``name`` out again (e.g. a test's temporary registration) and return it."""
        entry = self[name]  # an unknown name is refused, with the choices
        del self._entries[name]
        return entry

    def __getitem__(self, name: str) -> T:
        if name not in self._entries:
            raise ValueError(f"unknown {self.kind} {name!r}; choose one of {', '.join(self._entries)}")
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def literal(self):
        """``Literal[name1, name2, ...]`` of the names registered so far (for typed configuration)."""
        return Literal[self.names()]
