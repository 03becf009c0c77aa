"""Wire protocol v1: round trips for every kind, and rejection of malformed messages."""

from __future__ import annotations

import random

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from leukoflow.core import wire
from leukoflow.core.wire import REASONS, Message, WireError, decode, encode

CLASSES = ["neutrophil", "eosinophil", "monocyte", "lymphocyte"]


def _cells(n: int, rng: np.random.Generator) -> dict:
    return {"ids": [int(i) for i in rng.integers(0, 2**40, n)]}


def make(kind: str, n: int = 3, side: int = 8, seed: int = 0, dtype: str = "<f4") -> Message:
    """A valid message of ``kind`` with ``n`` cells."""
    rng = np.random.default_rng(seed)
    s = wire.Sender("run-1", "test")
    if kind == "crops":
        arr = rng.normal(size=(n, side, side)).astype(dtype)
        return s.message("crops", arr, frame=7, bbox=[[1, 2, side, side]] * n,
                         feat={"area_um": [float(v) for v in rng.uniform(10, 200, n)]},
                         labels=[int(v) for v in rng.integers(-1, 4, n)],
                         kinds=["neutrophil"] * n, **_cells(n, rng))
    probs = rng.dirichlet(np.ones(4), n).astype(np.float32)
    res = {"pred": [int(v) for v in probs.argmax(1)], "decision": ["counted"] * n,
           "conf": [float(v) for v in probs.max(1)], "ood_score": [-0.5] * n,
           "classes": CLASSES, "model": "lenet5-sim", **_cells(n, rng)}
    if kind == "results":
        return s.message("results", probs, **res)
    if kind == "explain":
        arr = rng.normal(size=(n, side, side)).astype(dtype)
        return s.message("explain", arr, probs=[[float(p) for p in r] for r in probs], **res)
    if kind == "control":
        return s.message("control", cmd="accounting", stats={"emitted": n, "dropped": {"x": 1}})
    return s.message("heartbeat", stats={"fps": 500.0})


def roundtrip(msg: Message) -> Message:
    return decode([bytes(f) for f in encode(msg)])


@pytest.mark.parametrize("kind", wire.KINDS)
def test_roundtrip_every_kind(kind: str) -> None:
    msg = make(kind)
    out = roundtrip(msg)
    assert out.kind == kind
    assert out.seq == msg.seq and out.sender == msg.sender
    for key, value in msg.header.items():
        assert out.header[key] == value
    if msg.array is None:
        assert out.array is None
    else:
        np.testing.assert_array_equal(out.array, msg.array)
        assert out.array.dtype == msg.array.dtype


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(["crops", "results", "explain"]), n=st.integers(0, 12),
       side=st.integers(1, 40), seed=st.integers(0, 2**31), half=st.booleans())
def test_roundtrip_property(kind: str, n: int, side: int, seed: int, half: bool) -> None:
    dtype = "<f2" if half and kind != "results" else "<f4"
    msg = make(kind, n=n, side=side, seed=seed, dtype=dtype)
    out = roundtrip(msg)
    assert out.n == n
    np.testing.assert_array_equal(out.array, msg.array)


#: stats keys with a schema (wire.STATS_*): free-form values are generated for the others
SCHEMA_KEYS = {*wire.STATS_COUNTS, *wire.STATS_COUNT_MAPS, *wire.STATS_STRINGS, "ids", "final"}


@settings(max_examples=100, deadline=None)
@given(stats=st.dictionaries(st.text(max_size=20).filter(lambda k: k not in SCHEMA_KEYS),
                             st.one_of(
    st.integers(-2**62, 2**62), st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=50), st.lists(st.integers(0, 100), max_size=5)), max_size=10))
def test_control_stats_property(stats: dict) -> None:
    s = wire.Sender("r", "acquire")
    out = roundtrip(s.message("control", cmd="eos", stats=stats))
    assert out.header["stats"] == stats


@pytest.mark.parametrize("stats", [
    [1],                                            # stats is not a map
    {"ids": 5},                                     # ids not a list
    {"ids": [1, -2]},                               # negative id
    {"ids": [True]},                                # bool is not an id
    {"cells_emitted": -1},                          # negative count
    {"cells_emitted": 1.5},                         # float count
    {"emitted": "7"},                               # string count
    {"cells_dropped": [1]},                         # map expected
    {"rejected": {"x": -3}},                        # negative count in a map
    {"restarts": {"infer-0": "x"}},                 # non-integer count in a map
    {"event": 3},                                   # event must be a string
    {"event": "rejected", "cells": 2},              # a per-cell event names its reason
    {"event": "dropped", "reason": "x"},            # ... and its cells
    {"final": 1},                                   # bool expected
    {"crops_sender": ["a"]},                        # string expected
])
@pytest.mark.parametrize("kind", ["control", "heartbeat"])
def test_stats_schema_rejects_what_would_crash_a_handler(stats, kind: str) -> None:
    s = wire.Sender("r", "infer")
    fields = {"cmd": "accounting"} if kind == "control" else {}
    h = {**s.message(kind, **fields).header, "stats": stats}
    frames = [msgpack.packb(h, use_bin_type=True), b""]
    with pytest.raises(WireError) as err:
        decode(frames)
    assert err.value.reason in ("field_type", "field_value", "missing_field")


def test_results_source_fields_are_checked() -> None:
    msg = make("results", n=2)
    msg.header.update(src_sender="acquire-1-a", src_seq=3, src_n=2, src_cum=10)
    assert roundtrip(msg).header["src_cum"] == 10
    for key, bad in (("src_seq", -1), ("src_n", 0), ("src_cum", "x"), ("src_sender", 5),
                     ("frame", 1.0)):
        h = {**msg.header, key: bad}
        with pytest.raises(WireError):
            wire.validate_header(h)


def test_zero_copy_large_payload() -> None:
    import zmq

    ctx = zmq.Context.instance()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    a.bind("inproc://zc")
    b.connect("inproc://zc")
    msg = make("crops", n=64, side=64)  # 1 MiB payload: above zmq.COPY_THRESHOLD
    a.send_multipart(encode(msg), copy=False)
    frames = b.recv_multipart(copy=False)
    out = decode(frames)
    assert not out.array.flags.writeable
    # zero-copy: the array is a view of the received frame's memory
    assert out.array.ctypes.data == np.frombuffer(frames[1].buffer, np.uint8).ctypes.data
    np.testing.assert_array_equal(out.array, msg.array)
    a.close()
    b.close()


@pytest.mark.parametrize("mutate,reason", [
    (lambda h, p: ([h], None), "frames"),
    (lambda h, p: ([b"\xc1garbage", p], None), "header_decode"),
    (lambda h, p: ([msgpack.packb([1, 2]), p], None), "header_type"),
    (lambda h, p: ([_re(h, v=2), p], None), "version"),
    (lambda h, p: ([_re(h, kind="pickle"), p], None), "kind"),
    (lambda h, p: ([_re(h, drop="ids"), p], None), "missing_field"),
    (lambda h, p: ([_re(h, seq="7"), p], None), "field_type"),
    (lambda h, p: ([_re(h, seq=-1), p], None), "field_value"),
    (lambda h, p: ([_re(h, dtype="|O"), p], None), "dtype"),
    (lambda h, p: ([_re(h, dtype="<f8"), p], None), "dtype"),
    (lambda h, p: ([_re(h, shape=[3, 8]), p], None), "count_mismatch"),
    (lambda h, p: ([_re(h, shape=[3, 8, 5000]), p], None), "shape"),
    (lambda h, p: ([h, p[:-4]], None), "payload_size"),
    (lambda h, p: ([_re(h, feat={"area_um": [1.0, float("nan"), 2.0]}), p], None), "non_finite"),
    (lambda h, p: ([_re(h, labels=[0, 1]), p], None), "count_mismatch"),
])
def test_mutations_rejected_with_reason(mutate, reason: str) -> None:
    h, p = (bytes(f) for f in encode(make("crops")))
    frames, _ = mutate(h, p)
    with pytest.raises(WireError) as exc:
        decode(frames)
    assert exc.value.reason == reason


def _re(h: bytes, drop: str | None = None, **changes) -> bytes:
    d = msgpack.unpackb(h)
    d.update(changes)
    if drop:
        d.pop(drop)
    return msgpack.packb(d)


def test_nan_payload_rejected_or_reported() -> None:
    msg = make("crops", n=4)
    arr = msg.array.copy()
    arr[2, 0, 0] = np.nan
    frames = encode(Message(msg.header, arr), validate=False)
    with pytest.raises(WireError) as exc:
        decode(frames)
    assert exc.value.reason == "non_finite"
    out = decode(frames, check_finite=False)
    assert wire.nonfinite_rows(out.array).tolist() == [False, False, True, False]


def test_results_probabilities_validated() -> None:
    msg = make("results", n=2)
    bad = msg.array.copy()
    bad[0, 0] = 1.5
    with pytest.raises(WireError) as exc:
        decode(encode(Message(msg.header, bad), validate=False))
    assert exc.value.reason == "field_value"


def test_ext_types_and_pickle_refused() -> None:
    import pickle

    h = msgpack.packb({"v": 1, "kind": "heartbeat", "x": msgpack.ExtType(1, b"abc")})
    with pytest.raises(WireError):
        decode([h, b""])
    with pytest.raises(WireError):
        decode([pickle.dumps({"v": 1}), b""])


def test_ten_thousand_random_and_mutated_messages() -> None:
    """10,000 random and mutated messages rejected with a known reason code.

    Mutations are drawn until 10,000 of them were rejected; a mutation that happens to be
    a valid message (e.g. a bit flip inside a cell id) must decode to a message that
    re-encodes and validates; nothing else may escape the decoder.
    """
    rng = random.Random(1234)
    valid = [[bytes(f) for f in encode(make(k, n=rng.randint(1, 4), seed=i))]
             for i, k in enumerate(["crops", "results", "explain", "control", "heartbeat"] * 4)]
    reasons: dict[str, int] = {}
    accepted = 0
    i = 0
    while sum(reasons.values()) < 10_000:
        i += 1
        base = [bytearray(f) for f in rng.choice(valid)]
        op = i % 5
        if op == 0:  # random bytes
            frames = [bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 64))),
                      bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 64)))]
        elif op == 1:  # flip bytes in the header
            for _ in range(rng.randint(1, 4)):
                j = rng.randrange(len(base[0]))
                base[0][j] ^= 1 << rng.randrange(8)
            frames = [bytes(base[0]), bytes(base[1])]
        elif op == 2:  # truncate or extend either frame
            k = rng.randrange(2)
            cut = rng.randint(0, max(0, len(base[k]) - 1))
            base[k] = base[k][:cut] if rng.random() < 0.7 else base[k] + b"\x00\x01"
            frames = [bytes(base[0]), bytes(base[1])]
        elif op == 3:  # replace a header value with a random type
            d = msgpack.unpackb(bytes(base[0]))
            key = rng.choice(sorted(d))
            d[key] = rng.choice([None, "x", -5, 2**70 // 2**10, 1.5, [], {}, [None], True,
                                 float("nan"), [1.0] * 50])
            frames = [msgpack.packb(d), bytes(base[1])]
        else:  # wrong frame count
            frames = [bytes(base[0])] * rng.choice([0, 1, 3])
        try:
            out = decode(frames)
        except WireError as exc:
            assert exc.reason in REASONS
            reasons[exc.reason] = reasons.get(exc.reason, 0) + 1
        else:
            accepted += 1  # still a valid message: it must survive a re-encode
            wire.validate_header(decode([bytes(f) for f in encode(out)]).header)
    assert sum(reasons.values()) == 10_000
    assert accepted < 0.15 * i  # mutations are overwhelmingly caught
    assert len(reasons) >= 8  # the mutations exercise many different checks


def test_gap_tracker_counts_loss_duplicates_and_restarts() -> None:
    g = wire.GapTracker()
    assert [g.observe("acquire-1-a", s) for s in (0, 1, 4, 5)] == [0, 0, 2, 0]
    assert g.gaps == 2
    g.observe("acquire-1-a", 3)
    assert g.duplicates == 1
    g.observe("acquire-2-b", 0)  # the process restarted: new sender id
    assert g.restarts == 1
    g.observe("acquire-3-c", 5)  # joined late: 5 messages it never owned, not gaps
    assert g.gaps == 2 and g.late_start == 5


def test_sender_ids_unique_and_sequence_increments() -> None:
    a, b = wire.Sender("r", "infer"), wire.Sender("r", "infer")
    assert a.sender != b.sender
    m0, m1 = a.message("heartbeat"), a.message("heartbeat")
    assert (m0.seq, m1.seq) == (0, 1)
