"""A real headless Chromium opens the run report: no errors, every figure decoded.

The run folder comes from a real collector fed by stand-in services over ZeroMQ (see
tests/test_run_report.py). Chromium is the Debian package ``chromium`` (CI installs it with
deploy/ci/install-system-deps.sh); without it the test is reported NOT RUN with the
command that enables it, and fails under CI.
"""

from __future__ import annotations

import json
import re
import subprocess

import sysdeps
from test_run_report import make_run_dir

from leukoflow.core.vocabulary import DECISIONS
from leukoflow.reports.report import write_run_report, write_validation_report
from leukoflow.reports.validate import evaluate_predictions
from leukoflow.run.collector import read_cell_log

PROBE = """<script>
window.__errors = [];
window.addEventListener('error', function (e) {
  window.__errors.push(String(e.message || (e.target && (e.target.src || e.target.href))));
}, true);
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var bad = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); })
                .map(function (i) { return i.getAttribute('src'); });
  var pre = document.createElement('pre');
  pre.id = '__probe';
  pre.textContent = JSON.stringify({images: imgs.length, bad: bad, errors: window.__errors,
                                    title: document.title});
  document.body.appendChild(pre);
});
</script>"""


def _chromium() -> str:
    """Headless Chromium; NOT RUN locally without it, a failure under CI (tests/sysdeps.py)."""
    return sysdeps.binary("chromium", "chromium-browser", "google-chrome", package="chromium")


def _open(page, tmp_path) -> tuple[dict, str]:
    """Load ``page`` (with the probe script) in headless Chromium; return probe and stderr."""
    html = page.read_text()
    probe_page = page.with_name("__probe.html")
    probe_page.write_text(html.replace("<head>", "<head>" + PROBE, 1))
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--no-first-run", f"--user-data-dir={tmp_path / 'chromium-profile'}",
           "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000",
           "--dump-dom", probe_page.as_uri()]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    probe_page.unlink()
    m = re.search(r'<pre id="__probe">(.*?)</pre>', res.stdout, re.S)
    assert m, f"probe output missing (rc {res.returncode}): {res.stderr[-2000:]}"
    return json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&")), res.stderr


def test_run_report_opens_in_headless_chromium(tmp_path) -> None:
    run_dir = make_run_dir(tmp_path)
    index = write_run_report(run_dir)
    probe, stderr = _open(index, tmp_path)
    assert probe["errors"] == [], probe
    assert probe["bad"] == [], f"images not decoded: {probe['bad']}"
    # differential, decisions, throughput/latency, histograms, reliability + gallery
    assert probe["images"] >= 6, probe
    console = [ln for ln in stderr.splitlines() if ":CONSOLE" in ln]
    assert console == [], console
    shot = tmp_path / "shot.png"
    subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu",
                    "--no-first-run", f"--user-data-dir={tmp_path / 'chromium-profile'}",
                    "--window-size=1200,2400", f"--screenshot={shot}", index.as_uri()],
                   capture_output=True, timeout=120, check=False)
    import matplotlib.image as mpimg

    img = mpimg.imread(shot)
    assert img.shape[0] > 1000 and img.std() > 0.05  # a real page, not a blank one


def test_validation_report_opens_in_headless_chromium(tmp_path) -> None:

    run_dir = make_run_dir(tmp_path)

    recs = read_cell_log(run_dir / "cells.bin")
    res = evaluate_predictions(recs["p"], recs["label"], [DECISIONS[d] for d in recs["decision"]])
    index = write_validation_report(res, tmp_path / "val")
    probe, _ = _open(index, tmp_path)
    assert probe["errors"] == [] and probe["bad"] == [] and probe["images"] >= 1, probe
