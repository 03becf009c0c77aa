"""Per-cell accounting of the inference worker.

Every cell that arrives in a decodable crop message ends in exactly one outcome:
``counted``, ``uncertain``, ``ood`` or ``rejected`` (by reason: bad shape, non-finite
crop, backend failure, results not deliverable ...). Cells of a message that cannot even be
decoded are rejected too when their number is known from the header, else the message is
counted by reason. Sequence numbers per sender (:class:`leukoflow.core.wire.GapTracker`) expose
lost messages and sender restarts as counted gaps.

``received == counted + uncertain + ood + rejected + pending`` holds at all times
(:meth:`Accounting.balanced`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from leukoflow.core.wire import GapTracker


@dataclass
class Accounting:
    """Cumulative counters of one worker (cells unless named ``messages``)."""

    received_messages: int = 0
    received_cells: int = 0
    counted: int = 0
    uncertain: int = 0
    ood: int = 0
    rejected: Counter = field(default_factory=Counter)
    rejected_messages: Counter = field(default_factory=Counter)
    control_messages: Counter = field(default_factory=Counter)
    gaps: GapTracker = field(default_factory=GapTracker)

    @property
    def rejected_cells(self) -> int:
        """Rejected cells over all reasons."""
        return int(sum(self.rejected.values()))

    @property
    def finished(self) -> int:
        """Cells with an outcome."""
        return self.counted + self.uncertain + self.ood + self.rejected_cells

    def balanced(self, pending: int = 0) -> bool:
        """True when every received cell has an outcome or is still pending."""
        return self.received_cells == self.finished + pending

    def receive(self, n_cells: int) -> None:
        """A crop message with ``n_cells`` cells arrived (decodable)."""
        self.received_messages += 1
        self.received_cells += int(n_cells)

    def reject(self, reason: str, n_cells: int) -> None:
        """``n_cells`` received cells are rejected with ``reason``."""
        if n_cells:
            self.rejected[reason] += int(n_cells)

    def reject_message(self, reason: str, n_cells: int = 0) -> None:
        """An undecodable message; its ``n_cells`` (if known) count as received + rejected."""
        self.rejected_messages[reason] += 1
        if n_cells:
            self.received_cells += int(n_cells)
            self.rejected[reason] += int(n_cells)

    def decided(self, counted: int, uncertain: int, ood: int) -> None:
        """Cells that got a decision."""
        self.counted += int(counted)
        self.uncertain += int(uncertain)
        self.ood += int(ood)

    def stats(self, pending: int = 0) -> dict[str, Any]:
        """Wire-ready cumulative totals (``control``/``heartbeat`` ``stats`` map)."""
        g = self.gaps
        return {
            "role": "infer",
            "received_messages": self.received_messages,
            "received_cells": self.received_cells,
            "counted": self.counted,
            "uncertain": self.uncertain,
            "ood": self.ood,
            "rejected": dict(self.rejected),
            "rejected_messages": dict(self.rejected_messages),
            "pending": int(pending),
            "gaps": g.gaps,
            "duplicates": g.duplicates,
            "sender_restarts": g.restarts,
            "late_start": g.late_start,
            "senders": {k: v for k, v in list(g.expected.items())[:64]},
        }
