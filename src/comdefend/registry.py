"""One lookup mechanism for every named thing: presets, classifiers, attacks, defenses, ...

Each kind of named thing has one :class:`Registry`. Entries are registered with a decorator
(``@ATTACKS.register("pgd")``) or a call (``ATTACKS.add("pgd", PGD)``), looked up
case-insensitively by name or alias, and a miss is a :class:`~comdefend.errors.UsageError` whose
one-line message lists the valid names. Users register their own entries the same way, so a
torchattacks attack or a custom defense enters ``comdefend evaluate`` by name.

Example:
    >>> from comdefend.registry import Registry
    >>> SHAPES: Registry[int] = Registry("shape")
    >>> SHAPES.add("square", 4, aliases=("quad",))
    4
    >>> SHAPES.get("Quad"), SHAPES.names()
    (4, ['square'])
    >>> "square" in SHAPES
    True
    >>> SHAPES.get("circle")
    Traceback (most recent call last):
    ...
    comdefend.errors.UsageError: unknown shape 'circle'; valid: square
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from comdefend.errors import UsageError

T = TypeVar("T")


def normalize_name(name: str) -> str:
    """The lookup key of a name: stripped and lower-case."""
    return name.strip().lower()


class Registry(Generic[T]):
    """Named entries of one kind, in registration order.

    Args:
        kind: what an entry is, for messages (``"attack"``, ``"threat model"``).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._aliases: dict[str, str] = {}

    def add(
        self, name: str, entry: T, *, aliases: tuple[str, ...] = (), replace: bool = False
    ) -> T:
        """Register ``entry`` under ``name`` (and ``aliases``); returns ``entry``.

        Raises:
            UsageError: the name or an alias is taken and ``replace`` is false.
        """
        key = normalize_name(name)
        if not key:
            raise UsageError(f"a {self.kind} name must not be empty")
        taken = [n for n in (key, *map(normalize_name, aliases)) if n in self]
        if taken and not replace:
            raise UsageError(
                f"{self.kind} name {taken[0]!r} is already registered; "
                "pass replace=True to override it"
            )
        self._entries[key] = entry
        for alias in aliases:
            self._aliases[normalize_name(alias)] = key
        return entry

    def register(
        self, name: str, *, aliases: tuple[str, ...] = (), replace: bool = False
    ) -> Callable[[T], T]:
        """Decorator form of :meth:`add`."""

        def decorate(entry: T) -> T:
            return self.add(name, entry, aliases=aliases, replace=replace)

        return decorate

    def remove(self, name: str) -> None:
        """Forget ``name`` and its aliases (for tests and user plug-ins)."""
        key = self.canonical(name)
        del self._entries[key]
        self._aliases = {a: k for a, k in self._aliases.items() if k != key}

    def canonical(self, name: str) -> str:
        """The registered name that ``name`` (a name or alias, any case) refers to."""
        if not isinstance(name, str):
            raise UsageError(f"a {self.kind} name must be a string, not {type(name).__name__}")
        key = normalize_name(name)
        key = self._aliases.get(key, key)
        if key not in self._entries:
            raise UsageError(f"unknown {self.kind} {name!r}; valid: {', '.join(self._entries)}")
        return key

    def get(self, name: str) -> T:
        """The entry called ``name``; a :class:`UsageError` lists the valid names otherwise."""
        return self._entries[self.canonical(name)]

    def __getitem__(self, name: str) -> T:
        """``registry[name]`` is :meth:`get` (so a registry reads like the dict it replaces)."""
        return self.get(name)

    def names(self) -> list[str]:
        """Registered names (not aliases), in registration order."""
        return list(self._entries)

    def items(self) -> list[tuple[str, T]]:
        return list(self._entries.items())

    def values(self) -> list[T]:
        """Registered entries, in registration order."""
        return list(self._entries.values())

    def aliases_of(self, name: str) -> list[str]:
        key = self.canonical(name)
        return [alias for alias, target in self._aliases.items() if target == key]

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        key = normalize_name(name)
        return key in self._entries or key in self._aliases

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"
