import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

from pyro_vae import VAE, VAEConfig
from pyro_vae.infer.fused import fused_available, fused_elbo_loss
from pyro_vae.infer.objectives import check_fused


@pytest.mark.parametrize("guide", ["amortized", "mean-field", "semi-amortized"])
@pytest.mark.parametrize("elbo", ["trace", "meanfield"])
@pytest.mark.parametrize("likelihood", ["bernoulli", "normal", "continuous-bernoulli"])
def test_fused_path_equals_plain_pyro_path(guide, elbo, likelihood, binary_batch):
    """Same seed, same minibatch: the same loss and the same gradient for every parameter."""
    config = VAEConfig(z_dim=4, hidden=(32,), guide=guide, elbo=elbo, likelihood=likelihood, refine_steps=2)
    assert fused_available(config)
    vae = VAE(config, num_data=100)
    x, idx = binary_batch[:16], torch.arange(40, 56)
    pyro_elbo = {"trace": Trace_ELBO(), "meanfield": TraceMeanField_ELBO()}[elbo]
    results = []
    for fused in (False, True):
        pyro.set_rng_seed(7)
        if fused:
            loss = fused_elbo_loss(vae, x, idx, 100, beta=0.5, analytic_kl=elbo == "meanfield")
        else:
            loss = pyro_elbo.differentiable_loss(vae.model, vae.guide, x, idx, num_data=100, beta=0.5)
        vae.zero_grad()
        loss.backward()
        grads = [p.grad.to_dense().clone() for p in vae.parameters() if p.grad is not None]
        results.append((loss.item(), grads))
    (pyro_loss, pyro_grads), (fused_loss, fused_grads) = results
    assert fused_loss == pytest.approx(pyro_loss, rel=1e-5)
    assert len(pyro_grads) == len(fused_grads) == len(list(vae.parameters()))
    for a, b in zip(pyro_grads, fused_grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def test_fused_is_only_used_where_it_is_exact():
    assert not fused_available(VAEConfig(estimator="score"))
    assert not fused_available(VAEConfig(num_particles=4))
    assert not fused_available(VAEConfig(elbo="jit"))


def test_check_fused_catches_a_model_it_does_not_know(binary_batch):
    config = VAEConfig(z_dim=4, hidden=(32,))
    vae = VAE(config)
    check_fused(vae, config, binary_batch, None, None)  # agrees

    class Tempered(VAE):  # a model change the fused path does not see
        def model(self, x, idx=None, num_data=None, beta=1.0):
            with pyro.poutine.scale(scale=0.5):
                return super().model(x, idx, num_data, beta)

    with pytest.raises(RuntimeError, match="differs"):
        check_fused(Tempered(config), config, binary_batch, None, None)
