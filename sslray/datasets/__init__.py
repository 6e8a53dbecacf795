"""Sources -> FFCV .beton + manifest; per-worker loaders; views on the device."""

from . import compile_cache

compile_cache.enable()  # before anything here imports ffcv

from .convert import ConversionError, WriteParams, convert, manifest_path, read_manifest
from .loader import DataError, DatasetInfo, dataset_info, make_loader, subset_indices
from .sources import SOURCES, SourceError, register_source

__all__ = [
    "convert", "WriteParams", "ConversionError", "manifest_path", "read_manifest", "DataError", "DatasetInfo",
    "dataset_info", "make_loader", "subset_indices", "SOURCES", "SourceError", "register_source",
]
