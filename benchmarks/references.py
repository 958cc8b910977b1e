"""The two reference implementations the speed benchmark measures pyro-vae against.

Both use the same networks as pyro-vae (``pyro_vae.networks``), the same in-memory data,
minibatch order and dynamic binarization, and report their loss as pyro-vae does: an estimate of
the full-data negative ELBO (minibatch sum scaled by N / B).

- :class:`HandWrittenVAE`: plain PyTorch, the neural-net reading. Reconstruction by
  ``binary_cross_entropy_with_logits``, KL in closed form, one ``torch.optim.Adam``.
- :class:`PyroTutorialVAE`: Pyro's tutorial recipe. ``SVI`` + ``pyro.optim.Adam`` (one Adam per
  parameter, through the param store) + ``Trace_ELBO``, argument validation on, a float (a sync)
  returned by every ``svi.step``.
"""

from __future__ import annotations

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO
from torch.nn import functional as F

from pyro_vae import VAE, VAEConfig
from pyro_vae.program.networks import BernoulliDecoder, Encoder

__all__ = ["HandWrittenVAE", "PyroTutorialVAE", "hand_written_iwae"]


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
