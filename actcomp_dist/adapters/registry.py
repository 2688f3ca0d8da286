"""The adapter registry: a method is one module class plus one decorator line."""

from __future__ import annotations

from typing import TYPE_CHECKING

from actcomp_dist.registry import Registry

if TYPE_CHECKING:
    from actcomp_dist.adapters.base import LowRankAdapter

ADAPTERS: Registry[type[LowRankAdapter]] = Registry("adapter method", attribute="method")


def register_adapter(name: str):
    """Class decorator that registers a :class:`LowRankAdapter` subclass under ``name``."""
    return ADAPTERS.register(name)


def get_adapter_class(name: str):
    return ADAPTERS.get(name)


def list_adapter_methods() -> list[str]:
    """Names of the registered adapter methods, sorted (importing ``actcomp_dist.adapters``
    registers the built-in ones)."""
    return ADAPTERS.names()
