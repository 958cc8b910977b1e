"""Bring your own data and networks (issue 16): IDX of any size, folders of PNG/JPEG images,
tensor files, tensors and Datasets; the conv architecture; your own encoder/decoder; the
continuous Bernoulli; and a clear one-line error for every bad input. All data is made here, tiny."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributions as td
from PIL import Image
from torch import nn

from pyro_vae import VAE, VAEConfig, fit, load_dataset, load_run, write_idx
from pyro_vae.cli import main
from pyro_vae.core.data import as_image_data
from pyro_vae.core.errors import CheckpointError, ConfigError, DataError
from pyro_vae.infer.evaluate import evaluate, log_importance_weights
from pyro_vae.infer.objectives import check_fused
from pyro_vae.program.likelihoods import ContinuousBernoulli, continuous_bernoulli_log_norm
from pyro_vae.program.networks import ConvDecoder, ConvEncoder

TINY = ["--epochs", "1", "--batch-size", "10", "--hidden", "16", "--z-dim", "2", "--quiet"]
EVAL = ["--iwae-k", "3", "--elbo-samples", "2", "--quiet", "--json"]


# ----------------------------------------------------------------------------- data made here


def idx_folder(folder: Path, size=(16, 16), n_train=40, n_test=12) -> Path:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, *size), dtype=np.uint8))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n, dtype=np.uint8))
    return folder


def png(path: Path, size=(32, 32), channels=3, seed=0) -> Path:
    """A random image (PNG, or JPEG when ``path`` ends in .jpg)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, channels), dtype=np.uint8)
    Image.fromarray(pixels[..., 0] if channels == 1 else pixels).save(path)
    return path


def png_folder(folder: Path, classes=("cat", "dog"), per_class=10, size=(32, 32), channels=3) -> Path:
    for c, name in enumerate(classes):
        for i in range(per_class):
            png(folder / name / f"{i:03d}.png", size, channels, seed=100 * c + i)
    return folder


def run_cli(argv, capsys):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


# ----------------------------------------------------------------------------- the three sources, end to end


def test_idx_of_any_size_trains_evaluates_and_draws(tmp_path, capsys):
    data = idx_folder(tmp_path / "idx")
    assert load_dataset(data_dir=data, split="test").event_shape == (1, 16, 16)
    out = tmp_path / "run"
    code, _, err = run_cli(["train", "--data-dir", data, "--val-size", "10", *TINY, "--out", out], capsys)
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["event_shape"] == [1, 16, 16]
    assert all((out / f).exists() for f in ("elbo.png", "samples.png", "reconstructions.png", "manifold.png"))
    code, stdout, err = run_cli(["evaluate", out, *EVAL], capsys)
    assert code == 0, err
    result = json.loads(stdout)
    assert (result["split"], result["n"]) == ("test", 12) and np.isfinite(result["iwae"])


def test_colour_png_folder_with_classes_and_the_conv_arch(tmp_path, capsys):
    data = png_folder(tmp_path / "pngs")
    train = load_dataset(data_dir=data, val_size=4, need_labels=True)
    assert train.event_shape == (3, 32, 32) and train.images.shape == (16, 3 * 32 * 32)
    assert set(train.labels.tolist()) == {0, 1} and 0 <= train.images.min() and train.images.max() <= 1
    out = tmp_path / "run"
    code, _, err = run_cli(["train", "--data-dir", data, "--arch", "conv", "--val-size", "4", *TINY, "--out", out],
                           capsys)
    assert code == 0, err
    assert all((out / f).exists() for f in ("elbo.png", "samples.png", "reconstructions.png", "latent.png"))
    run = load_run(out)
    assert run.config.arch == "conv" and isinstance(run.vae.decoder, ConvDecoder)
    assert run.sample(3).shape == (3, 3 * 32 * 32)
    code, stdout, err = run_cli(["evaluate", out, *EVAL], capsys)  # its own folder: the validation images
    assert code == 0 and json.loads(stdout)["split"] == "val", err
    other = png_folder(tmp_path / "held-out", classes=("cat",), per_class=3)  # another folder: all of it
    code, stdout, err = run_cli(["evaluate", out, "--data-dir", other, *EVAL], capsys)
    assert code == 0 and (json.loads(stdout)["split"], json.loads(stdout)["n"]) == ("test", 3), err


def test_train_and_test_subfolders_share_the_class_labels(tmp_path):
    png_folder(tmp_path / "d" / "train", classes=("a", "b", "c"), per_class=3, size=(8, 8), channels=1)
    png_folder(tmp_path / "d" / "test", classes=("c",), per_class=2, size=(8, 8), channels=1)
    test = load_dataset(data_dir=tmp_path / "d", split="test")
    assert test.event_shape == (1, 8, 8) and test.labels.tolist() == [2, 2]
    assert len(load_dataset(data_dir=tmp_path / "d", val_size=2)) == 7


def test_grey_and_colour_mixed_become_colour_and_image_size_resizes(tmp_path):
    png(tmp_path / "f" / "a.png", (20, 20), channels=1)
    png(tmp_path / "f" / "b.png", (12, 30), channels=3)
    with pytest.raises(DataError, match=r"images differ in size: a.png is 20x20, b.png is 12x30; pass --image-size"):
        load_dataset(data_dir=tmp_path / "f", val_size=0)
    data = load_dataset(data_dir=tmp_path / "f", val_size=0, image_size=16)
    assert data.event_shape == (3, 16, 16) and data.labels is None


def test_flat_folder_of_grey_jpegs(tmp_path):
    for i in range(3):
        png(tmp_path / "j" / f"{i}.jpg", (10, 12), channels=1, seed=i)
    data = load_dataset(data_dir=tmp_path / "j", split="test")
    assert data.event_shape == (1, 10, 12) and len(data) == 3 and data.labels is None


def test_npy_vectors_with_labels_train_and_skip_image_figures(tmp_path, capsys):
    x = np.random.default_rng(0).normal(size=(40, 12)).astype(np.float32)  # not in [0, 1]: fine for a Normal
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "y.txt").write_text("\n".join(str(i % 3) for i in range(40)) + "\n")
    out = tmp_path / "run"
    argv = ["train", "--data", tmp_path / "x.npy", "--labels-file", tmp_path / "y.txt", "--likelihood", "normal",
            "--binarize", "none", "--val-size", "10", *TINY, "--out", out]
    code, stdout, err = run_cli(argv, capsys)
    assert code == 0, err
    assert (out / "elbo.png").exists() and (out / "latent.png").exists() and not (out / "samples.png").exists()
    assert "vectors of 12 numbers, not images" in stdout + err
    assert json.loads((out / "config.json").read_text())["event_shape"] == [12]
    code, stdout, err = run_cli(["evaluate", out, *EVAL], capsys)
    assert code == 0 and json.loads(stdout)["split"] == "val", err
    data = load_dataset(data=tmp_path / "x.npy", labels_file=tmp_path / "y.txt", split="test", binarize="none")
    assert data.images.shape == (40, 12) and data.labels[:4].tolist() == [0, 1, 2, 0]


def test_pt_images_uint8_and_static_binarization(tmp_path):
    torch.save(torch.randint(0, 256, (30, 1, 6, 5), dtype=torch.uint8), tmp_path / "x.pt")
    data = load_dataset(data=str(tmp_path / "x.pt"), val_size=5, binarize="static")
    assert data.event_shape == (1, 6, 5) and len(data) == 25 and set(data.images.unique().tolist()) <= {0.0, 1.0}
    assert data.images.equal(load_dataset(data=str(tmp_path / "x.pt"), val_size=5, binarize="static").images)


class Pairs(torch.utils.data.Dataset):
    def __len__(self):
        return 24

    def __getitem__(self, i):
        return torch.full((1, 8, 8), (i % 5) / 5.0), i % 2


def test_fit_takes_a_tensor_or_a_dataset(tmp_path):
    config = VAEConfig(z_dim=2, hidden=(16,), epochs=1, batch_size=8, validate=True)
    x = torch.rand(24, 3, 8, 8)
    run = fit(config, train_data=x, val_data=x[:6], progress=False, log=lambda s: None)
    assert run.config.event_shape == (3, 8, 8) and run.history[0]["val_elbo"] is not None
    run = fit(config.replace(arch="conv"), train_data=Pairs(), progress=False, log=lambda s: None)
    assert run.config.event_shape == (1, 8, 8) and isinstance(run.vae.decoder, ConvDecoder)
    data = as_image_data(Pairs())
    assert data.labels.tolist()[:3] == [0, 1, 0] and data.images.shape == (24, 64)
    assert load_dataset(data=Pairs(), val_size=4).images.shape == (20, 64)  # a hold-out, as for files


# ----------------------------------------------------------------------------- networks


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 28, 28), (1, 32, 32), (3, 32, 32), (1, 64, 64), (3, 64, 64),
                                   (1, 15, 17)])
def test_conv_networks_fit_every_image_shape(shape):
    d = int(np.prod(shape))
    encoder, decoder = ConvEncoder(shape, 4), ConvDecoder(4, shape, outputs=2)
    loc, scale = encoder(torch.rand(3, d))
    assert loc.shape == scale.shape == (3, 4) and bool((scale > 0).all())
    mu, sigma = decoder(torch.randn(5, 3, 4))
    assert mu.shape == sigma.shape == (5, 3, d)


@pytest.mark.parametrize("likelihood", ["bernoulli", "normal", "continuous-bernoulli"])
def test_conv_arch_fused_loss_equals_pyro(likelihood):
    config = VAEConfig(arch="conv", z_dim=3, likelihood=likelihood, event_shape=(3, 8, 8))
    vae = VAE(config)
    x = torch.bernoulli(torch.full((6, 192), 0.3))
    check_fused(vae, config, x, torch.arange(6), 60)  # raises if they differ


def test_conv_needs_images(tmp_path):
    with pytest.raises(ConfigError, match=r"arch=conv needs images \[C, H, W\]; the data are vectors of 12"):
        fit(VAEConfig(arch="conv", epochs=1, batch_size=4), train_data=torch.rand(10, 12), progress=False)


class MyEncoder(nn.Module):
    def __init__(self, d=64, z=2, out=None):
        super().__init__()
        self.net, self.z, self.out = nn.Linear(d, 2 * z), z, out

    def forward(self, x):
        loc, raw = self.net(x).chunk(2, -1)
        return (loc, nn.functional.softplus(raw) + 1e-3) if self.out is None else self.out


class MyDecoder(nn.Module):
    def __init__(self, z=2, shape=(1, 8, 8)):
        super().__init__()
        self.net, self.shape = nn.Linear(z, int(np.prod(shape))), shape

    def forward(self, z):
        return self.net(z).view(-1, *self.shape)  # [B, C, H, W] is accepted too


def test_own_modules_train_save_and_load(tmp_path, capsys):
    config = VAEConfig(z_dim=2, epochs=1, batch_size=8, validate=True)
    out = tmp_path / "run"
    torch.manual_seed(0)
    run = fit(config, out, train_data=Pairs(), encoder=MyEncoder(), decoder=MyDecoder(), progress=False,
              log=lambda s: None)
    assert run.config.custom_modules == ("encoder", "decoder")
    assert json.loads((out / "config.json").read_text())["custom_modules"] == ["encoder", "decoder"]
    with pytest.raises(CheckpointError, match=r"load_run\('.*', encoder=MyEncoder\(\.\.\.\), decoder=MyDecoder"):
        load_run(out)
    code, _, err = run_cli(["evaluate", out, *EVAL], capsys)
    assert code == 1 and "load it in Python: load_run(" in err and err.count("\n") == 1
    loaded = load_run(out, encoder=MyEncoder(), decoder=MyDecoder())
    for a, b in zip(run.vae.state_dict().values(), loaded.vae.state_dict().values()):
        assert torch.equal(a.cpu(), b)
    result = evaluate(loaded, as_image_data(Pairs()), iwae_k=2, elbo_samples=2)
    assert np.isfinite(result.iwae)
    resumed = fit(config.replace(epochs=2), out, train_data=Pairs(), encoder=MyEncoder(), decoder=MyDecoder(),
                  resume=True, progress=False, log=lambda s: None)
    assert len(resumed.history) == 2 and resumed.history[0] == run.history[0]


def test_own_modules_of_the_wrong_shape_are_named():
    config = VAEConfig(z_dim=2, event_shape=(1, 8, 8))
    with pytest.raises(ConfigError, match=r"encoder MyEncoder returned \(\[2, 7\], \[2, 2\]\) for x of shape \[2, 64\]; "
                                          r"expected \(loc, scale\), each \[2, 2\]"):
        VAE(config, encoder=MyEncoder(out=(torch.zeros(2, 7), torch.ones(2, 2))))
    with pytest.raises(ConfigError, match=r"decoder MyDecoder returned \[2, 1, 4, 4\] .* expected logits \[2, 64\] "
                                          r"\(or \[2, 1, 8, 8\]\)"):
        VAE(config, decoder=MyDecoder(shape=(1, 4, 4)))
    with pytest.raises(ConfigError, match=r"expected \(loc, scale\) each \[2, 64\]"):
        VAE(config.replace(likelihood="normal"), decoder=MyDecoder())
    with pytest.raises(ConfigError, match="the mean-field guide has no encoder"):
        VAE(config.replace(guide="mean-field"), num_data=5, encoder=MyEncoder())
    semi = VAE(config.replace(guide="semi-amortized", refine_steps=1), encoder=MyEncoder())
    assert isinstance(semi.inference.encoder, MyEncoder)


# ----------------------------------------------------------------------------- continuous Bernoulli


def test_continuous_bernoulli_is_torchs_density_and_stays_finite():
    logits = torch.linspace(-15, 15, 301, dtype=torch.float64)
    assert torch.allclose(continuous_bernoulli_log_norm(logits), td.ContinuousBernoulli(logits=logits)._cont_bern_log_norm(),
                          atol=1e-8)
    x = torch.rand(301, dtype=torch.float64)
    assert torch.allclose(ContinuousBernoulli(logits=logits).log_prob(x), td.ContinuousBernoulli(logits=logits).log_prob(x),
                          atol=1e-8)
    big = ContinuousBernoulli(logits=torch.tensor([40.0, -40.0, 0.0]))  # torch's float32 saturates here
    assert bool(torch.isfinite(big.log_prob(torch.tensor([1.0, 0.0, 0.5]))).all())
    assert torch.allclose(big.mean, torch.tensor([1 - 1 / 40, 1 / 40, 0.5]), atol=1e-6)


def test_continuous_bernoulli_trains_and_scores_with_its_own_density():
    x = torch.rand(32, 1, 4, 4)
    config = VAEConfig(z_dim=2, hidden=(16,), epochs=2, batch_size=8, likelihood="continuous-bernoulli", binarize="none",
                       validate=True)
    run = fit(config, train_data=x, progress=False, log=lambda s: None)
    assert all(np.isfinite(h["train_elbo"]) for h in run.history)
    flat = x.reshape(32, -1)
    loc, scale = run.vae.inference.posterior(flat)
    eps = torch.randn(3, 32, 2)
    log_w = log_importance_weights(run.vae, flat, loc, scale, eps=eps)
    z = loc + scale * eps
    expected = (ContinuousBernoulli(logits=run.vae.decoder(z)).log_prob(flat).sum(-1) + run.vae.prior(32).log_prob(z)
                - td.Normal(loc, scale).log_prob(z).sum(-1))
    assert torch.allclose(log_w, expected, atol=1e-4)
    assert "continuous Bernoulli likelihood" in evaluate(run, flat, iwae_k=2, elbo_samples=2).note


# ----------------------------------------------------------------------------- bad input: one line, exit 1


def _bad_npy(t: Path, array) -> Path:
    np.save(t / "bad.npy", array)
    return t / "bad.npy"


BAD = [
    ("rank-3 tensor", lambda t: ["--data", _bad_npy(t, np.zeros((4, 5, 5), np.float32))],
     "tensor of shape [4, 5, 5] (rank 3); expected [N, D] vectors or [N, C, H, W] images; for grey images add a channel"),
    ("rank-1 tensor", lambda t: ["--data", _bad_npy(t, np.zeros(7, np.float32))], "(rank 1)"),
    ("5 channels", lambda t: ["--data", _bad_npy(t, np.zeros((4, 5, 3, 3), np.float32))], "with C = 5"),
    ("int32 values", lambda t: ["--data", _bad_npy(t, np.zeros((4, 3), np.int32))], "values are int32"),
    ("NaN", lambda t: ["--data", _bad_npy(t, np.full((4, 3), np.nan, np.float32))], "contains NaN or infinite values"),
    ("values > 1, Bernoulli", lambda t: ["--data", _bad_npy(t, np.full((30, 3), 2.0, np.float32))],
     "pixel values must lie in [0, 1]"),
    ("not .npy/.pt", lambda t: ["--data", t / "x.csv"], "expected a .npy or .pt file"),
    ("missing file", lambda t: ["--data", t / "none.npy"], "no such file"),
    ("pickled object", lambda t: ["--data", _bad_npy(t, np.array([{"a": 1}] * 3, dtype=object))],
     "cannot read the tensor"),
    ("a dict in .pt", lambda t: (torch.save({"x": torch.zeros(3)}, t / "d.pt"), ["--data", t / "d.pt"])[1],
     "holds a dict, not a tensor"),
    ("labels count", lambda t: ["--data", _bad_npy(t, np.zeros((30, 3), np.float32)), "--labels-file",
                                (t / "y.txt").write_text("1\n2\n") and t / "y.txt"], "2 labels for 30 rows"),
    ("labels not integers", lambda t: ["--data", _bad_npy(t, np.zeros((30, 3), np.float32)), "--labels-file",
                                       (t / "y.txt").write_text("1\ncat\n") and t / "y.txt"],
     "line 2, 'cat', is not an integer"),
    ("folder without images", lambda t: ((t / "f").mkdir(), (t / "f" / "README.txt").write_text("hi"),
                                         ["--data-dir", t / "f"])[2],
     "no PNG/JPEG images and no train-images-idx3-ubyte[.gz] file"),
    ("truncated PNG", lambda t: (png_folder(t / "f", per_class=3, size=(8, 8)),
                                 (t / "f" / "dog" / "001.png").write_bytes((t / "f" / "cat" / "000.png").read_bytes()[:60]),
                                 ["--data-dir", t / "f"])[2], "001.png: cannot read the image"),
    ("truncated JPEG", lambda t: (png(t / "f" / "a.jpg", (16, 16)), png(t / "f" / "b.jpg", (16, 16), seed=1),
                                  (t / "f" / "b.jpg").write_bytes((t / "f" / "b.jpg").read_bytes()[:400]),
                                  ["--data-dir", t / "f"])[3], "b.jpg: cannot read the image (Image is incomplete or truncated)"),
    ("not an image", lambda t: (png_folder(t / "f", per_class=3, size=(8, 8)),
                                (t / "f" / "dog" / "001.png").write_text("hello"), ["--data-dir", t / "f"])[2],
     "001.png: cannot read the image"),
    ("mixed sizes", lambda t: (png(t / "f" / "a.png", (8, 8)), png(t / "f" / "b.png", (9, 8)),
                               ["--data-dir", t / "f"])[2], "images differ in size: a.png is 8x8, b.png is 9x8"),
    ("images and class folders", lambda t: (png(t / "f" / "a.png"), png(t / "f" / "k" / "b.png"),
                                            ["--data-dir", t / "f"])[2], "holds images both at the top"),
]


@pytest.mark.parametrize("argv, message", [pytest.param(a, m, id=i) for i, a, m in BAD])
def test_bad_input_gives_one_line_and_exit_1(tmp_path, capsys, argv, message):
    code, _, err = run_cli(["train", *argv(tmp_path), "--val-size", "2", *TINY], capsys)
    assert code == 1 and message in err and err.count("\n") == 1, err


@pytest.mark.parametrize("argv, message", [
    (["--data", "x.npy", "--data-dir", "."], "give either data (a tensor file) or data_dir (a folder), not both"),
    (["--labels-file", "y.txt"], "labels_file labels the rows of a data tensor file"),
    (["--image-size", "16"], "resizes the images of an image folder"),
    (["--image-size", "0", "--data-dir", "."], "image_size must be a positive integer"),
])
def test_contradictory_data_flags_exit_2(capsys, argv, message):
    code, _, err = run_cli(["train", *argv, *TINY], capsys)
    assert code == 2 and message in err, err


def test_evaluate_on_data_of_another_shape_says_so(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(["train", "--data-dir", idx_folder(tmp_path / "a"), "--val-size", "10", *TINY, "--out", out],
                   capsys)[0] == 0
    code, _, err = run_cli(["evaluate", out, "--data-dir", idx_folder(tmp_path / "b", size=(12, 12)), *EVAL], capsys)
    assert code == 1 and "was trained on data of shape 1x16x16" in err and "has shape 1x12x12" in err, err
