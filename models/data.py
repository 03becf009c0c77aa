"""Datasets for training and evaluation, and physics-respecting augmentation.

Sources (``load_splits(spec)``):

* ``.npz`` in the PBC layout (``x_train``/``y_train``/``x_val``/``x_test``/``x_ood``/
  ``ood_kind``): the fixed splits are used as they are. uint8 images become float32 / 255
  (these are brightfield intensities, not radians).
* ``.npz`` with ``x``/``y`` (and optional ``kind``), or a labeled ``.rtdc`` crop dataset
  (``leukoflow.core.rtdc.read_crop_dataset``): in-distribution cells (y >= 0) are split
  stratified by class into train/val/test with a seeded generator; OOD objects (y = -1)
  are kept for evaluation only.
* ``sim`` or ``sim:<n_per_class>``: the simulated instrument
  (``acquisition.sim.make_crop_dataset(..., through_hologram=True)``), generated
  deterministically; test cells come from an independent simulator seed.
* ``simflow`` or ``simflow:<n_per_class>[:<ood_per_kind>[:<test_per_class>]]``: crops as
  the live acquisition path cuts them (``acquisition.pipeline_dataset.make_pipeline_dataset``:
  simulated flow -> reconstruction -> segmentation -> gates -> tracking -> crops, labelled by
  the ground truth each emitted cell was traced to). The OOD objects go through the same
  path with the quality gates opened, so every kind reaches the classifier (the worst case:
  a gate missed it). This is what the shipped simulated-instrument models train on.
  ``test_per_class`` sets the size of the independent test set (default 40 % of
  ``n_per_class``; ``sim``: 20 %).

Augmentation (:class:`Augment`) only moves pixels or adds noise: random 90-degree rotations,
flips, small integer shifts (circular, the crop border is background) and additive Gaussian
noise in rad. It never rescales intensities, which would change the phase in radians and
hence the dry mass a cell carries.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import leukoflow.acquisition.sim as sim_package
from leukoflow.acquisition.pipeline_dataset import DATASET_VERSION, make_pipeline_dataset
from leukoflow.acquisition.sim import make_crop_dataset
from leukoflow.core.physics import Optics
from leukoflow.core.rtdc import read_crop_dataset
from leukoflow.core.vocabulary import CLASS_NAMES


@dataclass
class Split:
    """One split: crops ``x`` (N, H, W) float32, labels ``y`` (N,) int64 (-1 = OOD),
    object kinds ``kind`` (list of str, class name for ID cells)."""

    x: np.ndarray
    y: np.ndarray
    kind: list[str]

    def __post_init__(self) -> None:
        self.x = np.ascontiguousarray(self.x, dtype=np.float32)
        self.y = np.asarray(self.y, dtype=np.int64)
        self.kind = [str(k) for k in self.kind]
        if self.x.ndim != 3 or len(self.x) != len(self.y) or len(self.y) != len(self.kind):
            raise ValueError(f"inconsistent split: x {self.x.shape}, y {self.y.shape}, "
                             f"kind {len(self.kind)}")

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, idx: np.ndarray) -> Split:
        """Rows ``idx`` as a new split."""
        idx = np.asarray(idx)
        return Split(self.x[idx], self.y[idx], [self.kind[i] for i in idx])

    @property
    def id_mask(self) -> np.ndarray:
        """True for in-distribution cells (y >= 0)."""
        return self.y >= 0


@dataclass
class Splits:
    """train / val / test (in-distribution) and ood (evaluation only) plus provenance."""

    train: Split
    val: Split
    test: Split
    ood: Split | None
    class_names: tuple[str, ...]
    pixel_size_um: float | None
    unit: str
    source: dict[str, Any] = field(default_factory=dict)
    ood_features: dict[str, np.ndarray] = field(default_factory=dict)

    def data_hash(self) -> str:
        """sha256 over all arrays (train, val, test, ood) in a fixed order."""
        h = hashlib.sha256()
        for s in (self.train, self.val, self.test, self.ood):
            if s is None:
                continue
            h.update(np.ascontiguousarray(s.x).tobytes())
            h.update(s.y.tobytes())
            h.update("\n".join(s.kind).encode())
        return h.hexdigest()


def _read_rtdc(path: Path) -> dict[str, Any]:
    """``leukoflow.core.rtdc.read_crop_dataset`` with the HDF5 compression filters registered."""
    try:
        import hdf5plugin  # noqa: F401  (registers zstd etc. with HDF5 before reading)
    except ImportError:  # pragma: no cover
        pass

    return read_crop_dataset(path)


def stratified_split(y: np.ndarray, fractions: tuple[float, float, float], seed: int
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices of a per-class (stratified) random split into three parts."""
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[], [], []]
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n1 = int(round(fractions[0] * len(idx)))
        n2 = n1 + int(round(fractions[1] * len(idx)))
        for p, sl in zip(parts, (idx[:n1], idx[n1:n2], idx[n2:]), strict=True):
            p.append(sl)
    return tuple(rng.permutation(np.concatenate(p)) for p in parts)  # type: ignore[return-value]


def _from_pbc_npz(path: Path) -> Splits:

    parts = {s: read_crop_dataset(path, split=s) for s in ("train", "val", "test", "ood")}
    sp = {s: Split(d["x"], d["y"], d["kind"]) for s, d in parts.items()}
    names = tuple(parts["train"]["meta"].get("class_names", CLASS_NAMES))
    return Splits(sp["train"], sp["val"], sp["test"], sp["ood"], names, None,
                  "intensity/255", {"path": str(path), "layout": "pbc npz (fixed splits)"})


def _from_flat(x: np.ndarray, y: np.ndarray, kind: list[str], source: dict[str, Any],
               pixel_size_um: float | None, seed: int,
               fractions: tuple[float, float, float], unit: str = "rad") -> Splits:
    full = Split(x, y, kind)
    ido = np.flatnonzero(full.y >= 0)
    tr, va, te = stratified_split(full.y[ido], fractions, seed)
    oodi = np.flatnonzero(full.y < 0)
    return Splits(full.subset(ido[tr]), full.subset(ido[va]), full.subset(ido[te]),
                  full.subset(oodi) if oodi.size else None, tuple(CLASS_NAMES),
                  pixel_size_um, unit, {**source, "split_seed": seed,
                                        "split_fractions": list(fractions)})


def _sim_cache_path(args: dict[str, Any]) -> Path | None:
    """Cache file for simulated data, keyed by arguments and the simulator source code."""
    import os

    root = os.environ.get("LEUKOFLOW_SIM_CACHE", str(Path.home() / ".cache" / "leukoflow" / "sim"))
    if root.lower() in ("", "0", "off", "none"):
        return None
    h = hashlib.sha256(repr(sorted(args.items())).encode())
    src = Path(sim_package.__file__).parent
    files = sorted(src.glob("*.py"))
    if args.get("through_pipeline"):
        # crop content: the simulator, reconstruction and crop cutting, plus the declared
        # version of the dataset builder (segmentation/tracking edits that change *which*
        # cells are emitted are not in the key: clear the cache or bump DATASET_VERSION)

        h.update(f"pipeline_dataset v{DATASET_VERSION}".encode())
        files += sorted((src.parent / "reconstruct").glob("*.py"))
        files.append(src.parent / "crops.py")
    for f in files:
        h.update(f.read_bytes())
    return Path(root) / f"sim-{h.hexdigest()[:20]}.npz"


def _simulate(n_per_class: int, ood_per_kind: int, seed: int,
              through_pipeline: bool = False) -> dict[str, Any]:
    """Simulated crops with an on-disk cache (npz, no pickle).

    ``make_crop_dataset(..., through_hologram=True)`` or, with ``through_pipeline``,
    ``make_pipeline_dataset`` (OOD objects with the quality gates opened).
    """
    args: dict[str, Any] = {"n_per_class": n_per_class, "ood_per_kind": ood_per_kind,
                            "seed": seed}
    if through_pipeline:
        args["through_pipeline"] = True
    cache = _sim_cache_path(args)
    if cache is not None and cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as z:
                return {"x": z["x"], "y": z["y"], "kind": [str(k) for k in z["kind"]],
                        "features": {k[2:]: z[k] for k in z.files if k.startswith("f_")}}
        except (OSError, ValueError, KeyError):
            pass
    if through_pipeline:
        d = _pipeline_data(n_per_class, ood_per_kind, seed)
    else:

        d = make_crop_dataset(n_per_class, ood_per_kind, seed, through_hologram=True)
    if cache is not None:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp.npz")
            np.savez(tmp, x=d["x"], y=d["y"], kind=np.asarray(d["kind"], dtype=str),
                     **{f"f_{k}": v for k, v in d["features"].items()})
            tmp.replace(cache)
        except OSError:
            pass
    return d


def simulate_splits(n_per_class: int = 1000, ood_per_kind: int = 200, seed: int = 0,
                    test_fraction: float = 0.2) -> Splits:
    """Deterministic simulated-instrument dataset (``acquisition.sim.make_crop_dataset``).

    Train/val come from simulator seed ``seed`` (85 / 15 % stratified split of
    ``n_per_class`` cells per class); the held-out test set and the OOD objects come from an
    independent simulator seed ``seed + 1000`` with ``round(test_fraction * n_per_class)``
    cells per class and ``ood_per_kind`` objects per OOD kind. Generated arrays are cached
    in ``$LEUKOFLOW_SIM_CACHE`` (default ``~/.cache/leukoflow/sim``; ``off`` disables),
    keyed by the arguments and the simulator's source code.
    """
    a = _simulate(n_per_class, 0, seed)
    b = _simulate(max(1, round(test_fraction * n_per_class)), ood_per_kind, seed + 1000)
    return _sim_splits(a, b, seed, {
        "generator": "acquisition.sim.make_crop_dataset", "n_per_class": n_per_class,
        "ood_per_kind": ood_per_kind, "seed": seed, "test_seed": seed + 1000,
        "through_hologram": True, "train_val_split": "85/15 stratified"})


def _sim_splits(a: dict[str, Any], b: dict[str, Any], seed: int,
                source: dict[str, Any]) -> Splits:
    """Splits from a train/val generation ``a`` and an independent test + OOD one ``b``."""

    full = Split(a["x"], a["y"], a["kind"])
    ido = np.flatnonzero(full.y >= 0)
    tr, va, _ = stratified_split(full.y[ido], (0.85, 0.15, 0.0), seed)
    bs = Split(b["x"], b["y"], b["kind"])
    oodi = np.flatnonzero(bs.y < 0)
    return Splits(full.subset(ido[tr]), full.subset(ido[va]),
                  bs.subset(np.flatnonzero(bs.y >= 0)), bs.subset(oodi), tuple(CLASS_NAMES),
                  float(Optics().pixel_um), "rad", source,
                  {k: np.asarray(v)[oodi] for k, v in b.get("features", {}).items()})


#: Quality gates opened for the OOD objects of ``simflow`` (every kind reaches the model).
OPEN_GATES: dict[str, Any] = {"gates": {"min_area_um": 0.5, "max_area_um": 1.0e4,
                                        "min_solidity": 0.0, "max_eccentricity": 1.0,
                                        "max_peaks": 10**6, "max_amp_std": 1.0e9}}


def _pipeline_data(n_per_class: int, ood_per_kind: int, seed: int) -> dict[str, Any]:
    """Leukocytes through the default pipeline; OOD objects with :data:`OPEN_GATES`."""
    import os


    workers = max(1, int(os.environ.get("LEUKOFLOW_SIM_WORKERS", "1")))
    a = make_pipeline_dataset(n_per_class, 0, seed, workers=workers)
    if not ood_per_kind:
        return a
    b = make_pipeline_dataset(0, ood_per_kind, seed, workers=workers, pipeline=OPEN_GATES)
    return {"x": np.concatenate([a["x"], b["x"]]), "y": np.concatenate([a["y"], b["y"]]),
            "kind": list(a["kind"]) + list(b["kind"]),
            "features": {k: np.concatenate([a["features"][k], b["features"][k]])
                         for k in a["features"]}}


def simflow_splits(n_per_class: int = 1000, ood_per_kind: int = 200, seed: int = 0,
                   test_fraction: float = 0.4) -> Splits:
    """Simulated dataset cut by the acquisition pipeline (see module docstring).

    Train/val (85 / 15 % stratified) from ``n_per_class`` cells per class of simulator
    seed ``seed``; test cells (``round(test_fraction * n_per_class)`` per class) and OOD
    objects from the independent seed ``seed + 1000``. Cached like :func:`simulate_splits`
    (keyed by the whole ``acquisition`` package source). ``LEUKOFLOW_SIM_WORKERS`` sets the
    number of generating processes (the arrays do not depend on it).
    """

    a = _simulate(n_per_class, 0, seed, through_pipeline=True)
    b = _simulate(max(1, round(test_fraction * n_per_class)), ood_per_kind, seed + 1000,
                  through_pipeline=True)
    return _sim_splits(a, b, seed, {
        "generator": "acquisition.pipeline_dataset.make_pipeline_dataset",
        "dataset_version": DATASET_VERSION,
        "n_per_class": n_per_class, "ood_per_kind": ood_per_kind, "seed": seed,
        "test_seed": seed + 1000, "test_fraction": test_fraction, "through_pipeline": True,
        "ood_gates": "opened (OPEN_GATES)", "train_val_split": "85/15 stratified"})


def _sim_spec(s: str) -> tuple[str, int, int, int | None] | None:
    """Parse ``sim[:n[:ood[:test]]]`` / ``simflow[:...]`` -> (kind, n, ood, test), else None.

    ``test`` (test cells per class) is None when not given (the generator's default share).
    """
    head = s.split(":")[0]
    if head not in ("sim", "simflow"):
        return None
    parts = s.split(":")[1:]
    if len(parts) > 3:
        raise ValueError(f"{s!r}: expected {head}[:n_per_class[:ood_per_kind[:test_per_class]]]")
    try:
        n = int(parts[0]) if parts else 1000
        n_ood = int(parts[1]) if len(parts) > 1 else 200
        n_test = int(parts[2]) if len(parts) > 2 else None
    except ValueError as exc:
        raise ValueError(f"{s!r}: counts must be integers") from exc
    if n < 1 or n_ood < 0 or (n_test is not None and n_test < 1):
        raise ValueError(f"{s!r}: need n_per_class >= 1, ood_per_kind >= 0, test >= 1")
    return head, n, n_ood, n_test


def load_splits(spec: str | Path, seed: int = 0,
                fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)) -> Splits:
    """Load a dataset by ``spec`` (see module docstring) as train/val/test/ood splits.

    Parameters
    ----------
    spec : str or Path
        ``sim[:<n_per_class>[:<ood_per_kind>[:<test_per_class>]]]``, ``simflow[:...]``
        (same, cut by the acquisition pipeline), or a path to an ``.npz`` / ``.rtdc`` file.
    seed : int
        Seed of the stratified split (and of the simulator for ``sim``).
    fractions : tuple
        train/val/test fractions for flat datasets.
    """
    s = str(spec)
    sim = _sim_spec(s)
    if sim is not None:
        kind, n, n_ood, n_test = sim
        fn = simflow_splits if kind == "simflow" else simulate_splits
        if n_test is None:
            return fn(n, n_ood, seed)
        return fn(n, n_ood, seed, test_fraction=n_test / n)
    p = Path(s).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"dataset not found: {p}")
    if p.suffix == ".npz":
        with np.load(p, allow_pickle=False) as z:
            keys = set(z.files)
        if {"x_train", "y_train", "x_val", "y_val", "x_test", "y_test"} <= keys:
            return _from_pbc_npz(p)
        if {"x", "y"} <= keys:
            with np.load(p, allow_pickle=False) as z:
                x = z["x"].astype(np.float32) / (255.0 if z["x"].dtype == np.uint8 else 1.0)
                y = z["y"]
                kind = ([str(k) for k in z["kind"]] if "kind" in keys else
                        [CLASS_NAMES[i] if i >= 0 else "ood" for i in y])
                px = float(z["pixel_size_um"]) if "pixel_size_um" in keys else None
                unit = "intensity/255" if z["x"].dtype == np.uint8 else "rad"
            return _from_flat(x, y, kind, {"path": str(p)}, px, seed, fractions, unit)
        raise ValueError(f"{p}: npz needs x/y or x_train/y_train/x_val/y_val/x_test/y_test")
    if p.suffix == ".rtdc":
        d = _read_rtdc(p)
        meta = d.get("meta") or {}
        px = meta.get("imaging:pixel size")
        return _from_flat(d["x"], d["y"], d["kind"], {"path": str(p)},
                          None if px is None else float(px), seed, fractions)
    raise ValueError(f"unsupported dataset {p} (use .npz, .rtdc or 'sim')")


def load_eval_set(spec: str | Path, seed: int = 0) -> tuple[Split, Split | None, dict[str, Any]]:
    """Labeled cells and OOD objects to *evaluate* on.

    PBC-layout ``.npz``: the test split and ``x_ood``. ``sim``: the held-out simulated test
    set. Any other ``.npz``/``.rtdc``: every row (the whole file is treated as a test set).
    """
    s = str(spec)
    if _sim_spec(s) is not None:
        sp = load_splits(s, seed)
        return sp.test, sp.ood, {**sp.source, "ood_features": sp.ood_features}
    p = Path(s).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"dataset not found: {p}")
    if p.suffix == ".npz":
        with np.load(p, allow_pickle=False) as z:
            pbc = "x_test" in z.files
        if pbc:
            sp = _from_pbc_npz(p)
            return sp.test, sp.ood, sp.source
    d = _read_rtdc(p)
    full = Split(d["x"], d["y"], d["kind"])
    ido, oodi = np.flatnonzero(full.y >= 0), np.flatnonzero(full.y < 0)
    feats = {k: np.asarray(v)[oodi] for k, v in (d.get("features") or {}).items()
             if np.ndim(v) == 1 and len(v) == len(full)}
    return (full.subset(ido), full.subset(oodi) if oodi.size else None,
            {"path": str(p), "layout": "whole file as test set", "ood_features": feats})


# ----------------------------------------------------------------------------- augmentation


@dataclass(frozen=True)
class Augment:
    """Physics-respecting augmentation of normalised crops (torch, batched).

    Parameters
    ----------
    rot90 : bool
        Random multiples of 90 degrees (cells have no preferred orientation in the channel
        cross-section; 90-degree steps need no interpolation).
    flip : bool
        Random horizontal flip (with rot90 this spans all 8 symmetries of the square).
    max_shift_px : int
        Random integer shift in [-s, s] px per axis (circular; the crop border is background).
    noise_rad : float
        Standard deviation of additive Gaussian noise in rad (converted to normalised units
        by the caller via ``std``).
    """

    rot90: bool = True
    flip: bool = True
    max_shift_px: int = 3
    noise_rad: float = 0.02

    def __call__(self, x, generator, std: float = 1.0):
        """Augment a batch ``(N, 1, H, W)`` with torch ``generator``; returns a new tensor."""
        import torch

        n = x.shape[0]
        out = x
        if self.rot90:
            k = torch.randint(0, 4, (n,), generator=generator)
            out = torch.stack([torch.rot90(out[i], int(k[i]), dims=(1, 2)) for i in range(n)])
        if self.flip:
            f = torch.rand(n, generator=generator) < 0.5
            out = torch.where(f[:, None, None, None], out.flip(-1), out)
        if self.max_shift_px > 0:
            s = torch.randint(-self.max_shift_px, self.max_shift_px + 1, (n, 2),
                              generator=generator)
            out = torch.stack([torch.roll(out[i], (int(s[i, 0]), int(s[i, 1])), dims=(1, 2))
                               for i in range(n)])
        if self.noise_rad > 0:
            out = out + torch.randn(out.shape, generator=generator) * (self.noise_rad / std)
        return out

    def to_dict(self) -> dict[str, Any]:
        """Parameters for the card."""
        return {"rot90": self.rot90, "flip": self.flip, "max_shift_px": self.max_shift_px,
                "noise_rad": self.noise_rad}
