"""View presets beyond SimCLR's (registered into ``sslray.datasets.views.PRESETS``)."""

from __future__ import annotations

from .views import PRESETS, AugParams, _base  # noqa: F401
