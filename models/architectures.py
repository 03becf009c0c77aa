"""CNN architectures for single-channel phase crops.

Every model takes a float32 tensor ``(N, 1, H, W)`` of *normalised* phase, i.e.
``(phase_rad - mean) / std`` with ``mean``/``std`` from the artifact card, and returns
class logits ``(N, K)``. All models share one interface used by inference, OOD scoring and
explanation:

* ``forward(x) -> logits``
* ``features(x) -> penultimate features (N, D)``
* ``forward_with_features(x) -> (logits, features)`` (one pass)

Every non-linearity is its own :class:`torch.nn.ReLU` *module* (never ``F.relu`` and
never one module reused twice), because Captum's Guided Backprop only hooks ReLU modules
and silently falls back to the plain gradient otherwise.

Architectures are registered in :data:`ARCHITECTURES` and built by name from the artifact
card (``ARCHITECTURES.create(card["architecture"], **card["arch_kwargs"])``).

The variational model :class:`LeNet5VI` keeps the convolutional trunk deterministic and puts a
mean-field Gaussian posterior on the two last fully connected layers (a *Bayesian head*).
Its ``S`` Monte-Carlo weight samples are drawn once per forward as a stacked tensor and
applied with one batched matrix product, so all samples run in one forward and differ from
each other (unlike bayesian-torch's reparameterisation layers, which draw one epsilon per
forward and give identical copies when the batch is repeated). Why a head and not Flipout
or MC dropout: the trunk runs once instead of ``S`` times; see ``benchmarks/bench_models.py``
(``vi_cost``) for the measured cost of each option on this machine.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812  (only for softmax/log-softmax, never relu)

from leukoflow.core.physics import CROP_SIZE_PX
from leukoflow.core.registry import Registry
from leukoflow.core.vocabulary import CLASS_NAMES

ARCHITECTURES: Registry = Registry("architecture")
"""Name -> model class. Keyword arguments come from the card's ``arch_kwargs``."""


def _conv_out(size: int, kernel: int, stride: int = 1, pad: int = 0) -> int:
    """Output side length (px) of a convolution or pooling layer."""
    return (size + 2 * pad - kernel) // stride + 1


class PhaseCNN(nn.Module):
    """Base class: ``trunk`` (conv part) -> flatten -> ``head`` (fully connected) -> ``fc_out``.

    Subclasses build ``self.trunk`` (an ``nn.Sequential`` of conv/pool/ReLU modules),
    ``self.head`` (``nn.Sequential`` ending in the penultimate activation) and
    ``self.fc_out`` (the final linear layer).
    """

    trunk: nn.Sequential
    head: nn.Sequential
    fc_out: nn.Module
    in_size: int
    num_classes: int

    def _check_input(self, x: torch.Tensor) -> None:
        if torch.jit.is_tracing() or torch.compiler.is_compiling():
            return
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"expected input (N, 1, H, W), got shape {tuple(x.shape)}")
        if x.shape[-2:] != (self.in_size, self.in_size):
            raise ValueError(
                f"expected {self.in_size}x{self.in_size} px crops, got "
                f"{x.shape[-2]}x{x.shape[-1]}"
            )

    def attach_descriptors(self, module: nn.Module | None) -> None:
        """Append ``module(x)`` (``leukoflow.models.descriptors.PhaseDescriptors``) to the features.

        The learned part is unchanged (``features``); ``forward_with_features`` then returns
        ``(N, D + n_descriptors)`` with the descriptors last. No weights are added (a
        submodule ``descriptors`` without persistent buffers: ``state_dict`` is unchanged).
        ``None`` detaches.
        """
        if module is None:
            self._modules.pop("descriptors", None)
        else:
            self.descriptors = module

    @property
    def n_descriptors(self) -> int:
        """Number of descriptor columns at the end of the feature output (0 if none)."""
        d = self._modules.get("descriptors")
        return 0 if d is None else int(d.n_out)

    def with_descriptors(self, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        """Learned features ``f`` with the descriptors of input ``x`` appended (if any)."""
        d = self._modules.get("descriptors")
        if d is None:
            return f
        return torch.cat([f, d(x).to(f.dtype)], dim=1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``(N, D)`` (after the last hidden ReLU)."""
        self._check_input(x)
        return self.head(torch.flatten(self.trunk(x), 1))

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(logits (N, K), features (N, D [+ descriptors]))`` from one pass."""
        f = self.features(x)
        return self.fc_out(f), self.with_descriptors(x, f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``(N, K)`` for normalised phase crops ``(N, 1, H, W)``."""
        return self.forward_with_features(x)[0]

    @property
    def feature_dim(self) -> int:
        """Length D of the penultimate feature vector."""
        last = [m for m in self.head if isinstance(m, nn.Linear)][-1]
        return last.out_features


@ARCHITECTURES.register("lenet5")
class LeNet5(PhaseCNN):
    """LeNet-5 (LeCun 1998) for one-channel crops, with ReLU and max pooling.

    conv 5x5 (6) -> ReLU -> pool 2 -> conv 5x5 (16) -> ReLU -> pool 2 -> fc 120 -> ReLU ->
    fc 84 -> ReLU -> fc K. At 64 x 64 px the second conv map is 26 x 26 px and the flattened
    trunk output has 16 x 13 x 13 = 2704 values. Features: the 84-d fc2 activation.

    Parameters
    ----------
    in_size : int
        Crop side length in px (square crops), >= 16.
    num_classes : int
        Number of output classes K.
    """

    def __init__(self, in_size: int = CROP_SIZE_PX, num_classes: int = len(CLASS_NAMES)) -> None:
        super().__init__()
        if in_size < 16:
            raise ValueError(f"LeNet5 needs in_size >= 16 px, got {in_size}")
        self.in_size = int(in_size)
        self.num_classes = int(num_classes)
        self.trunk = nn.Sequential(
            nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        )
        s = _conv_out(_conv_out(_conv_out(_conv_out(in_size, 5), 2, 2), 5), 2, 2)
        self.flat_dim = 16 * s * s
        self.head = nn.Sequential(
            nn.Linear(self.flat_dim, 120), nn.ReLU(),
            nn.Linear(120, 84), nn.ReLU(),
        )
        self.fc_out = nn.Linear(84, self.num_classes)


@ARCHITECTURES.register("alexnet")
class AlexNet(PhaseCNN):
    """AlexNet (Krizhevsky 2012) adapted to small one-channel crops, with a width factor.

    Five conv layers (5x5 stride 2, 5x5, 3x3, 3x3, 3x3) with three 3x3/2 max pools, an
    adaptive average pool to 3 x 3 and two dropout + fc + ReLU hidden layers. The first conv
    uses 5x5 stride 2 instead of 11x11 stride 4 because 64 px crops are 3.5x smaller than
    ImageNet inputs. Channel counts are ``round(c * width)`` of AlexNet's (64, 192, 384,
    256, 256); ``width=0.25, hidden=256`` is the small shipped variant (~0.4 M parameters).

    Parameters
    ----------
    in_size : int
        Crop side length in px, >= 32.
    num_classes : int
        Number of output classes K.
    width : float
        Multiplier on the conv channel counts (1.0 = AlexNet).
    hidden : int
        Width of the two hidden fully connected layers (4096 in AlexNet).
    dropout : float
        Dropout probability before each hidden fc layer (training only).
    """

    def __init__(self, in_size: int = CROP_SIZE_PX, num_classes: int = len(CLASS_NAMES),
                 width: float = 1.0, hidden: int = 4096, dropout: float = 0.5) -> None:
        super().__init__()
        if in_size < 32:
            raise ValueError(f"AlexNet needs in_size >= 32 px, got {in_size}")
        if width <= 0 or hidden < 1 or not 0.0 <= dropout < 1.0:
            raise ValueError("width must be > 0, hidden >= 1 and 0 <= dropout < 1")
        self.in_size = int(in_size)
        self.num_classes = int(num_classes)
        c = [max(1, round(ch * width)) for ch in (64, 192, 384, 256, 256)]
        self.trunk = nn.Sequential(
            nn.Conv2d(1, c[0], 5, stride=2, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
            nn.Conv2d(c[0], c[1], 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
            nn.Conv2d(c[1], c[2], 3, padding=1), nn.ReLU(),
            nn.Conv2d(c[2], c[3], 3, padding=1), nn.ReLU(),
            nn.Conv2d(c[3], c[4], 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2),
            nn.AdaptiveAvgPool2d(3),
        )
        self.flat_dim = c[4] * 9
        self.head = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(self.flat_dim, hidden), nn.ReLU(),
            nn.Dropout(dropout), nn.Linear(hidden, hidden), nn.ReLU(),
        )
        self.fc_out = nn.Linear(hidden, self.num_classes)


class BayesLinear(nn.Module):
    """Mean-field Gaussian linear layer with *batched* weight samples.

    Posterior q(w) = N(mu, softplus(rho)^2) per weight and bias; prior N(0, prior_sigma^2).
    :meth:`sample` draws ``S`` independent weight sets at once; :meth:`forward_samples`
    applies them to an input of shape ``(S, N, D)`` with one batched matmul.

    Parameters
    ----------
    in_features, out_features : int
        Layer shape.
    prior_sigma : float
        Standard deviation of the zero-mean Gaussian prior.
    rho_init : float
        Initial rho (sigma = softplus(rho); -5 gives sigma ~ 0.0067).
    """

    def __init__(self, in_features: int, out_features: int, prior_sigma: float = 1.0,
                 rho_init: float = -5.0) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.prior_sigma = float(prior_sigma)
        self.weight_mu = nn.Parameter(torch.empty(out_features, in_features))
        self.weight_rho = nn.Parameter(torch.full((out_features, in_features), rho_init))
        self.bias_mu = nn.Parameter(torch.zeros(out_features))
        self.bias_rho = nn.Parameter(torch.full((out_features,), rho_init))
        nn.init.kaiming_uniform_(self.weight_mu, a=math.sqrt(5))
        bound = 1.0 / math.sqrt(in_features)
        nn.init.uniform_(self.bias_mu, -bound, bound)

    def sample(self, n_samples: int, generator: torch.Generator | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``n_samples`` weight sets: ``(S, out, in)`` and biases ``(S, out)``."""
        dev, dt = self.weight_mu.device, self.weight_mu.dtype
        ew = torch.randn((n_samples, *self.weight_mu.shape), generator=generator,
                         device=dev, dtype=dt)
        eb = torch.randn((n_samples, *self.bias_mu.shape), generator=generator,
                         device=dev, dtype=dt)
        w = self.weight_mu + F.softplus(self.weight_rho) * ew
        b = self.bias_mu + F.softplus(self.bias_rho) * eb
        return w, b

    def forward_samples(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Apply sampled weights: ``x`` (S, N, in) -> (S, N, out)."""
        return torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic forward with the posterior mean weights."""
        return F.linear(x, self.weight_mu, self.bias_mu)

    def kl(self) -> torch.Tensor:
        """KL(q || prior), summed over all weights and biases (nats)."""
        total = torch.zeros((), device=self.weight_mu.device)
        p = self.prior_sigma
        for mu, rho in ((self.weight_mu, self.weight_rho), (self.bias_mu, self.bias_rho)):
            sig = F.softplus(rho)
            total = total + (torch.log(p / sig) + (sig**2 + mu**2) / (2 * p * p) - 0.5).sum()
        return total


@ARCHITECTURES.register("lenet5_vi")
class LeNet5VI(nn.Module):
    """LeNet-5 with a variational (Bayesian) head: fc2 and fc_out are :class:`BayesLinear`.

    The conv trunk and fc1 are deterministic and run once; their 120-d output is the
    ``features`` vector (the deterministic input of the Bayesian head, used by the
    feature-space OOD detectors). ``S = n_samples`` weight samples of the head are applied
    in one batched forward.

    * ``train()`` mode: ``forward`` returns the logits of one fresh weight sample per call
      (``train_samples`` samples averaged in probability space if > 1) for the ELBO.
    * ``eval()`` mode: ``forward`` returns log of the MC-averaged predictive,
      ``log mean_s softmax(z_s)``, which behaves as logits (softmax gives back the mean
      predictive; temperature scaling calibrates the averaged predictive). The ``S`` samples
      come from a generator seeded with ``mc_seed`` at every call, so eval outputs are
      deterministic and independent of the batch size and of the position in the batch.

    Parameters
    ----------
    in_size : int
        Crop side length in px.
    num_classes : int
        Number of classes K.
    n_samples : int
        Monte-Carlo samples S at evaluation.
    prior_sigma : float
        Prior standard deviation of the head weights.
    mc_seed : int
        Seed of the evaluation-time weight samples.
    """

    def __init__(self, in_size: int = CROP_SIZE_PX, num_classes: int = len(CLASS_NAMES),
                 n_samples: int = 20, prior_sigma: float = 1.0, mc_seed: int = 0) -> None:
        super().__init__()
        base = LeNet5(in_size, num_classes)
        self.in_size = base.in_size
        self.num_classes = base.num_classes
        self.n_samples = int(n_samples)
        self.mc_seed = int(mc_seed)
        self.trunk = base.trunk
        self.fc1 = base.head[0]
        self.relu_fc1 = base.head[1]
        self.fc2 = BayesLinear(120, 84, prior_sigma)
        self.relu_fc2 = nn.ReLU()
        self.fc_out = BayesLinear(84, num_classes, prior_sigma)
        self.flat_dim = base.flat_dim
        self.feature_dim = 120

    _check_input = PhaseCNN._check_input
    attach_descriptors = PhaseCNN.attach_descriptors
    n_descriptors = PhaseCNN.n_descriptors
    with_descriptors = PhaseCNN.with_descriptors

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic 120-d features (input of the Bayesian head) ``(N, 120)``."""
        self._check_input(x)
        return self.relu_fc1(self.fc1(torch.flatten(self.trunk(x), 1)))

    def sample_logits(self, feats: torch.Tensor, n_samples: int,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """Logits of ``n_samples`` head weight samples, ``(S, N, K)``, in one forward."""
        w2, b2 = self.fc2.sample(n_samples, generator)
        w3, b3 = self.fc_out.sample(n_samples, generator)
        h = feats.unsqueeze(0).expand(n_samples, -1, -1)
        h = self.relu_fc2(self.fc2.forward_samples(h, w2, b2))
        return self.fc_out.forward_samples(h, w3, b3)

    def _eval_generator(self, device: torch.device) -> torch.Generator:
        g = torch.Generator(device=device)
        g.manual_seed(self.mc_seed)
        return g

    def mc_logits(self, x: torch.Tensor, n_samples: int | None = None) -> torch.Tensor:
        """Per-sample logits ``(S, N, K)`` with the deterministic eval weight samples."""
        f = self.features(x)
        return self.sample_logits(f, n_samples or self.n_samples, self._eval_generator(f.device))

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits, features)``; in eval mode logits = log of the mean MC predictive."""
        f = self.features(x)
        if self.training:
            z = self.sample_logits(f, 1)
            return z[0], self.with_descriptors(x, f)
        z = self.sample_logits(f, self.n_samples, self._eval_generator(f.device))
        return (torch.logsumexp(F.log_softmax(z, dim=-1), dim=0) - math.log(z.shape[0]),
                self.with_descriptors(x, f))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (train: one weight sample; eval: log mean predictive)."""
        return self.forward_with_features(x)[0]

    def kl(self) -> torch.Tensor:
        """KL divergence of the Bayesian head from its prior (nats)."""
        return self.fc2.kl() + self.fc_out.kl()


def predictive_uncertainty(sample_logits: torch.Tensor, temperature: float = 1.0
                           ) -> dict[str, torch.Tensor]:
    """Mean predictive, entropy and mutual information from MC logits.

    Parameters
    ----------
    sample_logits : torch.Tensor
        ``(S, N, K)`` logits of S Monte-Carlo samples.
    temperature : float
        Temperature applied to each sample's logits before the softmax (1 = none). To
        calibrate the *averaged* predictive instead, apply T to ``log(mean)`` afterwards.

    Returns
    -------
    dict
        ``mean`` (N, K) mean predictive p̄, ``entropy`` (N,) H[p̄] in nats,
        ``expected_entropy`` (N,) E_s H[p_s], ``mutual_info`` (N,) = H[p̄] - E_s H[p_s]
        (epistemic part, nats, >= 0).
    """
    logp = F.log_softmax(sample_logits / temperature, dim=-1)
    p = logp.exp()
    mean = p.mean(0)
    ent = -(mean * torch.log(mean.clamp_min(1e-12))).sum(-1)
    exp_ent = -(p * logp).sum(-1).mean(0)
    return {"mean": mean, "entropy": ent, "expected_entropy": exp_ent,
            "mutual_info": (ent - exp_ent).clamp_min(0.0)}


def build_model(name: str, **kwargs) -> nn.Module:
    """Instantiate architecture ``name`` from :data:`ARCHITECTURES` with ``kwargs``."""
    return ARCHITECTURES.create(name, **kwargs)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
