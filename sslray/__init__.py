"""sslray: self-supervised visual pretraining on FFCV data with Ray Train, Ray Tune and MLflow.

The Python API (``sslray.pretrain``, ``sslray.train_local``, ``sslray.probe``, ...) lives in
``sslray.api`` and is importable from here; ``import sslray`` itself loads neither torch nor Ray.
"""

__version__ = "0.1.0"

API = ("Run", "convert", "embed", "evaluate", "export_backbone", "load_backbone", "load_config", "pretrain", "probe",
       "sweep", "train_local")
__all__ = ["__version__", *API]


def __getattr__(name: str):
    if name in API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'sslray' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *API])
