"""Model artifacts: save/load round trip, shipped artifacts, clear errors when broken."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from leukoflow.models.architectures import build_model
from leukoflow.models.artifact import (
    ArtifactError,
    list_artifacts,
    load_artifact,
    read_card,
    save_artifact,
)
from leukoflow.models.ood import DETECTORS


def _card(**over):
    card = {"architecture": "lenet5", "arch_kwargs": {}, "input_size": 64, "pixel_size_um": 0.34,
            "normalisation": {"mean": 0.3, "std": 0.8}, "temperature": 1.4,
            "class_names": ["neutrophil", "eosinophil", "monocyte", "lymphocyte"],
            "confidence_threshold": 0.8,
            "ood": None, "metrics": {"accuracy": {"value": 0.9, "ci95": [0.88, 0.92]}}}
    card.update(over)
    return card


@pytest.fixture()
def saved(tmp_path):
    torch.manual_seed(0)
    m = build_model("lenet5").eval()
    x = torch.randn(200, 1, 64, 64)
    with torch.no_grad():
        z, f = m.forward_with_features(x)
    y = np.arange(200) % 4
    det = DETECTORS.create("knn", k=5, bank_size=100).fit(z.numpy(), f.numpy(), y)
    det.fit_threshold(det.score(z.numpy(), f.numpy()))
    d = det.to_dict()
    card = _card(ood={"detector": "knn", "params": d["params"], "threshold": d["threshold"]})
    path = save_artifact(tmp_path / "art", m, card, d["arrays"])
    return path, m, det, x, z, f


def test_round_trip(saved):
    path, m, det, x, z, f = saved
    a = load_artifact(path)
    assert a.temperature == 1.4 and a.input_size == 64 and a.pixel_size_um == 0.34
    assert a.normalisation == {"mean": 0.3, "std": 0.8}
    assert a.class_names == ("neutrophil", "eosinophil", "monocyte", "lymphocyte")
    assert a.confidence_threshold == 0.8 and a.ood["detector"] == "knn"
    m2 = a.build_model()
    assert not m2.training
    with torch.no_grad():
        assert torch.equal(m2(x), m(x))
    d2 = a.ood_detector()
    assert d2.threshold == pytest.approx(det.threshold)
    np.testing.assert_allclose(d2.score(z.numpy(), f.numpy()), det.score(z.numpy(), f.numpy()),
                               rtol=1e-6)
    assert len(a.sha256) == 64
    card = json.loads((path / "card.json").read_text())
    assert card["model_sha256"] == a.sha256 and "created" in card and "versions" in card
    # the model hash ignores OOD arrays and the card, the file hash does not
    save_artifact(path.parent / "b", m, _card(temperature=2.0), {})
    assert load_artifact(path.parent / "b").sha256 == a.sha256
    # card.json path works too
    assert load_artifact(path / "card.json").sha256 == a.sha256


def test_preprocess(saved):
    a = load_artifact(saved[0])
    x = np.full((3, 64, 64), 1.1, np.float64)
    p = a.preprocess(x)
    assert p.shape == (3, 1, 64, 64) and p.dtype == np.float32 and p.flags.c_contiguous
    np.testing.assert_allclose(p, (1.1 - 0.3) / 0.8, rtol=1e-6)
    assert a.preprocess(np.zeros((64, 64))).shape == (1, 1, 64, 64)
    assert a.preprocess(np.zeros((2, 1, 64, 64))).shape == (2, 1, 64, 64)
    big = np.zeros((1, 70, 70), np.float32)
    big[0, 3 + 10, 3 + 20] = 5.0  # centre crop keeps the middle 64 px
    assert a.preprocess(big)[0, 0, 10, 20] == pytest.approx((5.0 - 0.3) / 0.8)
    small = np.ones((1, 60, 60), np.float32)
    ps = a.preprocess(small)[0, 0]
    assert ps[0, 0] == pytest.approx(-0.3 / 0.8) and ps[32, 32] == pytest.approx(0.7 / 0.8)
    with pytest.raises(ValueError, match="NaN"):
        a.preprocess(np.full((1, 64, 64), np.nan))
    with pytest.raises(ValueError):
        a.preprocess(np.zeros((2, 3, 64, 64)))
    with pytest.raises(ValueError):
        a.preprocess(np.zeros(5))


def test_missing_and_unknown(tmp_path):
    with pytest.raises(ArtifactError, match="not found"):
        load_artifact(tmp_path / "nope")
    with pytest.raises(ArtifactError, match="shipped"):
        load_artifact("no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match="card.json is missing"):
        load_artifact(tmp_path / "empty")


def test_truncated_weights(saved):
    path = saved[0]
    w = path / "weights.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="does not match|corrupt"):
        load_artifact(path)
    with pytest.raises(ArtifactError, match="truncated or corrupt"):
        load_artifact(path, verify=False)
    w.unlink()
    with pytest.raises(ArtifactError, match="missing"):
        load_artifact(path)


def test_flipped_byte_detected(saved):
    path = saved[0]
    w = path / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[-10] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="does not match"):
        load_artifact(path)


@pytest.mark.parametrize(("key", "value", "msg"), [
    ("temperature", -1.0, "temperature"),
    ("temperature", None, "temperature"),
    ("class_names", [], "class_names"),
    ("normalisation", {"mean": 0.0}, "normalisation"),
    ("confidence_threshold", 2.0, "confidence_threshold"),
    ("ood", {"detector": 3}, "ood"),
    ("format_version", 99, "format_version"),
])
def test_bad_card_values(saved, key, value, msg):
    path = saved[0]
    card = json.loads((path / "card.json").read_text())
    card[key] = value
    (path / "card.json").write_text(json.dumps(card))
    with pytest.raises(ArtifactError, match=msg):
        load_artifact(path)


def test_card_missing_keys_and_bad_json(saved):
    path = saved[0]
    card = json.loads((path / "card.json").read_text())
    del card["temperature"], card["input_size"]
    (path / "card.json").write_text(json.dumps(card))
    with pytest.raises(ArtifactError, match="missing keys: input_size, temperature"):
        read_card(path)
    (path / "card.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_artifact(path)


def test_wrong_shapes(saved, tmp_path):
    path = saved[0]
    card = json.loads((path / "card.json").read_text())
    card["architecture"] = "alexnet"
    (path / "card.json").write_text(json.dumps(card))
    with pytest.raises(ArtifactError, match="do not fit the architecture"):
        load_artifact(path)
    card["architecture"] = "lenet5"
    card["input_size"] = 48  # fc1 input size changes
    (path / "card.json").write_text(json.dumps(card))
    with pytest.raises(ArtifactError, match="size mismatch|do not fit"):
        load_artifact(path)


def test_ood_arrays_missing(saved):
    path = saved[0]
    m = load_artifact(path).build_model()
    card = read_card(path)
    save_artifact(path, m, card, {})  # card names knn, but no bank stored
    with pytest.raises(ArtifactError, match="cannot be restored"):
        load_artifact(path)


@pytest.mark.parametrize("name", ["lenet5-sim", "alexnet-sim", "lenet5-vi-sim"])
def test_shipped_artifacts_load(name, tmp_path):
    assert name in list_artifacts()
    a = load_artifact(name)
    card = a.card
    for key in ("training", "metrics", "model_card", "created", "versions"):
        assert key in card, key
    assert card["training"]["data_sha256"] and card["training"]["command"]
    assert set(card["model_card"]) >= {"intended_use", "data", "limitations"}
    assert a.ood_detector() is not None and a.ood_detector().threshold is not None
    m = a.build_model()
    x = a.preprocess(np.zeros((2, a.input_size, a.input_size), np.float32))
    with torch.no_grad():
        z, f = m.forward_with_features(torch.from_numpy(x))
    assert z.shape == (2, len(a.class_names))
    # a copy elsewhere loads identically
    shutil.copytree(a.path, tmp_path / "copy")
    assert load_artifact(tmp_path / "copy").sha256 == a.sha256
