"""The run cache: ``fit(config, cache=True)`` trains once and loads afterwards, never trusting a
partial or corrupt entry; ``compare_guides``/``gradient_variance`` results; ``pyro-vae cache``."""

import json

import pytest
import torch

import pyro_vae.experiments.compare as compare_module
import pyro_vae.experiments.variance_lab as lab_module
from pyro_vae import ConfigError, VAEConfig, fit, gradient_variance, load_dataset
from pyro_vae.cli import main
from pyro_vae.experiments.compare import compare_guides
from pyro_vae.infer.cache import cache_root, entries, run_settings
from pyro_vae.infer.svi import Trainer


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("PYRO_VAE_CACHE", str(folder))
    return folder


@pytest.fixture
def config():
    return VAEConfig(z_dim=3, hidden=(24,), epochs=2, batch_size=50, limit=200, val_size=100)


def _cached(config, lines=None):
    return fit(config, cache=True, progress=False, log=(lines.append if lines is not None else lambda s: None))


def _no_training(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("trained although the run is in the cache")

    monkeypatch.setattr(Trainer, "train_epoch", refuse)


def _same_parameters(a, b):
    sa, sb = a.vae.state_dict(), b.vae.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].cpu(), sb[k].cpu()) for k in sa)


def test_second_fit_loads_instead_of_training(cache, config, monkeypatch):
    lines = []
    first = _cached(config, lines)
    assert first.path.parent == cache and (first.path / "cache.json").is_file()
    assert any("training into" in line for line in lines)
    _no_training(monkeypatch)
    lines.clear()
    second = _cached(config, lines)
    assert any("loaded" in line for line in lines), lines
    assert second.path == first.path and second.history == first.history
    assert _same_parameters(first, second)
    assert second.config.event_shape == (1, 28, 28) and second.sample(2).shape == (2, 784)
    # settings that change how, not what, a run trains share the entry
    assert _cached(config.replace(device="cpu", validate=True, fused=False, on_nonfinite="skip")).path == first.path


def test_other_settings_or_images_make_another_entry(cache, config):
    a = _cached(config)
    b = _cached(config.replace(z_dim=2))
    c = _cached(config.replace(epochs=1))
    train = load_dataset("mnist-5k", "train", limit=150)
    d = fit(config, train_data=train, val_data=None, cache=True, progress=False, log=lambda s: None)
    assert len({a.path, b.path, c.path, d.path}) == 4
    assert b.config.z_dim == 2 and len(c.history) == 1 and d.history[-1]["val_elbo"] is None
    assert run_settings(VAEConfig()) == {}  # defaults are left out of the key
    assert run_settings(config.replace(device="cpu")) == run_settings(config)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "marker", "epochs"])
def test_damaged_entry_is_trained_again(cache, config, damage):
    first = _cached(config)
    ckpt, marker = first.path / "checkpoint.pt", first.path / "cache.json"
    if damage == "truncate":
        ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    elif damage == "garbage":
        ckpt.write_bytes(b"not a checkpoint at all")
    elif damage == "marker":  # killed after the last checkpoint, before the entry was recorded as finished
        marker.unlink()
    else:  # a checkpoint of fewer epochs (say, an older entry's) under a finished-training record
        state = torch.load(ckpt, weights_only=True)
        state["history"] = state["history"][:1]
        torch.save(state, ckpt)
    if damage in ("truncate", "garbage"):
        assert [e["status"] for e in entries()] == ["corrupt"]
    lines = []
    again = _cached(config, lines)
    assert any("training into" in line or "training it again" in line for line in lines), lines
    assert again.path == first.path and len(again.history) == 2
    assert _same_parameters(first, again)  # the same seed trains the same run
    assert [e["status"] for e in entries()] == ["ok"]


def test_killed_training_leaves_a_partial_entry_that_is_trained_again(cache, config, monkeypatch):
    end_epoch = Trainer._end_epoch

    def killed_after_first_epoch(self, state):
        end_epoch(self, state)
        raise KeyboardInterrupt  # as if the process died after the first checkpoint

    with monkeypatch.context() as m:
        m.setattr(Trainer, "_end_epoch", killed_after_first_epoch)
        with pytest.raises(KeyboardInterrupt):
            _cached(config)
    [entry] = entries()
    assert entry["status"] == "partial" and entry["epochs"] == 1
    lines = []
    run = _cached(config, lines)
    assert len(run.history) == 2 and [e["status"] for e in entries()] == ["ok"]
    assert any("training it again" in line for line in lines), lines


def test_cache_refuses_out_and_resume(cache, config, tmp_path):
    with pytest.raises(ConfigError, match="run cache"):
        fit(config, tmp_path / "run", cache=True)
    with pytest.raises(ConfigError, match="run cache"):
        fit(config, cache=True, resume=True)


def test_overwrite_trains_the_entry_again(cache, config, monkeypatch):
    first = _cached(config)
    calls = []
    train_epoch = Trainer.train_epoch
    monkeypatch.setattr(Trainer, "train_epoch", lambda self, state: calls.append(1) or train_epoch(self, state))
    again = fit(config, cache=True, overwrite=True, progress=False, log=lambda s: None)
    assert len(calls) == 2 and again.path == first.path and _same_parameters(first, again)


def test_cache_list_and_clear(cache, config, capsys):
    a = _cached(config)
    b = _cached(config.replace(likelihood="normal", binarize="none"))
    assert main(["cache", "list"]) == 0
    out = capsys.readouterr().out
    assert a.path.name[:12] in out and b.path.name[:12] in out and "likelihood=normal" in out
    assert out.count(" ok ") == 2 and str(cache) in out
    assert main(["cache", "clear", b.path.name[:8]]) == 0
    assert "removed 1 cache entry" in capsys.readouterr().out
    assert [e["key"] for e in entries()] == [a.path.name]
    assert main(["cache", "clear", "feedface"]) == 2  # no such entry: one line on stderr
    assert "no cache entry feedface" in capsys.readouterr().err
    assert main(["cache", "clear"]) == 0
    assert entries() == [] and cache_root() == cache
    assert main(["cache", "list"]) == 0 and "empty" in capsys.readouterr().out


def test_compare_guides_result_is_cached(cache, config, monkeypatch, tmp_path):
    small = dict(limit=20, iwae_k=8, local_steps=10, star_steps=15, log=lambda s: None)
    first = compare_guides(config, ("amortized", "mean-field"), cache=True, **small)
    assert len(entries()) == 3  # two runs and the evaluation
    _no_training(monkeypatch)

    def refuse(*args, **kwargs):
        raise RuntimeError("evaluated again")

    monkeypatch.setattr(compare_module, "gap_report", refuse)
    again = compare_guides(config, ("amortized", "mean-field"), cache=True, out=tmp_path / "cmp", **small)
    assert again == json.loads(json.dumps(first))
    assert (tmp_path / "cmp" / "comparison.md").is_file() and (tmp_path / "cmp" / "local_fit.png").is_file()
    assert all(r["train_seconds"] > 0 for r in again["guides"])
    with pytest.raises(RuntimeError, match="evaluated again"):  # another setting: measured anew
        compare_guides(config, ("amortized", "mean-field"), cache=True, **dict(small, iwae_k=9))


def test_gradient_variance_result_is_cached(cache, config, monkeypatch):
    run = _cached(config)
    x = torch.bernoulli(load_dataset("mnist-5k", "val", val_size=100).images[:8], generator=torch.Generator().manual_seed(0))
    small = dict(repeats=4, sweep=(1, 2), warmup=2)
    first = gradient_variance(run, x, ("reparam", "score"), cache=True, **small)
    monkeypatch.setattr(lab_module, "gradient_moments", lambda *a, **k: pytest.fail("measured again"))
    assert gradient_variance(run, x, ("reparam", "score"), cache=True, **small) == json.loads(json.dumps(first))
