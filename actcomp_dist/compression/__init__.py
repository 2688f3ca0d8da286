"""Compression methods as pure tensor math (no torch.distributed here).

Importing this package registers every built-in method. A new method is one file here with a
``@register_compressor`` class, one import line below and one row in the shared test matrix
(tests/test_methods.py).
"""

from actcomp_dist.compression import compact, lowrank, none, subtoken  # noqa: F401  (registers)
from actcomp_dist.compression.base import Compressed, Compressor
from actcomp_dist.compression.layout import BlockLayout
from actcomp_dist.compression.registry import (
    get_compressor_class,
    list_compressors,
    register_compressor,
)


def build_compressor(config, layout, layer_id, site, schedule) -> Compressor:
    """Instantiate the registered compressor for ``config.method``."""
    return get_compressor_class(config.method)(config, layout, layer_id, site, schedule)


__all__ = [
    "BlockLayout",
    "Compressed",
    "Compressor",
    "build_compressor",
    "get_compressor_class",
    "list_compressors",
    "register_compressor",
]
