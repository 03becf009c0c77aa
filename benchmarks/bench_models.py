"""Model benchmarks (CPU): training run, inference ceilings, cost of MC sampling options.

``python benchmarks/bench_models.py [--quick] [--json]``

1. ``train``: reruns the documented ``leukoflow train`` command of the shipped lenet5-sim
   (``--quick``: the reduced-budget command) and reports its wall time and the test accuracy
   next to the card's value (acceptance: within 1 point).
2. ``inference``: cells/s of ONNX Runtime vs PyTorch eager on one CPU thread at several
   batch sizes for the shipped LeNet5 (and AlexNet), with the ratio ORT / PyTorch.
3. ``vi_cost``: time per batch of 256 cells for the options of a variational model with
   S = 20 samples: the deterministic network, the Bayesian head (trunk once, head samples
   batched: ``LeNet5VI``), MC dropout looped S times, and MC dropout / Flipout-style full
   network sampling batched (input repeated S times). This is the measurement behind the
   choice of the Bayesian head.
4. ``descriptors``: cells/s of the network with the physical phase descriptors vs without
   (ONNX Runtime and PyTorch), and host-side ``combined`` vs ``mahalanobis`` OOD scoring.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from leukoflow.core.physics import CROP_SIZE_PX
from leukoflow.models.artifact import load_artifact
from leukoflow.models.export import export_onnx, onnx_session
from leukoflow.models.make_artifacts import COMMANDS, REDUCED, run_train
from leukoflow.models.ood import DETECTORS

os.environ.setdefault("OMP_NUM_THREADS", "1")


def _rate(fn, n_cells: int, min_time: float = 0.5, max_iter: int = 200) -> float:
    """Cells per second of ``fn`` (one warm-up call, then repeat for ``min_time`` s)."""
    fn()
    t0 = time.perf_counter()
    it = 0
    while True:
        fn()
        it += 1
        dt = time.perf_counter() - t0
        if dt >= min_time or it >= max_iter:
            return n_cells * it / dt


def bench_train(quick: bool) -> dict:
    """Rerun the lenet5-sim training command (or its reduced version); time + accuracy."""

    card = load_artifact("lenet5-sim").card
    with tempfile.TemporaryDirectory() as tmp:
        if quick:
            args = [*REDUCED, "--out", str(Path(tmp) / "m")]
            ref = card["reproduction"]["test_accuracy"]
        else:
            args = [a if not a.startswith("models/artifacts/") else str(Path(tmp) / "m")
                    for a in COMMANDS["lenet5-sim"]]
            ref = card["metrics"]["classification"]["accuracy"]["value"]
        got, dt = run_train(args)
    acc = got["metrics"]["classification"]["accuracy"]["value"]
    return {"command": "leukoflow train " + " ".join(args), "seconds": dt,
            "test_accuracy": acc, "card_accuracy": ref, "abs_diff": abs(acc - ref),
            "within_1_point": abs(acc - ref) <= 0.01,
            "epochs_run": got["training"]["history"]["epochs_run"],
            "train_seconds": got["training"]["history"]["seconds"]}


def bench_inference(quick: bool) -> dict:
    """ONNX Runtime vs PyTorch CPU (1 thread) cells/s per batch size."""
    import numpy as np
    import torch


    torch.set_num_threads(1)
    out: dict = {}
    names = ["lenet5-sim"] if quick else ["lenet5-sim", "alexnet-sim"]
    sizes = (1, 64) if quick else (1, 16, 64, 256, 1024)
    for name in names:
        art = load_artifact(name)
        model = art.build_model()
        with tempfile.TemporaryDirectory() as tmp:
            p = export_onnx(model, Path(tmp) / "m.onnx", art.input_size)
            sess = onnx_session(p, threads=1)
            rows = {}
            for bs in sizes:
                x = np.random.default_rng(0).standard_normal(
                    (bs, 1, art.input_size, art.input_size)).astype(np.float32)
                xt = torch.from_numpy(x)

                def run_torch(xt=xt, m=model):
                    with torch.inference_mode():
                        m.forward_with_features(xt)

                def run_ort(x=x, s=sess):
                    s.run(None, {"crops": x})

                t = _rate(run_torch, bs, 0.05 if quick else 1.0)
                o = _rate(run_ort, bs, 0.05 if quick else 1.0)
                rows[bs] = {"pytorch_cells_s": t, "onnxruntime_cells_s": o,
                            "ratio_ort_torch": o / t}
        out[name] = rows
    return out


def bench_vi_cost(quick: bool) -> dict:
    """Seconds per batch of 256 cells for the variational options (S = 20)."""
    import torch
    from torch import nn

    from leukoflow.models.architectures import LeNet5, LeNet5VI

    torch.set_num_threads(1)
    s, n = (20, 16) if quick else (20, 256)
    torch.manual_seed(0)
    x = torch.randn(n, 1, CROP_SIZE_PX, CROP_SIZE_PX)
    det = LeNet5().eval()
    vi = LeNet5VI(n_samples=s).eval()
    mcd = LeNet5().eval()
    mcd.head = nn.Sequential(nn.Dropout(0.2), *mcd.head[:2], nn.Dropout(0.2), *mcd.head[2:])
    for m in mcd.modules():
        if isinstance(m, nn.Dropout):
            m.train()  # only dropout in train mode (MC dropout)

    def t(fn):
        return n / _rate(fn, n, 0.02 if quick else 1.0, 2 if quick else 50)

    with torch.inference_mode():
        res = {
            "deterministic_lenet5": t(lambda: det(x)),
            "bayes_head_batched": t(lambda: vi(x)),
            "mc_dropout_looped": t(lambda: [mcd(x) for _ in range(s)]),
            "full_network_sampling_batched": t(lambda: mcd(x.repeat(s, 1, 1, 1))),
        }
        # samples differ within one batched forward
        spread = float(vi.mc_logits(x[:8]).std(0).mean())
    base = res["deterministic_lenet5"]
    return {"n_cells": n, "n_samples": s, "seconds_per_batch": res,
            "ratio_to_deterministic": {k: v / base for k, v in res.items()},
            "bayes_head_logit_std_across_samples_untrained": spread}


def bench_descriptors(quick: bool) -> dict:
    """Cost of the phase descriptors and the ``combined`` OOD score (lenet5-sim, 1 thread).

    Network with descriptors vs without (ONNX Runtime and PyTorch, batch 256), and host-side
    scoring of ``combined`` vs ``mahalanobis`` (the previous default detector).
    """
    import numpy as np
    import torch


    torch.set_num_threads(1)
    art = load_artifact("lenet5-sim")
    bs = 64 if quick else 256
    x = art.preprocess(np.random.default_rng(0).normal(
        art.normalisation["mean"], art.normalisation["std"],
        (bs, art.input_size, art.input_size)).astype(np.float32))
    out: dict = {"batch": bs}
    with tempfile.TemporaryDirectory() as tmp:
        for label, desc in (("with_descriptors", True), ("without", False)):
            m = art.build_model()
            if not desc:
                m.attach_descriptors(None)
            sess = onnx_session(export_onnx(m, Path(tmp) / f"{label}.onnx", art.input_size),
                                threads=1)
            xt = torch.from_numpy(x)

            def run_torch(xt=xt, m=m):
                with torch.inference_mode():
                    m.forward_with_features(xt)

            out[label] = {
                "onnxruntime_cells_s": _rate(lambda s=sess: s.run(None, {"crops": x}), bs,
                                             0.05 if quick else 1.0),
                "pytorch_cells_s": _rate(run_torch, bs, 0.05 if quick else 1.0)}
    for k in ("onnxruntime_cells_s", "pytorch_cells_s"):
        out[f"ratio_{k}"] = out["with_descriptors"][k] / out["without"][k]
    m = art.build_model()
    with torch.inference_mode():
        z, f = (t.numpy().astype(np.float64) for t in m.forward_with_features(torch.from_numpy(x)))
    rng = np.random.default_rng(1)
    ztr = np.repeat(z, 8, 0) + rng.normal(0, 0.1, (8 * bs, z.shape[1]))
    ftr = np.repeat(f, 8, 0) + rng.normal(0, 0.1, (8 * bs, f.shape[1]))
    ytr = ztr.argmax(1)
    for name in ("mahalanobis", "combined"):
        det = DETECTORS.create(name).fit(ztr, ftr, ytr, model=m)
        out[f"{name}_score_cells_s"] = _rate(lambda d=det: d.score(z, f), bs,
                                             0.05 if quick else 1.0)
    out["ratio_combined_mahalanobis_score"] = (out["combined_score_cells_s"]
                                               / out["mahalanobis_score_cells_s"])
    return out


def run(quick: bool = False) -> dict:
    """Run all model benchmarks; ``quick`` uses small sizes and the reduced training run."""
    return {"quick": quick, "threads": 1, "vi_cost": bench_vi_cost(quick),
            "inference": bench_inference(quick), "descriptors": bench_descriptors(quick),
            "train": bench_train(quick)}


def _print(res: dict) -> None:
    tr = res["train"]
    print(f"train: {tr['seconds']:.0f} s, test accuracy {100 * tr['test_accuracy']:.2f} % vs "
          f"card {100 * tr['card_accuracy']:.2f} % (|diff| {100 * tr['abs_diff']:.2f} points)")
    for name, rows in res["inference"].items():
        for bs, r in rows.items():
            print(f"{name} batch {bs:5d}: PyTorch {r['pytorch_cells_s']:9.0f} cells/s, ORT "
                  f"{r['onnxruntime_cells_s']:9.0f} cells/s, ratio {r['ratio_ort_torch']:.2f}")
    d = res["descriptors"]
    for k in ("onnxruntime_cells_s", "pytorch_cells_s"):
        print(f"descriptors {k[:-8]:12s}: with {d['with_descriptors'][k]:9.0f} cells/s, "
              f"without {d['without'][k]:9.0f}, ratio {d['ratio_' + k]:.2f}")
    print(f"host OOD score: combined {d['combined_score_cells_s']:9.0f} cells/s, mahalanobis "
          f"{d['mahalanobis_score_cells_s']:9.0f}, "
          f"ratio {d['ratio_combined_mahalanobis_score']:.2f}")
    v = res["vi_cost"]
    for k, sec in v["seconds_per_batch"].items():
        print(f"vi {k:32s} {1e3 * sec:8.1f} ms / {v['n_cells']} cells "
              f"(x{v['ratio_to_deterministic'][k]:.1f})")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    r = run(a.quick)
    print(json.dumps(r, indent=2, default=str)) if a.json else _print(r)
