"""CUDA correctness checks (run by ``benchmarks/gpu_check.sh`` on a lent GPU).

Each test compares the CUDA path with the CPU path that the rest of the suite covers, so
that a device run proves the same numbers come out, not only that the code executes. On a
machine without CUDA they are skipped (and counted as skipped, not passed).
"""

from __future__ import annotations

import numpy as np
import pytest

from leukoflow.acquisition.reconstruct.config import OffAxisConfig
from leukoflow.acquisition.reconstruct.offaxis import Reconstructor
from leukoflow.acquisition.reconstruct.synth import synthetic_hologram
from leukoflow.explain.segmentation import multi_slic

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="CUDA not available (device check runs on a lent GPU)"),
]


def test_reconstruction_cuda_matches_numpy_batched():

    holo, bg, truth = synthetic_hologram((256, 512), n_frames=6, seed=5)
    cpu = Reconstructor(OffAxisConfig(), background=bg)
    gpu = Reconstructor(OffAxisConfig(backend="torch", device="cuda"), background=bg)
    assert gpu.sideband == cpu.sideband
    pc = np.stack([cpu.phase(h) for h in holo])
    pg = np.asarray(gpu.phase(holo))  # one batched call on the device
    assert pg.shape == pc.shape
    np.testing.assert_allclose(pg, pc, atol=2e-3)
    assert gpu.params["device"].startswith("cuda")


def test_lime_cuda_matches_cpu():
    from leukoflow.benchmarks.workload_explain import toy_crops
    from leukoflow.explain.lime_batched import LimeParams, explain_many
    from leukoflow.models.architectures import LeNet5

    torch.manual_seed(0)
    crops, _ = toy_crops(2, seed=1)
    crops = crops[:3]
    params = LimeParams(n_samples=200)
    segs = [multi_slic(x, params.slic)[0] for x in crops]
    net = LeNet5().eval()
    cpu = explain_many(net, crops, [0, 1, 2], params, segments=segs)
    net_gpu = LeNet5().eval()
    net_gpu.load_state_dict(net.state_dict())
    gpu = explain_many(net_gpu.to("cuda"), crops, [0, 1, 2],
                       LimeParams(n_samples=200, batch_size=16384), segments=segs)
    for a, b in zip(cpu, gpu, strict=True):
        for ca, cb in zip(a.coefs, b.coefs, strict=True):
            scale = max(1e-6, float(np.abs(ca).max()))
            np.testing.assert_allclose(cb, ca, atol=1e-3 * scale)
        np.testing.assert_allclose(b.map, a.map, atol=1e-3)


def test_guided_backprop_cuda_matches_cpu():
    from leukoflow.benchmarks.workload_explain import toy_crops
    from leukoflow.explain.methods import EXPLAINERS
    from leukoflow.explain.model import ModelBundle
    from leukoflow.models.architectures import LeNet5

    torch.manual_seed(0)
    crops, _ = toy_crops(1, seed=2)
    net = LeNet5().eval()
    cpu = EXPLAINERS.create("guided_backprop", bundle=ModelBundle.from_module(net))
    gpu_bundle = ModelBundle.from_module(net)
    gpu_bundle.module.to("cuda")
    gpu = EXPLAINERS.create("guided_backprop", bundle=gpu_bundle)
    a = cpu.explain(crops[:2], [0, 1])
    b = gpu.explain(crops[:2], [0, 1])
    for ma, mb in zip(a, b, strict=True):
        scale = max(1e-8, float(np.abs(ma.map).max()))
        np.testing.assert_allclose(mb.map, ma.map, atol=1e-3 * scale)
