"""Live view: rendering of a real collector state, TTY detection, metrics scraping; CLI errors."""

from __future__ import annotations

import io
import threading

from helpers import FakeAcquisition, FakeWorker, endpoint, free_port, make_crops, wait_for
from rich.console import Console
from typer.testing import CliRunner

from leukoflow.cli import app
from leukoflow.run.collector import Collector, CollectorConfig
from leukoflow.run.liveview import StateFeed, render, scrape, want_live_view


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_want_live_view_only_on_a_terminal_without_json() -> None:
    assert want_live_view(False, _Tty())
    assert not want_live_view(True, _Tty())
    assert not want_live_view(False, io.StringIO())


def test_state_feed_and_render_from_a_live_collector(tmp_path) -> None:
    res_ep, live_ep, crops_ep = endpoint(), endpoint(), endpoint()
    mport = free_port()
    coll = Collector(CollectorConfig(results=res_ep, live=live_ep, metrics_port=mport,
                                     run_dir=str(tmp_path / "run"), run_id="live",
                                     publish_interval_s=0.1, drain_timeout_s=1.0))
    th = threading.Thread(target=lambda: coll.run(install_signals=False), daemon=True)
    th.start()
    assert wait_for(lambda: coll._health is not None and coll._health.ready, 10)
    feed = StateFeed(live_ep, {"collector": mport}, scrape_interval_s=0.1)
    acq = FakeAcquisition(crops_ep, res_ep, run="live")
    worker = FakeWorker(crops_ep, res_ep, run="live")
    worker.start()
    crops, labels = make_crops(50, seed=2)
    for k in range(5):
        acq.send_crops(list(range(10 * k, 10 * k + 10)), crops[10 * k:10 * k + 10],
                       labels[10 * k:10 * k + 10], frame=k)
    acq.account()
    assert wait_for(lambda: (feed.poll(), feed.state is not None
                             and feed.state["accounting"]["counted"] > 0)[1], 20)
    samples = scrape(mport)
    assert any(k.startswith("leukoflow_differential_cells") for k in samples)
    assert scrape(free_port()) == {}  # nothing listening: empty, no exception
    console = Console(file=io.StringIO(), width=120, force_terminal=False)
    console.print(render(feed.state, {"frames_per_s": 123.0, "explainer_backlog": 4,
                                      "queues": {"infer-0:pending": 7}}))
    text = console.file.getvalue()
    for word in ("neutrophil", "lymphocyte", "95 % interval", "counted", "uncertain", "OOD",
                 "dropped", "cells/s", "frames/s", "123", "latency p99", "explainer backlog",
                 "infer-0:pending 7"):
        assert word in text, word
    acq.account(eos=True)
    th.join(20)
    worker.stop_event.set()
    feed.close()
    acq.close()


def test_render_names_lost_cells_and_duplicates() -> None:
    state = {"run": "r", "differential": {"classes": {}},
             "accounting": {"emitted": 100, "counted": 80, "lost_total": 7,
                            "lost": {"infer:worker_died": 7}, "duplicates": 2}}
    console = Console(file=io.StringIO(), width=120, force_terminal=False)
    console.print(render(state, {}))
    text = console.file.getvalue()
    assert "LOST 7 cells (infer:worker_died 7)" in text
    assert "2 duplicate results (counted once)" in text
    console = Console(file=io.StringIO(), width=120, force_terminal=False)
    console.print(render({**state, "accounting": {"emitted": 100, "counted": 100}}, {}))
    assert "LOST" not in console.file.getvalue()


def test_cli_errors_are_clear(tmp_path) -> None:
    runner = CliRunner()
    r = runner.invoke(app, ["record", "--out", str(tmp_path / "x.rtdc")])
    assert r.exit_code == 2 and "--tap-in" in r.output
    bad = tmp_path / "bad.rtdc"
    bad.write_bytes(b"not an hdf5 file")
    r = runner.invoke(app, ["validate", str(bad)])
    assert r.exit_code == 2 and "validate" in r.output
    r = runner.invoke(app, ["replay", str(bad)])
    assert r.exit_code == 2
    r = runner.invoke(app, ["run", "--help"])
    assert r.exit_code == 0 and "--metrics-base-port" in r.output
