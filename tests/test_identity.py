"""Cell identity across restarts: epochs claimed from the state folder, ids in 53 bits,
the publisher's ids, ``cum`` field and journal."""

from __future__ import annotations

import json
import multiprocessing as mp
import time
from types import SimpleNamespace

import numpy as np
import pytest

from leukoflow.core import identity, wire
from leukoflow.core.identity import ID_LOCAL_BITS, claim, make_ids, release, split_ids


def _run_ids():
    n = iter(range(1000))
    return lambda: f"run-{next(n)}"


def test_epochs_increase_and_a_crashed_run_is_resumed(tmp_path) -> None:
    new = _run_ids()
    a = claim(tmp_path, "", new)
    assert (a.run, a.epoch, a.resumed) == ("run-0", 0, False)
    b = claim(tmp_path, "", new)  # a died without eos: same run, next epoch
    assert (b.run, b.epoch, b.resumed) == ("run-0", 1, True)
    release(b)  # clean end of stream
    c = claim(tmp_path, "", new)
    assert (c.run, c.epoch, c.resumed) == ("run-1", 2, False)
    d = claim(tmp_path, "fixed", new)  # a configured run id always wins
    assert (d.run, d.epoch) == ("fixed", 3)
    release(c)  # a stale release (not the current claim) changes nothing
    assert json.loads((tmp_path / identity.IDENTITY_FILE).read_text())["closed"] is False


def _claim_one(folder: str, q) -> None:
    q.put(claim(folder, "r", lambda: "x").epoch)


def test_concurrent_claims_get_distinct_epochs(tmp_path) -> None:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_claim_one, args=(str(tmp_path), q)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert sorted(q.get(timeout=10) for _ in procs) == [0, 1, 2, 3]


def test_ids_are_exact_in_float64_and_split_back() -> None:
    top = identity.MAX_LOCAL_ID
    ids = make_ids(2**identity.ID_EPOCH_BITS - 1, [0, 5, top])
    assert int(ids.max()) < 2**53
    np.testing.assert_array_equal(ids.astype(np.float64).astype(np.int64), ids)
    ep, loc = split_ids(ids)
    assert ep.tolist() == [2**identity.ID_EPOCH_BITS - 1] * 3 and loc.tolist() == [0, 5, top]
    with pytest.raises(identity.IdSpaceExhausted):
        make_ids(1, [top + 1])


def test_without_state_folder_the_epoch_comes_from_the_clock() -> None:
    a = claim("", "", lambda: "new")
    assert a.run == "new" and a.path is None
    assert identity.clock_epoch(1000.0) != identity.clock_epoch(1001.0)


def test_publisher_ids_carry_the_epoch_cum_and_journal(tmp_path) -> None:
    import zmq

    from leukoflow.acquisition.publisher import CropPublisher

    def cell(i: int) -> SimpleNamespace:  # what the publisher reads of an EmittedCell
        crop = SimpleNamespace(phase=np.zeros((8, 8), np.float32), bbox=(0, 0, 8, 8),
                               features={})
        return SimpleNamespace(cell_id=i, crop=crop, frame=i, t_acq_ns=1, truth_id=100 + i,
                               label=0, kind="x")

    ctx = zmq.Context()
    ep = f"ipc://{tmp_path}/crops"
    pub = CropPublisher(ctx, "r", ep, epoch=7, journal=str(tmp_path / "j.jsonl"))
    pull = ctx.socket(zmq.PULL)
    pull.connect(ep)
    t_end = time.monotonic() + 20
    while not pub.publish(0, [cell(0), cell(1)], {}, with_truth=True):
        assert time.monotonic() < t_end  # IMMEDIATE: wait until the PULL is connected
        time.sleep(0.05)
    assert pub.publish(1, [cell(2)], {}, with_truth=True)
    msgs = [wire.decode(pull.recv_multipart()) for _ in range(2)]
    base = 7 << ID_LOCAL_BITS
    assert msgs[0].header["ids"] == [base, base + 1] and msgs[0].header["cum"] == 0
    assert msgs[1].header["ids"] == [base + 2] and msgs[1].header["cum"] == 2
    pub.close(0)
    pull.close(0)
    ctx.term()
    lines = [json.loads(x) for x in (tmp_path / "j.jsonl").read_text().splitlines()]
    sent = [x for x in lines if "unsent" not in x]
    assert [x["seq"] for x in sent][-2:] == [0, 1]
    assert sent[-1]["truth_ids"] == [102] and sent[-1]["ids"] == [base + 2]
    unsent = [x["unsent"] for x in lines if "unsent" in x]
    assert all(u == 0 for u in unsent)  # only tries before the worker connected
