"""Compression methods as pure tensor math (no torch.distributed here).

Importing this package registers every built-in method. A method is one file with a
``@register_compressor`` class that declares everything the rest of the system asks about it
(see ``base.py``), plus one import line below; a method outside this package is a module
that does the same and is named in the run config's ``plugins`` list (README, "Adding a
compression method").
"""

from actcomp_dist.compression import compact, lowrank, none, subtoken  # noqa: F401  (registers)
from actcomp_dist.compression.base import Compressed, Compressor, SavedWidth
from actcomp_dist.compression.layout import BlockLayout
from actcomp_dist.compression.registry import (
    get_compressor_class,
    list_compressors,
    register_compressor,
)


def build_compressor(config, layout, layer_id, site, schedule) -> Compressor:
    """Instantiate the registered compressor for ``config.method``."""
    return get_compressor_class(config.method)(config, layout, layer_id, site, schedule)


def layer_layout(
    config, width: int, *, row_parallel: bool = False, tp_rank: int = 0, tp_size: int = 1
) -> BlockLayout:
    """The block layout of a linear with ``width`` input features under ``config``'s method:
    the whole width for single-device and column-parallel layers (their input is replicated),
    the method's :meth:`~Compressor.row_parallel_layout` for a feature-sharded one."""
    if not row_parallel:
        return BlockLayout(width)
    cls = get_compressor_class(config.method)
    return cls.row_parallel_layout(config, width, tp_rank, tp_size)


__all__ = [
    "BlockLayout",
    "Compressed",
    "Compressor",
    "SavedWidth",
    "build_compressor",
    "get_compressor_class",
    "layer_layout",
    "list_compressors",
    "register_compressor",
]
