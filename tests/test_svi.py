"""``fit`` is Pyro's SVI: the same parameters, step for step, as the textbook loop

    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": lr}), Trace_ELBO())
    for each minibatch: svi.step(x, idx, N, beta)

on the same seeds, minibatches and binarizations, for the fused and the plain Pyro path."""

import pyro
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO

from pyro_vae import VAE, ImageData, VAEConfig, fit

N, BATCH, EPOCHS, LR = 96, 16, 50, 3e-3  # 300 steps


def tiny_images() -> ImageData:
    """96 grey 1x8x8 images: the data set carries its own shape (no 28x28 anywhere)."""
    g = torch.Generator().manual_seed(3)
    blobs = torch.rand(N, 1, 8, 8, generator=g) * torch.linspace(0.2, 1.0, 8)  # brighter to the right
    return ImageData(blobs.reshape(N, 64), None, "tiny", "train", "dynamic", (1, 8, 8))


def textbook_svi(config: VAEConfig, data: ImageData) -> VAE:
    """Pyro's own SVI loop, drawing minibatches and binarizations as ``fit`` does."""
    pyro.set_rng_seed(config.seed)
    pyro.clear_param_store()
    vae = VAE(config, num_data=N)
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": config.lr}), Trace_ELBO())
    for epoch in range(config.epochs):
        order = torch.randperm(N)  # the epoch's minibatches
        for idx in order.split(config.batch_size):
            x = torch.bernoulli(data.images[idx])  # dynamic binarization
            svi.step(x, idx, N, config.beta_at(epoch))
    return vae


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("kl_warmup", [0, 5])
def test_fit_takes_the_same_steps_as_pyro_svi(fused, kl_warmup):
    data = tiny_images()
    config = VAEConfig(z_dim=3, hidden=(16,), batch_size=BATCH, epochs=EPOCHS, lr=LR, val_size=0, fused=fused,
                       kl_warmup=kl_warmup, event_shape=(1, 8, 8), seed=11)
    run = fit(config, train_data=data, progress=False, log=lambda s: None)
    reference = textbook_svi(config, data)
    ours, theirs = run.vae.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    moved = max((reference.state_dict()[k] - VAE(config).state_dict()[k]).abs().max() for k in theirs)
    assert moved > 0.05  # 300 steps really moved the parameters
    for k in ours:
        assert torch.allclose(ours[k], theirs[k], rtol=1e-4, atol=1e-5), (k, (ours[k] - theirs[k]).abs().max())
    assert run.config.event_shape == (1, 8, 8) and run.sample(2).shape == (2, 64)


def test_fit_reads_the_shape_from_the_data():
    """A config that says 28x28 is corrected by the data it trains on."""
    run = fit(VAEConfig(z_dim=2, hidden=(8,), batch_size=32, epochs=1, val_size=0), train_data=tiny_images(),
              progress=False, log=lambda s: None)
    assert run.config.event_shape == (1, 8, 8) and run.vae.x_dim == 64
