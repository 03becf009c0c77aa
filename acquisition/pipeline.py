"""The acquisition pipeline, in process: frame -> reconstruct -> segment -> features -> gates
-> track -> finished cells -> crops.

:class:`AcquisitionPipeline` is a plain class without sockets or threads, used by the
``acquire`` service, by replay and by tests. Every frame gives a :class:`FrameResult` with
the cells whose tracks ended in that frame (one crop each) and the cells rejected in that
frame, so a caller can publish and account for every object.

Frames can enter as raw holograms (:meth:`AcquisitionPipeline.process`, needs a
reconstructor) or as ready phase frames (:meth:`AcquisitionPipeline.process_phase`).
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from typing import Any, ClassVar

import numpy as np

from leukoflow.acquisition.crops import CellCrop, CropConfig, CropExtractor, window
from leukoflow.acquisition.features import Detection, measure_objects
from leukoflow.acquisition.gates import GateConfig, QualityGates
from leukoflow.acquisition.prescreen import EmptyFramePrescreen, PrescreenConfig
from leukoflow.acquisition.qc.scale import rescale_crop
from leukoflow.acquisition.reconstruct import OffAxisConfig, Reconstructor
from leukoflow.acquisition.segment import (
    Segmentation,
    SegmentConfig,
    Segmenter,
    SplitConfig,
    split_touching,
)
from leukoflow.acquisition.sources.base import FrameValidator, RawFrame
from leukoflow.acquisition.track import FinishedTrack, TrackConfig, Tracker
from leukoflow.core.config import (
    PIPELINE_GENERATION,
    PipelineId,
    parse_pipeline_id,
    pipeline_hash,
    pipeline_id,
)
from leukoflow.core.physics import DEFAULT_OPTICS, Optics
from leukoflow.core.vocabulary import CLASS_NAMES

#: Stage names stamped (monotonic ns) into ``FrameResult.t`` and the crop messages.
STAGES: tuple[str, ...] = ("t_acq", "t_recon", "t_segment", "t_track", "t_crop")
#: TOML section / ``LEUKOFLOW_<SECTION>_*`` infix of :class:`PipelineConfig`.
SECTION = "acquire_pipeline"


@dataclass(frozen=True)
class PipelineConfig:
    """Every parameter of the acquisition pipeline: the stages' own config dataclasses.

    Resolved by :func:`leukoflow.core.config.resolve` (section :data:`SECTION`): each stage
    is a nested section, e.g. TOML ``[acquire_pipeline.crop]`` ``size = 64`` or
    ``LEUKOFLOW_ACQUIRE_PIPELINE_CROP_SIZE=64``; the top-level fields are
    ``[acquire_pipeline]`` keys (``LEUKOFLOW_ACQUIRE_PIPELINE_PIXEL_UM``). Build one in code
    with :func:`leukoflow.core.config.build` (``build(PipelineConfig, {"segment.threshold":
    0.3})``). Its canonical form is the pipeline identifier
    (:func:`leukoflow.core.config.pipeline_id`).

    The pipeline sets the fields named in :attr:`DERIVED` itself (from the optics and
    ``pixel_um``); they are not settings.

    Attributes
    ----------
    reconstruct : OffAxisConfig
        Off-axis reconstruction (:mod:`leukoflow.acquisition.reconstruct`).
    segment : SegmentConfig
        Segmenter name and parameters (:class:`leukoflow.acquisition.segment.SegmentConfig`).
    split : SplitConfig
        Splitting blobs of two touching cells along their neck before the doublet gate;
        blobs whose split is ambiguous stay whole and are rejected as ``doublet`` (why the
        split was refused is counted in ``accounting()["splits"]``).
    gates : GateConfig
        Quality gates (:class:`leukoflow.acquisition.gates.GateConfig`).
    track : TrackConfig
        Tracker (:class:`leukoflow.acquisition.track.TrackConfig`); ``expected_dx_px`` = 0
        (the default here) takes the displacement from the optics (58.8 px).
    crop : CropConfig
        Crops (:class:`leukoflow.acquisition.crops.CropConfig`).
    prescreen : PrescreenConfig
        Skipping reconstruction and segmentation of raw frames that hold no object while no
        track is open (:mod:`leukoflow.acquisition.prescreen`; needs the background).
    pixel_um : float
        Phase-grid pixel size measured by reference-bead QC [µm]
        (:mod:`leukoflow.acquisition.qc`); 0 = nominal (optics). Features, gates and the
        tracker use it, and crops are resampled to the nominal pixel the models expect
        (:func:`leukoflow.acquisition.qc.scale.rescale_crop`).
    truth_match_px : float
        Margin [px] added to the object's equivalent radius for the ground-truth match.
    saturated_fraction : float
        Frames with more saturated pixels than this fraction are rejected.
    """

    reconstruct: OffAxisConfig = field(default_factory=OffAxisConfig)
    segment: SegmentConfig = field(default_factory=SegmentConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    gates: GateConfig = field(default_factory=GateConfig)
    track: TrackConfig = field(default_factory=lambda: TrackConfig(expected_dx_px=0.0))
    crop: CropConfig = field(default_factory=CropConfig)
    prescreen: PrescreenConfig = field(default_factory=PrescreenConfig)
    pixel_um: float = 0.0
    truth_match_px: float = 8.0
    saturated_fraction: float = 0.05

    #: Fields the pipeline derives (dotted path -> from what); refused as settings and left
    #: out of the pipeline identifier (the values used are in :attr:`AcquisitionPipeline.params`).
    DERIVED: ClassVar[dict[str, str]] = {
        "crop.pixel_um": "pixel_um (else the optics' phase-grid pixel)",
        "crop.wavelength_um": "the optics' wavelength",
        "crop.medium_index": "the optics' medium index",
        "track.frame_width": "the optics' frame width / reconstruct.downsample",
        "split.min_part_px": "gates.min_area_um on the phase grid",
        "reconstruct.camera_pixel_um": "the optics' camera pixel",
    }

    def to_dict(self) -> dict:
        """Plain (nested) dict (for metadata)."""
        return asdict(self)


def identity(config: PipelineConfig, optics: Optics = DEFAULT_OPTICS, *, model: str = "",
             model_sha: str = "") -> dict[str, Any]:
    """Identifier, hash and generation of a pipeline (recorded with runs and recordings).

    Parameters
    ----------
    config : PipelineConfig
        The acquisition pipeline's parameters.
    optics : leukoflow.core.physics.Optics
        The instrument geometry it runs with (section ``optics`` of the identifier).
    model, model_sha : str
        The model that classifies its crops and the sha256 of its tensors ('' = none).

    Returns
    -------
    dict
        ``id`` (:func:`leukoflow.core.config.pipeline_id`, parseable with
        :func:`parse_identity`), ``hash`` (16 hex digits), ``generation``
        (:data:`leukoflow.core.config.PIPELINE_GENERATION`), ``model``, ``model_sha``.
    """
    text = pipeline_id(config, model=model, model_sha=model_sha, extra={"optics": optics})
    return {"id": text, "hash": pipeline_hash(text), "generation": PIPELINE_GENERATION,
            "model": model, "model_sha": model_sha}


def parse_identity(text: str) -> PipelineId:
    """The :class:`PipelineConfig`, optics and model an :func:`identity` ``id`` encodes."""
    return parse_pipeline_id(text, PipelineConfig, {"optics": Optics})


@dataclass
class EmittedCell:
    """A cell whose track ended with an accepted instance.

    Attributes
    ----------
    cell_id : int
        Run-unique cell id (consecutive from 0 per pipeline).
    crop : CellCrop
        The crop (phase [rad], mask, bbox, features).
    frame : int
        Frame index of the instance the crop was cut from.
    t_acq_ns : int
        Acquisition time of that frame [monotonic ns].
    truth_id : int
        Matched ground-truth cell id (-1 when unknown or unmatched).
    label : int
        Ground-truth class index (-1 for OOD objects or unknown).
    kind : str
        Ground-truth object kind ("" when unknown).
    n_instances : int
        Detections associated with this cell.
    origin : object
        The source's frame object the crop came from (simulator ``Frame``; for scoring
        against ``true_phase``), None for real sources.
    """

    cell_id: int
    crop: CellCrop
    frame: int
    t_acq_ns: int
    truth_id: int = -1
    label: int = -1
    kind: str = ""
    n_instances: int = 0
    origin: Any = None


@dataclass
class RejectedCell:
    """A track that ended without an accepted instance."""

    reason: str
    track: FinishedTrack


@dataclass
class FrameResult:
    """Outcome of one frame.

    Attributes
    ----------
    index : int
        Frame index.
    t : dict
        Stage timestamps [monotonic ns] (:data:`STAGES`).
    cells : list[EmittedCell]
        Cells finished in this frame.
    rejected : list[RejectedCell]
        Objects rejected in this frame (tracks ended without an accepted instance).
    frame_reject : str or None
        Why the frame itself was rejected (then nothing else happened).
    n_detections : int
        Objects segmented in this frame.
    skipped : str or None
        Why reconstruction and segmentation were skipped (``empty``: the prescreen found
        no object and no track was open), None when the frame was processed.
    """

    index: int
    t: dict[str, int]
    cells: list[EmittedCell] = field(default_factory=list)
    rejected: list[RejectedCell] = field(default_factory=list)
    frame_reject: str | None = None
    n_detections: int = 0
    skipped: str | None = None


@dataclass
class _Payload:
    capture: Any
    truth: tuple[int, int, str] | None
    origin: Any = None


class AcquisitionPipeline:
    """Frames in, one crop per cell out.

    Parameters
    ----------
    config : PipelineConfig
        Parameters.
    background : numpy.ndarray, optional
        Background hologram; needed by :meth:`process` (raw holograms).
    optics : leukoflow.core.physics.Optics
        Instrument geometry (pixel size, wavelength, expected displacement, frame shape).
    reconstructor : object, optional
        A ready :class:`leukoflow.acquisition.reconstruct.Reconstructor` (overrides ``background``).
    """

    def __init__(self, config: PipelineConfig | None = None, *, background: Any = None,
                 optics: Optics = DEFAULT_OPTICS, reconstructor: Any = None) -> None:
        self.config = c = config or PipelineConfig()
        self.optics = optics
        #: pixel the crops are delivered at (the models' training scale)
        ds = c.reconstruct.downsample
        self.nominal_pixel_um = optics.camera_pixel_um * ds
        #: pixel of the phase grid: measured by QC when given, else nominal
        self.pixel_um = c.pixel_um if c.pixel_um > 0 else self.nominal_pixel_um
        self.phase_shape = (optics.roi_shape[0] // ds, optics.roi_shape[1] // ds)
        dx = c.track.expected_dx_px or (
            optics.flow_speed_um_s / optics.frame_rate_hz / self.pixel_um)
        # the stages get their own configs, with the fields PipelineConfig.DERIVED names set
        self.segmenter: Segmenter = c.segment.create()
        self.split_config = replace(
            c.split, min_part_px=int(np.ceil(c.gates.min_area_um / self.pixel_um**2)))
        if c.split.enabled:
            import skimage.segmentation  # noqa: F401  (once here, not in the first doublet frame)
        self.gates = QualityGates(c.gates)
        self.tracker = Tracker(replace(c.track, expected_dx_px=dx,
                                       frame_width=self.phase_shape[1]))
        self.crops = CropExtractor(replace(
            c.crop, pixel_um=self.pixel_um, wavelength_um=optics.wavelength_um,
            medium_index=optics.medium_index))
        self.validator = FrameValidator(shape=tuple(optics.roi_shape),
                                        saturated_fraction=c.saturated_fraction,
                                        max_value=float(2**optics.bit_depth - 1))
        self.prescreen_config = c.prescreen
        self.prescreen: EmptyFramePrescreen | None = None
        self.reconstructor = reconstructor
        if self.reconstructor is None and background is not None:
            self.reconstructor = self._make_reconstructor(background)
        if background is not None:
            self._make_prescreen(background)
        self._next_cell = 0
        self.stats: dict[str, Counter] = {
            "frames": Counter(), "frames_rejected": Counter(), "cells_rejected": Counter(),
            "detections": Counter(), "splits": Counter(),
        }
        self.n_emitted = 0
        self.stage_ns: Counter = Counter()

    # ------------------------------------------------------------------ setup
    def _make_reconstructor(self, background: Any) -> Any:

        rc = self.config.reconstruct
        if rc.camera_pixel_um is None:  # derived: the optics' camera pixel (metadata)
            rc = replace(rc, camera_pixel_um=self.optics.camera_pixel_um)
        return Reconstructor(rc, background=background)

    def set_background(self, background: Any) -> None:
        """(Re)calibrate the reconstruction with a new background hologram."""
        self.reconstructor = self._make_reconstructor(background)
        self._make_prescreen(background)

    def _make_prescreen(self, background: Any) -> None:
        self.prescreen = None
        sb = getattr(self.reconstructor, "sideband", None)
        if not self.prescreen_config.enabled or sb is None:
            return
        try:
            self.prescreen = EmptyFramePrescreen(self.prescreen_config, np.asarray(background),
                                                 sb)
        except ValueError:  # frame too small for the blocks: process every frame
            self.prescreen = None

    @property
    def params(self) -> dict[str, Any]:
        """Every parameter (for ``pipeline:`` metadata)."""
        d: dict[str, Any] = {
            "pipeline": self.config.to_dict(),
            "segmenter": self.segmenter.ppid,
            "split": self.split_config.to_dict(),
            "gates": self.gates.config.to_dict(),
            "tracker": self.tracker.config.to_dict(),
            "crops": self.crops.config.to_dict(),
            "pixel_um": self.pixel_um,
            "nominal_pixel_um": self.nominal_pixel_um,
            "prescreen": (self.prescreen.params if self.prescreen is not None
                          else {**self.prescreen_config.to_dict(), "enabled": False}),
            "optics": self.optics.to_dict(),
            "identity": identity(self.config, self.optics),
        }
        if self.reconstructor is not None:
            try:
                d["reconstruct"] = self.reconstructor.params
            except Exception:  # noqa: BLE001 (metadata must not break the pipeline)
                d["reconstruct"] = {}
        return d

    # ------------------------------------------------------------------ frames
    def process(self, raw: RawFrame) -> FrameResult:
        """Process one raw hologram frame (validated first; bad frames are counted).

        Parameters
        ----------
        raw : RawFrame
            Frame from a source.
        """
        reason = self.validator.check(raw.image)
        if reason is not None:
            self.stats["frames_rejected"][reason] += 1
            return FrameResult(raw.index, {"t_acq": raw.t_acq_ns}, frame_reject=reason)
        if self.reconstructor is None:
            raise RuntimeError("no background hologram: call set_background() first")
        audit = False
        if self.prescreen is not None and self.tracker.n_open == 0 and \
                not self.prescreen.has_object(raw.image):
            audit = self.prescreen.audit_due()
            if not audit:  # nothing in view, nothing being tracked: no phase needed
                self.stats["frames"]["processed"] += 1
                self.stats["frames"]["skipped_empty"] += 1
                now = time.monotonic_ns()
                return FrameResult(raw.index, {"t_acq": raw.t_acq_ns, "t_recon": now,
                                               "t_segment": now, "t_track": now,
                                               "t_crop": now}, skipped="empty")
        res = self._process_full(raw)
        if audit:
            self.prescreen.audit(res.n_detections > 0)
        return res

    def _process_full(self, raw: RawFrame) -> FrameResult:
        t0 = time.monotonic_ns()
        try:
            fld = self.reconstructor.field(raw.image)
        except ValueError:
            self.stats["frames_rejected"]["reconstruct"] += 1
            return FrameResult(raw.index, {"t_acq": raw.t_acq_ns}, frame_reject="reconstruct")
        phase = np.angle(fld).astype(np.float32, copy=False)
        amp = np.abs(fld).astype(np.float32, copy=False)
        if not np.isfinite(phase).all():
            self.stats["frames_rejected"]["non_finite"] += 1
            return FrameResult(raw.index, {"t_acq": raw.t_acq_ns}, frame_reject="non_finite")
        t1 = time.monotonic_ns()
        self.stage_ns["recon"] += t1 - t0
        return self.process_phase(raw.index, phase, amplitude=amp, t_acq_ns=raw.t_acq_ns,
                                  truth=raw.truth, origin=raw.origin, _t_recon=t1)

    def process_phase(self, index: int, phase: np.ndarray, *, amplitude: np.ndarray | None = None,
                      t_acq_ns: int | None = None, truth: list | None = None,
                      origin: Any = None, _t_recon: int | None = None) -> FrameResult:
        """Process one reconstructed frame.

        Parameters
        ----------
        index : int
            Frame index (monotonic).
        phase : numpy.ndarray
            Background-corrected phase [rad] on the phase grid, wrapped or unwrapped.
        amplitude : numpy.ndarray, optional
            Background-normalised amplitude (focus gate).
        t_acq_ns : int, optional
            Acquisition time [monotonic ns] (default: now).
        truth : list, optional
            Simulator ground truth of this frame (``CellTruth`` objects).
        origin : object, optional
            The source's frame object, kept with emitted cells (scoring).
        """
        t_acq = time.monotonic_ns() if t_acq_ns is None else int(t_acq_ns)
        t = {"t_acq": t_acq, "t_recon": _t_recon if _t_recon is not None else time.monotonic_ns()}
        self.stats["frames"]["processed"] += 1
        seg, dets = self._detect(index, phase, amplitude)
        self.gates.apply(dets)
        if self.split_config.enabled:
            dets = self._split(dets, seg, phase, amplitude, index)
        t["t_segment"] = time.monotonic_ns()
        self.stage_ns["segment"] += t["t_segment"] - t["t_recon"]
        for d in dets:
            self.stats["detections"][d.reason or "accepted"] += 1

        def on_candidate(d: Detection) -> _Payload:
            ph = phase
            sib = d.extra.get("sibling")
            if sib is not None:
                # a part of a split pair: its touching neighbour is not part of its crop
                ph = np.where(seg.labels == sib, np.float32(0.0), phase)
            cap = self.crops.capture(d, ph, seg.labels, amplitude, t_acq)
            return _Payload(cap, self._match_truth(d, truth), origin)

        finished = self.tracker.update(index, dets, on_candidate)
        t["t_track"] = time.monotonic_ns()
        self.stage_ns["track"] += t["t_track"] - t["t_segment"]
        res = self._finish(index, finished, t)
        res.n_detections = len(dets)
        t["t_crop"] = time.monotonic_ns()
        self.stage_ns["crop"] += t["t_crop"] - t["t_track"]
        return res

    def _detect(self, index: int, phase: np.ndarray, amplitude: np.ndarray | None
                ) -> tuple[Segmentation, list[Detection]]:
        """Segment one phase frame and measure its objects (the batched device pipeline,
        :mod:`leukoflow.acquisition.batched`, hands in what it computed on the device)."""
        seg = self.segmenter.segment(phase)
        return seg, measure_objects(seg.labels, seg.n, phase, amplitude=amplitude,
                                    frame=index, pixel_um=self.pixel_um)

    def _split(self, dets: list[Detection], seg: Segmentation, phase: np.ndarray,
               amplitude: np.ndarray | None, index: int) -> list[Detection]:
        """Replace doublet blobs of two touching cells by their two parts (gated again).

        The parts get the blob's label and a new one in ``seg.labels`` (in place) and
        ``extra["sibling"]`` = the other part's label.
        """
        out: list[Detection] = []
        h_img, w_img = seg.labels.shape
        for d in dets:
            if d.reason != "doublet" or d.touches_flow_edge:
                out.append(d)
                continue
            y0, x0, h, w = d.bbox
            m = 8  # window margin [px]: background around the blob for the measurements
            Y0, X0 = max(y0 - m, 0), max(x0 - m, 0)
            Y1, X1 = min(y0 + h + m, h_img), min(x0 + w + m, w_img)
            lab_w = seg.labels[Y0:Y1, X0:X1]
            parts, outcome = split_touching(lab_w == d.label, phase[Y0:Y1, X0:X1],
                                            self.split_config)
            self.stats["splits"][outcome] += 1
            if parts is None:
                out.append(d)
                continue
            new_label = seg.n + 1
            seg.n = new_label
            lab_w[parts == 2] = new_label  # a view: updates seg.labels
            amp_w = None if amplitude is None else amplitude[Y0:Y1, X0:X1]
            halves = measure_objects(parts, 2, phase[Y0:Y1, X0:X1], amplitude=amp_w,
                                     frame=index, pixel_um=self.pixel_um)
            labels = (d.label, new_label)
            for k, p in enumerate(halves):
                by, bx, bh, bw = p.bbox
                gy, gx = by + Y0, bx + X0
                touch = "".join(e for e, hit in (("t", gy == 0), ("b", gy + bh == h_img),
                                                 ("l", gx == 0), ("r", gx + bw == w_img))
                                if hit)
                q = dataclasses.replace(
                    p, label=labels[k], cy=p.cy + Y0, cx=p.cx + X0, bbox=(gy, gx, bh, bw),
                    touch=touch, reason=None,
                    extra={"split_from": d.label, "sibling": labels[1 - k]})
                q.reason = self.gates.reason(q)
                out.append(q)
        return out

    def flush(self, index: int = -1) -> FrameResult:
        """End every open track (end of stream) and return the resulting cells."""
        t = {"t_acq": time.monotonic_ns()}
        res = self._finish(index, self.tracker.flush(), t)
        t["t_crop"] = time.monotonic_ns()
        return res

    def _finish(self, index: int, finished: list[FinishedTrack], t: dict) -> FrameResult:
        res = FrameResult(index, t)
        for ft in finished:
            if ft.best is None:
                reason = ft.reason or "partial"
                self.stats["cells_rejected"][reason] += 1
                res.rejected.append(RejectedCell(reason, ft))
                continue
            payload: _Payload = ft.best.payload
            crop = self.crops.finalize(payload.capture)
            if self.pixel_um != self.nominal_pixel_um:  # QC scale: crops at the model's pixel
                crop.phase = rescale_crop(crop.phase, self.pixel_um, self.nominal_pixel_um)
                crop.mask = rescale_crop(crop.mask, self.pixel_um, self.nominal_pixel_um, 0)
                if crop.amplitude is not None:
                    crop.amplitude = rescale_crop(crop.amplitude, self.pixel_um,
                                                  self.nominal_pixel_um, fill=1.0)
            if crop.unwrap_method == "failed":
                self.stats["cells_rejected"]["unwrap"] += 1
                res.rejected.append(RejectedCell("unwrap", ft))
                continue
            tid, label, kind = payload.truth if payload.truth else (-1, -1, "")
            res.cells.append(EmittedCell(
                cell_id=self._next_cell, crop=crop, frame=ft.best.det.frame,
                t_acq_ns=payload.capture.t_acq_ns, truth_id=tid, label=label, kind=kind,
                n_instances=ft.n_instances, origin=payload.origin))
            self._next_cell += 1
            self.n_emitted += 1
        return res

    def _match_truth(self, d: Detection, truth: list | None) -> tuple[int, int, str] | None:
        if not truth:
            return None
        # nearest simulated object within the object's equivalent radius plus
        # truth_match_px: coincident cells merged into one blob still trace to one of them
        r_px = max(self.config.truth_match_px, 0.5 * d.diameter_um / self.pixel_um) + \
            self.config.truth_match_px
        best, best_d2 = None, r_px**2
        for tr in truth:
            d2 = (tr.y_px - d.cy) ** 2 + (tr.x_px - d.cx) ** 2
            if d2 <= best_d2:
                best, best_d2 = tr, d2
        if best is None:
            return None
        return int(best.cell_id), int(best.label), str(best.kind)

    # ------------------------------------------------------------------ accounting
    def accounting(self) -> dict[str, Any]:
        """Counts so far: frames, rejected frames and cells by reason, emitted cells."""
        return {
            "frames": int(self.stats["frames"]["processed"]),
            "frames_rejected": dict(self.stats["frames_rejected"]),
            "detections": int(sum(self.stats["detections"].values())),
            "cells_emitted": int(self.n_emitted),
            "cells_rejected": dict(self.stats["cells_rejected"]),
            "tracks_open": int(self.tracker.n_open),
            "unwrap": dict(self.crops.stats),
            "splits": dict(self.stats["splits"]),
            "frames_skipped_empty": int(self.stats["frames"]["skipped_empty"]),
            "prescreen": dict(self.prescreen.stats) if self.prescreen is not None else {},
        }


#: Object kinds that count as cells for the acquisition yield (leukocytes, erythrocytes).
CELL_KINDS: frozenset[str] = frozenset((*CLASS_NAMES, "erythrocyte"))


class TruthScorer:
    """Score a run against simulator ground truth (tests, benchmarks, validation).

    A cell *fully crosses* the field of view when it is fully inside in at least one frame;
    *cells* are the leukocytes and erythrocytes (:data:`CELL_KINDS`): the simulator's
    platelets (2–3 µm) and most debris lie below the ``too_small`` gate by design and are
    counted as rejected, so they are reported with all objects but not among the cells; it
    is *resolvable* when in at least one of those frames no other object comes closer
    than the sum of both radii plus ``isolation_px`` (coincident cells that touch in every
    frame are physically inseparable; the gates reject them as doublets).

    Parameters
    ----------
    pixel_um : float
        Phase-grid pixel size [µm].
    isolation_px : float
        Extra clearance [px] between object outlines for "resolvable".
    true_phase : callable, optional
        ``true_phase(origin) -> (H, W) float32`` [rad]; enables the phase RMSE.
    """

    def __init__(self, pixel_um: float = DEFAULT_OPTICS.pixel_um, isolation_px: float = 4.0,
                 true_phase: Any = None) -> None:
        self.pixel_um = pixel_um
        self.isolation_px = isolation_px
        self.true_phase = true_phase
        self.kind: dict[int, str] = {}
        self.label: dict[int, int] = {}
        self.full: set[int] = set()
        self.resolvable: set[int] = set()
        self.emitted: Counter = Counter()
        self.unmatched = 0
        self.n_cells = 0
        self._sq_err = 0.0
        self._n_px = 0
        self.rmse_per_cell: list[float] = []

    def observe_truth(self, truth: list) -> None:
        """Record one frame's ground truth."""
        rad = [0.5 * t.diameter_um / self.pixel_um for t in truth]
        for i, t in enumerate(truth):
            self.kind[t.cell_id] = t.kind
            self.label[t.cell_id] = int(t.label)
            if not t.fully_inside:
                continue
            self.full.add(t.cell_id)
            clear = True
            for j, o in enumerate(truth):
                if j == i:
                    continue
                dist = ((t.y_px - o.y_px) ** 2 + (t.x_px - o.x_px) ** 2) ** 0.5
                if dist < rad[i] + rad[j] + self.isolation_px:
                    clear = False
                    break
            if clear:
                self.resolvable.add(t.cell_id)

    def observe_cells(self, cells: list[EmittedCell]) -> None:
        """Record emitted cells (and their phase error when ``true_phase`` is set)."""

        for c in cells:
            self.n_cells += 1
            if c.truth_id < 0:
                self.unmatched += 1
            else:
                self.emitted[c.truth_id] += 1
            if self.true_phase is not None and c.origin is not None:
                y0, x0, h, w = c.crop.bbox
                tp, valid = window(self.true_phase(c.origin), y0, x0, h, w, 0.0)
                m = c.crop.mask & valid
                if m.any():
                    err = (c.crop.phase[m].astype(np.float64) - tp[m]) ** 2
                    self._sq_err += float(err.sum())
                    self._n_px += int(m.sum())
                    self.rmse_per_cell.append(float(np.sqrt(err.mean())))

    def summary(self) -> dict[str, Any]:
        """Yield (all objects and leukocytes only), duplicates, traceability, phase error."""
        def frac(ids: set[int]) -> dict[str, Any]:
            n = len(ids)
            one = sum(1 for i in ids if self.emitted[i] == 1)
            zero = sum(1 for i in ids if self.emitted[i] == 0)
            return {"n": n, "exactly_one": one, "missed": zero,
                    "multiple": n - one - zero,
                    "yield_exactly_one": one / n if n else float("nan")}

        dup = sum(v - 1 for v in self.emitted.values() if v > 1)
        missed_kinds = Counter(self.kind[i] for i in self.resolvable if self.emitted[i] == 0)
        leuko = {i for i, lab in self.label.items() if lab >= 0}
        cells = {i for i, k in self.kind.items() if k in CELL_KINDS}
        return {
            "cells_emitted": self.n_cells,
            "full_crossing": frac(self.full),
            "resolvable": frac(self.resolvable),
            "full_crossing_cells": frac(self.full & cells),
            "resolvable_cells": frac(self.resolvable & cells),
            "full_crossing_leukocytes": frac(self.full & leuko),
            "resolvable_leukocytes": frac(self.resolvable & leuko),
            "duplicates": dup,
            "duplicate_rate": dup / self.n_cells if self.n_cells else 0.0,
            "unmatched_emitted": self.unmatched,
            "traceable_rate": 1 - self.unmatched / self.n_cells if self.n_cells else 1.0,
            "phase_rmse_rad": float(np.sqrt(self._sq_err / self._n_px)) if self._n_px
            else float("nan"),
            "phase_rmse_p99_rad": float(np.percentile(self.rmse_per_cell, 99))
            if self.rmse_per_cell else float("nan"),
            "missed_resolvable_kinds": dict(missed_kinds),
        }
