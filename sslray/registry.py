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
            old = self._entries.get(key)
            # The same definition again (its module imported anew, as a reloaded plugin is) replaces itself.
            if old is not None and old is not obj and (_origin(old) is None or _origin(old) != _origin(obj)):
                where = f": by {_origin(old)} and {_origin(obj)}" if _origin(old) and _origin(obj) else ""
                raise ValueError(f"{self.kind} {name!r} is registered twice{where}")
            self._entries[key] = obj
            return obj

        return deco

    def unregister(self, name: str) -> T:
        """Remove and return the entry ``name`` (a plugin's, when it is to be re-imported from scratch)."""
        self.get(name)  # unknown names raise the usual KeyError, listing the known ones
        return self._entries.pop(name.lower())

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


def _origin(obj) -> str | None:
    """Where a function or class entry was defined, ``module.qualname``: what tells a re-import from a
    second definition. None for other entries (instances), which are only ever the same when identical."""
    qualname = getattr(obj, "__qualname__", None) if isinstance(obj, type) or callable(obj) else None
    if not isinstance(qualname, str) or not isinstance(getattr(obj, "__module__", None), str):
        return None
    return f"{obj.__module__}.{qualname}"
