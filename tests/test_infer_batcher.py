"""Dynamic batcher logic with an injected clock (no sleeping, no wall-clock assertions)."""

from __future__ import annotations

import numpy as np
import pytest

from leukoflow.inference.batcher import DynamicBatcher


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def crops(n: int, start: int = 0) -> np.ndarray:
    """Crops whose pixel value is the cell number (to check order after gathering)."""
    return np.arange(start, start + n, dtype=np.float32)[:, None, None] * np.ones((1, 4, 4),
                                                                                  np.float32)


def test_partial_batch_waits_exactly_max_delay():
    clk = FakeClock()
    b = DynamicBatcher(max_batch=8, max_delay_s=0.002, clock=clk)
    b.put(crops(3), "m0")
    assert not b.ready() and b.pop() is None
    assert b.time_to_deadline() == pytest.approx(0.002)
    clk.t += 0.001
    b.put(crops(2, 3), "m1")  # a later message does not extend the oldest cell's deadline
    assert b.time_to_deadline() == pytest.approx(0.001)
    clk.t += 0.000999
    assert b.pop() is None
    clk.t += 0.000001
    batch = b.pop()
    assert batch is not None and batch.reason == "delay" and batch.n == 5
    assert batch.oldest_wait == pytest.approx(0.002)
    assert [s.ctx for s in batch.segments] == ["m0", "m1"]
    assert b.pending == 0 and b.deadline() is None and b.time_to_deadline() is None


def test_full_batch_goes_immediately_and_splits_messages():
    clk = FakeClock()
    b = DynamicBatcher(max_batch=8, max_delay_s=10.0, clock=clk)
    b.put(crops(5), "a")
    assert b.pop() is None
    b.put(crops(6, 5), "b")  # 11 pending: one full batch now, 3 left
    assert b.ready() and b.time_to_deadline() == 0.0
    batch = b.pop()
    assert batch.reason == "full" and batch.n == 8 and batch.bucket == 8
    assert [(s.ctx, s.start, s.n) for s in batch.segments] == [("a", 0, 5), ("b", 0, 3)]
    out = batch.gather(np.empty((8, 4, 4), np.float32))
    np.testing.assert_array_equal(out[:, 0, 0], np.arange(8))
    assert b.pending == 3 and not b.ready()
    rest = b.flush()
    assert len(rest) == 1 and rest[0].reason == "flush"
    seg = rest[0].segments[0]
    assert (seg.ctx, seg.start, seg.stop) == ("b", 3, 6)
    # the remainder keeps the arrival time of its message (its deadline does not restart)
    assert seg.t_enq == 100.0


def test_large_message_spans_several_full_batches():
    clk = FakeClock()
    b = DynamicBatcher(max_batch=4, max_delay_s=1.0, clock=clk)
    b.put(crops(10), "big")
    sizes = []
    while (batch := b.pop()) is not None:
        sizes.append((batch.n, batch.reason, batch.segments[0].start))
    assert sizes == [(4, "full", 0), (4, "full", 4)]
    clk.t += 1.0
    last = b.pop()
    assert (last.n, last.reason, last.segments[0].start) == (2, "delay", 8)


def test_buckets_pad_partial_batches_with_zeros():
    clk = FakeClock()
    b = DynamicBatcher(max_batch=16, max_delay_s=0.0, buckets=(1, 4, 8, 16), clock=clk)
    assert [b.bucket_for(n) for n in (1, 2, 4, 5, 9, 16)] == [1, 4, 4, 8, 16, 16]
    b.put(crops(5, 1), None)
    batch = b.pop()  # max_delay 0: due at once
    assert batch.n == 5 and batch.bucket == 8
    buf = np.full((16, 4, 4), 7.0, np.float16)  # dtype conversion during gather
    out = batch.gather(buf)
    assert out.shape == (8, 4, 4) and out.dtype == np.float16
    np.testing.assert_array_equal(out[:5, 0, 0], np.arange(1, 6))
    assert (out[5:] == 0).all() and (buf[8:] == 7).all()
    with pytest.raises(ValueError):
        batch.gather(np.empty((4, 4, 4), np.float32))


def test_invalid_arguments():
    with pytest.raises(ValueError):
        DynamicBatcher(0, 0.001)
    with pytest.raises(ValueError):
        DynamicBatcher(8, -1)
    with pytest.raises(ValueError):
        DynamicBatcher(16, 0.001, buckets=(1, 8))
    b = DynamicBatcher(8, 0.001)
    with pytest.raises(ValueError):
        b.put(np.zeros((4, 4)), None)
    b.put(np.zeros((0, 4, 4)), None)  # empty message: nothing pending
    assert b.pending == 0 and b.pop(force=True) is None
