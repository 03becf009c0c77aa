"""Mutual information of the variational model's Monte-Carlo predictive (epistemic OOD).

The detector stores the ``S`` evaluation-time weight samples of the Bayesian head of a
:class:`leukoflow.models.architectures.LeNet5VI` (the same samples its ``eval()`` forward uses), so
it can score from the 120-d deterministic features alone: logits_s = head_s(features), then
MI = H[mean_s p_s] - mean_s H[p_s] (nats, larger = more OOD).
"""

from __future__ import annotations

import numpy as np
from scipy.special import log_softmax

from leukoflow.models.ood.base import DETECTORS, OODDetector


@DETECTORS.register("mutual_info")
class MutualInformation(OODDetector):
    """Mutual information between prediction and head weights (BALD score)."""

    uses_features = True

    def _fit(self, logits, features, labels, model=None, **_) -> None:
        import torch

        if model is None or not hasattr(model, "fc2") or not hasattr(model, "_eval_generator"):
            raise ValueError("mutual_info needs the variational model (model=LeNet5VI)")
        with torch.no_grad():
            g = model._eval_generator(torch.device("cpu"))
            w2, b2 = model.fc2.sample(model.n_samples, g)
            w3, b3 = model.fc_out.sample(model.n_samples, g)
        self.arrays = {k: v.cpu().numpy().astype(np.float32)
                       for k, v in (("w2", w2), ("b2", b2), ("w3", w3), ("b3", b3))}
        self.params["n_samples"] = int(model.n_samples)

    def required_arrays(self) -> tuple[str, ...]:
        return ("w2", "b2", "w3", "b3")

    def sample_logits(self, features: np.ndarray) -> np.ndarray:
        """``(S, N, K)`` logits of the stored head samples."""
        a = self.arrays
        f = np.asarray(features, np.float32)
        h = np.maximum(np.einsum("nd,sod->sno", f, a["w2"]) + a["b2"][:, None, :], 0.0)
        return np.einsum("snd,sod->sno", h, a["w3"]) + a["b3"][:, None, :]

    def _score(self, logits, features) -> np.ndarray:
        logp = log_softmax(self.sample_logits(features).astype(np.float64), axis=-1)
        p = np.exp(logp)
        mean = p.mean(0)
        ent = -(mean * np.log(np.maximum(mean, 1e-12))).sum(-1)
        exp_ent = -(p * logp).sum(-1).mean(0)
        return np.maximum(ent - exp_ent, 0.0)
