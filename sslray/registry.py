"""One tiny registry class serves every kind (methods, backbones, sources, view presets)."""

from __future__ import annotations

from typing import Callable, Dict, Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> entry map filled by a decorator, read by ``get``; tests parametrize over ``names()``."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: Dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        key = name.lower()

        def deco(obj: T) -> T:
            if key in self._entries and self._entries[key] is not obj:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[key] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        try:
            return self._entries[name.lower()]
        except KeyError:
            known = ", ".join(sorted(self._entries)) or "(none)"
            raise KeyError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name.lower() in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
