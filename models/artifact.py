"""Model artifacts: ``weights.safetensors`` + ``card.json`` in one folder (no pickle).

Layout of ``models/artifacts/<name>/``:

* ``weights.safetensors``: the model ``state_dict`` under the prefix ``model.`` and the
  fitted OOD-detector arrays under ``ood.`` (e.g. ``ood.bank`` for KNN). float32.
* ``card.json``: everything needed to use the weights correctly and to judge them
  (architecture and kwargs, input size in px, pixel size in µm, normalisation in rad,
  class names, temperature, confidence threshold, OOD detector name/params/threshold,
  training data hash and command, metrics with intervals, date, versions, model card).

``load_artifact("lenet5-sim")`` resolves a bare name to ``models/artifacts/<name>/``; a path
to a folder (or to its ``card.json``) works too. Every way an artifact can be broken (missing
folder or file, truncated or altered weights, card missing keys or with bad values, tensors
of the wrong shape) raises :class:`ArtifactError` with a message naming the problem.

``Artifact.sha256`` is a hash of the *model* tensors only (names, dtypes, shapes, bytes), so
it identifies the network (used by the ONNX/TensorRT engine caches) and does not change when
the temperature or the OOD detector is refitted. ``card["weights_file_sha256"]`` is the
sha256 of the whole weights file and is verified on load to detect corruption.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import platform
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from leukoflow import __version__
from leukoflow.core.jsonutil import json_safe
from leukoflow.models.ood import DETECTORS

ARTIFACTS_DIR = Path(__file__).resolve().parent / "artifacts"
"""Folder holding the shipped artifacts (``models/artifacts/<name>/``)."""

CARD_FILE = "card.json"
WEIGHTS_FILE = "weights.safetensors"
FORMAT_VERSION = 1
MODEL_PREFIX = "model."
OOD_PREFIX = "ood."

REQUIRED_KEYS: tuple[str, ...] = (
    "format_version", "architecture", "arch_kwargs", "input_size", "pixel_size_um",
    "normalisation", "class_names", "temperature", "confidence_threshold", "ood",
)
"""Card keys without which an artifact cannot be used."""

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class ArtifactError(RuntimeError):
    """A model artifact is missing, corrupt or inconsistent."""


# ----------------------------------------------------------------------------- helpers


def tensors_sha256(tensors: Mapping[str, Any]) -> str:
    """Canonical sha256 of named tensors (sorted names, dtype, shape, raw bytes)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        a = tensors[name]
        arr = a.detach().cpu().contiguous().numpy() if hasattr(a, "detach") else np.asarray(a)
        arr = np.ascontiguousarray(arr)
        h.update(name.encode())
        h.update(str(arr.dtype).encode())
        h.update(str(arr.shape).encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def software_versions() -> dict[str, str]:
    """Versions of the software that produced an artifact."""
    import torch


    out = {"leukoflow": __version__, "python": platform.python_version(),
           "torch": torch.__version__, "numpy": np.__version__}
    try:
        import safetensors

        out["safetensors"] = safetensors.__version__
    except (ImportError, AttributeError):  # pragma: no cover
        pass
    return out


def resolve_artifact_path(path_or_name: str | Path) -> Path:
    """Return the artifact folder for a name (``models/artifacts/<name>``) or a path."""
    p = Path(path_or_name).expanduser()
    if p.name == CARD_FILE:
        p = p.parent
    if p.is_dir():
        return p
    s = str(path_or_name)
    if _NAME_RE.match(s) and (ARTIFACTS_DIR / s).is_dir():
        return ARTIFACTS_DIR / s
    avail = sorted(d.name for d in ARTIFACTS_DIR.glob("*") if (d / CARD_FILE).is_file()) \
        if ARTIFACTS_DIR.is_dir() else []
    raise ArtifactError(
        f"model artifact not found: {s!r} (not a folder, and not a shipped name; "
        f"shipped: {', '.join(avail) or 'none'})"
    )


def _validate_card(card: Any, where: Path) -> dict[str, Any]:
    if not isinstance(card, dict):
        raise ArtifactError(f"{where}: card is not a JSON object")
    missing = [k for k in REQUIRED_KEYS if k not in card]
    if missing:
        raise ArtifactError(f"{where}: card is missing keys: {', '.join(missing)}")
    if card["format_version"] != FORMAT_VERSION:
        raise ArtifactError(f"{where}: unsupported card format_version "
                            f"{card['format_version']!r} (this code reads {FORMAT_VERSION})")
    names = card["class_names"]
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        raise ArtifactError(f"{where}: class_names must be a non-empty list of strings")
    t = card["temperature"]
    if not isinstance(t, int | float) or not math.isfinite(t) or t <= 0:
        raise ArtifactError(f"{where}: temperature must be a finite number > 0, got {t!r}")
    n = card["normalisation"]
    if not (isinstance(n, dict) and isinstance(n.get("mean"), int | float)
            and isinstance(n.get("std"), int | float) and n["std"] > 0):
        raise ArtifactError(f"{where}: normalisation must be {{'mean': float, 'std': float > 0}}")
    if not isinstance(card["input_size"], int) or card["input_size"] < 8:
        raise ArtifactError(f"{where}: input_size must be an int >= 8 px")
    if not isinstance(card["arch_kwargs"], dict):
        raise ArtifactError(f"{where}: arch_kwargs must be an object")
    ct = card["confidence_threshold"]
    if not isinstance(ct, int | float) or not 0.0 <= ct <= 1.0:
        raise ArtifactError(f"{where}: confidence_threshold must be in [0, 1], got {ct!r}")
    desc = card.get("descriptors")
    if desc is not None:
        try:
            from leukoflow.models.descriptors import DescriptorConfig
        except ImportError:  # no torch (lean GPU image): descriptors live in the ONNX graph
            DescriptorConfig = None  # noqa: N806
        try:
            if not isinstance(desc, dict):
                raise TypeError("not an object")
            if DescriptorConfig is not None:
                DescriptorConfig(**{k: v for k, v in desc.items() if k != "names"})
        except (AttributeError, TypeError, ValueError) as exc:
            raise ArtifactError(f"{where}: invalid descriptors {desc!r}: {exc}") from exc
        px = card.get("pixel_size_um")
        if not isinstance(px, int | float) or not px > 0:
            raise ArtifactError(f"{where}: descriptors need pixel_size_um > 0, got {px!r}")
    ood = card["ood"]
    if ood is not None and not (isinstance(ood, dict) and isinstance(ood.get("detector"), str)
                                and isinstance(ood.get("params", {}), dict)
                                and isinstance(ood.get("threshold"), int | float)):
        raise ArtifactError(f"{where}: ood must be null or "
                            "{'detector': str, 'params': {...}, 'threshold': float}")
    return card


# ----------------------------------------------------------------------------- Artifact


class Artifact:
    """A loaded model artifact (see module docstring). Create with :func:`load_artifact`."""

    def __init__(self, path: Path, card: dict[str, Any], model_state: dict[str, Any],
                 ood_tensors: dict[str, np.ndarray]) -> None:
        self.path = path
        self.card = card
        self._state = model_state
        self.ood_tensors = ood_tensors
        self.sha256 = tensors_sha256(model_state)

    # --- card fields -------------------------------------------------------------------
    @property
    def name(self) -> str:
        """Artifact name (card ``name``, else the folder name)."""
        return str(self.card.get("name") or self.path.name)

    @property
    def architecture(self) -> str:
        """Registered architecture name (``leukoflow.models.architectures.ARCHITECTURES``)."""
        return str(self.card["architecture"])

    @property
    def class_names(self) -> tuple[str, ...]:
        """Class names in logit order."""
        return tuple(self.card["class_names"])

    @property
    def temperature(self) -> float:
        """Fitted temperature T (> 0): calibrated p = softmax(logits / T)."""
        return float(self.card["temperature"])

    @property
    def input_size(self) -> int:
        """Crop side length in px."""
        return int(self.card["input_size"])

    @property
    def pixel_size_um(self) -> float | None:
        """Pixel size of the training crops in µm (None for non-QPI data of unknown scale)."""
        v = self.card["pixel_size_um"]
        return None if v is None else float(v)

    @property
    def normalisation(self) -> dict[str, float]:
        """``{"mean": rad, "std": rad}``; the model sees ``(x - mean) / std``."""
        n = self.card["normalisation"]
        return {"mean": float(n["mean"]), "std": float(n["std"])}

    @property
    def ood(self) -> dict[str, Any] | None:
        """``{"detector": name, "params": {...}, "threshold": float}`` or None."""
        return self.card["ood"]

    @property
    def confidence_threshold(self) -> float:
        """Cells whose calibrated max probability is below this are 'uncertain'."""
        return float(self.card["confidence_threshold"])

    @property
    def is_variational(self) -> bool:
        """True for Monte-Carlo (Bayesian) models with ``mc_logits``."""
        return self.architecture.endswith("_vi")

    # --- objects -----------------------------------------------------------------------
    def build_model(self, device: str = "cpu"):
        """Return the network with the stored weights, in ``eval()`` mode, float32."""
        import torch

        from leukoflow.models.architectures import ARCHITECTURES

        try:
            model = ARCHITECTURES.create(self.architecture, in_size=self.input_size,
                                         num_classes=len(self.class_names),
                                         **self.card["arch_kwargs"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"{self.path}: cannot build {self.architecture!r} "
                                f"with {self.card['arch_kwargs']}: {exc}") from exc
        try:
            model.load_state_dict(self._state, strict=True)
        except RuntimeError as exc:
            raise ArtifactError(f"{self.path}: weights do not fit the architecture "
                                f"{self.architecture!r}: {exc}") from exc
        desc = self.card.get("descriptors")
        if desc:
            from leukoflow.models.descriptors import DescriptorConfig, PhaseDescriptors

            cfg = DescriptorConfig(**{k: v for k, v in desc.items() if k != "names"})
            n = self.normalisation
            model.attach_descriptors(PhaseDescriptors(self.input_size, n["mean"], n["std"],
                                                      float(self.pixel_size_um), cfg))
        return model.to(device=torch.device(device), dtype=torch.float32).eval()

    def ood_detector(self):
        """Return the fitted OOD detector (``leukoflow.models.ood``), or None if the card has
        none."""
        if self.ood is None:
            return None

        cls = DETECTORS.get(self.ood["detector"])
        try:
            return cls.from_dict({"params": self.ood.get("params", {}),
                                  "threshold": self.ood["threshold"],
                                  "arrays": self.ood_tensors})
        except (KeyError, ValueError, TypeError) as exc:
            raise ArtifactError(f"{self.path}: OOD detector {self.ood['detector']!r} "
                                f"cannot be restored: {exc}") from exc

    def preprocess(self, x_rad: np.ndarray) -> np.ndarray:
        """Phase crops in rad -> normalised float32 model input ``(N, 1, H, W)``.

        Parameters
        ----------
        x_rad : np.ndarray
            ``(H, W)``, ``(N, H, W)`` or ``(N, 1, H, W)`` phase in rad (any real dtype),
            with H = W = ``input_size``. Crops that are larger are centre-cropped and
            smaller ones are zero-padded (0 rad = background phase) to ``input_size``;
            the pixel size is *not* changed, so crops must come at ``pixel_size_um``.

        Returns
        -------
        np.ndarray
            C-contiguous float32 ``(N, 1, S, S)`` with S = input_size.

        Raises
        ------
        ValueError
            Wrong number of dimensions, non-square mismatch handling impossible, or
            non-finite values.
        """
        x = np.asarray(x_rad)
        if x.ndim == 2:
            x = x[None]
        elif x.ndim == 4:
            if x.shape[1] != 1:
                raise ValueError(f"expected one channel, got shape {x.shape}")
            x = x[:, 0]
        if x.ndim != 3:
            raise ValueError(f"expected (H,W), (N,H,W) or (N,1,H,W) crops, got {x_rad.shape}")
        if not np.issubdtype(x.dtype, np.number) or np.iscomplexobj(x):
            raise ValueError(f"crops must be real numbers, got dtype {x.dtype}")
        x = fit_size(x, self.input_size)
        out = np.empty((x.shape[0], 1, self.input_size, self.input_size), np.float32)
        n = self.normalisation
        np.subtract(x, n["mean"], out=out[:, 0], casting="unsafe")
        out /= np.float32(n["std"])
        if not np.isfinite(out).all():
            raise ValueError("crops contain NaN or infinite values")
        return out

    def __repr__(self) -> str:
        return (f"Artifact({self.name!r}, arch={self.architecture}, T={self.temperature:.4g}, "
                f"sha256={self.sha256[:12]})")


def fit_size(x: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop or zero-pad ``(N, H, W)`` crops to ``(N, size, size)`` (no resampling)."""
    _, h, w = x.shape
    if h == size and w == size:
        return x
    out = np.zeros((x.shape[0], size, size), dtype=x.dtype)
    sy, sx = max(0, (h - size) // 2), max(0, (w - size) // 2)
    dy, dx = max(0, (size - h) // 2), max(0, (size - w) // 2)
    ch, cw = min(h, size), min(w, size)
    out[:, dy:dy + ch, dx:dx + cw] = x[:, sy:sy + ch, sx:sx + cw]
    return out


# ----------------------------------------------------------------------------- save/load


def save_artifact(path: str | Path, model, card: Mapping[str, Any],
                  extra_tensors: Mapping[str, Any] | None = None) -> Path:
    """Write ``weights.safetensors`` and ``card.json`` into folder ``path``.

    Parameters
    ----------
    path : str or Path
        Artifact folder (created if needed; existing files are replaced atomically).
    model : torch.nn.Module
        The network; its ``state_dict`` is stored as float32 under ``model.``.
    card : mapping
        Card content; must hold :data:`REQUIRED_KEYS` (``format_version`` is filled in).
        ``name``, ``created`` (UTC ISO date), ``versions`` are added when absent;
        ``weights_file_sha256`` and ``model_sha256`` are always (re)computed.
    extra_tensors : mapping, optional
        Additional arrays (e.g. OOD detector arrays) stored under ``ood.<name>``.

    Returns
    -------
    Path
        The artifact folder.
    """
    import torch
    from safetensors.torch import save_file

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    model_state = {}
    for k, v in model.state_dict().items():
        t = v.detach().cpu()
        if t.is_floating_point():
            t = t.float()
        model_state[k] = t.contiguous().clone()
        tensors[MODEL_PREFIX + k] = model_state[k]
    for k, v in (extra_tensors or {}).items():
        arr = np.ascontiguousarray(np.asarray(v))
        if arr.dtype == np.float64:
            arr = arr.astype(np.float32)
        tensors[OOD_PREFIX + k] = torch.from_numpy(arr.copy())
    full = dict(card)
    full["format_version"] = FORMAT_VERSION
    full.setdefault("name", folder.name)
    full.setdefault("created", _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
    full.setdefault("versions", software_versions())
    _validate_card(json_safe(full, strict=True), folder)
    tmp_w = folder / (WEIGHTS_FILE + ".tmp")
    save_file(tensors, str(tmp_w), metadata={"format": "pt", "leukoflow_card_format": "1"})
    full["weights_file_sha256"] = file_sha256(tmp_w)
    full["model_sha256"] = tensors_sha256(model_state)
    tmp_c = folder / (CARD_FILE + ".tmp")
    tmp_c.write_text(json.dumps(json_safe(full, strict=True), indent=2, allow_nan=False) + "\n")
    tmp_w.chmod(0o644)
    tmp_w.replace(folder / WEIGHTS_FILE)
    tmp_c.replace(folder / CARD_FILE)
    return folder


def read_card(path_or_name: str | Path) -> dict[str, Any]:
    """Read and validate ``card.json`` only (no weights)."""
    folder = resolve_artifact_path(path_or_name)
    cpath = folder / CARD_FILE
    if not cpath.is_file():
        raise ArtifactError(f"{folder}: {CARD_FILE} is missing")
    try:
        card = json.loads(cpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{cpath}: not valid JSON ({exc})") from exc
    return _validate_card(card, cpath)


def load_artifact(path_or_name: str | Path, verify: bool = True) -> Artifact:
    """Load an artifact folder or a shipped artifact by name.

    Parameters
    ----------
    path_or_name : str or Path
        Folder (or its ``card.json``), or the name of a folder in ``models/artifacts/``.
    verify : bool
        Check the weights file sha256 against the card and build the model once so that
        shape mismatches are reported here (default True).

    Raises
    ------
    ArtifactError
        Missing folder or files, corrupt/truncated weights, invalid card, wrong shapes.
    """
    from safetensors import SafetensorError

    try:
        from safetensors.torch import load_file
        have_torch = True
    except ImportError:  # the lean GPU image (TensorRT + pycuda, no torch): numpy tensors
        from safetensors.numpy import load_file
        have_torch = False
    folder = resolve_artifact_path(path_or_name)
    card = read_card(folder)
    wpath = folder / WEIGHTS_FILE
    if not wpath.is_file():
        raise ArtifactError(f"{folder}: {WEIGHTS_FILE} is missing")
    if verify and card.get("weights_file_sha256"):
        got = file_sha256(wpath)
        if got != card["weights_file_sha256"]:
            raise ArtifactError(f"{wpath}: sha256 {got[:16]}... does not match the card "
                                f"({card['weights_file_sha256'][:16]}...): file corrupt or "
                                "replaced")
    try:
        tensors = load_file(str(wpath))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ArtifactError(f"{wpath}: cannot read weights (truncated or corrupt?): {exc}"
                            ) from exc
    state = {k[len(MODEL_PREFIX):]: v for k, v in tensors.items() if k.startswith(MODEL_PREFIX)}
    ood = {k[len(OOD_PREFIX):]: np.asarray(v.numpy() if have_torch else v)
           for k, v in tensors.items() if k.startswith(OOD_PREFIX)}
    if not state:
        raise ArtifactError(f"{wpath}: no model tensors (keys starting with {MODEL_PREFIX!r})")
    art = Artifact(folder, card, state, ood)
    if verify:
        if have_torch:  # without torch the network runs from its exported graph only
            art.build_model()
        if card["ood"] is not None:
            art.ood_detector()
    return art


def list_artifacts() -> list[str]:
    """Names of the loadable shipped artifacts in :data:`ARTIFACTS_DIR` (card and weights;
    result-only folders such as ``lenet5-pbc`` hold a card without weights)."""
    if not ARTIFACTS_DIR.is_dir():
        return []
    return sorted(d.name for d in ARTIFACTS_DIR.iterdir()
                  if (d / CARD_FILE).is_file() and (d / WEIGHTS_FILE).is_file())


def update_card(path_or_name: str | Path, updates: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``updates`` into an artifact's card (top-level keys) without touching weights.

    The weights file hash is kept and checked, so this cannot hide a corrupt file.
    """
    folder = resolve_artifact_path(path_or_name)
    card = read_card(folder)
    card.update(json_safe(dict(updates), strict=True))
    card["format_version"] = FORMAT_VERSION
    _validate_card(card, folder)
    tmp = folder / (CARD_FILE + ".tmp")
    tmp.write_text(json.dumps(card, indent=2, allow_nan=False) + "\n")
    tmp.replace(folder / CARD_FILE)
    return card
