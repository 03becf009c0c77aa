"""The live differential on a simulated blood mix (short version of the 10,000-cell benchmark).

A few hundred simulated cells in the natural leukocyte mix plus OOD objects are replayed
through the real inference worker into the collector while recording. Checked: accounting
balances exactly, the ground-truth differential the collector reports equals the labels that
were sent, and the live counts equal the per-cell decisions written to the recording (no
cell counted twice or lost between counting and recording). The accuracy criterion (within
2 percentage points of ground truth on 10,000 cells) is measured by
``benchmarks/bench_e2e.py --accuracy 10000``; the error found here is printed.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import run_port_args
from test_run_e2e import _cli

from leukoflow.acquisition.sim.dataset import make_crop_dataset
from leukoflow.core.rtdc import write_crop_dataset
from leukoflow.core.vocabulary import CLASS_NAMES
from leukoflow.run.recorder import read_recording

MIX = {"neutrophil": 55, "eosinophil": 6, "monocyte": 12, "lymphocyte": 37}
OOD = ("erythrocyte", "debris", "defocus", "noise")


@pytest.mark.slow
def test_live_differential_on_a_simulated_blood_mix(tmp_path) -> None:

    xs, ys, ks = [], [], []
    for i, (cls, n) in enumerate(MIX.items()):
        d = make_crop_dataset(n, 0, seed=100 + i, classes=[cls], ood_kinds=[])
        xs.append(d["x"])
        ys.append(d["y"])
        ks += d["kind"]
    d = make_crop_dataset(0, 3, seed=99, classes=[], ood_kinds=list(OOD))
    xs.append(d["x"])
    ys.append(d["y"])
    ks += d["kind"]
    order = np.random.default_rng(0).permutation(sum(len(x) for x in xs))
    x, y = np.concatenate(xs)[order], np.concatenate(ys)[order]
    kinds = [ks[i] for i in order]
    data = tmp_path / "mix.rtdc"
    write_crop_dataset(data, x, y, kinds)
    rec = tmp_path / "mix-rec.rtdc"
    s = json.loads(_cli("replay", str(data), "--record", str(rec), "--out",
                        str(tmp_path / "run"), "--json", *run_port_args()).stdout)
    acc = s["accounting"]
    n = len(y)
    assert acc["emitted"] == n and acc["balanced"] and acc["dropped_total"] == 0
    assert acc["counted"] + acc["uncertain"] + acc["ood"] == n
    truth = s["truth"]
    assert truth["labelled"] == sum(MIX.values()) and truth["ood_objects"] == 3 * len(OOD)
    for cls, k in MIX.items():
        assert truth["classes"][cls]["count"] == k
    r = read_recording(rec)
    counted = np.array(r["decision"]) == "counted"
    for i, cls in enumerate(CLASS_NAMES):
        assert s["counts"][cls] == int((r["pred"][counted] == i).sum())
    errors = {c: v["error_pp"] for c, v in truth["classes"].items()}
    print(f"live differential error vs ground truth on {n} cells [pp]: {errors}")
