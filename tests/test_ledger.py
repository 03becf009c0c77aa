"""The per-source completeness ledger: gaps sized from ``cum``, partial messages, trailing
messages of a dead source, late arrivals, attribution, and an exact rebuild from its journal.

The ledger is pure bookkeeping with an injected clock, so these tests drive it message by
message against a known stream (which messages exist, with how many cells)."""

from __future__ import annotations

import random

from leukoflow.run.ledger import LOSS_REASONS, Ledger


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def stream(n_msgs: int, seed: int = 0) -> list[tuple[int, int, int]]:
    """(seq, n, cum) of a source's messages."""
    rng = random.Random(seed)
    out, cum = [], 0
    for seq in range(n_msgs):
        n = rng.randint(1, 6)
        out.append((seq, n, cum))
        cum += n
    return out


def test_gap_is_sized_from_cum_and_attributed_to_the_dead_worker() -> None:
    clock = Clock()
    lines: list[dict] = []
    led = Ledger(timeout_s=5.0, sink=lines.append, clock=clock)
    msgs = stream(10)
    lost = {3, 4, 7}
    for seq, n, cum in msgs:
        if seq not in lost:
            led.resolved("acquire-1-a", seq, n, cum, n)
    led.reported("acquire-1-a", 10, msgs[-1][2] + msgs[-1][1])
    led.advance()
    assert led.lost() == {}  # nothing is declared before the timeout
    clock.t += 1
    led.event("worker_died", "infer-0")
    clock.t += 5
    led.advance()
    want = sum(msgs[s][1] for s in lost)
    assert led.lost() == {"infer:worker_died": want}
    src = led.sources["acquire-1-a"]
    assert src.next == 10 and not src.open and src.lost_msgs == 3

    # rebuilt from the journal: same state
    again = Ledger(timeout_s=5.0, clock=clock)
    for line in lines:
        again.replay(line)
    again.advance()  # passes the complete messages after the last declaration, loses none
    assert again.lost() == led.lost()
    assert again.sources["acquire-1-a"].next == 10
    assert again.sources["acquire-1-a"].next_cum == src.next_cum


def test_partial_message_and_late_arrival() -> None:
    clock = Clock()
    led = Ledger(timeout_s=2.0, clock=clock)
    led.resolved("s", 0, 5, 0, 3)  # 2 of 5 cells missing
    led.resolved("s", 1, 2, 5, 2)
    clock.t += 3
    led.advance()
    assert led.lost() == {"pipeline:unattributed": 2}
    assert led.attribute(led.sources["s"], "gap", clock.t, False, 0) in LOSS_REASONS
    # the two cells arrive after all (a slow worker): counted, no longer lost
    assert led.resolved("s", 0, 5, 0, 2) == "pipeline:unattributed"
    assert led.lost() == {}
    assert led.sources["s"].late_cells == 2


def test_trailing_messages_of_a_dead_source() -> None:
    clock = Clock()
    led = Ledger(timeout_s=2.0, clock=clock)
    msgs = stream(6, seed=2)
    for seq, n, cum in msgs[:4]:
        led.resolved("acq", seq, n, cum, n)
    total = msgs[-1][2] + msgs[-1][1]
    led.reported("acq", 6, total)  # the last report before it died
    led.advance()
    clock.t += 10
    led.advance()
    assert led.lost() == {}  # a live source's crops may still be queued somewhere
    led.source_died("acq")
    clock.t += 1
    led.advance()
    assert led.lost() == {}  # in flight in a worker for a while after the death
    clock.t += 2
    led.advance()
    assert led.lost() == {"acquire:source_died": msgs[4][1] + msgs[5][1]}


def test_collector_restart_and_drain_timeout_reasons() -> None:
    clock = Clock()
    led = Ledger(timeout_s=2.0, clock=clock)
    led.resolved("a", 0, 2, 0, 2)
    led.event("collector_restart", "collector")
    led.resolved("a", 2, 2, 4, 2)  # message 1 was received by the collector that died
    clock.t += 3
    led.advance()
    assert led.lost() == {"collector:restart": 2}
    led2 = Ledger(timeout_s=100.0, clock=clock)
    led2.resolved("b", 1, 3, 4, 3)
    led2.advance(final=True)  # the run ended with message 0 missing, nothing to blame
    assert led2.lost() == {"collector:drain_timeout": 4}


def test_complete_stream_loses_nothing_in_any_order() -> None:
    clock = Clock()
    led = Ledger(timeout_s=1.0, clock=clock)
    msgs = stream(200, seed=3)
    rng = random.Random(4)
    order = msgs[:]
    rng.shuffle(order)
    for seq, n, cum in order:  # split each message in two deliveries, any order
        k = rng.randint(0, n)
        led.resolved("x", seq, n, cum, k)
        led.resolved("x", seq, n, cum, n - k)
        clock.t += 0.01
        led.advance()
    led.advance(final=True)
    src = led.sources["x"]
    assert led.lost() == {} and src.next == 200 and src.inconsistent == 0
    assert src.next_cum == msgs[-1][2] + msgs[-1][1]
