"""The semi-supervised M2 (pyro_vae.program.m2): the enumerated ELBO against a hand computation,
labelled images counted once, learning on the embedded data, resume, evaluation, bad inputs."""

import math

import pyro
import pytest
import torch
from pyro import poutine

from pyro_vae.cli import main
from pyro_vae.core.config import VAEConfig
from pyro_vae.core.data import eval_binarized, load_splits
from pyro_vae.experiments.m2_lab import accuracy, labelled_only_classifier
from pyro_vae.infer.evaluate_m2 import class_log_weights, evaluate_m2
from pyro_vae.infer.m2 import m2_elbo
from pyro_vae.infer.svi import fit
from pyro_vae.program.m2 import M2, choose_labelled

K, D, Z, B = 3, 6, 2, 5


def _tiny(num_labels=3, alpha=0.1, **kw):
    config = VAEConfig(model="m2", event_shape=(D,), z_dim=Z, hidden=(4,), num_classes=K, num_labels=num_labels,
                       alpha=alpha)
    torch.manual_seed(0)
    return M2(config, **kw)


def _x(n=B, seed=1):
    return torch.bernoulli(torch.full((n, D), 0.5), generator=torch.Generator().manual_seed(seed))


def _class_elbos(m2, x, y, eps):
    """Per image, for one label value y (a [B] tensor or an int broadcast), by hand:
    log p(y) + log p(x|y,z) + log p(z) - log q(z|x,y), with z = loc + scale * eps."""
    y = torch.as_tensor(y).expand(len(x))
    onehot = torch.nn.functional.one_hot(y, K).float()
    loc, scale = m2.encoder(torch.cat([x, onehot], -1))
    z = loc + scale * eps
    logits = m2.decoder(torch.cat([z, onehot], -1))
    log_px = torch.distributions.Bernoulli(logits=logits).log_prob(x).sum(-1)
    log_pz = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
    log_qz = torch.distributions.Normal(loc, scale).log_prob(z).sum(-1)
    return -math.log(K) + log_px + log_pz - log_qz  # [B]


def _unlabelled_by_hand(m2, x, eps):
    """sum_y q(y|x) [ELBO(x, y) - log q(y|x)] per image, eps [K, B, Z] (the guide's draw order)."""
    log_q = torch.log_softmax(m2.classifier(x), -1)  # [B, K]
    per_class = torch.stack([_class_elbos(m2, x, k, eps[k]) for k in range(K)], -1)  # [B, K]
    return (log_q.exp() * (per_class - log_q)).sum(-1)  # [B]


def test_enumerated_elbo_is_the_sum_over_classes_of_the_per_class_elbos():
    m2, x = _tiny(), _x()
    pyro.set_rng_seed(7)
    loss = m2_elbo().loss(m2.model, m2.guide, x)
    torch.manual_seed(7)
    eps = torch.randn(K, B, Z)  # what the guide's z site draws: [K, B, Z] (y enumerated left of the plate)
    with torch.no_grad():
        by_hand = -_unlabelled_by_hand(m2, x, eps).sum().item()
    assert loss == pytest.approx(by_hand, rel=1e-5)


def test_enumerated_trace_shapes():
    m2, x = _tiny(), _x()
    guide = poutine.trace(poutine.enum(m2.guide, first_available_dim=-2)).get_trace(x)
    assert guide.nodes["y"]["value"].shape == (K, 1)  # all K values, left of the data plate
    assert guide.nodes["z"]["value"].shape == (K, B, Z)


def test_a_labelled_image_contributes_its_terms_exactly_once():
    n = 8
    images, labels = _x(n, seed=2), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    m2 = _tiny(num_labels=3, alpha=0.5, images=images, labels=labels)
    rows = m2.labelled_rows
    assert len(rows) == 3 and sorted(labels[rows].tolist()) == [0, 1, 2]  # balanced: one per class
    idx = torch.arange(n)
    labelled = (images[rows], labels[rows], torch.arange(3))
    pyro.set_rng_seed(3)
    loss = m2_elbo().loss(m2.model, m2.guide, images, idx, num_data=n, labelled=labelled)
    torch.manual_seed(3)
    eps_u, eps_l = torch.randn(K, n, Z), torch.randn(3, Z)  # the guide's draws: z (all rows), then z_l
    with torch.no_grad():
        unlabelled = _unlabelled_by_hand(m2, images, eps_u)
        keep = torch.ones(n, dtype=torch.bool)
        keep[rows] = False  # labelled rows: not in the unlabelled sum
        labelled_terms = _class_elbos(m2, images[rows], labels[rows], eps_l)
        log_q = torch.log_softmax(m2.classifier(images[rows]), -1).gather(-1, labels[rows, None]).squeeze(-1)
        objective = unlabelled[keep].sum() + labelled_terms.sum() + 0.5 * n / 3 * log_q.sum()  # alpha N / N_l
    assert loss == pytest.approx(-objective.item(), rel=1e-5)


def test_balanced_choice_and_its_errors():
    labels = torch.arange(30) % 3
    rows = choose_labelled(labels, 7, 3, seed=0)
    assert sorted(torch.bincount(labels[rows]).tolist()) == [2, 2, 3]
    assert torch.equal(rows, choose_labelled(labels, 7, 3, seed=0))
    assert not torch.equal(rows, choose_labelled(labels, 7, 3, seed=1))


def test_accuracy_beats_chance_after_a_short_run_and_resume_matches(tmp_path):
    config = VAEConfig(model="m2", num_labels=50, alpha=5.0, limit=1000, val_size=300, z_dim=8, hidden=(64,),
                       batch_size=100, labelled_batch=50, epochs=4, seed=0)
    run = fit(config, tmp_path / "a", progress=False, log=lambda s: None)
    _, val = load_splits(config)
    acc = accuracy(run.vae.classify, val.images, val.labels)
    assert acc > 0.5  # chance: 0.1 (0.67 with these settings)
    fit(config.replace(epochs=2), tmp_path / "b", progress=False, log=lambda s: None)
    resumed = fit(config, tmp_path / "b", resume=True, progress=False, log=lambda s: None)
    for (name, a), (_, b) in zip(run.vae.state_dict().items(), resumed.vae.state_dict().items()):
        assert torch.equal(a, b), name
    result = evaluate_m2(tmp_path / "a", val, iwae_k=20, elbo_samples=5)
    assert result.accuracy == pytest.approx(accuracy(run.vae.classify, eval_binarized(val), val.labels))
    assert result.iwae > result.elbo and sum(map(sum, result.confusion)) == len(val)
    base = labelled_only_classifier(run.config, val.images[:50], val.labels[:50], steps=50)
    assert 0 <= accuracy(base, val.images, val.labels) <= 1


def test_class_log_weights_match_pyro_traces():
    m2, x = _tiny(), _x()
    eps = torch.randn(1, K, B, Z)
    with torch.no_grad():
        log_w = class_log_weights(m2, x, eps)[0]  # [K, B]
        for k in range(K):
            assert torch.allclose(log_w[k], _class_elbos(m2, x, k, eps[0, k]) + math.log(K), atol=1e-5)


@pytest.mark.parametrize("flags, message", [
    (["--labels", "5"], "--labels 5 is fewer than the 10 classes"),
    (["--labels", "600"], "--labels 600 exceeds the 300 training images"),
    (["--labels", "20", "--guide", "mean-field"], "model=m2 supports"),
])
def test_bad_inputs_are_one_line_errors(flags, message, tmp_path, capsys):
    argv = ["train", "--model", "m2", "--limit", "300", "--epochs", "1", "--quiet", "--out", str(tmp_path / "r"), *flags]
    assert main(argv) != 0
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_data_without_labels_is_a_one_line_error(tmp_path, capsys):
    data = tmp_path / "x.pt"
    torch.save(torch.rand(50, 1, 8, 8), data)
    assert main(["train", "--model", "m2", "--data", str(data), "--val-size", "10", "--labels", "10",
                 "--out", str(tmp_path / "r"), "--quiet"]) != 0
    err = capsys.readouterr().err.strip()
    assert "model=m2 needs labels" in err and len(err.splitlines()) == 1
