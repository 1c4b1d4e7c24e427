"""Compiled helpers of flexkv_core, built from C at install time (see setup.py).

Importing a missing build fails with the way to fix it rather than a bare ``ModuleNotFoundError``.
"""

from __future__ import annotations

try:
    from ._index import IndexCore
except ImportError as exc:  # pragma: no cover - depends on how the checkout was installed
    raise ImportError(
        "flexkv_core's compiled index (flexkv_core/native/_index, from flexkv_core/native/index.c) is not built "
        f"({exc}): install the project with a C compiler present, e.g. `bash scripts/setup.sh` or "
        "`pip install -e .` in the checkout"
    ) from exc

__all__ = ["IndexCore"]
