"""Instrument and sample profiles of the simulator: TOML files of :class:`SimConfig` overrides.

A profile is a TOML document whose keys are :class:`leukoflow.acquisition.sim.SimConfig`
fields (nested tables for ``optics``, ``camera``, ``background``, ``bead``), plus an
optional ``description``. ``size_scale`` and ``ri_scale`` may be one number (every
leukocyte class) or a table per class. Profiles compose: applied left to right, later
values win, nested tables merge key by key::

    cfg = apply_profiles(SimConfig(seed=3), ["mag+5", "beads"])   # QC run at +5 % mag.

Shipped profiles live in ``acquisition/sim/profiles/*.toml`` (``list_profiles()``): the
nominal ``default`` and drifted instruments/samples (``cells+5``, ``cells+10``,
``cells-5``, ``ri-5``, ``mag+5``, ``mag-5``, ``defocus2um``, ``camera-aged``) and the QC
sample ``beads``. A path to a ``.toml`` file works wherever a name does. The ``sim:``
source spec takes them as its fourth field (``sim:SEED:CONCENTRATION:PROFILE[,PROFILE]``).
The resolved configuration and the profile names are recorded with every run
(:func:`profile_record`).
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from leukoflow.acquisition.sim.params import SimConfig
from leukoflow.core.vocabulary import CLASS_NAMES

#: Folder of the shipped profiles.
PROFILE_DIR = Path(__file__).resolve().parent / "profiles"

_NESTED = ("optics", "camera", "background", "bead")
_PER_CLASS = ("size_scale", "ri_scale")
_MERGED_MAPS = ("class_fractions", "ood_fractions", *_PER_CLASS)


class ProfileError(ValueError):
    """A profile is missing, unreadable or sets unknown or invalid parameters."""


def list_profiles() -> dict[str, str]:
    """Shipped profile names and their descriptions."""
    out = {}
    for p in sorted(PROFILE_DIR.glob("*.toml")):
        try:
            out[p.stem] = str(_read(p).get("description", ""))
        except ProfileError as exc:  # pragma: no cover - shipped files are tested
            out[p.stem] = f"(unreadable: {exc})"
    return out


def _read(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(f"cannot read profile {path}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"invalid TOML in profile {path}: {exc}") from exc


def profile_path(name: str) -> Path:
    """File of profile ``name`` (a shipped name or a path to a ``.toml`` file)."""
    if not name:
        raise ProfileError("empty profile name")
    p = Path(name).expanduser()
    if p.suffix == ".toml" or "/" in name:
        if not p.is_file():
            raise ProfileError(f"profile file not found: {p}")
        return p
    q = PROFILE_DIR / f"{name}.toml"
    if not q.is_file():
        raise ProfileError(f"unknown simulator profile {name!r}; shipped: "
                           f"{', '.join(list_profiles())} (or a path to a .toml file)")
    return q


def load_profile(name: str) -> dict[str, Any]:
    """Overrides of profile ``name`` (``description`` removed), checked for unknown keys."""
    doc = _read(profile_path(name))
    doc.pop("description", None)
    known = {f for f in SimConfig.__dataclass_fields__}
    unknown = set(doc) - known
    if unknown:
        raise ProfileError(f"profile {name!r}: unknown keys {sorted(unknown)}; "
                           f"valid keys are SimConfig fields: {', '.join(sorted(known))}")
    if "seed" in doc:
        raise ProfileError(f"profile {name!r}: the seed is not part of a profile")
    for key in _PER_CLASS:
        v = doc.get(key)
        if isinstance(v, int | float) and not isinstance(v, bool):
            doc[key] = dict.fromkeys(CLASS_NAMES, float(v))
    return doc


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if (k in _NESTED or k in _MERGED_MAPS) and isinstance(v, Mapping) \
                and isinstance(out.get(k), Mapping):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


def parse_profiles(spec: str | Sequence[str] | None) -> list[str]:
    """Profile names from ``"a,b"`` or a sequence (empty entries dropped)."""
    if spec is None:
        return []
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    return [s.strip() for s in items if s and s.strip()]


def apply_profiles(cfg: SimConfig, names: str | Sequence[str] | None) -> SimConfig:
    """``cfg`` with the profiles ``names`` applied in order (validated).

    Raises
    ------
    ProfileError
        Unknown profile, unknown key, or a resulting configuration that fails
        :meth:`SimConfig.validate` (the message names the profile chain).
    """
    names = parse_profiles(names)
    if not names:
        return cfg
    d = cfg.to_dict()
    for n in names:
        d = _merge(d, load_profile(n))
    try:
        return SimConfig.from_dict(d)
    except (TypeError, ValueError) as exc:
        raise ProfileError(f"profile {','.join(names)}: {exc}") from exc


def profile_record(names: str | Sequence[str] | None, cfg: SimConfig) -> dict[str, Any]:
    """What a run records about its simulated instrument: profile names, their merged
    overrides and the full resolved configuration."""
    names = parse_profiles(names)
    over: dict[str, Any] = {}
    for n in names:
        over = _merge(over, load_profile(n))
    return {"profiles": names or ["default"], "overrides": over, "config": cfg.to_dict()}
