"""A million fuzzed messages through each handler: collector, inference worker, explainer.

:mod:`leukoflow.benchmarks.fuzz` builds messages that pass wire validation but are extreme in
content (and, one in five, wildly mutated); each harness holds the real service object (the
worker with the shipped model and a real backend, so batches run through the network and the
decision step; the explainer explains a cell now and then) and feeds it frames as its loop
does. Rows per handler: messages fed, past the decoder, handler errors (an exception that
reached the error boundary) and crashes (one that escaped it, or a broken invariant): both
must be 0; and the handler's rate beside the rate of building and decoding the same messages
alone (the baseline).

Run: ``leukoflow bench fuzz`` (``--quick``: 20,000 per handler).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import logging
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from leukoflow.benchmarks.common import machine, row
from leukoflow.benchmarks.fuzz import CollectorHarness, ExplainHarness, WorkerHarness, fuzz, message
from leukoflow.core import wire
from leukoflow.models.artifact import load_artifact


def _decode_only(kinds: tuple[str, ...], n: int, side: int, seed: int) -> float:
    """Messages per second of building and decoding alone (the baseline)."""
    rng = random.Random(seed)
    t0 = time.perf_counter()
    for _ in range(n):
        try:
            wire.decode(message(rng, rng.choice(kinds), side=side), check_finite=False)
        except wire.WireError:
            pass
    return n / (time.perf_counter() - t0)


def run(quick: bool = False, n: int | None = None, seed: int = 1) -> dict[str, Any]:
    """Fuzz each handler with ``n`` messages (default 1,000,000; quick 20,000)."""
    n = n or (20_000 if quick else 1_000_000)
    # every rejected message is logged by the services: keep the benchmark's output readable
    logging.getLogger("leukoflow").setLevel(logging.CRITICAL)
    rows: list[dict[str, Any]] = []
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-fuzz-") as tmp:
        d = Path(tmp)
        worker = WorkerHarness(load_artifact("lenet5-sim"), d)
        try:
            for name, h, every in (("collector", CollectorHarness(d / "coll"), 1000),
                                   ("worker", worker, 1000),
                                   ("explainer", ExplainHarness(d / "exp"), 5000)):
                res = fuzz(h, n, seed=seed, check_every=every)
                base = _decode_only(h.KINDS, min(n, 20_000), getattr(h, "side", 32), seed)
                results[name] = {**res, "decode_only_per_s": base}
                rows += [
                    row(f"{name}: messages fed", res["fed"], "messages"),
                    row(f"{name}: past the decoder", res["past_decoder"], "messages"),
                    row(f"{name}: crashes", res["crashes"], "messages", target="0"),
                    row(f"{name}: handler errors", res["handler_errors"], "messages",
                        target="0"),
                    row(f"{name}: handled", res["messages_per_s"], "messages/s",
                        "build + decode only", base),
                ]
        finally:
            worker.close()
    return {"machine": machine(), "n_per_handler": n, "rows": rows, "handlers": results}


if __name__ == "__main__":
    from leukoflow.benchmarks.common import main

    main(run)
