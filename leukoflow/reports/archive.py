"""Validation of many recordings on a Dask cluster: one task per recording, one pooled report.

``leukoflow validate A.rtdc B.rtdc 'runs/*/run.rtdc' --scheduler ...`` and
``leukoflow replay --fast ...`` hand each recording to a Dask worker as one task:

* ``validate`` (:func:`validate_task`): the recorded predictions against the labels
  (:func:`leukoflow.reports.validate.validate_recording`);
* ``replay --fast`` (:func:`leukoflow.run.replay.fast_replay`): the model runs again on the
  recorded crops (local backend, no ZeroMQ pipeline), its decisions are compared with the
  recorded ones cell by cell and validated against the labels.

Every task returns plain JSON data: the per-recording result plus the sums that pool exactly
(confusion matrices, decision table, true and estimated class counts, reliability-bin sums,
OOD counts). :func:`pool` adds them up into the pooled confusion matrix, accuracy (Wilson 95 %
interval), ECE (15 equal-width bins), OOD rejection rates and the pooled differential error per
class with a 95 % interval from a bootstrap over recordings (recordings, not cells, are the
independent units of an archive). A task that fails is a row with its error, never a silent
gap. The scheduler is Dask's: ``None``/``"local"`` starts a local cluster sized to the
machine (one single-threaded worker process per core, at most one per recording, bound to
loopback); ``tcp://host:8786`` or ``tls://...`` uses a running cluster, whose workers must have
leukoflow installed and see the recording paths (shared filesystem).
"""

from __future__ import annotations

import glob
import html
import math
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from leukoflow.core.stats import (
    N_BINS,
    bin_sums,
    ece_from_sums,
    reliability_from_sums,
    wilson_interval,
)
from leukoflow.core.vocabulary import CLASS_NAMES
from leukoflow.reports.report import _fig, _page, _plt, _save, _table, fig_reliability
from leukoflow.reports.validate import evaluate_predictions, validate_recording
from leukoflow.run.recorder import read_recording
from leukoflow.run.replay import fast_replay

MODES = ("validate", "fast-replay")


def expand_recordings(items: Sequence[str | Path]) -> list[Path]:
    """Paths and glob patterns -> sorted unique existing files.

    Raises
    ------
    FileNotFoundError
        A plain path that does not exist, or a pattern that matches nothing.
    """
    out: list[Path] = []
    for item in items:
        s = str(item)
        if any(c in s for c in "*?["):
            hits = sorted(glob.glob(s, recursive=True))
            if not hits:
                raise FileNotFoundError(f"no recording matches {s!r}")
            out.extend(Path(h) for h in hits)
        else:
            p = Path(s)
            if not p.is_file():
                raise FileNotFoundError(f"recording not found: {p}")
            out.append(p)
    seen: dict[str, Path] = {}
    for p in out:
        seen.setdefault(str(p.resolve()), p.resolve())
    if not seen:
        raise FileNotFoundError("no recordings given")
    return [seen[k] for k in sorted(seen)]


@contextmanager
def dask_client(scheduler: str | None = None, n_tasks: int | None = None,
                n_workers: int | None = None) -> Iterator[Any]:
    """A ``distributed.Client``: a local cluster (default) or a running scheduler.

    Parameters
    ----------
    scheduler : str, optional
        ``None``/``"local"``: start a ``LocalCluster`` here; ``tcp://``/``tls://`` address:
        connect to a running cluster.
    n_tasks : int, optional
        Recordings to process (no more local workers than tasks).
    n_workers : int, optional
        Local workers (default: the machine's cores).
    """
    from distributed import Client, LocalCluster

    if scheduler in (None, "", "local"):
        n = n_workers or os.cpu_count() or 1
        if n_tasks:
            n = max(1, min(n, n_tasks))
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                               host="127.0.0.1", dashboard_address=None,
                               env={"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
                                    "MKL_NUM_THREADS": "1"})
        client = Client(cluster)
        try:
            yield client
        finally:
            client.close()
            cluster.close()
        return
    if not str(scheduler).startswith(("tcp://", "tls://")):
        raise ValueError(f"scheduler must be 'local' or a tcp:// / tls:// address, "
                         f"got {scheduler!r}")
    client = Client(scheduler, timeout="30s")
    try:
        yield client
    finally:
        client.close()


# ----------------------------------------------------------------------------- per task
def pool_sums(probs: np.ndarray, labels: np.ndarray, decisions: Sequence[str],
              estimate: Sequence[float | None], classes: Sequence[str] = CLASS_NAMES
              ) -> dict[str, Any]:
    """The additive summaries of one recording that :func:`pool` adds up.

    Parameters
    ----------
    probs : ndarray (N, K)
        Calibrated probabilities.
    labels : ndarray (N,)
        Class index, -1 for OOD objects, < -1 unknown.
    decisions : sequence of str
        ``counted`` / ``uncertain`` / ``ood`` per cell.
    estimate : sequence of float
        The recording's reported differential (fraction per class over the cells not
        decided OOD).
    """
    probs = np.asarray(probs, np.float64)
    labels = np.asarray(labels, np.int64)
    dec = np.asarray(list(decisions))
    k = len(classes)
    pred = probs.argmax(1)
    idd = labels >= 0
    cm = np.zeros((k, k), np.int64)
    np.add.at(cm, (labels[idd], pred[idd]), 1)
    cnt = idd & (dec == "counted")
    cm_c = np.zeros((k, k), np.int64)
    np.add.at(cm_c, (labels[cnt], pred[cnt]), 1)
    counted = dec == "counted"
    conf = probs[idd].max(1) if idd.any() else np.zeros(0)
    bc, bconf, bcorr = bin_sums(conf, pred[idd] == labels[idd], np.linspace(0.0, 1.0, N_BINS + 1))
    in_dist = int((dec != "ood").sum())
    est = [None if e is None or not math.isfinite(e) else float(e) * in_dist for e in estimate]
    ood_obj = labels == -1
    return {
        "confusion": cm.tolist(), "confusion_counted": cm_c.tolist(),
        "true_counts": np.bincount(labels[idd], minlength=k).tolist(),
        "counted_per_class": np.bincount(pred[counted], minlength=k).tolist(),
        "not_ood": in_dist, "estimated_counts": est,
        "bins_count": bc.astype(int).tolist(), "bins_conf": bconf.tolist(),
        "bins_correct": bcorr.tolist(),
        "ood_objects": int(ood_obj.sum()), "ood_rejected": int((dec[ood_obj] == "ood").sum()),
        "id_cells": int(idd.sum()), "id_rejected": int((dec[idd] == "ood").sum()),
    }


def validate_task(path: str) -> dict[str, Any]:
    """Dask task: validate one recording's recorded predictions (JSON-able result)."""
    t0 = time.perf_counter()
    res = validate_recording(path)
    rec = read_recording(path)
    est = [v["estimate"] for v in res["differential"]["classes"].values()]
    res["sums"] = pool_sums(rec["probs"], rec["label"], rec["decision"], est, rec["classes"])
    res["seconds"] = time.perf_counter() - t0
    res["worker_pid"] = os.getpid()
    return res


def _run_task(mode: str, path: str, model: str | None, backend: str) -> dict[str, Any]:
    """Run one task and turn any failure into an error row (never lost silently)."""
    try:
        if mode == "validate":
            return {"file": path, "status": "ok", **validate_task(path)}
        return {"file": path, "status": "ok", **fast_replay_task(path, model, backend)}
    except Exception as exc:  # one bad recording must not sink the archive
        return {"file": path, "status": "error", "error": f"{type(exc).__name__}: {exc}"}


def fast_replay_task(path: str, model: str | None, backend: str) -> dict[str, Any]:
    """Dask task: run the model again on one recording's crops (:func:`fast_replay`),
    compare with the recorded decisions and validate the new ones against the labels."""
    t0 = time.perf_counter()
    r = fast_replay(path, model=model, backend=backend)
    classes = r["classes"]
    res: dict[str, Any] = {"model": r["model"], "backend": r["backend"], "n": r["n"],
                           "comparison": r["comparison"], "classes": classes}
    if (np.asarray(r["label"]) >= -1).any():
        res.update(evaluate_predictions(r["probs"], r["label"], r["decision"], r["kind"],
                                        classes))
        est = [v["estimate"] for v in res["differential"]["classes"].values()]
        res["sums"] = pool_sums(r["probs"], r["label"], r["decision"], est, classes)
    res["n"] = r["n"]
    res["seconds"] = time.perf_counter() - t0
    res["worker_pid"] = os.getpid()
    return res


# ----------------------------------------------------------------------------- pooling
def wilson(k: int, n: int) -> tuple[float | None, float | None]:
    """95 % Wilson interval of ``k / n`` (:func:`leukoflow.core.stats.wilson_interval`);
    ``(None, None)`` without data."""
    return wilson_interval(k, n) if n > 0 else (None, None)


def _pooled_diff(sums: list[dict[str, Any]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Pooled estimated and true class fractions of a list of recordings' sums."""
    est = np.zeros(k)
    m = 0
    for s in sums:
        if all(e is not None for e in s["estimated_counts"]):
            est += np.asarray(s["estimated_counts"], np.float64)
            m += s["not_ood"]
    true = np.sum([s["true_counts"] for s in sums], axis=0).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return est / m if m else np.full(k, np.nan), true / true.sum()


def pool(rows: list[dict[str, Any]], classes: Sequence[str] = CLASS_NAMES, n_boot: int = 2000,
         seed: int = 0) -> dict[str, Any]:
    """Pooled validation over the successful recordings of ``rows`` (see module docstring).

    Returns
    -------
    dict
        ``recordings`` (pooled), ``classification`` (pooled confusion matrices, accuracy with
        its Wilson interval), ``differential`` (per class: pooled estimate, counted fraction,
        truth, error [pp] with a recording-bootstrap 95 % interval), ``calibration`` (ECE and
        reliability bins), ``ood`` (rejection rates).
    """
    ok = [r for r in rows if r.get("status") == "ok" and "sums" in r]
    k = len(classes)
    if not ok:
        return {"recordings": 0}
    sums = [r["sums"] for r in ok]
    cm = np.sum([s["confusion"] for s in sums], axis=0)
    cm_c = np.sum([s["confusion_counted"] for s in sums], axis=0)
    n_id, hit = int(cm.sum()), int(np.trace(cm))
    n_c, hit_c = int(cm_c.sum()), int(np.trace(cm_c))
    lo, hi = wilson(hit, n_id)
    lo_c, hi_c = wilson(hit_c, n_c)
    est, true = _pooled_diff(sums, k)
    counted = np.sum([s["counted_per_class"] for s in sums], axis=0).astype(np.float64)
    live = counted / counted.sum() if counted.sum() else np.full(k, np.nan)
    # bootstrap over recordings: the spread of the pooled error if the archive were drawn again
    rng = np.random.default_rng(seed)
    boot = np.empty((n_boot, k))
    for i in range(n_boot):
        pick = rng.integers(0, len(sums), len(sums))
        e, t = _pooled_diff([sums[j] for j in pick], k)
        boot[i] = 100.0 * (e - t)
    with np.errstate(invalid="ignore"):
        q = np.nanpercentile(boot, [2.5, 97.5], axis=0) if len(sums) > 1 else np.full(
            (2, k), np.nan)
    diff = {}
    for i, name in enumerate(classes):
        err = 100.0 * (est[i] - true[i])
        diff[name] = {
            "estimate": _f(est[i]), "live": _f(live[i]), "true": _f(true[i]),
            "error_pp": _f(err), "counted_error_pp": _f(100.0 * (live[i] - true[i])),
            "error_pp_ci95": [_f(q[0, i]), _f(q[1, i])]}
    bc = np.sum([s["bins_count"] for s in sums], axis=0).astype(np.float64)
    bconf = np.sum([s["bins_conf"] for s in sums], axis=0)
    bcorr = np.sum([s["bins_correct"] for s in sums], axis=0)
    ece = _f(ece_from_sums(bc, bconf, bcorr))
    n_ood = sum(s["ood_objects"] for s in sums)
    n_rej = sum(s["ood_rejected"] for s in sums)
    return {
        "recordings": len(ok), "cells_labelled_in_distribution": n_id,
        "classification": {
            "accuracy": hit / n_id if n_id else None, "accuracy_ci95": [lo, hi],
            "confusion_matrix": cm.tolist(),
            "confusion_axes": "rows = true class, columns = predicted class",
            "counted": {"accuracy": hit_c / n_c if n_c else None, "accuracy_ci95": [lo_c, hi_c],
                        "coverage": n_c / n_id if n_id else None,
                        "confusion_matrix": cm_c.tolist()},
        },
        "differential": {
            "classes": diff, "interval": "95 % bootstrap over recordings "
                                         f"({n_boot} resamples, seed {seed})",
            "max_abs_error_pp": max((abs(v["error_pp"]) for v in diff.values()
                                     if v["error_pp"] is not None), default=None)},
        "calibration": {"ece": ece, "n_bins": N_BINS, "reliability": reliability_from_sums(
            np.linspace(0.0, 1.0, N_BINS + 1), bc, bconf, bcorr)},
        "ood": {"objects": n_ood, "rejection_rate": n_rej / n_ood if n_ood else None,
                "rejection_ci95": list(wilson(n_rej, n_ood)),
                "false_rejection_rate": (sum(s["id_rejected"] for s in sums)
                                         / max(1, sum(s["id_cells"] for s in sums)))},
    }


def _f(v: Any) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


def recording_row(r: dict[str, Any]) -> dict[str, Any]:
    """One line of the per-recording table."""
    if r.get("status") != "ok":
        return {"file": r["file"], "status": "error", "error": r.get("error", "")}
    cls = r.get("classification", {})
    diff = r.get("differential", {})
    row = {"file": r["file"], "status": "ok", "model": r.get("model"),
           "cells": r.get("n"), "labelled": r.get("labelled_in_distribution"),
           "accuracy": cls.get("accuracy"),
           "counted_accuracy": cls.get("counted", {}).get("accuracy"),
           "coverage": cls.get("counted", {}).get("coverage"),
           "max_abs_error_pp": diff.get("max_abs_error_pp"),
           "ece": r.get("calibration", {}).get("ece"),
           "ood_rejection": r.get("ood", {}).get("rejection_rate"),
           "seconds": r.get("seconds")}
    if "comparison" in r:
        c = r["comparison"]
        row["identical_decisions"] = c.get("identical")
        row["compared"] = c.get("compared")
    return row


def validate_archive(recordings: Sequence[str | Path], scheduler: str | None = None,
                     mode: str = "validate", model: str | None = None,
                     backend: str = "onnxruntime", n_workers: int | None = None,
                     n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Validate (or fast-replay) many recordings on Dask and pool the results.

    Parameters
    ----------
    recordings : sequence of str or Path
        Files and glob patterns (:func:`expand_recordings`).
    scheduler : str, optional
        See :func:`dask_client`.
    mode : {"validate", "fast-replay"}
        Recorded predictions, or the model run again on the recorded crops.
    model : str, optional
        Artifact for ``fast-replay`` (default: the one named in each recording).
    backend : str
        Local inference backend of ``fast-replay``.
    n_workers : int, optional
        Workers of a local cluster.

    Returns
    -------
    dict
        ``recordings`` (per-recording rows), ``pooled`` (:func:`pool`), ``results`` (full
        per-recording results), ``failed``, ``cluster`` (scheduler and workers used).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    paths = [str(p) for p in expand_recordings(recordings)]
    t0 = time.perf_counter()
    with dask_client(scheduler, n_tasks=len(paths), n_workers=n_workers) as client:
        workers = len(client.scheduler_info().get("workers", {}))
        futures = client.map(_run_task, [mode] * len(paths), paths, [model] * len(paths),
                             [backend] * len(paths), pure=False)
        results = client.gather(futures)
        address = client.scheduler.address
    classes = next((r.get("classes") for r in results if r.get("status") == "ok"
                    and r.get("classes")), list(CLASS_NAMES))
    return {
        "mode": mode, "recordings": [recording_row(r) for r in results],
        "pooled": pool(results, classes, n_boot=n_boot, seed=seed),
        "failed": sum(r.get("status") != "ok" for r in results),
        "results": results, "classes": list(classes),
        "cluster": {"scheduler": scheduler or "local", "address": address, "workers": workers,
                    "tasks": len(paths), "seconds": time.perf_counter() - t0},
    }


# ----------------------------------------------------------------------------- report
def fig_errors(result: dict[str, Any], path: Path) -> str:
    """Differential error per class [pp]: each recording (dots) and the pooled error with
    its 95 % bootstrap interval (bar)."""
    plt = _plt()
    classes = result["classes"]
    pooled = result["pooled"].get("differential", {}).get("classes", {})
    fig, ax = plt.subplots(figsize=(6.0, 3.4))
    for i, name in enumerate(classes):
        errs = [r["differential"]["classes"][name]["error_pp"] for r in result["results"]
                if r.get("status") == "ok" and "differential" in r]
        errs = [e for e in errs if e is not None]
        ax.plot(np.full(len(errs), i) + np.linspace(-0.15, 0.15, max(1, len(errs)))[:len(errs)],
                errs, "o", ms=4, color="#868e96", label="recording" if i == 0 else None)
        v = pooled.get(name, {})
        if v.get("error_pp") is not None:
            lo, hi = v["error_pp_ci95"]
            yerr = None if lo is None else [[v["error_pp"] - lo], [hi - v["error_pp"]]]
            ax.errorbar([i + 0.3], [v["error_pp"]], yerr=yerr, fmt="s", color="#4c6ef5",
                        capsize=4, label="pooled (95 % CI)" if i == 0 else None)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(range(len(classes)), classes)
    ax.set_ylabel("estimate - truth [pp]")
    ax.legend(fontsize=8)
    return _save(fig, path)


def write_archive_report(result: dict[str, Any], out: str | Path) -> Path:
    """Write the pooled validation report (``index.html`` + figures) into folder ``out``
    (or the ``.html`` file named)."""
    out = Path(out)
    folder, index = (out.parent, out) if out.suffix in (".html", ".htm") else (
        out, out / "index.html")
    folder.mkdir(parents=True, exist_ok=True)
    pooled = result["pooled"]
    cl = result["cluster"]
    body = [f'<p class="small">{len(result["recordings"])} recordings ({result["failed"]} '
            f'failed), mode {html.escape(result["mode"])}, Dask scheduler '
            f'{html.escape(str(cl["scheduler"]))} ({cl["workers"]} workers, '
            f'{cl["seconds"]:.1f} s).</p>']
    body.append("<h2>Recordings</h2>")
    cols = ["file", "status", "cells", "labelled", "accuracy", "counted_accuracy", "coverage",
            "max_abs_error_pp", "ece", "ood_rejection"]
    if result["mode"] == "fast-replay":
        cols += ["identical_decisions", "compared"]
    body.append(_table([[Path(r["file"]).name if c == "file" else
                         (r.get("error") or "error" if c == "status" and r["status"] != "ok"
                          else r.get(c)) for c in cols] for r in result["recordings"]], cols))
    if pooled.get("recordings"):
        cls = pooled["classification"]
        names = result["classes"]
        lo, hi = cls["accuracy_ci95"]
        body.append("<h2>Pooled</h2>")
        body.append(f"<p>{pooled['cells_labelled_in_distribution']} labelled in-distribution "
                    f"cells from {pooled['recordings']} recordings: accuracy "
                    f"{cls['accuracy']:.4f} (95 % CI {lo:.4f}-{hi:.4f}); counted cells "
                    f"{cls['counted']['accuracy']}; ECE {pooled['calibration']['ece']}; OOD "
                    f"rejection {pooled['ood']['rejection_rate']}.</p>")
        body.append(_table([[n, *row] for n, row in zip(names, cls["confusion_matrix"],
                                                        strict=True)],
                           ["true \\ predicted", *names]))
        diff = pooled["differential"]
        body.append("<h2>Pooled differential error</h2>")
        body.append(_table([[n, None if v["estimate"] is None else 100 * v["estimate"],
                             None if v["true"] is None else 100 * v["true"], v["error_pp"],
                             v["error_pp_ci95"][0], v["error_pp_ci95"][1]]
                            for n, v in diff["classes"].items()],
                           ["class", "estimate %", "true %", "error [pp]", "CI low", "CI high"]))
        body.append(f'<p class="small">Interval: {html.escape(diff["interval"])}.</p>')
        body.append(_fig(fig_errors(result, folder / f"{index.stem}_errors.png"),
                         "Differential error per recording and pooled"))
        body.append(_fig(fig_reliability(pooled["calibration"]["reliability"],
                                         folder / f"{index.stem}_reliability.png",
                                         "Pooled reliability"),
                         "Pooled reliability diagram (15 equal-width bins)"))
    index.write_text(_page("leukoflow archive validation", body), encoding="utf-8")
    return index
