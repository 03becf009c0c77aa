"""Configuration: defaults in code < TOML file < ``LEUKOFLOW_*`` environment < CLI flags.

Every service declares its parameters as a frozen dataclass with defaults (the single
source of truth, recorded with the data it produces). :func:`resolve` layers the other
sources on top::

    cfg = resolve("infer", InferConfig, {"max_batch": 128})

* TOML: the file named by ``--config`` (stored in ``LEUKOFLOW_CONFIG``), table ``[infer]``.
* Environment: ``LEUKOFLOW_INFER_MAX_BATCH=128`` (section and key upper-cased).
* CLI: a mapping of flag values; ``None`` means "not given".
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

ENV_PREFIX = "LEUKOFLOW_"
CONFIG_ENV = "LEUKOFLOW_CONFIG"


class ConfigError(ValueError):
    """A configuration value could not be parsed or is unknown."""


def load_toml(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Load the TOML file ``path`` (default: ``$LEUKOFLOW_CONFIG``); ``{}`` if none."""
    path = path or os.environ.get(CONFIG_ENV)
    if not path:
        return {}
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        return tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"invalid TOML in {p}: {exc}") from exc


def _coerce(value: Any, typ: Any, name: str) -> Any:
    """Convert ``value`` (often a string from the environment) to the annotated type."""
    origin = typing.get_origin(typ)
    if origin is typing.Union or origin is types.UnionType:
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("", "none", "null")):
            return None
        typ = args[0]
        origin = typing.get_origin(typ)
    try:
        if typ is bool:
            if isinstance(value, str):
                low = value.strip().lower()
                if low in ("1", "true", "yes", "on"):
                    return True
                if low in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if typ in (int, float, str):
            return typ(value)
        if origin in (tuple, list):
            if isinstance(value, str):
                value = [v for v in value.replace(";", ",").split(",") if v.strip()]
            inner = typing.get_args(typ)
            if origin is tuple and inner and inner[-1] is not Ellipsis:
                return tuple(_coerce(v, t, name) for v, t in zip(value, inner, strict=True))
            it = inner[0] if inner else str
            return origin(_coerce(v, it, name) for v in value)
        if origin is dict or typ is dict:
            return dict(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"bad value for {name}: {value!r} ({exc})") from exc
    return value


def resolve(
    section: str,
    cls: type[T],
    cli: Mapping[str, Any] | None = None,
    *,
    toml: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> T:
    """Build ``cls`` for ``section`` from defaults, TOML, environment and CLI values.

    Parameters
    ----------
    section : str
        TOML table and environment-variable infix (``LEUKOFLOW_<SECTION>_<KEY>``).
    cls : dataclass type
        Declares the parameters and their defaults.
    cli : mapping, optional
        CLI flag values; ``None`` entries are ignored.
    toml, env : mapping, optional
        Override the TOML document and environment (tests).
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    values: dict[str, Any] = {}
    doc = load_toml() if toml is None else toml
    table = doc.get(section, {}) if isinstance(doc, Mapping) else {}
    unknown = set(table) - fields
    if unknown:
        raise ConfigError(f"unknown keys in [{section}]: {', '.join(sorted(unknown))}")
    values.update(table)
    env = os.environ if env is None else env
    prefix = f"{ENV_PREFIX}{section.upper()}_"
    for key, raw in env.items():
        if key.startswith(prefix):
            name = key[len(prefix):].lower()
            if name in fields:
                values[name] = raw
    for name, val in (cli or {}).items():
        if val is not None and name in fields:
            values[name] = val
    kwargs = {k: _coerce(v, hints[k], f"{section}.{k}") for k, v in values.items()}
    return cls(**kwargs)


def as_dict(cfg: Any) -> dict[str, Any]:
    """Plain dict of a resolved config (for metadata and ``--json`` output)."""
    return dataclasses.asdict(cfg)
