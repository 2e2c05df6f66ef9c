"""Hand a top-level import of this folder's name over to the installed distribution of that name.

Kept free of package-relative imports of the kernels, so that it runs before any of them load.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
from types import ModuleType


def _same_dir(entry: str, root: str) -> bool:
    try:
        return os.path.samefile(entry or os.getcwd(), root)
    except OSError:
        return False


def hand_over(name: str, init_file: str) -> ModuleType:
    """Import ``name`` from ``sys.path`` without the folder that holds this package; raise
    ModuleNotFoundError (as if this folder were not there) when nothing else provides it."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(init_file)))
    path = [entry for entry in sys.path if not _same_dir(entry, root)]
    spec = importlib.machinery.PathFinder.find_spec(name, path)
    if spec is None or spec.loader is None:
        sys.modules.pop(name, None)
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module
