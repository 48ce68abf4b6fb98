"""One registry mechanism for everything chosen by name: triggers, models, defenses, inversions, data sources.

A registry maps names to classes or builder functions. Entries register with a decorator in the file that defines
them, so adding a trigger or a defense is one new file (imported by its package's ``__init__``)::

    from lightning_backdoor.triggers.base import TRIGGERS, Trigger

    @TRIGGERS.register("checkerboard")
    class Checkerboard(Trigger):
        ...

Lookups by an unknown name raise a one-line ``ValueError`` naming the closest known names. A registry is a
read-only ``Mapping``: ``name in TRIGGERS``, ``TRIGGERS[name]``, ``sorted(TRIGGERS)`` all work.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar

T = TypeVar("T")
EntryT = TypeVar("EntryT")


class Registry(Mapping[str, T], Generic[T]):
    """Named entries of one ``kind`` (``"trigger"``, ``"model"``...), used in its error messages.

    A registered class with a string ``name`` attribute (``Trigger.name``, ``Defense.name``) gets its registered
    name there, so a built object knows the name it was chosen by.
    """

    def __init__(self, kind: str, plural: str | None = None) -> None:
        self.kind, self.plural = kind, plural or f"{kind}s"
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[EntryT], EntryT]:
        """A decorator registering its class or function under ``name`` and returning it unchanged.

        Raises:
            ValueError: ``name`` is empty or already registered to another entry.
        """
        if not name:
            raise ValueError(f"a {self.kind} needs a non-empty name to be registered")

        def decorate(entry: EntryT) -> EntryT:
            known = self._entries.get(name)
            if known is not None and known is not entry:
                raise ValueError(f"{self.kind} {name!r} is already registered to {known!r}")
            if isinstance(entry, type) and isinstance(getattr(entry, "name", None), str):
                entry.name = name  # type: ignore[attr-defined]
            self._entries[name] = entry  # type: ignore[assignment]
            return entry

        return decorate

    def lookup(self, name: str) -> T:
        """The entry registered as ``name``.

        Raises:
            ValueError: (one line) no such name; the message suggests close names and lists the known ones.
        """
        if name in self._entries:
            return self._entries[name]
        close = difflib.get_close_matches(str(name), list(self._entries), n=3)
        hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
        raise ValueError(f"unknown {self.kind} {name!r}{hint}; known {self.plural}: {self.known_names()}")

    def known_names(self) -> str:
        """The known names as the unknown-name message lists them: sorted, comma-separated. A registry whose lookups
        also accept names of another form (``torchvision:<name>`` for models) extends this to say so."""
        return ", ".join(sorted(self))

    def build(self, name: str, /, **kwargs: Any) -> Any:
        """Call the entry registered as ``name`` with ``kwargs`` (instantiate a class, call a builder)."""
        return self.lookup(name)(**kwargs)  # type: ignore[operator]

    def __getitem__(self, name: str) -> T:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"
