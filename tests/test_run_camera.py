"""Keeping up with the camera in the application (issue 15): the run summary sums the
acquisition processes' frame accounting, the live view and the run report say when the
acquisition fell behind and how many frames (and cells) were lost."""

from __future__ import annotations

import io

from rich.console import Console

from leukoflow.acquisition.realtime import camera_summary
from leukoflow.cli.run import _print_summary
from leukoflow.reports.report import camera_section
from leukoflow.run.liveview import camera_line, render


def _cam(taken: int, dropped: int, steady: float, paced: bool = True) -> dict:
    return {"paced": paced, "nominal_hz": 500.0 if paced else 0.0, "steady_hz": steady,
            "steady_ratio": steady / 500.0, "frames_taken": taken,
            "frames_captured": taken + dropped,
            "frames_dropped": {"overrun": dropped} if dropped else {},
            "frames_dropped_warmup": 3, "cells_in_dropped_frames_estimate": dropped * 0.06,
            "backlog_max": 256}


def test_camera_summary_adds_up_restarted_acquisitions_and_ignores_workers():
    senders = {"acquire-1-a": {"camera": _cam(1000, 100, 450.0)},
               "acquire-2-b": {"camera": _cam(2000, 50, 480.0)},
               "infer-3-c": {"camera": _cam(5, 5, 1.0)},  # not an acquisition
               "acquire-4-d": {"frames": 3}}  # an old-style report without camera figures
    cam = camera_summary(senders)
    assert cam["frames_taken"] == 3000 and cam["frames_captured"] == 3150
    assert cam["frames_dropped"] == {"overrun": 150} and cam["frames_dropped_total"] == 150
    assert cam["frames_dropped_fraction"] == 150 / 3150
    assert cam["cells_in_dropped_frames_estimate"] == 150 * 0.06
    assert cam["steady_hz"] == 480.0 and cam["processes"] == 2
    assert camera_summary({"infer-1": {}}) is None


def test_live_view_says_when_the_acquisition_falls_behind():
    base = {"frame_rate_nominal": 500.0, "frame_backlog": 256.0, "frames_dropped": 900.0,
            "cells_in_dropped_frames": 54.0, "warming_up": 0.0}
    text, style = camera_line({**base, "frame_rate_achieved": 300.0})
    assert "300 of 500 frames/s" in text and "FALLING BEHIND" in text and "~54 cells" in text
    assert style == "bold red"
    text, style = camera_line({**base, "frame_rate_achieved": 500.0, "frames_dropped": 0.0})
    assert "FALLING" not in text and style == "green"
    assert camera_line({**base, "frame_rate_achieved": 100.0, "warming_up": 1.0})[1] == "yellow"
    assert "unpaced" in camera_line({**base, "frame_rate_nominal": 0.0,
                                      "frame_rate_achieved": 900.0})[0]
    assert camera_line({"frames_per_s": 3.0}) is None  # no acquisition metrics (replay)
    console = Console(file=io.StringIO(), width=160, force_terminal=False)
    state = {"run": "r", "differential": {"classes": {}}, "accounting": {}}
    console.print(render(state, {**base, "frame_rate_achieved": 300.0}))
    assert "FALLING BEHIND" in console.file.getvalue()


def test_report_section_reports_dropped_frames_and_cells():
    html = "".join(camera_section(camera_summary({"acquire-1-a": {
        "camera": _cam(1000, 100, 400.0)}})))
    assert "fell behind" in html and "dropped 100" in html and "about 6 cells" in html
    assert "overrun" in html
    ok = "".join(camera_section(camera_summary({"acquire-1-a": {"camera": _cam(1000, 0,
                                                                               499.0)}})))
    assert "kept up" in ok and "fell behind" not in ok
    unpaced = "".join(camera_section(camera_summary({"acquire-1-a": {
        "camera": _cam(1000, 0, 900.0, paced=False)}})))
    assert "Unpaced run" in unpaced
    assert camera_section(None) == []


def test_end_of_run_summary_says_what_was_lost_and_dropped(capsys):
    """The terminal summary names lost cells and dropped frames; a clean run names none."""
    senders = {"acquire-1-a": {"camera": {
        "frames_taken": 900, "frames_captured": 1000, "frames_dropped": {"overrun": 100},
        "nominal_hz": 500.0, "steady_hz": 450.0, "cells_in_dropped_frames_estimate": 7.0}}}
    acc = {"emitted": 50, "counted": 40, "uncertain": 5, "ood": 2, "rejected_total": 0,
           "dropped_total": 0, "lost_total": 3, "lost": {"infer:worker_died": 3},
           "balanced": True}
    _print_summary({"run": "r", "accounting": acc, "camera": camera_summary(senders)})
    out = capsys.readouterr().out
    assert "lost 3" in out and "WARNING: 3 cells lost (infer:worker_died 3)" in out
    assert "100 frames dropped (10.0 %; overrun 100), ~7 cells" in out
    assert "450 of 500 frames/s" in out
    clean = dict(acc, lost_total=0, lost={})
    cam = {"frames_taken": 1000, "frames_captured": 1000, "frames_dropped": {}}
    _print_summary({"run": "r", "accounting": clean,
                    "camera": camera_summary({"acquire-1-a": {"camera": cam}})})
    assert "WARNING" not in capsys.readouterr().out
