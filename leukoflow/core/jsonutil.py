"""JSON/msgpack-safe values: the one place that cleans numbers and containers for output.

Every JSON file (run summaries, model cards, explanation documents) and every wire ``stats``
map goes through :func:`json_safe`: numpy scalars and arrays become Python numbers and
lists, tuples become lists, mapping keys become strings, non-finite floats become ``None``
(JSON has no NaN, and the wire rejects non-finite numbers), paths become strings.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["json_safe", "dumps", "atomic_write_bytes", "atomic_write_json", "fsync_folder"]


def json_safe(obj: Any, *, strict: bool = False) -> Any:
    """Return ``obj`` as plain JSON values (dict with str keys, list, str, int, float, bool, None).

    Parameters
    ----------
    obj : any
        Nested mappings, lists/tuples/sets, numpy arrays and scalars, floats, paths, scalar
        tensors (anything with a callable ``item``).
    strict : bool
        What to do with values of any other type: raise :class:`TypeError` (``True``, for
        documents that must round-trip, e.g. model cards) or store ``str(value)`` (``False``).

    Returns
    -------
    any
        A new structure; non-finite floats are ``None``.
    """
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v, strict=strict) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        return [json_safe(v, strict=strict) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist(), strict=strict)
    if isinstance(obj, np.generic):
        return json_safe(obj.item(), strict=strict)
    if obj is None or isinstance(obj, bool | int | str):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):  # torch scalar tensor
        return json_safe(obj.item(), strict=strict)
    if strict:
        raise TypeError(f"cannot store {type(obj).__name__} as JSON: {obj!r}")
    return str(obj)


def dumps(obj: Any, *, indent: int | None = None, strict: bool = False) -> str:
    """``json.dumps`` of :func:`json_safe` (``obj``); never writes ``NaN``/``Infinity``."""
    return json.dumps(json_safe(obj, strict=strict), indent=indent, allow_nan=False)


def atomic_write_bytes(path: str | Path, data: bytes, *, durable: bool = True) -> None:
    """Write ``data`` to ``path`` atomically (hidden temporary file in the folder + rename).

    ``durable``: ``fsync`` the file before the rename and the folder after it, so that after
    a crash of the machine ``path`` holds either the old or the new content, never nothing.
    """
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        if durable:
            fh.flush()
            os.fsync(fh.fileno())
    os.replace(tmp, p)
    if durable:
        fsync_folder(p.parent)


def fsync_folder(folder: str | Path) -> None:
    """``fsync`` a folder, so that the names created or renamed in it are on disk.

    Best effort: a folder that cannot be opened, or a file system that refuses ``fsync``
    on folders, is skipped.
    """
    try:
        dfd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:  # some file systems refuse fsync on folders
        pass
    finally:
        os.close(dfd)


def atomic_write_json(path: str | Path, obj: Any, *, indent: int | None = 1,
                      strict: bool = False) -> None:
    """Write :func:`dumps` (``obj``) to ``path`` atomically (a reader never sees half a file)."""
    atomic_write_bytes(path, (dumps(obj, indent=indent, strict=strict) + "\n").encode())
