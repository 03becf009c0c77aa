"""Routing of flagged cells to the explainer, bounded and never blocking counting.

OOD and uncertain cells always qualify; confident (counted) cells qualify with probability
``sample_rate`` from a seeded generator (reproducible for a given seed and cell order). The
selected cells of a batch go out as one ``explain`` wire message over a PUSH socket with a
small send high-water mark and ``zmq.NOBLOCK``: when the explainer is slow or absent the
message is dropped and its cells are counted in :attr:`ExplainRouter.dropped`, so counting
throughput never depends on the explainer.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from leukoflow.core import wire
from leukoflow.inference.decision import COUNTED, OOD, UNCERTAIN, Decisions

ROUTE_REASONS = ("ood", "uncertain", "sample")


class ExplainRouter:
    """Select cells for explanation and send them without blocking.

    Parameters
    ----------
    socket : zmq.Socket or None
        Connected PUSH socket (SNDHWM small, IMMEDIATE on); None disables sending (cells are
        selected but not sent and not counted).
    sender : leukoflow.core.wire.Sender
        Stamps run, sender id and sequence numbers.
    sample_rate : float
        Probability that a confident cell is also routed (0..1).
    seed : int
        Seed of the sampling generator.
    classes : sequence of str
        Class names (header ``classes``).
    model : str
        Model name (header ``model``).
    """

    def __init__(self, socket: Any, sender: wire.Sender, sample_rate: float = 0.01,
                 seed: int = 0, classes: Sequence[str] = (), model: str = "") -> None:
        if not 0.0 <= sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in [0, 1], got {sample_rate}")
        self.socket = socket
        self.sender = sender
        self.sample_rate = float(sample_rate)
        self.seed = int(seed)
        self.rng = np.random.default_rng(seed)
        self.classes = list(classes)
        self.model = model
        self.routed: Counter[str] = Counter()
        self.dropped = 0
        self.messages_dropped = 0

    def select(self, code: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows to route and their reason index into :data:`ROUTE_REASONS`.

        Parameters
        ----------
        code : ndarray (N,) uint8
            Decision codes (``leukoflow.inference.decision``).
        """
        code = np.asarray(code)
        reason = np.full(code.shape, -1, dtype=np.int8)
        reason[code == OOD] = 0
        reason[code == UNCERTAIN] = 1
        if self.sample_rate > 0:
            counted = code == COUNTED
            draw = self.rng.random(code.shape[0]) < self.sample_rate
            reason[counted & draw] = 2
        idx = np.flatnonzero(reason >= 0)
        return idx, reason[idx]

    def send(self, run: str, crops: np.ndarray, ids: list[int], dec: Decisions,
             reasons: np.ndarray, t: dict[str, int], labels: list[int] | None = None) -> bool:
        """Send one ``explain`` message with the selected cells (non-blocking).

        Returns
        -------
        bool
            True if queued; False if dropped (explainer full or absent; counted).
        """
        n = len(ids)
        if n == 0 or self.socket is None:
            return False
        import zmq

        fields: dict[str, Any] = {
            "ids": ids, "classes": self.classes, "model": self.model,
            "pred": dec.pred.tolist(), "decision": dec.names(),
            "conf": dec.conf.astype(float).tolist(),
            "ood_score": _finite(dec.ood_score).tolist(),
            "probs": dec.probs.astype(float).tolist(),
            "route": [ROUTE_REASONS[r] for r in reasons],
        }
        if labels is not None:
            fields["labels"] = labels
        msg = self.sender.message("explain", np.ascontiguousarray(crops), t=t, run=run,
                                  **fields)
        try:
            self.socket.send_multipart(wire.encode(msg, validate=False),
                                       flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            self.dropped += n
            self.messages_dropped += 1
            return False
        self.routed.update(ROUTE_REASONS[r] for r in reasons)
        return True


def _finite(score: np.ndarray) -> np.ndarray:
    """OOD scores for the wire (finite floats: NaN = no detector -> 0, inf clipped)."""
    big = float(np.finfo(np.float32).max)
    return np.nan_to_num(score.astype(np.float64), nan=0.0, posinf=big, neginf=-big)
