"""The stacked M1+M2 (pyro_vae.program.m1m2): its ELBO against a hand computation with z1 fixed,
the labelled weights' objectives, M1 frozen, the M1 run recorded and required, save/load/resume/
evaluate, one-line errors. Tiny M1s are trained here on synthetic labelled vectors."""

import math

import pyro
import pytest
import torch
from torch.distributions import Bernoulli, Normal, kl_divergence

from pyro_vae.cli import main
from pyro_vae.core.config import VAEConfig
from pyro_vae.core.data import ImageData, eval_binarized
from pyro_vae.core.errors import CheckpointError, ConfigError
from pyro_vae.experiments.m2_lab import accuracy, codes_classifier
from pyro_vae.infer.evaluate_m2 import class_log_weights, evaluate_m2
from pyro_vae.infer.m2 import m2_elbo
from pyro_vae.infer.run import load_run
from pyro_vae.infer.svi import fit
from pyro_vae.program.m1m2 import M1M2, file_sha256

K, D, Z1, Z2 = 3, 12, 4, 2


def _data(n=120, seed=0, d=D):
    """Labelled binary vectors: each class flips its own prototype's pixels on with p = 0.9."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % K
    prototypes = torch.rand(K, d, generator=torch.Generator().manual_seed(99)) > 0.5
    images = torch.bernoulli(0.05 + 0.9 * prototypes[labels].float(), generator=g)
    return ImageData(images, labels, "synthetic", "train", "dynamic", (d,))


def _quiet(message):
    pass


@pytest.fixture(scope="module")
def m1_run(tmp_path_factory):
    """A tiny VAE (M1) trained for a few steps."""
    config = VAEConfig(event_shape=(D,), z_dim=Z1, hidden=(32,), epochs=30, batch_size=20, kl_warmup=0, lr=1e-2,
                       val_size=0)
    folder = tmp_path_factory.mktemp("m1")
    fit(config, folder, train_data=_data(), progress=False, log=_quiet)
    return folder


def _config(m1_run, **kw):
    settings = dict(model="m2", features=str(m1_run), event_shape=(D,), num_classes=K, z_dim=Z2, hidden=(8,),
                    num_labels=6, labelled_batch=6, batch_size=10, epochs=2, kl_warmup=0, val_size=0)
    settings.update(kw)
    return VAEConfig(**settings)


def _program(m1_run, units=(0, 2, 3), images=None, labels=None, **kw):
    torch.manual_seed(0)
    return M1M2(_config(m1_run, feature_units=units, **kw), images, labels)


def _class_elbo(p, x, y, eps1, eps2, closed_form=False):
    """Per image, by hand, for label y (an int or [B]) with z1 = loc1 + scale1 * eps1 fixed:
    log p(y) + log p(x|z1) + log p(z1|y, z2) + log p(z2) - log q(z2|z1, y) - log q(z1|x)."""
    y = torch.as_tensor(y).expand(len(x))
    onehot = torch.nn.functional.one_hot(y, K).float()
    loc1, scale1 = p.m1.inference.posterior(x)  # M1's q(z1|x)
    z1 = loc1 + scale1 * eps1
    units = list(p.config.feature_units)
    loc2, scale2 = p.encoder(torch.cat([z1[:, units], onehot], -1))
    z2 = loc2 + scale2 * eps2
    mu, sigma = p.decoder(torch.cat([z2, onehot], -1))
    full_mu, full_sigma = torch.zeros_like(z1), torch.ones_like(z1)
    full_mu[:, units], full_sigma[:, units] = mu, sigma
    log_p = Bernoulli(logits=p.m1.decoder(z1)).log_prob(x).sum(-1) + Normal(full_mu, full_sigma).log_prob(z1).sum(-1)
    q2 = Normal(loc2, scale2)
    kl2 = kl_divergence(q2, Normal(0.0, 1.0)).sum(-1) if closed_form else \
        q2.log_prob(z2).sum(-1) - Normal(0.0, 1.0).log_prob(z2).sum(-1)
    return -math.log(K) + log_p - kl2 - Normal(loc1, scale1).log_prob(z1).sum(-1)


def _unlabelled(p, x, eps1, eps2, closed_form=False):
    """sum_y q(y|z1) [ELBO(x, y) - log q(y|z1)] per image; eps1 [B, Z1], eps2 [K, B, Z2]."""
    loc1, scale1 = p.m1.inference.posterior(x)
    log_q = torch.log_softmax(p.classifier((loc1 + scale1 * eps1)[:, list(p.config.feature_units)]), -1)  # [B, K]
    per_class = torch.stack([_class_elbo(p, x, k, eps1, eps2[k], closed_form) for k in range(K)], -1)
    return (log_q.exp() * (per_class - log_q)).sum(-1)


@pytest.mark.parametrize("elbo", ["trace", "meanfield"])
def test_elbo_is_the_sum_over_classes_of_the_per_class_elbos_with_z1_fixed(m1_run, elbo):
    p, x = _program(m1_run, elbo=elbo), _data(5, seed=3).images
    pyro.set_rng_seed(7)
    loss = m2_elbo().loss(p.model, p.guide, x)
    torch.manual_seed(7)
    eps1, eps2 = torch.randn(5, Z1), torch.randn(K, 5, Z2)  # the guide's draws: z1 first, then z for every y
    with torch.no_grad():
        by_hand = -_unlabelled(p, x, eps1, eps2, closed_form=elbo == "meanfield").sum().item()
    assert loss == pytest.approx(by_hand, rel=1e-5)


@pytest.mark.parametrize("weight, w, elbo", [("data", 1.0, "trace"), ("step", 2.0, "meanfield"), ("2.5", 2.5, "trace")])
def test_the_labelled_weights_give_the_documented_objectives(m1_run, weight, w, elbo):
    data = _data(8, seed=4)
    p = _program(m1_run, images=data.images, labels=data.labels, labelled_weight=weight, num_labels=3, batch_size=4,
                 alpha=0.5, elbo=elbo)
    closed_form = elbo == "meanfield"
    rows = p.labelled_rows
    labelled = (data.images[rows], data.labels[rows], torch.arange(3))
    pyro.set_rng_seed(3)
    loss = m2_elbo().loss(p.model, p.guide, data.images, torch.arange(8), num_data=8, labelled=labelled)
    torch.manual_seed(3)
    eps1, eps2 = torch.randn(8, Z1), torch.randn(K, 8, Z2)  # unlabelled plate: z1, then z for every y
    eps1_l, eps2_l = torch.randn(3, Z1), torch.randn(3, Z2)  # labelled plate: z1_l, z_l
    with torch.no_grad():
        keep = torch.ones(8, dtype=torch.bool)
        keep[rows] = False
        unlabelled = _unlabelled(p, data.images, eps1, eps2, closed_form)[keep].sum()
        xl, yl = labelled[0], labelled[1]
        labelled_elbo = _class_elbo(p, xl, yl, eps1_l, eps2_l, closed_form).sum()
        loc1, scale1 = p.m1.inference.posterior(xl)
        codes = (loc1 + scale1 * eps1_l)[:, list(p.config.feature_units)]
        log_q = torch.log_softmax(p.classifier(codes), -1).gather(-1, yl[:, None]).sum()
        objective = unlabelled + w * labelled_elbo + 0.5 * 8 / 3 * log_q  # J = U + w L + alpha N / N_l log q
    assert loss == pytest.approx(-objective.item(), rel=1e-5)


def test_class_log_weights_use_one_z1_per_draw_for_every_label(m1_run):
    p, x = _program(m1_run), _data(5, seed=5).images
    eps = torch.randn(2, K, 5, p.noise_dim)
    with torch.no_grad():
        log_w = class_log_weights(p, x, eps)  # [2, K, 5]
        for j in range(2):
            for k in range(K):
                by_hand = _class_elbo(p, x, k, eps[j, 0, :, Z2:], eps[j, k, :, :Z2]) + math.log(K)
                assert torch.allclose(log_w[j, k], by_hand, atol=1e-4)


def _fit(m1_run, out, **kw):
    return fit(_config(m1_run, **kw), out, train_data=_data(), progress=False, log=_quiet)


def test_m1_stays_frozen_and_the_run_saves_loads_resumes_and_evaluates(m1_run, tmp_path):
    sha = file_sha256(m1_run / "checkpoint.pt")
    before = {k: v.clone() for k, v in load_run(m1_run).vae.state_dict().items()}
    run = _fit(m1_run, tmp_path / "a", elbo="meanfield", labelled_weight="step", epochs=3)
    assert run.config.features_sha256 == sha and run.config.feature_units  # recorded: M1's checksum, active units
    assert not any(name.startswith("m1.") for name in run.vae.state_dict())  # M1's weights stay in M1's run
    for name, value in run.vae.m1.state_dict().items():
        assert torch.equal(value, before[name]), name  # M1 did not move while M2 trained
    assert file_sha256(m1_run / "checkpoint.pt") == sha
    loaded = load_run(tmp_path / "a")
    for (name, a), (_, b) in zip(run.vae.state_dict().items(), loaded.vae.state_dict().items()):
        assert torch.equal(a, b), name
    _fit(m1_run, tmp_path / "b", elbo="meanfield", labelled_weight="step", epochs=1)
    resumed = fit(_config(m1_run, elbo="meanfield", labelled_weight="step", epochs=3), tmp_path / "b", resume=True,
                  train_data=_data(), progress=False, log=_quiet)
    for (name, a), (_, b) in zip(run.vae.state_dict().items(), resumed.vae.state_dict().items()):
        assert torch.equal(a, b), name  # bit-exact on CPU
    test = _data(60, seed=8)
    result = evaluate_m2(tmp_path / "a", test, iwae_k=20, elbo_samples=5)
    assert result.accuracy == pytest.approx(accuracy(loaded.vae.classify, eval_binarized(test), test.labels))
    assert result.iwae > result.elbo and sum(map(sum, result.confusion)) == 60
    codes = codes_classifier(loaded.vae, test.images[:9], test.labels[:9], steps=20)
    assert 0 <= accuracy(lambda x: codes(loaded.vae.read(x)), test.images, test.labels) <= 1


def test_an_m1m2_run_refuses_to_load_without_its_m1(m1_run, tmp_path):
    _fit(m1_run, tmp_path / "run", epochs=1)
    moved = tmp_path / "m1-copy"
    moved.mkdir()
    for name in ("checkpoint.pt", "config.json"):
        (moved / name).write_bytes((m1_run / name).read_bytes())
    _fit(moved, tmp_path / "on-copy", epochs=1)
    (moved / "checkpoint.pt").unlink()
    with pytest.raises(CheckpointError, match="no VAE run there") as missing:
        load_run(tmp_path / "on-copy")
    fit(load_run(m1_run).config.replace(seed=1), moved, train_data=_data(), progress=False, log=_quiet,
        overwrite=True)  # another M1 in its place
    with pytest.raises(CheckpointError, match="changed since") as changed:
        load_run(tmp_path / "on-copy")
    with pytest.raises(CheckpointError, match="trained on an M1") as resumed:  # resume checks the weights' M1
        fit(_config(moved, epochs=2), tmp_path / "on-copy", resume=True, train_data=_data(), progress=False, log=_quiet)
    for error in (missing, changed, resumed):
        assert len(str(error.value).splitlines()) == 1


def test_units_that_do_not_fit_m1s_z_dim_are_a_one_line_error(m1_run):
    with pytest.raises(ConfigError, match=f"do not fit M1's z_dim={Z1}") as error:
        _program(m1_run, units=(0, Z1))
    assert len(str(error.value).splitlines()) == 1


@pytest.fixture
def files(tmp_path):
    data = _data()
    torch.save(data.images, tmp_path / "x.pt")
    torch.save(data.labels, tmp_path / "y.pt")
    wide = _data(d=D + 2)
    torch.save(wide.images, tmp_path / "wide.pt")
    return tmp_path


@pytest.mark.parametrize("case, message", [
    ("m2-run", "not a VAE (M1)"),
    ("wide", f"M1 was trained on data of shape [{D}]; these are [{D + 2}]"),
    ("missing", "no VAE run there"),
])
def test_bad_features_are_one_line_errors(m1_run, files, case, message, capsys):
    m2_run = files / "m2-run"
    if case == "m2-run":
        _fit(m1_run, m2_run, epochs=1)
    features = {"m2-run": m2_run, "wide": m1_run, "missing": files / "nothing"}[case]
    data = files / ("wide.pt" if case == "wide" else "x.pt")
    argv = ["train", "--model", "m2", "--features", str(features), "--data", str(data), "--labels-file",
            str(files / "y.pt"), "--val-size", "20", "--labels", "6", "--epochs", "1", "--quiet", "--out",
            str(files / "out")]
    assert main(argv) != 0
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_the_command_line_trains_and_evaluates_an_m1m2_run(m1_run, files, capsys):
    common = ["--data", str(files / "x.pt"), "--labels-file", str(files / "y.pt"), "--val-size", "20"]
    assert main(["train", "--model", "m2", "--features", str(m1_run), *common, "--labels", "6", "--labelled-batch",
                 "6", "--labelled-weight", "step", "--z-dim", "2", "--hidden", "8", "--epochs", "1", "--batch-size",
                 "20", "--quiet", "--out", str(files / "cli")]) == 0
    assert (files / "cli" / "confusion.png").exists()
    capsys.readouterr()
    assert main(["evaluate", str(files / "cli"), "--iwae-k", "3", "--elbo-samples", "2", "--quiet", "--json"]) == 0
    out = capsys.readouterr().out
    assert '"accuracy"' in out and '"num_labels": 6' in out


def test_the_plate_diagram_stacks_m2_on_m1(m1_run):
    import matplotlib

    matplotlib.use("Agg")
    from pyro_vae.experiments.m2_plots import plot_m1m2_diagram

    fig = plot_m1m2_diagram(_program(m1_run, elbo="meanfield"), _data(4).images)
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert {"$y$", "$z_2$", "$z_1$", "$x$"} <= set(texts) and "M1\n(frozen)" in texts
    assert len(fig.axes[0].patches) > 4  # circles, arrows, the plate


def test_the_run_cache_serves_a_stacked_run_and_keys_it_on_m1(m1_run, tmp_path):
    """fit(cache=...) fills M1's checksum and units in before keying, so a second call loads the
    entry instead of training it again."""
    messages = []
    config = _config(m1_run)
    first = fit(config, train_data=_data(), progress=False, log=messages.append, cache=tmp_path)
    again = fit(config, train_data=_data(), progress=False, log=messages.append, cache=tmp_path)
    assert [m.split(":")[1].split()[0] for m in messages if m.startswith("run cache")] == ["training", "loaded"]
    assert again.path == first.path and again.config.features_sha256 == file_sha256(m1_run / "checkpoint.pt")
