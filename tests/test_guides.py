import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoNormal

from pyro_vae import VAE, VAEConfig
from pyro_vae.program.guides import AmortizedGuide, MeanFieldGuide, SemiAmortizedGuide
from pyro_vae.infer.local import fit_local
from pyro_vae.infer.objectives import make_optimizer
from pyro_vae.infer.svi import fit

Z = 4


@pytest.fixture
def data(small_train):
    return torch.bernoulli(small_train.images[:200], generator=torch.Generator().manual_seed(0))


def test_every_guide_trains_with_the_same_model(data):
    vae = VAE(VAEConfig(z_dim=Z, hidden=(64,)))
    model = vae.model  # one model object, three variational families
    guides = {
        "amortized": AmortizedGuide(784, (64,), Z),
        "mean-field": MeanFieldGuide(len(data), Z, sparse=False),
        "semi-amortized": SemiAmortizedGuide(784, (64,), Z, refine_steps=2),
    }
    guides["semi-amortized"].attach(vae.likelihood)
    loss_fn = TraceMeanField_ELBO().differentiable_loss
    decoder_init = {k: v.clone() for k, v in vae.decoder.state_dict().items()}
    for name, guide in guides.items():
        vae.decoder.load_state_dict(decoder_init)
        local_lr = 0.1 if name == "mean-field" else 1e-2
        opt = torch.optim.Adam(
            [{"params": vae.decoder.parameters()}, {"params": guide.parameters(), "lr": local_lr}], lr=1e-2
        )
        losses = []
        for step in range(60):
            idx = torch.randint(0, len(data), (50,))
            loss = loss_fn(model, guide, data[idx], idx, len(data)) / len(data)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 15, name


def test_mean_field_minibatch_step_moves_only_its_rows(data):
    config = VAEConfig(z_dim=Z, hidden=(64,), guide="mean-field")
    vae = VAE(config, num_data=len(data))
    local = vae.inference.local.weight
    assert local.numel() == len(data) * 2 * Z  # N x 2 x z_dim local parameters, nothing else
    assert sum(p.numel() for p in vae.inference.parameters()) == len(data) * 2 * Z
    optimizer = make_optimizer(vae, config)
    loss_fn = Trace_ELBO().differentiable_loss
    for step in range(5):  # several steps, so that Adam has momentum in many rows
        idx = torch.randperm(len(data))[:40]
        before = local.detach().clone()
        loss = loss_fn(vae.model, vae.guide, data[idx], idx, len(data))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        changed = (local.detach() != before).any(-1).nonzero().flatten()
        assert set(changed.tolist()) == set(idx.tolist())


def test_hand_written_mean_field_matches_pyro_autonormal(data):
    vae = VAE(VAEConfig(z_dim=Z, hidden=(64,)))
    x, n = data[:30], 30

    def create_plates(x, idx=None, num_data=None, beta=1.0):
        return pyro.plate("data", size=n, subsample=idx, dim=-1)

    auto = AutoNormal(vae.model, create_plates=create_plates, init_scale=0.5)
    auto(x)  # creates its parameters
    ours = MeanFieldGuide(n, Z)
    loc, scale = torch.randn(n, Z), torch.rand(n, Z) + 0.2
    ours.set(loc, scale)
    with torch.no_grad():
        auto.locs.z = loc
        auto.scales.z = scale
    idx = torch.tensor([3, 17, 5, 29])
    for guide in (auto, ours):  # same subsample, same seed: same z, same ELBO estimate
        pyro.set_rng_seed(11)
        value = Trace_ELBO().loss(vae.model, guide, x[idx], idx, n)
        if guide is auto:
            expected = value
    assert value == pytest.approx(expected, rel=1e-5)


def test_semi_amortized_with_zero_steps_is_amortized(data):
    torch.manual_seed(0)
    semi = VAE(VAEConfig(z_dim=Z, hidden=(64,), guide="semi-amortized", refine_steps=0))
    amort = VAE(VAEConfig(z_dim=Z, hidden=(64,)))
    amort.load_state_dict(semi.state_dict())
    grads = []
    for vae in (semi, amort):
        pyro.set_rng_seed(4)
        loss = Trace_ELBO().differentiable_loss(vae.model, vae.guide, data[:50])
        vae.zero_grad()
        loss.backward()
        grads.append([p.grad.clone() for p in vae.parameters()])
        if vae is semi:
            semi_loss = loss.item()
    assert loss.item() == semi_loss
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@pytest.fixture(scope="module")
def trained():
    return fit(VAEConfig(z_dim=8, hidden=(128,), epochs=8, limit=1500, val_size=300), progress=False, log=lambda s: None)


def test_refinement_improves_each_images_elbo(trained, data):
    from pyro_vae.program.guides import local_elbo

    semi = SemiAmortizedGuide(784, (128,), 8, refine_steps=20, refine_lr=1e-2)
    semi.encoder.load_state_dict(trained.vae.inference.encoder.state_dict())
    semi.attach(trained.vae.likelihood)
    x = data[:100]
    with torch.no_grad():
        before = torch.stack([local_elbo(trained.vae.likelihood, x, *semi.encoder(x)) for _ in range(50)]).mean()
        after = torch.stack([local_elbo(trained.vae.likelihood, x, *semi.posterior(x)) for _ in range(50)]).mean()
    assert after > before + 0.5


def test_fit_local_improves_held_out_elbo(trained):
    from pyro_vae.core.data import eval_binarized
    from pyro_vae import load_dataset

    val = load_dataset("mnist-5k", "val", val_size=300, limit=100)
    x = eval_binarized(val)
    zero = fit_local(trained, x, steps=300, init="zero", lr=5e-2)
    enc = fit_local(trained, x, steps=300, init="encoder", lr=1e-2)
    assert zero.elbo[-1] > zero.elbo[0] + 20  # from the prior, a long way up
    # from the encoder: the curve starts at the encoder's ELBO and ends no worse (beyond MC noise)
    start = sum(enc.elbo[:3]) / 3
    end = sum(enc.elbo[-3:]) / 3
    assert end > start - 0.5
    assert enc.loc.shape == (100, 8) and (enc.scale > 0).all()


def test_evaluate_fits_new_images_for_the_mean_field_guide(tmp_path, capsys):
    import json

    from pyro_vae.cli import main

    small = ["--limit", "300", "--val-size", "100", "--epochs", "2", "--batch-size", "50", "--hidden", "32", "--quiet"]
    assert main(["train", *small, "--guide", "mean-field", "--out", str(tmp_path / "mf")]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "mf"), "--iwae-k", "8", "--elbo-samples", "4", "--limit", "20", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 20 and result["iwae"] >= result["elbo"] - 3 * result["elbo_se"]


def test_adam_beta1_reaches_the_optimizer(data):
    """``adam_beta1`` sets Adam's first-moment decay: three steps equal torch's Adam with those betas
    (and differ from the default 0.9, which the first step alone cannot show)."""
    params = {}
    for beta1, reference in [(0.95, False), (0.95, True), (0.9, False)]:
        torch.manual_seed(0)
        config = VAEConfig(z_dim=Z, hidden=(16,), adam_beta1=beta1)
        vae = VAE(config)
        optimizer = torch.optim.Adam(vae.parameters(), lr=config.lr, betas=(beta1, 0.999)) if reference \
            else make_optimizer(vae, config)
        for step in range(3):
            loss = Trace_ELBO().differentiable_loss(vae.model, vae.guide, data[:20], None, 20)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        params[beta1, reference] = torch.cat([p.detach().flatten() for p in vae.parameters()])
    assert torch.equal(params[0.95, False], params[0.95, True])
    assert not torch.allclose(params[0.95, False], params[0.9, False])
