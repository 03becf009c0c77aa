"""Base class and result type of the explanation methods."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from leukoflow.explain.lime_batched import Target
from leukoflow.explain.model import ModelBundle


@dataclass
class Explanation:
    """One method's explanation of one crop.

    Attributes
    ----------
    method : str
        Registry name of the method.
    map : ndarray float32 (H, W)
        Relevance per pixel (positive = supports the target); unit depends on the method
        (recorded in ``params["unit"]``).
    target : int or tuple
        What was explained (class index, or a contrast pair).
    params : dict
        Every parameter of the method.
    extra : dict of str -> ndarray
        Further maps (e.g. LIME's ``std`` stability map, ``mask``).
    info : dict
        Per-explanation diagnostics (e.g. surrogate R^2).
    duration_s : float
        Compute time of the batch this crop was explained in, divided by its size [s].
    """

    method: str
    map: np.ndarray
    target: Target
    params: dict[str, Any]
    extra: dict[str, np.ndarray] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    duration_s: float = 0.0


class Explainer(ABC):
    """An explanation method bound to one model.

    Subclasses implement :meth:`_explain` for a batch; :meth:`explain` validates input,
    times the call and fills :attr:`Explanation.duration_s`.

    Parameters
    ----------
    bundle : ModelBundle
        The model (the method keeps its own deep copy when it registers hooks).
    """

    name: ClassVar[str] = "base"
    #: whether the method accepts contrast-pair targets
    supports_contrast: ClassVar[bool] = False

    def __init__(self, bundle: ModelBundle) -> None:
        self.bundle = bundle

    @abstractmethod
    def params(self) -> dict[str, Any]:
        """Every parameter of the method (JSON-serialisable)."""

    @abstractmethod
    def _explain(self, crops: np.ndarray, targets: Sequence[Target],
                 cell_keys: Sequence[int]) -> list[Explanation]:
        ...

    def explain(self, crops: np.ndarray, targets: Sequence[Target],
                cell_keys: Sequence[int] | None = None) -> list[Explanation]:
        """Explain crops (B, H, W) [rad] for ``targets`` (one per crop).

        Raises
        ------
        ValueError
            Bad shapes, non-finite crops, or a target the method cannot explain.
        """
        crops = np.asarray(crops, dtype=np.float32)
        if crops.ndim == 2:
            crops = crops[None]
        if crops.ndim != 3 or crops.shape[0] != len(targets):
            raise ValueError(f"need crops (B, H, W) and B targets; got {crops.shape}, "
                             f"{len(targets)} targets")
        if not np.isfinite(crops).all():
            raise ValueError("crops contain non-finite values")
        k = len(self.bundle.class_names)
        for t in targets:
            idx = list(t) if isinstance(t, tuple | list) else [t]
            if len(idx) > 1 and not self.supports_contrast:
                raise ValueError(f"{self.name} explains class indices only, not pairs")
            if any(not 0 <= int(i) < k for i in idx):
                raise ValueError(f"target {t} out of range for {k} classes")
        keys = list(range(len(crops))) if cell_keys is None else [int(c) for c in cell_keys]
        t0 = time.perf_counter()
        out = self._explain(crops, list(targets), keys)
        per = (time.perf_counter() - t0) / max(1, len(crops))
        for e in out:
            e.duration_s = per
        return out
