"""Seeded, reproducible training with early stopping on the validation NLL.

* Reproducible: one ``seed`` fixes the weight initialisation, the batch order and every
  augmentation draw (explicit ``torch.Generator``/numpy generators, deterministic torch
  algorithms); on the CPU the same seed and data give bit-identical weights.
* Early stopping: the validation NLL (un-augmented, eval mode) is computed after every epoch;
  training stops after ``patience`` epochs without improvement and the best weights are
  restored.
* Class balance: ``balance="weights"`` uses inverse-frequency class weights in the loss,
  ``"sampler"`` draws batches with inverse-frequency probabilities, ``"none"`` does neither.
* Variational models (with a ``kl()`` method) minimise CE + ``kl_weight`` * KL / N_train
  (the ELBO per training cell).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from leukoflow.models.data import Augment

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Training hyper-parameters (all recorded in the artifact card).

    Attributes
    ----------
    epochs : int
        Maximum number of epochs.
    batch_size : int
        Training batch size (cells).
    lr : float
        Peak AdamW learning rate (cosine decay to 2 % over ``epochs``).
    weight_decay : float
        AdamW decoupled weight decay.
    patience : int
        Early-stopping patience in epochs (validation NLL).
    seed : int
        Seed of initialisation, batch order and augmentation.
    balance : str
        ``weights``, ``sampler`` or ``none``.
    kl_weight : float
        Weight of the KL term per training cell (variational models).
    label_smoothing : float
        Label smoothing of the cross entropy (0 = none).
    device : str
        ``auto`` (CUDA when present), ``cpu`` or ``cuda``.
    threads : int
        torch CPU threads (1 on the shared machine).
    augment : dict
        :class:`leukoflow.models.data.Augment` parameters.
    """

    epochs: int = 30
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-4
    patience: int = 6
    seed: int = 0
    balance: str = "weights"
    kl_weight: float = 1.0
    label_smoothing: float = 0.0
    device: str = "auto"
    threads: int = 1
    augment: dict[str, Any] = field(default_factory=lambda: Augment().to_dict())

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for the card."""
        return asdict(self)


def resolve_device(name: str = "auto") -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("CUDA requested but not available")
    return name


def normalise(x: np.ndarray, mean: float, std: float) -> np.ndarray:
    """``(x - mean) / std`` as float32 ``(N, 1, H, W)``."""
    return ((np.asarray(x, np.float32) - np.float32(mean)) / np.float32(std))[:, None]


def predict(model, x_norm: np.ndarray, batch_size: int = 512, device: str = "cpu"
            ) -> tuple[np.ndarray, np.ndarray]:
    """Logits ``(N, K)`` and features ``(N, D)`` (float64) of normalised crops, eval mode."""
    import torch

    model.eval()
    zs, fs = [], []
    with torch.no_grad():
        for i in range(0, len(x_norm), batch_size):
            xb = torch.from_numpy(np.ascontiguousarray(x_norm[i:i + batch_size])).to(device)
            z, f = model.forward_with_features(xb)
            zs.append(z.double().cpu().numpy())
            fs.append(f.double().cpu().numpy())
    if not zs:
        return np.zeros((0, 0)), np.zeros((0, 0))
    return np.concatenate(zs), np.concatenate(fs)


def _val_nll(model, xv: np.ndarray, yv: np.ndarray, device: str) -> tuple[float, float]:
    from scipy.special import log_softmax

    z, _ = predict(model, xv, device=device)
    lp = log_softmax(z, axis=1)
    return float(-lp[np.arange(len(yv)), yv].mean()), float((z.argmax(1) == yv).mean())


def train_model(model, x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray,
                y_val: np.ndarray, cfg: TrainConfig, norm_std: float = 1.0,
                progress: bool = True) -> dict[str, Any]:
    """Train ``model`` in place on normalised crops; returns the history.

    Parameters
    ----------
    model : torch.nn.Module
        Network (``forward`` -> logits; optional ``kl()`` for variational models).
    x_train, x_val : np.ndarray
        Normalised crops ``(N, 1, H, W)`` float32.
    y_train, y_val : np.ndarray
        Class indices (in-distribution only).
    cfg : TrainConfig
        Hyper-parameters.
    norm_std : float
        Normalisation std (rad) so that ``augment.noise_rad`` is in rad.
    progress : bool
        Show a tqdm progress bar (auto-disabled when not a terminal).

    Returns
    -------
    dict
        ``epochs_run``, ``best_epoch``, ``best_val_nll``, per-epoch ``train_loss``,
        ``val_nll``, ``val_acc``, ``seconds``, ``device``.
    """
    import torch
    from torch.nn import functional as F  # noqa: N812
    from tqdm.auto import tqdm

    device = resolve_device(cfg.device)
    if device == "cpu":
        torch.set_num_threads(max(1, cfg.threads))
    torch.manual_seed(cfg.seed)
    torch.use_deterministic_algorithms(device == "cpu", warn_only=True)
    # re-initialise so that the seed, not the caller's RNG state, fixes the weights
    for m in model.modules():
        if m is not model and hasattr(m, "reset_parameters"):
            m.reset_parameters()
    if hasattr(model, "fc2") and hasattr(model.fc2, "weight_rho"):
        _reset_bayes(model, cfg.seed)
    model.to(device)
    aug = Augment(**cfg.augment)
    gen = torch.Generator().manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    k = int(max(y_train.max(), y_val.max())) + 1
    counts = np.bincount(y_train, minlength=k).astype(np.float64)
    if np.any(counts == 0):
        raise ValueError(f"every class needs training cells; counts per class: {counts}")
    inv = counts.sum() / (k * counts)
    class_w = torch.tensor(inv if cfg.balance == "weights" else np.ones(k),
                           dtype=torch.float32, device=device)
    sample_p = inv[y_train] / inv[y_train].sum() if cfg.balance == "sampler" else None
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n = len(y_train)
    steps_per_epoch = max(1, math.ceil(n / cfg.batch_size))
    total = cfg.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    has_kl = hasattr(model, "kl")
    xt = torch.from_numpy(np.ascontiguousarray(x_train))
    yt = torch.from_numpy(np.asarray(y_train, np.int64))
    hist: dict[str, Any] = {"train_loss": [], "val_nll": [], "val_acc": [], "device": device}
    best, best_state, best_epoch, bad = math.inf, None, -1, 0
    t0 = time.perf_counter()
    bar = tqdm(total=total, disable=not progress or None, desc="train", unit="batch",
               leave=False)
    for epoch in range(cfg.epochs):
        model.train()
        order = (rng.choice(n, n, p=sample_p) if sample_p is not None else rng.permutation(n))
        run_loss = 0.0
        for b in range(steps_per_epoch):
            idx = torch.from_numpy(order[b * cfg.batch_size:(b + 1) * cfg.batch_size])
            xb = aug(xt[idx], gen, std=norm_std).to(device)
            yb = yt[idx].to(device)
            loss = F.cross_entropy(model(xb), yb, weight=class_w,
                                   label_smoothing=cfg.label_smoothing)
            if has_kl:
                loss = loss + cfg.kl_weight * model.kl() / n
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            run_loss += float(loss.detach()) * len(idx)
            bar.update(1)
        vnll, vacc = _val_nll(model, x_val, y_val, device)
        hist["train_loss"].append(run_loss / n)
        hist["val_nll"].append(vnll)
        hist["val_acc"].append(vacc)
        bar.set_postfix(epoch=epoch + 1, val_nll=f"{vnll:.4f}", val_acc=f"{vacc:.4f}")
        log.info("epoch %d loss %.4f val_nll %.4f val_acc %.4f", epoch + 1, run_loss / n,
                 vnll, vacc)
        if vnll < best - 1e-5:
            best, best_epoch, bad = vnll, epoch + 1, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            bad += 1
            if bad >= cfg.patience:
                break
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    model.to("cpu").eval()
    hist.update(epochs_run=len(hist["val_nll"]), best_epoch=best_epoch, best_val_nll=best,
                seconds=time.perf_counter() - t0)
    return hist


def _reset_bayes(model, seed: int) -> None:
    """Re-initialise BayesLinear layers (mu like nn.Linear, rho constant)."""
    import torch
    from torch import nn

    for layer in (model.fc2, model.fc_out):
        with torch.no_grad():
            nn.init.kaiming_uniform_(layer.weight_mu, a=math.sqrt(5))
            bound = 1.0 / math.sqrt(layer.in_features)
            layer.bias_mu.uniform_(-bound, bound)
            layer.weight_rho.fill_(-5.0)
            layer.bias_rho.fill_(-5.0)
