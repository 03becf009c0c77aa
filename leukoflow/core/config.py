"""Configuration: defaults in code < TOML file < ``LEUKOFLOW_*`` environment < CLI flags.

Every service declares its parameters as a frozen dataclass with defaults (the single
source of truth, recorded with the data it produces). :func:`resolve` layers the other
sources on top::

    cfg = resolve("infer", InferConfig, {"max_batch": 128})

* TOML: the file named by ``--config`` (stored in ``LEUKOFLOW_CONFIG``), table ``[infer]``.
* Environment: ``LEUKOFLOW_INFER_MAX_BATCH=128`` (section and key upper-cased).
* CLI: a mapping of flag values; ``None`` means "not given".

A field whose type is itself a dataclass is a *nested section*: a config composed of the
stages' own dataclasses (``PipelineConfig.crop: CropConfig``) is set with the TOML table
``[acquire_pipeline.crop]``, the variable ``LEUKOFLOW_ACQUIRE_PIPELINE_CROP_SIZE`` and the
CLI key ``"crop.size"`` (or a nested mapping). Fields a composed config derives from other
settings are named in its ``DERIVED`` class attribute (``{"crop.pixel_um": "why"}``) and
refused as settings. :func:`build` makes a config from such a mapping alone (no TOML, no
environment), with the same checks.

Nonsense is refused with a :class:`ConfigError` naming the setting:

* an unknown key in a TOML table, an unknown ``LEUKOFLOW_<SECTION>_<KEY>`` of the section
  being resolved, and any ``LEUKOFLOW_*`` variable that is neither a setting of a known
  section (:data:`SECTIONS`) nor one of the global variables (:data:`GLOBAL_ENV`);
* NaN or infinite numbers, and numbers outside a field's range: declared with
  :func:`bounded` (``metadata={"range": (lo, hi)}``), else by the unit suffix of the name
  (:data:`SUFFIX_RANGES`: ports, durations, rates, sizes);
* a non-loopback ``metrics_host`` without the section's ``allow_remote`` opt-in (remote
  metrics, like remote ZeroMQ endpoints, must be asked for).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import ipaddress
import math
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, unquote

T = TypeVar("T")

ENV_PREFIX = "LEUKOFLOW_"
CONFIG_ENV = "LEUKOFLOW_CONFIG"

#: Configuration sections (TOML tables, ``LEUKOFLOW_<SECTION>_`` infixes). A new section is
#: added here (tests/test_config_validation.py checks every ``resolve`` call in the code).
SECTIONS: frozenset[str] = frozenset({
    "acquire", "acquire_pipeline", "infer", "explain", "collector", "run", "simulate",
    "reconstruct", "qc", "drift", "triton",
})
#: ``LEUKOFLOW_*`` variables that are not section settings (read directly where noted).
GLOBAL_ENV: frozenset[str] = frozenset({
    "LEUKOFLOW_CONFIG",          # TOML file (--config)
    "LEUKOFLOW_LOG_LEVEL",       # --log-level
    "LEUKOFLOW_KEYS",            # CurveZMQ key folder (leukoflow.core.curve)
    "LEUKOFLOW_CACHE_DIR",       # ONNX/TensorRT export cache (inference backends)
    "LEUKOFLOW_SIM_CACHE",       # simulated training data cache (models.data)
    "LEUKOFLOW_SIM_WORKERS",     # processes simulating training data (models.data)
    "LEUKOFLOW_DRIFT_CACHE",     # drift reference cache (models.drift_reference)
    "LEUKOFLOW_TRITONSERVER",    # Triton server binary (inference.triton_server)
    "LEUKOFLOW_TRITON_CONFIG",   # Triton benchmark configuration (benchmarks/bench_triton)
    "LEUKOFLOW_IMAGE",           # container images (deploy/compose*.yaml)
    "LEUKOFLOW_CUDA_IMAGE",
    "LEUKOFLOW_CUDA_TORCH_IMAGE",  # GPU explainer image (deploy/compose.gpu.yaml)
    "LEUKOFLOW_SUPERVISOR_PID",  # parent of a supervised child (leukoflow.core.lifeline)
})
#: Range [lo, hi] (None: open) of numeric fields without a declared range, by name suffix.
SUFFIX_RANGES: tuple[tuple[str, tuple[float | None, float | None]], ...] = (
    ("_port", (-1, 65535)),
    ("_s", (0, None)), ("_ms", (0, None)), ("_hz", (0, None)),
    ("_bytes", (0, None)), ("hwm", (0, None)),
)
#: metadata key of a declared range
RANGE = "range"


def bounded(default: Any, lo: float | None = None, hi: float | None = None,
            **kwargs: Any) -> Any:
    """A dataclass field whose numbers (or each number of a tuple) lie in [lo, hi].

    ``max_delay_ms: float = bounded(2.0, 0.0, 60_000.0)``
    """
    return dataclasses.field(default=default, metadata={RANGE: (lo, hi)}, **kwargs)


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
        if typ in (int, float) and isinstance(value, bool):
            raise ValueError("a number is required, not a boolean")
        if typ is int and isinstance(value, float) and not value.is_integer():
            raise ValueError("an integer is required")
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
        Declares the parameters and their defaults; fields typed with a dataclass are
        nested sections (TOML ``[section.field]``, ``LEUKOFLOW_<SECTION>_<FIELD>_<KEY>``).
    cli : mapping, optional
        CLI flag values; ``None`` entries are ignored, and so are names that are no setting
        (flags of the command itself). Nested settings as ``"crop.size"`` or nested mappings.
    toml, env : mapping, optional
        Override the TOML document and environment (tests).
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    check_sections(cls)
    derived = _derived(cls)
    values: dict[str, Any] = {}
    doc = load_toml() if toml is None else toml
    table = doc.get(section, {}) if isinstance(doc, Mapping) else {}
    _merge_table(values, table, cls, section, derived)
    env = os.environ if env is None else env
    check_environment(env, extra_sections=(section,))
    prefix = f"{ENV_PREFIX}{section.upper()}_"
    for key, raw in env.items():
        if key.startswith(prefix) and _section_of(key, (section,)) == section:
            name = key[len(prefix):].lower()
            path = _env_path(cls, name)
            if path is None:
                raise ConfigError(f"unknown setting {key}"
                                  f"{_suggest(name, _flat_names(cls), prefix)}")
            _refuse_derived(path, derived, section, key)
            _put(values, path, raw)
    for name, val in _cli_items(cli or {}):
        if val is None or _field_path(cls, name) is None:
            continue
        _refuse_derived(name, derived, section, name)
        _put(values, name, val)
    cfg = _construct(cls, values, section)
    validate(cfg, section)
    return cfg


def build(cls: type[T], values: Mapping[str, Any] | None = None, section: str = "") -> T:
    """``cls`` from its defaults and ``values`` only (no TOML, no environment).

    ``values`` may name nested settings as ``"gates.max_amp_std"`` or as nested mappings;
    unknown names, derived fields and values outside their range are refused
    (:class:`ConfigError`), as in :func:`resolve`.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    derived = _derived(cls)
    merged: dict[str, Any] = {}
    for name, val in _cli_items(values or {}):
        if _field_path(cls, name) is None:
            where = f"{section}." if section else ""
            raise ConfigError(f"unknown setting {where}{name}"
                              f"{_suggest(name, _dotted_names(cls))}")
        _refuse_derived(name, derived, section, name)
        _put(merged, name, val)
    cfg = _construct(cls, merged, section)
    validate(cfg, section)
    return cfg


def _nested(cls: Any) -> dict[str, type]:
    """Fields of ``cls`` that are nested sections: name -> dataclass type."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)
            if f.init and isinstance(hints[f.name], type)
            and dataclasses.is_dataclass(hints[f.name])}


def _derived(cls: Any) -> Mapping[str, str]:
    """``{dotted path: reason}`` of the fields ``cls`` derives itself (not settings)."""
    return getattr(cls, "DERIVED", {}) or {}


def _refuse_derived(path: str | tuple[str, ...], derived: Mapping[str, str], section: str,
                    given: str) -> None:
    dotted = path if isinstance(path, str) else ".".join(path)
    if dotted in derived:
        where = f"{section}." if section else ""
        raise ConfigError(f"{given}: {where}{dotted} is not a setting, it is derived from "
                          f"{derived[dotted]}")


def _dotted_names(cls: Any, prefix: str = "") -> list[str]:
    """Every setting of ``cls`` as a dotted path (nested sections expanded)."""
    nested = _nested(cls)
    out: list[str] = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.name in nested:
            out += _dotted_names(nested[f.name], f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    return out


def _flat_names(cls: Any) -> list[str]:
    """Every setting of ``cls`` as its environment-variable suffix (``crop_size``)."""
    return [n.replace(".", "_") for n in _dotted_names(cls)]


def _env_path(cls: Any, name: str) -> tuple[str, ...] | None:
    """``crop_size`` -> ``("crop", "size")``: the setting a variable suffix names, or None.

    A nested section's name is matched first (longest first); :func:`check_sections` makes
    sure no two settings share a suffix.
    """
    nested = _nested(cls)
    for sub in sorted(nested, key=len, reverse=True):
        if name.startswith(sub + "_"):
            rest = _env_path(nested[sub], name[len(sub) + 1:])
            if rest is not None:
                return (sub, *rest)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    return (name,) if name in fields and name not in nested else None


def _field_path(cls: Any, dotted: str) -> tuple[str, ...] | None:
    """``"crop.size"`` -> ``("crop", "size")`` when that is a setting (or section) of ``cls``."""
    parts = tuple(dotted.split("."))
    c = cls
    for i, part in enumerate(parts):
        fields = {f.name for f in dataclasses.fields(c) if f.init}
        if part not in fields:
            return None
        nested = _nested(c)
        if i < len(parts) - 1:
            if part not in nested:
                return None
            c = nested[part]
    return parts


def check_sections(cls: Any) -> None:
    """Refuse a config whose settings cannot all be named by an environment variable.

    Raises
    ------
    TypeError
        When two settings map to the same ``LEUKOFLOW_<SECTION>_<SUFFIX>`` (e.g. a field
        ``crop_size`` beside a nested section ``crop`` with a field ``size``).
    """
    seen: dict[str, str] = {}
    for dotted in _dotted_names(cls):
        flat = dotted.replace(".", "_")
        if flat in seen:
            raise TypeError(f"{cls.__name__}: {seen[flat]} and {dotted} share the environment "
                            f"name {flat.upper()}")
        seen[flat] = dotted
        if _env_path(cls, flat) != tuple(dotted.split(".")):
            raise TypeError(f"{cls.__name__}: the environment name {flat.upper()} does not "
                            f"reach {dotted}")


def _cli_items(cli: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Flatten nested mappings of CLI/override values to dotted names."""
    out: list[tuple[str, Any]] = []
    for k, v in cli.items():
        if isinstance(v, Mapping) and not isinstance(v, str):
            out += _cli_items(v, f"{prefix}{k}.")
        else:
            out.append((prefix + str(k), v))
    return out


def _put(values: dict[str, Any], path: str | tuple[str, ...], val: Any) -> None:
    parts = path.split(".") if isinstance(path, str) else list(path)
    d = values
    for p in parts[:-1]:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise ConfigError(f"{'.'.join(parts)}: {p} is a section, not a value")
    d[parts[-1]] = val


def _merge_table(values: dict[str, Any], table: Any, cls: Any, where: str,
                 derived: Mapping[str, str], prefix: str = "") -> None:
    """TOML table ``[where]`` of ``cls`` into ``values`` (unknown keys refused)."""
    if not isinstance(table, Mapping):
        raise ConfigError(f"[{where}] must be a table")
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    nested = _nested(cls)
    unknown = set(table) - fields
    if unknown:
        raise ConfigError(f"unknown keys in [{where}]: {', '.join(sorted(unknown))}"
                          f"{_suggest(sorted(unknown)[0], fields)}")
    for key, val in table.items():
        if key in nested:
            if not isinstance(val, Mapping):
                raise ConfigError(f"[{where}] {key} is a section: set its keys in "
                                  f"[{where}.{key}]")
            _merge_table(values.setdefault(key, {}), val, nested[key], f"{where}.{key}",
                         derived, f"{prefix}{key}.")
        else:
            _refuse_derived(prefix + key, derived, "", f"[{where}] {key}")
            values[key] = val


def _construct(cls: Any, values: Mapping[str, Any], section: str, base: Any = None) -> Any:
    """``cls`` (or ``base`` with replaced fields) from coerced, possibly nested ``values``."""
    hints = typing.get_type_hints(cls)
    nested = _nested(cls)
    kwargs: dict[str, Any] = {}
    for k, v in values.items():
        where = f"{section}.{k}" if section else k
        if k in nested:
            if not isinstance(v, Mapping):
                raise ConfigError(f"{where} is a section, not a value")
            kwargs[k] = _construct(nested[k], v, where, _default_of(cls, k))
        else:
            kwargs[k] = _coerce(v, hints[k], where)
    try:
        return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)
    except (TypeError, ValueError) as exc:  # a stage's own __post_init__ checks
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{section or cls.__name__}: {exc}") from exc


def _default_of(cls: Any, name: str) -> Any:
    """The default value of field ``name`` of ``cls`` (calling its default factory)."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
    return None


def _section_of(key: str, extra: tuple[str, ...] = ()) -> str | None:
    """The longest known section whose ``LEUKOFLOW_<SECTION>_`` prefixes ``key``."""
    best = None
    for s in (*SECTIONS, *extra):
        if key.startswith(f"{ENV_PREFIX}{s.upper()}_") and (best is None or len(s) > len(best)):
            best = s
    return best


def _suggest(name: str, candidates: Any, prefix: str = "") -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {prefix}{close[0].upper() if prefix else close[0]}?)" if close else ""


def check_environment(env: Mapping[str, str] | None = None,
                      extra_sections: tuple[str, ...] = ()) -> None:
    """Refuse ``LEUKOFLOW_*`` variables that belong to no known section nor :data:`GLOBAL_ENV`.

    A misspelt variable would otherwise be ignored silently.
    """
    env = os.environ if env is None else env
    for key in env:
        if not key.startswith(ENV_PREFIX) or key in GLOBAL_ENV:
            continue
        if _section_of(key, extra_sections) is None:
            bare = key[len(ENV_PREFIX):]
            rest = bare.split("_", 1)[1] if "_" in bare else ""
            known = [f"{s.upper()}_{rest}" for s in (*SECTIONS, *extra_sections)]
            known += [g[len(ENV_PREFIX):] for g in GLOBAL_ENV]
            raise ConfigError(f"unknown setting {key}: not a LEUKOFLOW_<SECTION>_<KEY> of "
                              f"the sections {', '.join(sorted(SECTIONS))} nor a global "
                              f"variable{_suggest(bare, known, ENV_PREFIX)}")


def _range_of(f: dataclasses.Field) -> tuple[float | None, float | None] | None:
    if RANGE in f.metadata:
        return f.metadata[RANGE]
    for suffix, rng in SUFFIX_RANGES:
        if f.name.endswith(suffix):
            return rng
    return None


def _check_number(v: Any, name: str, rng: tuple[float | None, float | None] | None) -> None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        if isinstance(v, tuple | list):
            for x in v:
                _check_number(x, name, rng)
        return
    if not math.isfinite(v):
        raise ConfigError(f"{name} = {v!r}: a finite number is required")
    if rng is not None:
        lo, hi = rng
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise ConfigError(f"{name} = {v!r} is outside its range "
                              f"[{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]")


def _is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def validate(cfg: Any, section: str = "") -> None:
    """Check a config dataclass: finite numbers in range, remote metrics only when opted in.

    :func:`resolve` calls it; services built from a hand-made config may call it too.
    """
    where = f"{section}." if section else ""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            validate(value, f"{where}{f.name}")  # a nested section
            continue
        _check_number(value, f"{where}{f.name}", _range_of(f))
    host = getattr(cfg, "metrics_host", None)
    if isinstance(host, str) and host and not _is_loopback(host) and not getattr(
            cfg, "allow_remote", False):
        raise ConfigError(f"{where}metrics_host = {host!r} is not loopback: /metrics and "
                          f"/status would be open to the network; set {where}allow_remote "
                          "= true to ask for it")


def as_dict(cfg: Any) -> dict[str, Any]:
    """Plain dict of a resolved config (for metadata and ``--json`` output)."""
    return dataclasses.asdict(cfg)


# ----------------------------------------------------------------------------- pipeline id

#: Generation of the processing behind a pipeline identifier. Bump it by hand (and say why
#: in the commit) when code changes what the acquisition pipeline or the model's decisions
#: produce from the same frames *without* a parameter changing: a new or corrected feature,
#: another algorithm in a stage, a fixed bug that changes numbers. Identifiers and hashes of
#: different generations never match, so recordings made before and after such a change are
#: never taken for the same pipeline. Parameter changes need no bump (they are in the id).
#: History: 1 = first identified pipeline (#13: nested PipelineConfig, TIE focus distance).
PIPELINE_GENERATION: int = 1
#: First field of every pipeline identifier (``leukoflow:<generation>``).
PIPELINE_ID_PREFIX = "leukoflow"
#: Section of the identifier holding the top-level (non-section) fields of the config.
ROOT_SECTION = "pipeline"
#: Section of the identifier naming the model (``model:name=...^sha=...``).
MODEL_SECTION = "model"


@dataclasses.dataclass(frozen=True)
class PipelineId:
    """A parsed pipeline identifier.

    Attributes
    ----------
    text : str
        The identifier itself (:func:`pipeline_id`).
    generation : int
        :data:`PIPELINE_GENERATION` when it was made.
    config : object
        The configuration it encodes (an instance of the class given to
        :func:`parse_pipeline_id`; derived fields at their defaults).
    model : str
        Model name ('' = none).
    model_sha : str
        sha256 of the model's tensors ('' = none).
    extra : dict
        Further sections (e.g. ``optics``) as instances of the classes given.
    """

    text: str
    generation: int
    config: Any
    model: str = ""
    model_sha: str = ""
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def hash(self) -> str:
        """:func:`pipeline_hash` of :attr:`text`."""
        return pipeline_hash(self.text)


def _enc(v: Any) -> str:
    """One value of the canonical form (reserved ``|^:=,%`` and spaces %-escaped)."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v)  # shortest text that reads back to the same float
    if isinstance(v, str):
        return quote(v, safe="")
    if isinstance(v, tuple | list):
        return ",".join(_enc(x) for x in v)
    raise TypeError(f"no canonical form for {type(v).__name__} values ({v!r})")


def _dec(text: str, typ: Any, name: str) -> Any:
    """Inverse of :func:`_enc` for a field annotated ``typ``."""
    origin = typing.get_origin(typ)
    if origin is typing.Union or origin is types.UnionType:
        if text == "":
            return None
        typ = next(a for a in typing.get_args(typ) if a is not type(None))
        origin = typing.get_origin(typ)
    if origin in (tuple, list):
        inner = typing.get_args(typ)
        parts = text.split(",") if text else []
        if origin is tuple and inner and inner[-1] is not Ellipsis:
            if len(parts) != len(inner):
                raise ConfigError(f"{name}: {len(inner)} values expected, got {text!r}")
            return tuple(_dec(p, t, name) for p, t in zip(parts, inner, strict=True))
        it = inner[0] if inner else str
        return origin(_dec(p, it, name) for p in parts)
    if typ is str:
        return unquote(text)
    return _coerce(text, typ, name)


def _sections(cfg: Any, root: str = ROOT_SECTION, path: str = "",
              derived: Mapping[str, str] | None = None) -> list[tuple[str, list[str]]]:
    """``[(section, ["key=value", ...]), ...]``: scalars first, then nested sections."""
    derived = _derived(type(cfg)) if derived is None else derived
    own: list[str] = []
    subs: list[tuple[str, list[str]]] = []
    for f in dataclasses.fields(cfg):
        if not f.init or f"{path}{f.name}" in derived:
            continue
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            subs += _sections(v, f"{path}{f.name}", f"{path}{f.name}.", derived)
        else:
            own.append(f"{f.name}={_enc(v)}")
    return ([(root, own)] if own else []) + subs


def pipeline_id(cfg: Any, *, model: str = "", model_sha: str = "",
                extra: Mapping[str, Any] | None = None,
                generation: int = PIPELINE_GENERATION) -> str:
    """The canonical, parseable identifier of a pipeline configuration.

    ``leukoflow:<generation>|pipeline:<top-level fields>|<section>:<k>=<v>^<k>=<v>|...|
    <extra sections>|model:name=<name>^sha=<sha>``: every field of ``cfg`` in declaration
    order (nested sections by their dotted path, fields named in the config's ``DERIVED``
    left out), values in a canonical text (floats as their shortest exact repr, booleans
    1/0, None empty, strings %-escaped). Equal configurations give equal identifiers;
    :func:`parse_pipeline_id` turns one back into the configuration, and
    :func:`pipeline_hash` is its short hash.

    Parameters
    ----------
    cfg : dataclass instance
        The configuration (e.g. :class:`leukoflow.acquisition.pipeline.PipelineConfig`).
    model, model_sha : str
        Model name and the sha256 of its tensors ('' = no model).
    extra : mapping, optional
        Further dataclass sections by name (e.g. ``{"optics": Optics(...)}``).
    generation : int
        :data:`PIPELINE_GENERATION` (other values for tests only).
    """
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        raise TypeError(f"{cfg!r} is not a dataclass instance")
    sections = _sections(cfg)
    names = {s for s, _ in sections}
    for name, value in (extra or {}).items():
        if name in names or name == MODEL_SECTION or "." in name:
            raise ValueError(f"extra section name {name!r} is taken")
        sections += _sections(value, name, derived={})
    sections.append((MODEL_SECTION, [f"name={_enc(model)}", f"sha={_enc(model_sha)}"]))
    body = "|".join(f"{s}:{'^'.join(kv)}" for s, kv in sections)
    return f"{PIPELINE_ID_PREFIX}:{int(generation)}|{body}"


def pipeline_hash(text_or_cfg: Any, **kwargs: Any) -> str:
    """Short hash of a pipeline: the first 16 hex digits of the sha256 of its identifier.

    Parameters
    ----------
    text_or_cfg : str or dataclass instance
        An identifier (:func:`pipeline_id`), or a configuration (then ``kwargs`` go to
        :func:`pipeline_id`).
    """
    text = text_or_cfg if isinstance(text_or_cfg, str) else pipeline_id(text_or_cfg, **kwargs)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def parse_pipeline_id(text: str, cls: type[T],
                      extra: Mapping[str, type] | None = None) -> PipelineId:
    """Turn a :func:`pipeline_id` back into the configuration it was made from.

    Parameters
    ----------
    text : str
        The identifier.
    cls : dataclass type
        The configuration class (fields added since the identifier was made take their
        defaults; unknown sections or keys are refused).
    extra : mapping, optional
        Classes of the extra sections (``{"optics": Optics}``).

    Raises
    ------
    ConfigError
        For text that is not an identifier of ``cls``, or values its checks refuse.
    """
    head, _, body = text.partition("|")
    prefix, _, gen = head.partition(":")
    if prefix != PIPELINE_ID_PREFIX or not gen.isdigit():
        raise ConfigError(f"not a pipeline identifier (expected '{PIPELINE_ID_PREFIX}:<n>|"
                          f"...'): {text[:60]!r}")
    extra = dict(extra or {})
    own: dict[str, dict[str, Any]] = {}
    extras: dict[str, dict[str, Any]] = {}
    model = {"name": "", "sha": ""}
    for part in body.split("|") if body else []:
        section, sep, kv = part.partition(":")
        if not sep:
            raise ConfigError(f"pipeline identifier: section without ':' ({part[:40]!r})")
        pairs = dict(p.split("=", 1) for p in kv.split("^") if p) if kv else {}
        if any("=" not in p for p in kv.split("^") if p):
            raise ConfigError(f"pipeline identifier: [{section}] has an entry without '='")
        if section == MODEL_SECTION:
            unknown = set(pairs) - set(model)
            if unknown:
                raise ConfigError(f"pipeline identifier: unknown keys in [model]: {unknown}")
            model.update({k: unquote(v) for k, v in pairs.items()})
        elif section.split(".")[0] in extra:
            extras.setdefault(section, {}).update(pairs)
        else:
            own[section] = pairs
    config = _from_sections(cls, own, ROOT_SECTION, "")
    ext = {name: _from_sections(c, {k: v for k, v in extras.items()
                                    if k == name or k.startswith(name + ".")}, name, name + ".")
           for name, c in extra.items() if any(k.split(".")[0] == name for k in extras)}
    return PipelineId(text=text, generation=int(gen), config=config, model=model["name"],
                      model_sha=model["sha"], extra=ext)


def _from_sections(cls: Any, sections: Mapping[str, Mapping[str, str]], root: str,
                   path: str) -> Any:
    """Rebuild ``cls`` from ``{section: {key: text}}`` (see :func:`_sections`)."""
    values: dict[str, Any] = {}
    known = {root} | {f"{path}{d}" for d in _dotted_sections(cls)}
    unknown = set(sections) - known
    if unknown:
        raise ConfigError(f"pipeline identifier: unknown sections {sorted(unknown)} for "
                          f"{cls.__name__}")
    for section, pairs in sections.items():
        sub = cls if section == root else _section_class(cls, section[len(path):])
        hints = typing.get_type_hints(sub)
        fields = {f.name for f in dataclasses.fields(sub) if f.init}
        for key, raw in pairs.items():
            if key not in fields or key in _nested(sub):
                raise ConfigError(f"pipeline identifier: unknown key {key!r} in [{section}]")
            rel = key if section == root else f"{section[len(path):]}.{key}"
            _put(values, rel, _dec(raw, hints[key], f"{section}.{key}"))
    cfg = _construct(cls, values, root)
    validate(cfg, root)
    return cfg


def _dotted_sections(cls: Any, prefix: str = "") -> list[str]:
    out: list[str] = []
    for name, sub in _nested(cls).items():
        out.append(prefix + name)
        out += _dotted_sections(sub, f"{prefix}{name}.")
    return out


def _section_class(cls: Any, dotted: str) -> Any:
    c = cls
    for part in dotted.split("."):
        c = _nested(c)[part]
    return c
