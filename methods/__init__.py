"""The method registry: every way to split a network across devices is one module in this package.

Each module registers one :class:`methods.base.Method` subclass with ``@register``; this package
imports every module in it, so adding a method is adding its file (and a config that names it).
"""
from __future__ import annotations

import importlib
import pkgutil

from methods.base import METHODS, Method, register

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["METHODS", "Method", "register"]
