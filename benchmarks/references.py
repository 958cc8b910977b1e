"""The reference implementations the speed benchmarks measure pyro-vae against.

Both use the same networks as pyro-vae (``pyro_vae.networks``), the same in-memory data,
minibatch order and dynamic binarization, and report their loss as pyro-vae does: an estimate of
the full-data negative ELBO (minibatch sum scaled by N / B).

- :class:`HandWrittenVAE`: plain PyTorch, the neural-net reading. Reconstruction by
  ``binary_cross_entropy_with_logits``, KL in closed form, one ``torch.optim.Adam``.
- :class:`PyroTutorialVAE`: Pyro's tutorial recipe. ``SVI`` + ``pyro.optim.Adam`` (one Adam per
  parameter, through the param store) + ``Trace_ELBO``, argument validation on, a float (a sync)
  returned by every ``svi.step``.
- :class:`HandWrittenConvVAE`: plain PyTorch, the twin of ``--arch conv`` on 28x28 grey images,
  its layers written out by hand (``benchmarks/arch.py``).
"""

from __future__ import annotations

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO
from torch.nn import functional as F

from pyro_vae import VAE, VAEConfig
from pyro_vae.program.networks import BernoulliDecoder, Encoder

__all__ = ["HandWrittenVAE", "PyroTutorialVAE", "HandWrittenConvVAE", "hand_written_iwae"]


class HandWrittenVAE(torch.nn.Module):
    def __init__(self, config: VAEConfig, num_data: int):
        super().__init__()
        self.encoder = Encoder(784, config.hidden, config.z_dim)
        self.decoder = BernoulliDecoder(config.z_dim, config.hidden, 784)
        self.num_data = num_data
        self.optimizer = torch.optim.Adam(self.parameters(), lr=config.lr)

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        loc, scale = self.encoder(x)  # [B, z] each
        z = loc + scale * torch.randn_like(loc)
        reconstruction = F.binary_cross_entropy_with_logits(self.decoder(z), x, reduction="sum")
        kl = 0.5 * (loc.pow(2) + scale.pow(2) - 1 - 2 * scale.log()).sum()
        return (reconstruction + kl) * (self.num_data / x.shape[0])

    def step(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        loss = self.loss(x)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach()


class HandWrittenConvVAE(HandWrittenVAE):
    """The layers of pyro-vae's ``--arch conv`` for 1x28x28 images, by hand: 4x4 stride-2
    convolutions 1 -> 32 -> 64 channels (28 -> 14 -> 7) with ReLU, a linear layer to (loc, raw
    scale); the decoder a linear layer with ReLU to 64x7x7, then 4x4 stride-2 transposed
    convolutions 64 -> 32 -> 1 (7 -> 14 -> 28), ReLU between. Same loss as :class:`HandWrittenVAE`."""

    def __init__(self, config: VAEConfig, num_data: int):
        torch.nn.Module.__init__(self)
        z = config.z_dim
        self.enc = torch.nn.Sequential(
            torch.nn.Conv2d(1, 32, 4, 2, 1), torch.nn.ReLU(), torch.nn.Conv2d(32, 64, 4, 2, 1), torch.nn.ReLU(),
            torch.nn.Flatten(), torch.nn.Linear(64 * 7 * 7, 2 * z),
        )
        self.dec = torch.nn.Sequential(
            torch.nn.Linear(z, 64 * 7 * 7), torch.nn.ReLU(), torch.nn.Unflatten(1, (64, 7, 7)),
            torch.nn.ConvTranspose2d(64, 32, 4, 2, 1), torch.nn.ReLU(), torch.nn.ConvTranspose2d(32, 1, 4, 2, 1),
            torch.nn.Flatten(),
        )
        self.encoder = lambda x: self._posterior(x)
        self.decoder = self.dec
        self.num_data = num_data
        self.optimizer = torch.optim.Adam(self.parameters(), lr=config.lr)

    def _posterior(self, x: torch.Tensor):
        loc, raw_scale = self.enc(x.view(-1, 1, 28, 28)).chunk(2, dim=-1)
        return loc, F.softplus(raw_scale) + 1e-5


class PyroTutorialVAE:
    def __init__(self, config: VAEConfig, num_data: int):
        pyro.clear_param_store()
        self.vae = VAE(config)
        self.num_data = num_data
        self.svi = SVI(self.vae.model, self.vae.guide, pyro.optim.Adam({"lr": config.lr}), loss=Trace_ELBO())

    def parameters(self):
        return self.vae.parameters()

    def step(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        pyro.enable_validation(True)  # the tutorial's default
        return torch.tensor(self.svi.step(x, idx, self.num_data))


@torch.no_grad()
def hand_written_iwae(encoder, decoder, x: torch.Tensor, k: int, chunk: int = 100) -> torch.Tensor:
    """Per-image IWAE bound ``[B]`` in plain PyTorch: k samples, batched decoder calls, a
    streaming logsumexp over chunks of samples."""
    loc, scale = encoder(x)  # [B, z]
    total = None
    for start in range(0, k, chunk):
        n = min(chunk, k - start)
        eps = torch.randn(n, *loc.shape)
        z = loc + scale * eps  # [n, B, z]
        log_px = -F.binary_cross_entropy_with_logits(decoder(z), x.expand(n, -1, -1), reduction="none").sum(-1)
        log_pz = -0.5 * (z.pow(2) + torch.log(torch.tensor(2 * torch.pi))).sum(-1)
        log_qz = -0.5 * (eps.pow(2) + torch.log(torch.tensor(2 * torch.pi))).sum(-1) - scale.log().sum(-1)
        chunk_lse = torch.logsumexp(log_px + log_pz - log_qz, 0)  # [B]
        total = chunk_lse if total is None else torch.logaddexp(total, chunk_lse)
    return total - torch.log(torch.tensor(float(k)))
