"""Inference backends: same function in every runtime, export cache, registry, auto choice.

The CUDA test is marked ``gpu`` (run by benchmarks/gpu_check.sh on a lent GPU); on this CPU
machine the CUDA/TensorRT backends are checked to refuse cleanly.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from helpers import offline_predict

from leukoflow.benchmarks.workload_infer import (
    SyntheticArtifact,
    make_test_artifact,
    synthetic_crops,
)
from leukoflow.inference.backends import AUTO_ORDER, BACKENDS, available_backends, create_backend
from leukoflow.inference.backends.base import BackendUnavailable, pow2_buckets
from leukoflow.inference.backends.onnx_cpu import export_onnx, onnx_path
from leukoflow.inference.decision import rule_from_artifact
from leukoflow.models.ood import DETECTORS

SIZE = 32


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return make_test_artifact(tmp_path_factory.mktemp("art") / "lenet-b", input_size=SIZE,
                              detector="energy")


def test_registry_and_auto(tmp_path, artifact):
    avail = available_backends()
    assert set(avail) == {"torch-cpu", "onnxruntime", "torch-cuda", "tensorrt", "triton"}
    # every local backend is a candidate of "auto"; triton needs a server: named explicitly
    assert set(AUTO_ORDER) == set(BACKENDS.names()) - {"triton"}
    assert avail["torch-cpu"] == "" and avail["onnxruntime"] == ""
    be = create_backend("auto", artifact, max_batch=16, cache_dir=tmp_path)
    first_ok = next(n for n in AUTO_ORDER if avail[n] == "")
    assert be.name == first_ok
    with pytest.raises(KeyError):
        create_backend("tpu", artifact)


def test_torch_cpu_equals_offline_exactly_at_any_batch_size(artifact):
    x = synthetic_crops(70, SIZE, seed=2)
    ref = offline_predict(artifact, x)

    rule = rule_from_artifact(artifact)
    for mb in (1, 16, 128):
        be = create_backend("torch-cpu", artifact, max_batch=mb)
        out = be.infer(x)
        d = rule(out.logits, out.features)
        if mb >= 70:  # same batch as the offline run: bit for bit
            np.testing.assert_array_equal(d.probs, ref["probs"])
        else:  # other batch compositions: float32 summation order only
            np.testing.assert_allclose(d.probs, ref["probs"], rtol=0, atol=1e-6)
        assert d.names() == ref["decision"].tolist()
        assert d.pred.tolist() == ref["pred"].tolist()
        assert out.finite.all() and out.features.shape == (70, be.feature_dim)
    assert be.describe()["threads"] == 1


def test_onnxruntime_matches_torch_and_reuses_cache(tmp_path, artifact):
    x = synthetic_crops(50, SIZE, seed=3)
    x[7, 1, 1] = np.nan
    tcpu = create_backend("torch-cpu", artifact, max_batch=64).infer(x)
    ort = create_backend("onnxruntime", artifact, max_batch=64, cache_dir=tmp_path)
    path = onnx_path(artifact, tmp_path)
    assert path.is_file() and artifact.sha256[:16] in path.name
    out = ort.infer(x)
    ok = np.arange(50) != 7
    np.testing.assert_allclose(out.logits[ok], tcpu.logits[ok], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out.features[ok], tcpu.features[ok], rtol=1e-4, atol=1e-4)
    assert out.finite.tolist() == ok.tolist() == tcpu.finite.tolist()
    assert (out.logits[ok].argmax(1) == tcpu.logits[ok].argmax(1)).all()
    mtime = os.stat(path).st_mtime_ns
    assert export_onnx(artifact, tmp_path) == path and os.stat(path).st_mtime_ns == mtime
    assert ort.describe()["provider"] == "CPUExecutionProvider"


def test_gpu_backends_report_unavailable_without_cuda(artifact):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA present: covered by the gpu-marked test")
    for name in ("torch-cuda", "tensorrt"):
        ok, why = BACKENDS.get(name).available()
        assert not ok and why
        with pytest.raises(BackendUnavailable):
            create_backend(name, artifact, max_batch=8)


def test_pow2_buckets():
    assert pow2_buckets(256, 8) == (8, 16, 32, 64, 128, 256)
    assert pow2_buckets(100, 8) == (8, 16, 32, 64, 100)
    assert pow2_buckets(1) == (1,)


@pytest.mark.gpu
def test_torch_cuda_fp16_matches_cpu():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")

    art = SyntheticArtifact(32)  # no files: runs where safetensors is missing
    x = synthetic_crops(300, 32, seed=4)
    x[5, 0, 0] = np.inf
    ref = create_backend("torch-cpu", art, max_batch=512).infer(x)
    for graphs in (True, False):
        be = create_backend("torch-cuda", art, max_batch=128, precision="fp16",
                            cuda_graphs=graphs)
        be.warmup()
        out = be.infer(x)
        ok = np.arange(300) != 5
        assert out.finite.tolist() == ok.tolist()
        # tolerances from the finite rows only (row 5 is inf -> NaN logits by design)
        np.testing.assert_allclose(out.logits[ok], ref.logits[ok],
                                   atol=0.02 * np.abs(ref.logits[ok]).max() + 1e-3)
        np.testing.assert_allclose(out.features[ok], ref.features[ok],
                                   atol=0.02 * np.abs(ref.features[ok]).max() + 1e-3)
        # OOD score computed in the graph equals the host detector on the GPU's logits
        assert out.ood_score is not None and be.describe()["device_ood"] == "EnergyScore"
        host = art.ood_detector().score(out.logits[ok], out.features[ok])
        np.testing.assert_allclose(out.ood_score[ok], host, rtol=1e-4, atol=1e-4)
        # pipelined use (two batches in flight) returns each batch's own rows
        h1 = be.submit(np.ascontiguousarray(x[:128], be.input_dtype), 128)
        h2 = be.submit(np.ascontiguousarray(x[128:256], be.input_dtype), 128)
        o1, o2 = be.collect(h1), be.collect(h2)
        np.testing.assert_allclose(o1.logits[6:], out.logits[6:128], atol=1e-3)
        np.testing.assert_allclose(o2.logits, out.logits[128:256], atol=1e-3)


@pytest.mark.parametrize("name", ["torch-cpu", "onnxruntime"])
def test_pipelined_cpu_backend_keeps_batches_apart(tmp_path, artifact, name):
    """Two batches in flight (compute thread): each collect returns its own batch's rows."""
    x = synthetic_crops(96, SIZE, seed=8)
    ref = create_backend(name, artifact, max_batch=32, cache_dir=tmp_path).infer(x)
    be = create_backend(name, artifact, max_batch=32, pipeline=True, cache_dir=tmp_path)
    assert be.max_in_flight == 2 and be.describe()["pipeline"]
    outs, pending = [], []
    for i in range(3):  # the worker's order: gather k, submit k, collect k-1
        buf = be.host_buffer(32)
        buf[:] = x[32 * i:32 * i + 32]
        pending.append(be.submit(buf, 32))
        if len(pending) == 2:
            outs.append(be.collect(pending.pop(0)))
    outs.append(be.collect(pending.pop(0)))
    got = np.concatenate([o.logits for o in outs])
    np.testing.assert_array_equal(got, ref.logits)
    be.close()


@pytest.mark.parametrize("name", ["msp", "energy", "mahalanobis", "rmds", "knn"])
def test_device_ood_scorers_equal_models_ood(name):
    """The torch scorers the CUDA backend runs in its graph equal the numpy detectors."""
    import torch

    from leukoflow.inference.backends.device_ood import torch_scorer

    rng = np.random.default_rng(1)
    feats = np.abs(rng.normal(size=(300, 24))).astype(np.float32)
    logits = (rng.normal(size=(300, 4)) * 3).astype(np.float32)
    det = DETECTORS.create(name, **({"k": 10} if name == "knn" else {}))
    det.fit(logits[:200], feats[:200], logits[:200].argmax(1), temperature=1.3)
    ref = det.score(logits[200:], feats[200:])
    got = torch_scorer(det)(torch.from_numpy(logits[200:]), torch.from_numpy(feats[200:]))
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    assert torch_scorer(None) is None


@pytest.mark.parametrize("name", ["mahalanobis", "knn", "descriptors", "combined"])
def test_device_ood_scorers_with_descriptor_columns(name):
    """With phase descriptors appended to the features, the torch scorers read the same
    columns as the numpy detectors (learned, descriptors, or both for ``combined``)."""
    import torch

    from leukoflow.inference.backends.device_ood import torch_scorer

    rng = np.random.default_rng(2)
    y = rng.integers(0, 4, 600)
    feats = np.hstack([np.abs(rng.normal(size=(600, 24))) + y[:, None] * 0.3,
                       rng.normal(size=(600, 7)) + y[:, None] * 0.2]).astype(np.float32)
    feats[500:, 24:] += 1.5  # last 100: unusual descriptors
    logits = (rng.normal(size=(600, 4)) * 3).astype(np.float32)
    det = DETECTORS.create(name, **({"k": 10} if name == "knn" else {}))
    det.fit(logits[:400], feats[:400], y[:400], temperature=1.3, n_descriptors=7)
    ref = det.score(logits[400:], feats[400:])
    got = torch_scorer(det)(torch.from_numpy(logits[400:]), torch.from_numpy(feats[400:]))
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
