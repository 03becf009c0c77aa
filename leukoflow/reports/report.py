"""Run and validation reports: a self-contained folder of HTML and PNG figures.

:func:`write_run_report` is called at the end of every ``leukoflow run`` and ``replay``. It
reads the run folder (``summary.json`` written by the collector, the cell log ``cells.bin``,
``supervisor.json`` written by the supervisor, ``explanations/`` written by the explainer)
and writes ``<run_dir>/report/index.html`` with figures beside it (relative links only, no
scripts, no network), showing

* the differential with 95 % intervals (and ground truth when known),
* decisions over time, throughput and end-to-end latency (p50/p99) over time,
* confidence and OOD-score histograms, the reliability diagram when labels exist,
* a gallery of flagged cells with their explanation images,
* what was lost: accounting by outcome and reason, restarts, sequence gaps, time gaps.
"""

from __future__ import annotations

import html
import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from leukoflow.acquisition.realtime import camera_summary
from leukoflow.core.stats import reliability_bins
from leukoflow.core.vocabulary import CLASS_NAMES, DECISIONS
from leukoflow.reports.drift_section import drift_section, is_valid, validity_banner
from leukoflow.reports.validate import evaluate_predictions
from leukoflow.run.collector import read_cell_log

DECISION_COLOURS = {"counted": "#2b8a3e", "uncertain": "#e67700", "ood": "#c92a2a"}
GALLERY_MAX = 24

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;
max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.6em}h2{font-size:1.25em;border-bottom:1px solid #ddd;padding-bottom:.2em;
margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;
text-align:right}th{background:#f4f4f4}td.l,th.l{text-align:left}
figure{display:inline-block;margin:.4em;vertical-align:top}figure img{max-width:520px;
border:1px solid #eee}figcaption{font-size:.85em;color:#555;max-width:520px}
.gallery figure img{max-width:200px}.bad{color:#c92a2a;font-weight:bold}
.ok{color:#2b8a3e;font-weight:bold}.small{font-size:.85em;color:#555}
"""


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    _plt().close(fig)
    return path.name


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e4 else f"{v:,.0f}"
    return html.escape(str(v))


def _table(rows: list[list[Any]], header: list[str] | None = None) -> str:
    out = ["<table>"]
    if header:
        out.append("<tr>" + "".join(f'<th class="{"l" if i == 0 else ""}">{html.escape(h)}</th>'
                                    for i, h in enumerate(header)) + "</tr>")
    for r in rows:
        out.append("<tr>" + "".join(f'<td class="{"l" if i == 0 else ""}">{_fmt(c)}</td>'
                                    for i, c in enumerate(r)) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _page(title: str, body: list[str]) -> str:
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n<body>\n"
            f"<h1>{html.escape(title)}</h1>\n" + "\n".join(body) + "\n</body></html>\n")


def _fig(src: str, caption: str) -> str:
    return (f'<figure><img src="{html.escape(src)}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


# ----------------------------------------------------------------------------- figures

def fig_differential(summary: Mapping[str, Any], path: Path) -> str:
    """Bar chart of the class fractions with 95 % intervals (and ground truth)."""
    plt = _plt()
    classes = summary["differential"]["classes"]
    est = (summary["differential"].get("estimate") or {}).get("classes") or classes
    names = list(classes)
    frac = np.array([100 * (est[n]["fraction"] or 0.0) for n in names])
    lo = np.array([100 * est[n]["lower"] for n in names])
    hi = np.array([100 * est[n]["upper"] for n in names])
    counted = np.array([100 * (classes[n]["fraction"] or 0.0) for n in names])
    fig, ax = plt.subplots(figsize=(6, 3.6))
    x = np.arange(len(names))
    ax.bar(x, frac, color="#4c6ef5", alpha=0.8, label="differential (prior-shift corrected)")
    # a bootstrap percentile interval need not contain the point estimate (few cells, an
    # estimate at 0 %): draw the part of the interval on each side, never a negative length
    yerr = [np.clip(frac - lo, 0.0, None), np.clip(hi - frac, 0.0, None)]
    ax.errorbar(x, frac, yerr=yerr, fmt="none", ecolor="k", capsize=5,
                label="95 % interval")
    ax.scatter(x, counted, marker="_", s=300, color="#495057", zorder=3,
               label="counted cells (argmax)")
    truth = summary.get("truth")
    if truth and truth.get("labelled"):
        tf = [100 * (truth["classes"][n]["fraction"] or 0.0) for n in names]
        ax.scatter(x, tf, marker="D", color="#e8590c", zorder=3, label="ground truth")
    ax.set_xticks(x, names)
    ax.set_ylabel("fraction of leukocytes [%]")
    ax.set_title(f"Differential ({summary['differential']['counted']} counted cells)")
    ax.legend(fontsize=8)
    return _save(fig, path)


def _bins(recs: np.ndarray, width_s: float) -> tuple[np.ndarray, np.ndarray]:
    t = (recs["t_recv_ns"] - recs["t_recv_ns"].min()) / 1e9
    n_bins = max(1, int(np.ceil((t.max() + 1e-9) / width_s)))
    return t, np.minimum((t / width_s).astype(int), n_bins - 1)


def fig_decisions_over_time(recs: np.ndarray, path: Path, width_s: float) -> str:
    """Stacked bar chart of decisions per time bin."""
    plt = _plt()
    _, b = _bins(recs, width_s)
    n_bins = int(b.max()) + 1
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    bottom = np.zeros(n_bins)
    centres = (np.arange(n_bins) + 0.5) * width_s
    for code, name in enumerate(DECISIONS):
        c = np.bincount(b[recs["decision"] == code], minlength=n_bins)
        ax.bar(centres, c, width=width_s * 0.95, bottom=bottom, color=DECISION_COLOURS[name],
               label=name)
        bottom += c
    ax.set_xlabel("time since first result [s]")
    ax.set_ylabel(f"cells per {width_s:g} s")
    ax.set_title("Decisions over time")
    ax.legend(fontsize=8)
    return _save(fig, path)


def fig_throughput_latency(recs: np.ndarray, path: Path, width_s: float) -> str:
    """Cells/s and end-to-end latency p50/p99 per time bin."""
    plt = _plt()
    _, b = _bins(recs, width_s)
    n_bins = int(b.max()) + 1
    centres = (np.arange(n_bins) + 0.5) * width_s
    rate = np.bincount(b, minlength=n_bins) / width_s
    lat = recs["latency_s"].astype(float)
    p50 = np.full(n_bins, np.nan)
    p99 = np.full(n_bins, np.nan)
    for i in range(n_bins):
        v = lat[(b == i) & np.isfinite(lat)]
        if v.size:
            p50[i], p99[i] = np.percentile(v, 50) * 1e3, np.percentile(v, 99) * 1e3
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(6.5, 4.6), sharex=True)
    a1.plot(centres, rate, "-o", ms=3, color="#1971c2")
    a1.set_ylabel("cells/s")
    a1.set_title("Throughput and end-to-end latency")
    a2.plot(centres, p50, "-o", ms=3, label="p50")
    a2.plot(centres, p99, "-o", ms=3, label="p99")
    a2.set_ylabel("latency [ms]")
    a2.set_xlabel("time since first result [s]")
    a2.legend(fontsize=8)
    return _save(fig, path)


def fig_histograms(recs: np.ndarray, path: Path) -> str:
    """Confidence and OOD-score histograms, split by decision."""
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 3.2))
    for code, name in enumerate(DECISIONS):
        m = recs["decision"] == code
        if m.any():
            a1.hist(recs["conf"][m], bins=np.linspace(0, 1, 41), alpha=0.6,
                    color=DECISION_COLOURS[name], label=name)
            a2.hist(recs["ood"][m], bins=40, alpha=0.6, color=DECISION_COLOURS[name],
                    label=name)
    a1.set_xlabel("confidence (max calibrated probability)")
    a1.set_ylabel("cells")
    a2.set_xlabel("OOD score")
    a1.legend(fontsize=8)
    a1.set_title("Confidence")
    a2.set_title("OOD score")
    return _save(fig, path)


def fig_reliability(rel: Mapping[str, Any], path: Path, title: str = "Reliability") -> str:
    """Reliability diagram from :func:`leukoflow.core.stats.reliability_bins` output."""
    plt = _plt()
    edges = np.asarray(rel["edges"])
    centres = (edges[:-1] + edges[1:]) / 2
    acc = np.array([np.nan if v is None else v for v in rel["accuracy"]], dtype=float)
    conf = np.array([np.nan if v is None else v for v in rel["confidence"]], dtype=float)
    count = np.asarray(rel["count"], dtype=float)
    fig, (ax, axc) = plt.subplots(2, 1, figsize=(4.8, 5.2), sharex=True,
                                  gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], "k:", lw=1, label="perfect calibration")
    w = edges[1] - edges[0]
    ax.bar(centres, np.nan_to_num(acc), width=w * 0.95, alpha=0.7, color="#4c6ef5",
           label="accuracy")
    ax.plot(conf, acc, "o", color="#e8590c", ms=3, label="mean confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend(fontsize=8)
    axc.bar(centres, count, width=w * 0.95, color="#868e96")
    axc.set_yscale("log" if count.max() > 0 else "linear")
    axc.set_xlabel("confidence")
    axc.set_ylabel("cells")
    return _save(fig, path)


# ----------------------------------------------------------------------------- run report

def _load_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _gallery(run_dir: Path, out: Path, recs: np.ndarray) -> list[str]:
    src = run_dir / "explanations"
    if not src.is_dir():
        return []
    pngs = sorted(src.glob("*.png"))[:GALLERY_MAX]
    if not pngs:
        return []
    gdir = out / "gallery"
    gdir.mkdir(exist_ok=True)
    by_id = {int(r["id"]): r for r in recs} if len(recs) else {}
    figs = []
    for p in pngs:
        shutil.copy2(p, gdir / p.name)
        meta = _load_json(p.with_suffix(".json"))
        cap = p.stem
        try:
            r = by_id.get(int(p.stem.split("_")[0]))
        except ValueError:
            r = None
        if meta:
            bits = [str(meta.get(k)) for k in ("decision", "pred_name", "pred", "reason")
                    if meta.get(k) is not None]
            cap += " · " + " · ".join(bits[:3])
        elif r is not None:
            cap += (f" · {DECISIONS[int(r['decision'])]}"
                    f" · conf {float(r['conf']):.2f}")
        figs.append(_fig(f"gallery/{p.name}", cap))
    return figs


def _time_gaps(recs: np.ndarray, min_gap_s: float = 1.0) -> list[tuple[float, float]]:
    if len(recs) < 2:
        return []
    t = np.sort((recs["t_recv_ns"] - recs["t_recv_ns"].min()) / 1e9)
    d = np.diff(t)
    idx = np.nonzero(d > min_gap_s)[0]
    return [(float(t[i]), float(d[i])) for i in idx]


def lost_section(summary: Mapping[str, Any], sup: Mapping[str, Any],
                 recs: np.ndarray) -> list[str]:
    """HTML of the "what was lost" section."""
    acc = summary.get("accounting", {})
    body = ["<h2>What was lost</h2>"]
    bal = acc.get("balanced")
    body.append(f"<p>Accounting: emitted {acc.get('emitted', 0)} = counted "
                f"{acc.get('counted', 0)} + uncertain {acc.get('uncertain', 0)} + OOD "
                f"{acc.get('ood', 0)} + rejected {acc.get('rejected_total', 0)} + dropped "
                f"{acc.get('dropped_total', 0)} + lost {acc.get('lost_total', 0)} — "
                + ('<span class="ok">balanced</span>' if bal
                   else '<span class="bad">NOT balanced</span>') + "</p>")
    if acc.get("lost_total"):
        body.append(f"<p class=\"bad\">{acc['lost_total']} cells never came back from the "
                    "pipeline (found by the per-source completeness check; stage and reason "
                    "below).</p>")
    rows = [["rejected", r, n] for r, n in acc.get("rejected", {}).items()]
    rows += [["dropped", r, n] for r, n in acc.get("dropped", {}).items()]
    rows += [["lost", r, n] for r, n in acc.get("lost", {}).items()]
    if acc.get("late"):
        rows.append(["late (counted)", "declared lost, then arrived", acc["late"]])
    rows += [["message rejected at collector", r, n]
             for r, n in acc.get("messages_rejected", {}).items()]
    if acc.get("duplicates"):
        rows.append(["duplicates (counted once)", "same cell id twice", acc["duplicates"]])
        body.append(f"<p class=\"bad\">{acc['duplicates']} results repeated a cell already "
                    "counted (the same cell sent twice); each cell was counted once.</p>")
    if summary.get("sequence_gaps"):
        rows.append(["sequence gaps", "messages missing by sequence number",
                     summary["sequence_gaps"]])
    body.append(_table(rows, ["outcome", "reason", "cells"]) if rows
                else "<p>No cell was rejected or dropped.</p>")
    body.extend(camera_section(camera_summary(summary.get("senders") or {})))
    restarts = dict(summary.get("restarts", {}))
    for child, n in (sup.get("restarts") or {}).items():
        restarts[child] = max(restarts.get(child, 0), n)
    events = sup.get("events", [])
    if restarts or events:
        body.append("<h3>Restarts</h3>")
        body.append(_table([[c, n] for c, n in restarts.items()], ["child", "restarts"]))
        ev_rows = [[e.get("t_s"), e.get("child"), e.get("event"), e.get("detail", "")]
                   for e in events if e.get("event") not in ("started",)]
        if ev_rows:
            body.append(_table(ev_rows[:50], ["t [s]", "child", "event", "detail"]))
    if summary.get("collector_restarts"):
        body.append(f"<p class=\"bad\">The collector was restarted "
                    f"{summary['collector_restarts']} time(s); cells it had received but not "
                    f"yet logged when it died are counted as lost (collector:restart) above.</p>")
    rec = summary.get("recording") or {}
    if rec:
        segs = rec.get("segments", [])
        body.append(f"<p>Recording: {rec.get('events', 0)} events in the last segment; "
                    f"segments: {', '.join(html.escape(Path(s).name) for s in segs)}; crops "
                    f"without result {rec.get('unmatched', 0)}, results without crop "
                    f"{rec.get('missing_crop', 0)}, evicted {rec.get('overflow', 0)}.</p>")
    gaps = _time_gaps(recs)
    if gaps:
        body.append("<p>Gaps of more than 1 s without results: "
                    + ", ".join(f"at {t:.1f} s for {d:.1f} s" for t, d in gaps[:20]) + "</p>")
    return body


def _camera_rate(cam: Mapping[str, Any] | None) -> str | None:
    if cam is None:
        return None
    if not cam.get("paced"):
        return "unpaced"
    steady = cam.get("steady_hz")
    return (f"{'–' if steady is None else f'{steady:.0f}'} / {cam.get('nominal_hz', 0):.0f}"
            f" ({cam.get('frames_dropped_total', 0)} frames dropped)")


def camera_section(cam: Mapping[str, Any] | None) -> list[str]:
    """HTML of "keeping up with the camera" (frames dropped before processing)."""
    if cam is None:
        return []
    body = ["<h3>Keeping up with the camera</h3>"]
    if not cam.get("paced"):
        body.append("<p>Unpaced run: frames were taken as fast as the acquisition processed "
                    f"them ({cam.get('frames_taken', 0)} frames; simulated time ran slower "
                    "than real time, nothing was dropped).</p>")
        return body
    nominal = cam.get("nominal_hz") or 0.0
    steady = cam.get("steady_hz")
    n_drop = cam.get("frames_dropped_total", 0)
    keep = steady is not None and steady >= 0.95 * nominal
    verdict = ('<span class="ok">kept up</span>' if keep and not n_drop else
               '<span class="bad">fell behind</span>' if not keep
               else '<span class="bad">dropped frames</span>')
    body.append(f"<p>Camera {nominal:.0f} frames/s; acquisition after the warm-up "
                f"{_fmt(steady)} frames/s — {verdict}. Frames captured "
                f"{cam.get('frames_captured', 0)}, taken {cam.get('frames_taken', 0)}, "
                f"dropped {n_drop} ({100 * cam.get('frames_dropped_fraction', 0.0):.2f} %; "
                f"{cam.get('frames_dropped_warmup', 0)} during the warm-up); about "
                f"{cam.get('cells_in_dropped_frames_estimate', 0.0):.0f} cells passed in "
                "dropped frames and are missing from the counts (the differential of the "
                "counted cells is not biased by it: frames are lost whatever they hold). "
                f"Largest backlog {cam.get('backlog_max', 0)} frames.</p>")
    rows = [[r, n] for r, n in (cam.get("frames_dropped") or {}).items()]
    if rows:
        body.append(_table(rows, ["reason frames were dropped", "frames"]))
    return body


def write_run_report(run_dir: str | Path, title: str | None = None) -> Path:
    """Write ``<run_dir>/report/index.html`` (and figures); return its path.

    Parameters
    ----------
    run_dir : path-like
        Run folder with ``summary.json`` and ``cells.bin`` (collector),
        optionally ``supervisor.json`` and ``explanations/``.
    title : str, optional
        Page title.
    """

    run_dir = Path(run_dir)
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    summary = _load_json(run_dir / "summary.json")
    sup = _load_json(run_dir / "supervisor.json")
    recs = read_cell_log(run_dir / "cells.bin")
    title = title or f"leukoflow run {summary.get('run', run_dir.name)}"
    body: list[str] = []
    acc = summary.get("accounting", {})
    thr = summary.get("throughput", {})
    lat = summary.get("latency", {})
    body.append("<h2>Summary</h2>")
    body.append(_table([
        ["cells emitted", acc.get("emitted")], ["counted", acc.get("counted")],
        ["uncertain", acc.get("uncertain")], ["OOD", acc.get("ood")],
        ["rejected", acc.get("rejected_total")], ["dropped", acc.get("dropped_total")],
        ["throughput [cells/s]", thr.get("mean_cells_per_s")],
        ["latency p50 [ms]", None if lat.get("run_p50_s") is None else lat["run_p50_s"] * 1e3],
        ["latency p99 [ms]", None if lat.get("run_p99_s") is None else lat["run_p99_s"] * 1e3],
        ["frames/s taken (after warm-up) / camera",
         _camera_rate(camera_summary(summary.get("senders") or {}))],
        ["duration [s]", sup.get("duration_s", thr.get("span_s"))],
    ], ["quantity", "value"]))
    figs: list[str] = []
    if summary.get("differential"):
        rows = []
        truth = summary.get("truth") or {}
        est = (summary["differential"].get("estimate") or {}).get("classes", {})
        for name, c in summary["differential"]["classes"].items():
            t = (truth.get("classes") or {}).get(name, {})
            e = est.get(name, {"fraction": None, "lower": 0.0, "upper": 1.0})
            rows.append([name, None if e["fraction"] is None else 100 * e["fraction"],
                         100 * e["lower"], 100 * e["upper"], c["count"],
                         None if c["fraction"] is None else 100 * c["fraction"],
                         c["probabilistic_count"],
                         None if t.get("fraction") is None else 100 * t["fraction"],
                         t.get("error_pp")])
        body.append("<h2>Differential</h2>")
        body.extend(validity_banner(summary))
        body.append("<p>Differential: the class fractions of all in-distribution cells "
                    "(counted and uncertain), estimated from the calibrated probabilities with "
                    "a prior-shift correction (EM, Saerens et al. 2002; the model was "
                    "trained on class-balanced data), with a bootstrap 95 % interval. The "
                    "argmax count of confidently classified cells is shown beside it.</p>")
        body.append(_table(rows, ["class", "differential %", "95 % low", "95 % high",
                                  "counted cells", "counted %", "probabilistic count",
                                  "truth %", "error [pp]"]))
        figs.append(_fig(fig_differential(summary, out / "differential.png"),
                         "Differential with 95 % intervals" + (
                             "" if is_valid(summary) else " — NOT VALID (see the banner)")))
    body.extend(drift_section(summary))
    if len(recs):
        span = (recs["t_recv_ns"].max() - recs["t_recv_ns"].min()) / 1e9
        width = max(0.5, float(np.ceil(span / 40.0 * 2) / 2)) if span > 0 else 1.0
        figs.append(_fig(fig_decisions_over_time(recs, out / "decisions_over_time.png", width),
                         "Decisions over time"))
        figs.append(_fig(fig_throughput_latency(recs, out / "throughput_latency.png", width),
                         "Throughput and end-to-end latency over time"))
        figs.append(_fig(fig_histograms(recs, out / "histograms.png"),
                         "Confidence and OOD-score histograms by decision"))
        lab = recs["label"]
        if (lab >= 0).any():
            rel = reliability_bins(recs["p"][lab >= 0].astype(float), lab[lab >= 0])
            figs.append(_fig(fig_reliability(rel, out / "reliability.png"),
                             "Reliability diagram (labelled in-distribution cells)"))
            val = evaluate_predictions(recs["p"], lab.astype(int),
                                       [DECISIONS[d]
                                        for d in recs["decision"]])
            body.append(_validation_tables(val))
    body.append("<h2>Figures</h2>")
    body.extend(figs or ["<p>No results were collected.</p>"])
    gallery = _gallery(run_dir, out, recs)
    body.append("<h2>Flagged cells and their explanations</h2>")
    body.append('<div class="gallery">' + "\n".join(gallery) + "</div>" if gallery
                else "<p>No explanations were written in this run.</p>")
    body.extend(lost_section(summary, sup, recs))
    params = summary.get("params") or sup.get("params")
    if params:
        body.append("<h2>Parameters</h2><pre class=\"small\">"
                    + html.escape(json.dumps(params, indent=1, default=str)[:20000]) + "</pre>")
    index = out / "index.html"
    index.write_text(_page(title, body), encoding="utf-8")
    return index


def _validation_tables(val: Mapping[str, Any]) -> str:
    parts = ["<h2>Agreement with ground truth</h2>"]
    cls = val["classification"]
    parts.append(f"<p>Arg-max accuracy on {val['labelled_in_distribution']} labelled "
                 f"in-distribution cells: {_fmt(cls['accuracy'])}; on counted cells: "
                 f"{_fmt(cls['counted']['accuracy'])} "
                 f"(coverage {_fmt(cls['counted']['coverage'])})."
                 f" ECE (15 bins): {_fmt(val.get('calibration', {}).get('ece'))}.</p>")
    names = val["classes"]
    parts.append(_table([[n, *row] for n, row in zip(names, cls["confusion_matrix"],
                                                     strict=True)],
                        ["true \\ predicted", *names]))
    parts.append(_table([[n, v["precision"], v["recall"], v["f1"], v["support"]]
                         for n, v in cls["per_class"].items()],
                        ["class", "precision", "recall", "F1", "support"]))
    dec = val["decisions"]
    parts.append(_table([[k, *v] for k, v in dec["rows"].items()],
                        ["true \\ decision", *dec["columns"]]))
    ood = val["ood"]
    parts.append(f"<p>OOD objects rejected: {_fmt(ood['rejection_rate'])}; in-distribution "
                 f"cells rejected as OOD: {_fmt(ood['false_rejection_rate'])}.</p>")
    if ood["per_kind"]:
        parts.append(_table([[k, v["n"], v["rejection_rate"]] for k, v in ood["per_kind"].items()],
                            ["OOD kind", "n", "rejection rate"]))
    return "\n".join(parts)


def write_validation_report(result: Mapping[str, Any], out: str | Path) -> Path:
    """Write a validation report (``index.html`` + figures) into folder ``out``."""
    out = Path(out)
    if out.suffix in (".html", ".htm"):
        folder, index = out.parent, out
    else:
        folder, index = out, out / "index.html"
    folder.mkdir(parents=True, exist_ok=True)
    body = [f"<p class=\"small\">File: {html.escape(str(result.get('file', '')))}</p>",
            _validation_tables(result)]
    diff = result["differential"]["classes"]
    body.append("<h2>Differential error</h2>")
    body.append(_table([[n, None if v["live"] is None else 100 * v["live"],
                         None if v["true"] is None else 100 * v["true"], v["error_pp"]]
                        for n, v in diff.items()], ["class", "live %", "true %", "error [pp]"]))
    cal = result.get("calibration")
    if cal:
        body.append("<h2>Calibration</h2>")
        body.append(_table([[k, cal[k]] for k in ("ece", "adaptive_ece", "mce", "nll", "brier")],
                           ["metric", "value"]))
        name = f"{index.stem}_reliability.png"
        body.append(_fig(fig_reliability(cal["reliability"], folder / name),
                         "Reliability diagram (15 equal-width bins)"))
    index.write_text(_page("leukoflow validation", body), encoding="utf-8")
    return index


__all__ = ["write_run_report", "write_validation_report", "CLASS_NAMES"]
