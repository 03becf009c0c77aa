"""Online drift detection: live cells against the model card's reference distributions.

The model card stores, in ``card["drift"]`` (:class:`DriftReference`), what the live path
measures on a reference sample of the nominal instrument: per predicted class, the mean and
standard deviation of cell size, dry mass (log), mean phase, focus metric (log), amplitude
spread (log) and of the penultimate-layer features projected on their first principal
axes; the rates of uncertain and OOD decisions; and the predicted class fractions of the
reference mix. Features and decision rates are compared *per predicted class* so that a
patient's differential (a different mix of the same cells) is not mistaken for drift;
only when the run measures the reference mix itself (``reference_mix``, a control sample)
are the class fractions compared too.

:class:`DriftMonitor` is a sequential test with a controlled false-alarm probability per
run. Cells are taken in arrival order; every ``window`` cells is a checkpoint k = 1, 2, ...
At checkpoint k every test t (feature × class, or rate) is evaluated twice — on the cells of
the last window and on all cells of the run so far — as a z statistic against the reference:

    z = max(0, |mean − μ_ref| − ε) / sqrt(σ_ref² / n + σ_ref² / n_ref + τ²)

(rates on Anscombe's arcsine scale, where σ = 1/2 and rare-event tails stay binomial-like)
with ε = ``margin_sd``·σ_ref the smallest change that counts as drift, and τ the spread of
the mean between independent reference sessions (simulator seeds: a new background and
sample each), so that what differs between normal runs is not called drift. The alarm
fires when any z exceeds the two-sided normal quantile of α_k / (2·m) (m tests, two
variants), with the error spent over checkpoints as α_k = α·6/(π²k²) (Σ α_k = α). By the
union bound the probability of any false alarm in a run of any length is at most
``alpha`` (default 0.01), when the reference describes the nominal instrument.

Pure numpy: no I/O, no sockets; the collector feeds it (:meth:`DriftMonitor.add`) and
publishes :meth:`DriftMonitor.snapshot`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

#: Per-cell features watched (name in the crop messages' ``feat`` map, transform).
FEATURES: tuple[tuple[str, str], ...] = (
    ("diameter_um", "identity"), ("dm_pg", "log"), ("pha_mean", "identity"),
    ("focus", "log"), ("amp_std", "log"),
)
#: Units and meaning of each watched feature (for reports).
FEATURE_DOC: dict[str, str] = {
    "diameter_um": "equivalent diameter [µm]", "dm_pg": "dry mass [pg]",
    "pha_mean": "mean phase [rad]", "focus": "focus metric [rad²/µm²]",
    "amp_std": "amplitude spread (defocus fringes)",
    "pen": "penultimate-layer feature projection (principal axis)",
    "uncertain": "fraction of uncertain decisions among cells of this most probable class",
    "ood": "fraction of OOD decisions among cells of this most probable class",
    "fraction": "predicted fraction of the reference mix",
}
#: Prefix of the penultimate-layer projections in the results' ``feat`` map.
PEN_PREFIX = "pen"
#: Decision codes (``inference.decision``): counted, uncertain, ood.
_COUNTED, _UNCERTAIN, _OOD = 0, 1, 2
FORMAT = 1


@dataclass(frozen=True)
class DriftConfig:
    """Drift detection (section ``[drift]``, env ``LEUKOFLOW_DRIFT_*``).

    Attributes
    ----------
    enabled : bool
        Run the detector (needs a card with a ``drift`` reference).
    alpha : float
        Probability of a false alarm per run (any length) on the nominal instrument.
    window : int
        Cells per checkpoint window.
    min_cells : int
        A test needs at least this many cells (of its class) to be evaluated.
    margin_sd : float
        Shifts smaller than this many reference standard deviations are not drift.
    reference_mix : bool
        The run measures the card's reference mix (a control sample): also test the
        predicted class fractions.
    on_drift : str
        ``invalidate``: the differential is marked not valid once drift is detected (the
        report and live view say so and ``summary.json`` says why); ``warn``: it is only
        flagged.
    model : str
        Artifact whose card holds the reference ('' = the run's model).
    """

    enabled: bool = True
    alpha: float = 0.01
    window: int = 250
    min_cells: int = 20
    margin_sd: float = 0.05
    reference_mix: bool = False
    on_drift: str = "invalidate"
    model: str = ""

    def __post_init__(self) -> None:
        if not 0 < self.alpha < 1:
            raise ValueError("drift.alpha must be in (0, 1)")
        if self.window < 10 or self.min_cells < 2:
            raise ValueError("drift.window must be >= 10 and drift.min_cells >= 2")
        if self.margin_sd < 0:
            raise ValueError("drift.margin_sd must be >= 0")
        if self.on_drift not in ("invalidate", "warn"):
            raise ValueError("drift.on_drift must be 'invalidate' or 'warn'")


def _transform(x: np.ndarray, how: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if how == "log":
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(x > 0, np.log(np.where(x > 0, x, 1.0)), np.nan)
    return x


@dataclass
class Projector:
    """Standardise then project penultimate-layer features on principal axes.

    Attributes
    ----------
    mean, scale : numpy.ndarray
        (D,) per-feature centre and scale of the reference.
    components : numpy.ndarray
        (P, D) principal axes (rows, unit length).
    """

    mean: np.ndarray
    scale: np.ndarray
    components: np.ndarray

    @classmethod
    def fit(cls, pen: np.ndarray, n_components: int = 3) -> Projector:
        """Principal axes of the standardised reference features ``pen`` (N, D)."""
        x = np.asarray(pen, dtype=np.float64)
        mean = x.mean(axis=0)
        scale = x.std(axis=0)
        scale[scale < 1e-6] = 1.0
        z = (x - mean) / scale
        _, _, vt = np.linalg.svd(z - z.mean(axis=0), full_matrices=False)
        comps = vt[:n_components]
        # fixed sign convention: the largest loading of each axis is positive
        sign = np.sign(comps[np.arange(len(comps)), np.abs(comps).argmax(axis=1)])
        return cls(mean, scale, comps * sign[:, None])

    def __call__(self, pen: np.ndarray) -> np.ndarray:
        """(N, P) projections of (N, D) features."""
        z = (np.asarray(pen, dtype=np.float64) - self.mean) / self.scale
        return z @ self.components.T

    @property
    def dim(self) -> int:
        """Input dimension D."""
        return int(self.mean.shape[0])

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (card)."""
        return {"mean": self.mean.tolist(), "scale": self.scale.tolist(),
                "components": self.components.tolist()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Projector:
        """Inverse of :meth:`to_dict` (validated shapes)."""
        mean = np.asarray(d["mean"], dtype=np.float64)
        scale = np.asarray(d["scale"], dtype=np.float64)
        comps = np.asarray(d["components"], dtype=np.float64)
        if mean.ndim != 1 or scale.shape != mean.shape or comps.ndim != 2 or \
                comps.shape[1] != mean.shape[0] or not np.all(scale > 0):
            raise ValueError("drift projector: inconsistent shapes or scale <= 0")
        return cls(mean, scale, comps)


def _moments(v: np.ndarray, parts: np.ndarray | None) -> dict[str, float] | None:
    v = v[np.isfinite(v)]
    if v.size < 10:
        return None
    out = {"n": int(v.size), "mean": float(v.mean()), "sd": float(v.std(ddof=1)),
           "tau": 0.0}
    if parts is not None:
        out["tau"] = _between(v, parts)
    out["q"] = [float(q) for q in np.quantile(v, [0.05, 0.25, 0.5, 0.75, 0.95])]
    return out


def _between(v: np.ndarray, parts: np.ndarray) -> float:
    """Between-session SD of the mean (random-effects moment estimate, >= 0)."""
    groups = [v[parts == p] for p in np.unique(parts)]
    groups = [g for g in groups if g.size >= 5]
    if len(groups) < 3:
        return 0.0
    means = np.array([g.mean() for g in groups])
    within = np.array([g.var(ddof=1) / g.size for g in groups])
    return float(math.sqrt(max(0.0, means.var(ddof=1) - within.mean())))


@dataclass
class DriftReference:
    """Reference distributions of one model on the nominal instrument (``card["drift"]``).

    Attributes
    ----------
    class_names : tuple of str
        Classes in probability order.
    features : dict
        ``{feature: {group: {n, mean, sd, tau, q}}}`` with group ``all`` or a class name;
        feature values transformed as in :data:`FEATURES` (``pen<i>``: projections).
    rates : dict
        ``{"uncertain": {class: {n, p, tau}}, "ood": {...}}``: decision rates among the
        cells whose most probable class is ``class``.
    fractions : dict
        Predicted class fractions of the counted cells of the reference mix
        (``{class: {n, p, tau}}``).
    projector : Projector or None
        Penultimate-layer projection.
    transforms : dict
        Transform per feature.
    """

    class_names: tuple[str, ...]
    features: dict[str, dict[str, dict[str, Any]]]
    rates: dict[str, dict[str, float]]
    fractions: dict[str, dict[str, float]]
    projector: Projector | None
    transforms: dict[str, str]

    @classmethod
    def fit(cls, rec: Mapping[str, Any], class_names: Sequence[str],
            n_components: int = 3) -> DriftReference:
        """Reference from per-cell records of a nominal sample.

        Parameters
        ----------
        rec : mapping
            ``feat`` {name: (N,)}, ``pred`` (N,), ``code`` (N,), optional ``pen`` (N, D)
            penultimate-layer features and ``part`` (N,) independent-session index.
        class_names : sequence of str
            Class names.
        n_components : int
            Principal axes of the penultimate layer kept.
        """
        names = tuple(class_names)
        pred = np.asarray(rec["pred"])
        code = np.asarray(rec["code"])
        parts = np.asarray(rec["part"]) if rec.get("part") is not None else None
        counted = code == _COUNTED
        feats: dict[str, dict[str, dict[str, Any]]] = {}
        transforms = dict(FEATURES)
        cols = {f: _transform(rec["feat"][f], how) for f, how in FEATURES if f in rec["feat"]}
        proj = None
        if rec.get("pen") is not None and len(rec["pen"]):
            pen = np.asarray(rec["pen"], dtype=np.float64)
            proj = Projector.fit(pen, n_components)
            for i, col in enumerate(proj(pen).T):
                cols[f"{PEN_PREFIX}{i}"] = col
                transforms[f"{PEN_PREFIX}{i}"] = "identity"
        for f, v in cols.items():
            groups = {"all": np.ones(len(v), bool)}
            groups.update({c: counted & (pred == i) for i, c in enumerate(names)})
            feats[f] = {}
            for g, m in groups.items():
                mom = _moments(v[m], parts[m] if parts is not None else None)
                if mom is not None:
                    feats[f][g] = mom

        def rate(mask: np.ndarray, sel: np.ndarray | None = None) -> dict[str, float]:
            sel = np.ones(len(mask), bool) if sel is None else sel
            x = mask[sel].astype(np.float64)
            out = {"n": int(x.size), "p": float(x.mean()) if x.size else 0.0, "tau": 0.0}
            if parts is not None and x.size:
                out["tau"] = _between(x, parts[sel])
            return out

        # decision rates per predicted class (argmax), so a different mix is not drift
        rates = {r: {c: rate(code == k, pred == i) for i, c in enumerate(names)}
                 for r, k in (("uncertain", _UNCERTAIN), ("ood", _OOD))}
        fractions = {c: rate(pred == i, counted) for i, c in enumerate(names)}
        return cls(names, feats, rates, fractions, proj, transforms)

    def to_card(self) -> dict[str, Any]:
        """The JSON block stored as ``card["drift"]``."""
        return {"format": FORMAT, "class_names": list(self.class_names),
                "features": self.features, "transforms": self.transforms,
                "rates": self.rates, "fractions": self.fractions,
                "projector": self.projector.to_dict() if self.projector else None,
                "doc": "reference distributions of the live path on the nominal instrument "
                       "(leukoflow.inference.drift); values transformed per 'transforms'"}

    @classmethod
    def from_card(cls, card: Mapping[str, Any]) -> DriftReference | None:
        """The reference of a model card, None if the card has none.

        Raises
        ------
        ValueError
            The block is malformed.
        """
        d = card.get("drift")
        if not d:
            return None
        if not isinstance(d, Mapping) or d.get("format") != FORMAT:
            raise ValueError("card drift block: unknown format")
        try:
            proj = Projector.from_dict(d["projector"]) if d.get("projector") else None
            ref = cls(tuple(d["class_names"]), dict(d["features"]), dict(d["rates"]),
                      dict(d.get("fractions", {})), proj, dict(d["transforms"]))
            for f, groups in ref.features.items():
                for g, m in groups.items():
                    if not (m["n"] > 1 and m["sd"] > 0 and math.isfinite(m["mean"])):
                        raise ValueError(f"card drift block: bad moments for {f}/{g}")
        except (KeyError, TypeError) as exc:
            raise ValueError(f"card drift block malformed: {exc}") from exc
        return ref


@dataclass
class _Test:
    name: str      # "diameter_um|neutrophil"
    kind: str      # "mean" or "rate" or "fraction"
    feature: str
    group: str
    ref: dict[str, Any]

    def __post_init__(self) -> None:
        self.cum = np.zeros(3)   # n, sum, sum of squares (or n, k, 0)
        self.win = np.zeros(3)
        self.best: dict[str, Any] | None = None
        self.last: dict[str, Any] | None = None


class DriftMonitor:
    """The sequential drift test of one run (see the module docstring).

    Parameters
    ----------
    reference : DriftReference
        The model card's reference.
    config : DriftConfig
        Parameters.
    """

    def __init__(self, reference: DriftReference, config: DriftConfig | None = None) -> None:
        self.ref = reference
        self.cfg = config or DriftConfig()
        self.classes = reference.class_names
        self.tests: list[_Test] = []
        for f, groups in reference.features.items():
            for g in self.classes:
                if g in groups:
                    self.tests.append(_Test(f"{f}|{g}", "mean", f, g, groups[g]))
        for r in ("uncertain", "ood"):
            for g in self.classes:
                m = reference.rates.get(r, {}).get(g)
                if m and m.get("n", 0) >= 10:
                    self.tests.append(_Test(f"{r}|{g}", "rate", r, g, m))
        if self.cfg.reference_mix:
            for c, m in reference.fractions.items():
                self.tests.append(_Test(f"fraction|{c}", "fraction", "fraction", c, m))
        self.cells = 0
        self._in_window = 0
        self.checkpoints = 0
        self.alarm = False
        self.first_alarm_cell: int | None = None
        self.first_alarm_checkpoint: int | None = None
        self.fired: list[dict[str, Any]] = []
        self.last_threshold = float("nan")
        self.max_score = 0.0
        self.skipped_cells = 0

    # -- input -------------------------------------------------------------------------
    def add(self, pred: np.ndarray, code: np.ndarray, feat: Mapping[str, Any] | None = None,
            pen: np.ndarray | None = None) -> None:
        """Add cells in arrival order.

        Parameters
        ----------
        pred, code : array-like (N,)
            Predicted class index and decision code (0 counted, 1 uncertain, 2 OOD).
        feat : mapping, optional
            ``{name: (N,)}`` acquisition features (missing names are skipped) and
            ``pen<i>`` projections when already projected.
        pen : array-like (N, D), optional
            Penultimate-layer features (projected here with the reference's projector).
        """
        pred = np.asarray(pred, dtype=np.int64)
        code = np.asarray(code, dtype=np.int64)
        n = int(pred.size)
        if code.shape != (n,):
            raise ValueError("pred and code must have the same length")
        cols: dict[str, np.ndarray] = {}
        for f, how in self.ref.transforms.items():
            if feat is not None and f in feat:
                v = np.asarray(feat[f], dtype=np.float64)
                if v.shape == (n,):
                    cols[f] = _transform(v, how)
        if pen is not None and self.ref.projector is not None:
            p = np.asarray(pen, dtype=np.float64)
            if p.ndim == 2 and p.shape == (n, self.ref.projector.dim):
                for i, col in enumerate(self.ref.projector(p).T):
                    cols[f"{PEN_PREFIX}{i}"] = col
        start = 0
        while start < n:  # split at window boundaries so checkpoints see exact windows
            take = min(n - start, self.cfg.window - self._in_window)
            sl = slice(start, start + take)
            self._accumulate(pred[sl], code[sl], {k: v[sl] for k, v in cols.items()})
            self.cells += take
            self._in_window += take
            start += take
            if self._in_window >= self.cfg.window:
                self._checkpoint()

    def _accumulate(self, pred: np.ndarray, code: np.ndarray,
                    cols: Mapping[str, np.ndarray]) -> None:
        counted = code == _COUNTED
        for t in self.tests:
            if t.kind == "mean":
                v = cols.get(t.feature)
                if v is None:
                    continue
                i = self.classes.index(t.group)
                v = v[counted & (pred == i)]
                v = v[np.isfinite(v)]
                add = np.array([v.size, v.sum(), (v * v).sum()])
            elif t.kind == "rate":
                sel = pred == self.classes.index(t.group)
                hit = code[sel] == (_UNCERTAIN if t.feature == "uncertain" else _OOD)
                add = np.array([hit.size, hit.sum(), 0.0])
            else:  # fraction of counted cells
                i = self.classes.index(t.group)
                add = np.array([counted.sum(), (counted & (pred == i)).sum(), 0.0])
            t.cum += add
            t.win += add

    # -- testing -----------------------------------------------------------------------
    def threshold(self, k: int) -> float:
        """z threshold at checkpoint ``k`` (alpha spending, Bonferroni over tests)."""
        a_k = self.cfg.alpha * 6.0 / (math.pi**2 * k * k)
        per = a_k / (2.0 * max(1, len(self.tests)))  # two variants per test
        return NormalDist().inv_cdf(1.0 - per / 2.0)

    def _z(self, t: _Test, acc: np.ndarray) -> dict[str, Any] | None:
        n, s, ss = acc
        if n < self.cfg.min_cells:
            return None
        r = t.ref
        tau = float(r.get("tau", 0.0))
        if t.kind == "mean":
            mean = s / n
            sd = float(r["sd"])
            diff = mean - float(r["mean"])
            se = math.sqrt(sd * sd / n + sd * sd / float(r["n"]) + tau * tau)
            eps = self.cfg.margin_sd * sd
            shift_sd = diff / sd
        else:  # proportions on Anscombe's arcsine scale: variance 1/(4n), tails that
            # stay close to the binomial's even for rare events (a 1 % rate in 100 cells)
            p0, n0 = float(r["p"]), float(r["n"])
            mean = s / n
            y = math.asin(math.sqrt((s + 0.375) / (n + 0.75)))
            y0 = math.asin(math.sqrt((p0 * n0 + 0.375) / (n0 + 0.75)))
            tau_y = tau / (2.0 * math.sqrt(max(p0 * (1 - p0), 1.0 / n0)))  # delta method
            diff = mean - p0
            se = math.sqrt(0.25 / n + 0.25 / n0 + tau_y * tau_y)
            eps = self.cfg.margin_sd * 0.5
            shift_sd = (y - y0) / 0.5
            z = max(0.0, abs(y - y0) - eps) / se
            return {"n": int(n), "live": float(mean), "ref": p0, "diff": float(diff),
                    "shift_sd": float(shift_sd), "z": float(z)}
        z = max(0.0, abs(diff) - eps) / se
        return {"n": int(n), "live": float(mean), "ref": float(r.get("mean", r.get("p"))),
                "diff": float(diff), "shift_sd": float(shift_sd), "z": float(z)}

    def _checkpoint(self, final: bool = False) -> None:
        self.checkpoints += 1
        k = self.checkpoints
        thr = self.threshold(k)
        self.last_threshold = thr
        fired_now = []
        top = 0.0
        for t in self.tests:
            best = None
            for variant, acc in (("window", t.win), ("run", t.cum)):
                if variant == "window" and final:
                    continue
                r = self._z(t, acc)
                if r is None:
                    continue
                r.update(variant=variant, score=r["z"] / thr, checkpoint=k,
                         cell=self.cells)
                if best is None or r["score"] > best["score"]:
                    best = r
            t.win[:] = 0.0
            if best is None:
                continue
            t.last = best
            top = max(top, best["score"])
            if t.best is None or best["score"] > t.best["score"]:
                t.best = best
            if best["score"] >= 1.0:
                fired_now.append(t)
        self.max_score = top
        self._in_window = 0
        if fired_now and not self.alarm:
            self.alarm = True
            self.first_alarm_cell = self.cells
            self.first_alarm_checkpoint = k
        for t in fired_now:
            if all(f["test"] != t.name for f in self.fired):
                self.fired.append(self._describe(t, t.last))

    def finish(self) -> None:
        """Evaluate the cells of the last, incomplete window (run-so-far variant only)."""
        if self._in_window >= self.cfg.min_cells:
            self._checkpoint(final=True)

    def _describe(self, t: _Test, r: dict[str, Any]) -> dict[str, Any]:
        how = self.ref.transforms.get(t.feature, "identity")
        d = {"test": t.name, "feature": t.feature, "group": t.group, "kind": t.kind,
             "cell": r["cell"], "checkpoint": r["checkpoint"], "variant": r["variant"],
             "n": r["n"], "z": r["z"], "score": r["score"], "shift_sd": r["shift_sd"],
             "doc": FEATURE_DOC.get(t.feature.rstrip("0123456789") if t.feature.startswith(
                 PEN_PREFIX) else t.feature, "")}
        if how == "log":  # report in original units: relative change
            d["live"], d["ref"] = math.exp(r["live"]), math.exp(r["ref"])
            d["change_pct"] = 100.0 * (math.exp(r["diff"]) - 1.0)
        else:
            d["live"], d["ref"] = r["live"], r["ref"]
            d["change_pct"] = (100.0 * r["diff"] / r["ref"]
                               if r["ref"] and t.kind == "mean" and
                               not t.feature.startswith(PEN_PREFIX) else None)
        return d

    # -- output ------------------------------------------------------------------------
    def snapshot(self, top: int = 8) -> dict[str, Any]:
        """JSON-ready state: alarm, when, which features moved, the largest scores."""
        ranked = sorted((t for t in self.tests if t.last is not None),
                        key=lambda t: t.last["score"], reverse=True)
        return {
            "enabled": True, "alarm": self.alarm, "cells": self.cells,
            "checkpoints": self.checkpoints, "first_alarm_cell": self.first_alarm_cell,
            "first_alarm_checkpoint": self.first_alarm_checkpoint,
            "threshold_z": self.last_threshold if self.checkpoints else None,
            "max_score": self.max_score, "n_tests": len(self.tests),
            "moved": list(self.fired),
            "top": [self._describe(t, t.last) for t in ranked[:top]],
            "config": asdict(self.cfg),
            "method": f"per-class z tests of window and run means against the card's "
                      f"reference, alpha {self.cfg.alpha:g} per run spent as "
                      f"alpha*6/(pi^2 k^2) over checkpoints of {self.cfg.window} cells, "
                      f"Bonferroni over {len(self.tests)} tests x 2",
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue after a restart (JSON-ready)."""
        return {"cells": self.cells, "in_window": self._in_window,
                "checkpoints": self.checkpoints, "alarm": self.alarm,
                "first_alarm_cell": self.first_alarm_cell,
                "first_alarm_checkpoint": self.first_alarm_checkpoint, "fired": self.fired,
                "tests": {t.name: {"cum": t.cum.tolist(), "win": t.win.tolist(),
                                   "best": t.best, "last": t.last} for t in self.tests}}

    def load_state(self, st: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict` (tests unknown to this reference are ignored)."""
        self.cells = int(st.get("cells", 0))
        self._in_window = int(st.get("in_window", 0))
        self.checkpoints = int(st.get("checkpoints", 0))
        self.alarm = bool(st.get("alarm", False))
        self.first_alarm_cell = st.get("first_alarm_cell")
        self.first_alarm_checkpoint = st.get("first_alarm_checkpoint")
        self.fired = list(st.get("fired", []))
        tests = st.get("tests", {})
        for t in self.tests:
            s = tests.get(t.name)
            if s:
                t.cum = np.asarray(s["cum"], dtype=np.float64)
                t.win = np.asarray(s["win"], dtype=np.float64)
                t.best, t.last = s.get("best"), s.get("last")


class PenultimateProjection:
    """What the inference worker adds to each result for drift detection: the projections
    of the penultimate-layer features on the card's principal axes (``pen0``, ``pen1``...).

    Parameters
    ----------
    projector : Projector
        From the card's drift reference.
    n_descriptors : int
        Trailing phase-descriptor columns of the backend features (not penultimate-layer
        features; the card's ``ood.params.n_descriptors``).
    """

    def __init__(self, projector: Projector, n_descriptors: int = 0) -> None:
        self.projector = projector
        self.nd = int(n_descriptors)

    @classmethod
    def from_card(cls, card: Mapping[str, Any]) -> PenultimateProjection | None:
        """The projection of a model card; None without a (valid) drift reference."""
        try:
            ref = DriftReference.from_card(card)
        except ValueError:
            return None
        if ref is None or ref.projector is None:
            return None
        nd = ((card.get("ood") or {}).get("params") or {}).get("n_descriptors", 0) or 0
        return cls(ref.projector, int(nd))

    def __call__(self, features: np.ndarray | None) -> np.ndarray | None:
        """(N, P) float32 projections, or None when the features do not fit."""
        if features is None:
            return None
        f = np.asarray(features)
        if f.ndim != 2 or f.shape[1] - self.nd != self.projector.dim:
            return None
        out = self.projector(f[:, : f.shape[1] - self.nd] if self.nd else f)
        return np.where(np.isfinite(out), out, 0.0).astype(np.float32)

    def fields(self, proj: np.ndarray) -> dict[str, list[float]]:
        """``{"pen0": [...], ...}`` for a results message's ``feat`` map."""
        return {f"{PEN_PREFIX}{i}": proj[:, i].astype(float).tolist()
                for i in range(proj.shape[1])}


def disabled_snapshot(reason: str) -> dict[str, Any]:
    """Snapshot of a run without drift detection (says why)."""
    return {"enabled": False, "alarm": False, "reason": reason, "cells": 0, "moved": [],
            "top": []}
