"""Small, seeded helpers for the explainer's benchmarks (and tests).

* :func:`toy_crops` - phase crops of four toy "classes" with known cues when the
  simulated instrument is not wanted (unit tests of the methods themselves): size
  (class 0 large vs class 3 small) and interior texture (class 1 granular vs class 2
  smooth with a dark vacuole), all at 0 rad background.
* :func:`explainer_process` - an explainer service in a child process (benchmarks).

(Test-only helpers live in ``tests/helpers.py``.)
"""

from __future__ import annotations

import numpy as np

from leukoflow.core.physics import CROP_SIZE_PX
from leukoflow.explain.service import ExplainConfig, ExplainService


def toy_crops(n_per_class: int, seed: int = 0,
              size: int = CROP_SIZE_PX) -> tuple[np.ndarray, np.ndarray]:
    """Toy phase crops (N, size, size) float32 [rad] and labels (N,) (see module doc)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float64)
    xs, ys = [], []
    radius = {0: 17.0, 1: 14.0, 2: 14.0, 3: 10.0}
    for c in range(4):
        for _ in range(n_per_class):
            cy, cx = size / 2 + rng.normal(0, 1.5, 2)
            r0 = radius[c] * rng.uniform(0.92, 1.08)
            r = np.hypot(yy - cy, xx - cx)
            ph = 1.6 * np.sqrt(np.clip(1 - (r / r0) ** 2, 0, None))
            if c == 1:  # coarse granules
                for _ in range(25):
                    a, d = rng.uniform(0, 2 * np.pi), r0 * np.sqrt(rng.uniform(0, 0.6))
                    gy, gx = cy + d * np.sin(a), cx + d * np.cos(a)
                    ph += 0.7 * np.exp(-((yy - gy) ** 2 + (xx - gx) ** 2) / 2.0)
            if c == 2:  # vacuole
                a, d = rng.uniform(0, 2 * np.pi), 0.3 * r0
                vy, vx = cy + d * np.sin(a), cx + d * np.cos(a)
                ph -= 0.9 * np.exp(-((yy - vy) ** 2 + (xx - vx) ** 2) / 12.0) * (r < r0)
            ph += rng.normal(0, 0.03, ph.shape)
            xs.append(ph.astype(np.float32))
            ys.append(c)
    return np.stack(xs), np.asarray(ys, np.int64)


def explainer_process(cfg: dict, ready: object, stop: object, out: object = None) -> None:
    """Run an :class:`~leukoflow.explain.service.ExplainService` in this (child) process
    (benchmarks).

    Sets ``ready`` once the model is loaded and warmed up, stops when ``stop`` is set and
    puts the service's final counters on the queue ``out``.

    Parameters
    ----------
    cfg : dict
        :class:`~leukoflow.explain.service.ExplainConfig` fields (tuples may arrive as lists).
    ready, stop : multiprocessing.Event
    out : multiprocessing.Queue, optional
    """
    import time

    import torch


    torch.set_num_threads(int(cfg.get("threads", 1)))
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}
    svc = ExplainService(ExplainConfig(**cfg))
    svc.lower_priority()  # as ``run_forever`` in production
    svc.start()
    end = time.monotonic() + 300
    while not (svc.health is not None and svc.health.ready) and time.monotonic() < end:
        time.sleep(0.05)
    ready.set()  # type: ignore[attr-defined]
    stop.wait(900)  # type: ignore[attr-defined]
    st = svc.stop()
    if out is not None:
        out.put(st)  # type: ignore[attr-defined]
