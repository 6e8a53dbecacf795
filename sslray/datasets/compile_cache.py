"""Keep ffcv's import-time numba compiles on disk.

``import ffcv`` builds a ``numba.typed.Dict`` (``ffcv.fields.rgb_image.IMAGE_MODES``), and numba
compiles the typed dict's helpers from scratch in every new process: ~4 s of a ~7 s import on a
2-core machine, paid again by every Ray Train worker, Tune trial and CLI process. Those helpers are
plain ``@njit`` functions of numba's own; numba can cache any such dispatcher, but only the ones
declared ``cache=True`` are, so here the few the dict uses get their on-disk cache switched on
before ffcv is imported. numba keys the cache by the helper's source file and the machine's CPU, so
a numba upgrade or another CPU model recompiles instead of loading stale code. Where no cache
location is writable, nothing changes.
"""

from __future__ import annotations

TYPED_DICT_HELPERS = ("_make_dict", "_setitem", "_getitem", "_length", "_contains", "_get")


def enable() -> None:
    """Switch on numba's on-disk cache for the typed-dict helpers ffcv compiles when imported
    (a helper whose cache is on already is left as it is; any failure leaves numba as it was)."""
    try:
        from numba.typed import typeddict
    except Exception:  # pragma: no cover - numba comes with ffcv
        return
    for name in TYPED_DICT_HELPERS:
        dispatcher = getattr(typeddict, name, None)
        if type(getattr(dispatcher, "_cache", None)).__name__ != "NullCache":  # gone, or already cached
            continue
        try:
            dispatcher.enable_caching()
        except Exception:  # no writable cache location: compile in memory, as numba does by default
            return
