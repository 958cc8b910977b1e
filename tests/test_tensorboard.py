"""``fit(..., tensorboard=True)`` / ``pyro-vae train --tensorboard`` and the callback hook it uses:
event files that TensorBoard's own reader loads, with every scalar per epoch, the image grids and
the hyperparameters; a training loop that takes exactly the same steps with the writer; a missing
``tensorboard`` package or run folder as one-line errors."""

import math
import re
import sys
import types
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from pyro_vae import Callback, ConfigError, ImageData, TensorBoardWriter, VAEConfig, fit
from pyro_vae.cli import main
from pyro_vae.infer.tensorboard import SCALAR_TAGS

QUIET = dict(progress=False, log=lambda s: None)


def read_events(run_dir) -> EventAccumulator:
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def scalar_values(events: EventAccumulator, tag: str) -> dict:
    return {e.step: e.value for e in events.Scalars(tag)}


def scalar_values_of_every_file(run_dir, tag: str) -> dict:
    """``tag``'s values from each event file on its own. A folder is read in the order of its file
    names, which need not be the order of creation for two writers of one process in one second."""
    values = {}
    for path in (run_dir / "tensorboard").glob("events.out.tfevents.*"):
        events = EventAccumulator(str(path), size_guidance={"scalars": 0})
        events.Reload()
        if tag in events.Tags()["scalars"]:
            values.update(scalar_values(events, tag))
    return values


def test_event_files_hold_every_scalar_image_and_hyperparameter(tmp_path, tiny_config):
    config = tiny_config.replace(epochs=2, kl_warmup=2)
    run = fit(config, tmp_path / "r", tensorboard=True, **QUIET)
    events = read_events(tmp_path / "r")
    assert set(SCALAR_TAGS) <= set(events.Tags()["scalars"])
    for tag in SCALAR_TAGS:
        assert sorted(scalar_values(events, tag)) == [1, 2], tag
    for key, tag in [("train_elbo", "elbo/train"), ("val_elbo", "elbo/validation"), ("beta", "train/beta"),
                     ("seconds", "train/seconds")]:
        logged = scalar_values(events, tag)
        for record in run.history:
            assert logged[record["epoch"]] == pytest.approx(record[key], rel=1e-6), tag
    assert scalar_values(events, "train/beta") == {1: 0.5, 2: 1.0}
    assert scalar_values(events, "train/learning_rate") == {1: pytest.approx(config.lr), 2: pytest.approx(config.lr)}
    assert all(0 < g < math.inf for g in scalar_values(events, "train/grad_norm").values())
    reconstruction, kl = scalar_values(events, "elbo/reconstruction"), scalar_values(events, "elbo/kl")
    for record in run.history:  # the same validation images, another draw of z: the same ELBO up to noise
        epoch = record["epoch"]
        assert kl[epoch] > 0 > reconstruction[epoch]
        assert reconstruction[epoch] - kl[epoch] == pytest.approx(record["val_elbo"], rel=0.02)

    images = {tag: events.Images(tag) for tag in ("images/reconstructions", "images/samples")}
    assert [e.step for e in images["images/reconstructions"]] == [2]  # images_every=10: the last epoch only
    assert (images["images/reconstructions"][0].width, images["images/reconstructions"][0].height) == (242, 122)
    assert (images["images/samples"][0].width, images["images/samples"][0].height) == (242, 242)

    assert scalar_values(events, "hparam/val_elbo") == {2: pytest.approx(run.history[-1]["val_elbo"])}
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["kl_warmup"].number_value == 2 and hparams["guide"].string_value == "amortized"
    assert hparams["hidden"].string_value == "32" and "data_dir" not in hparams  # unset: left out


@pytest.mark.parametrize("guide", ["amortized", "semi-amortized", "mean-field", "iaf", "full-rank"])
def test_the_writer_changes_no_step_of_training(tmp_path, tiny_config, guide):
    """The writer's own draws (probe ELBO, refinement, samples) come from forked streams."""
    config = tiny_config.replace(epochs=2, guide=guide, refine_steps=2)
    plain = fit(config, tmp_path / "plain", **QUIET)
    logged = fit(config, tmp_path / "logged", callbacks=[TensorBoardWriter(images_every=1)], **QUIET)
    for key, value in plain.vae.state_dict().items():
        assert torch.equal(value, logged.vae.state_dict()[key]), key
    without_seconds = lambda run: [{k: v for k, v in h.items() if k != "seconds"} for h in run.history]  # noqa: E731
    assert without_seconds(plain) == without_seconds(logged)
    events = read_events(tmp_path / "logged")
    assert [e.step for e in events.Images("images/samples")] == [1, 2]
    assert ("elbo/validation" in events.Tags()["scalars"]) == (guide != "mean-field")  # needs an encoder


def test_probe_terms_of_a_non_diagonal_guide_are_its_own_q():
    """A full-rank guide at initialisation (zero off-diagonal) is the diagonal Gaussian of its
    encoder: the Monte-Carlo terms from its q agree with the exact KL of the diagonal path."""
    from pyro_vae.infer.evaluate import elbo_terms
    from pyro_vae.infer.tensorboard import _q_terms
    from pyro_vae.program.model import VAE

    torch.manual_seed(0)
    vae = VAE(VAEConfig(guide="full-rank", z_dim=3, hidden=(16,), event_shape=(1, 4, 4)))
    x = torch.bernoulli(torch.full((8, 16), 0.3))
    with torch.no_grad():
        loc, terms = _q_terms(vae, x, vae.inference.q(x), samples=20000)
        exact = elbo_terms(vae, x, *_diagonal(vae, x), 20000, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(loc, _diagonal(vae, x)[0], atol=1e-5)
    assert terms["kl"] == pytest.approx(exact["kl"].mean().item(), abs=0.02)
    assert terms["reconstruction"] == pytest.approx(exact["reconstruction"].mean().item(), abs=0.05)


def _diagonal(vae, x):
    q = vae.inference.q(x)  # MultivariateNormal with a diagonal scale_tril at initialisation
    return q.loc, q.scale_tril.diagonal(dim1=-2, dim2=-1)


def test_resumed_run_continues_the_epochs(tmp_path, tiny_config):
    fit(tiny_config, tmp_path / "r", tensorboard=True, **QUIET)
    run = fit(tiny_config.replace(epochs=2), tmp_path / "r", resume=True, tensorboard=True, **QUIET)
    logged = scalar_values_of_every_file(tmp_path / "r", "elbo/train")
    assert logged == {h["epoch"]: pytest.approx(h["train_elbo"], rel=1e-6) for h in run.history}


def test_overwrite_deletes_the_replaced_runs_event_files_and_evaluation(tmp_path, tiny_config):
    out = tmp_path / "r"
    fit(tiny_config, out, tensorboard=True, **QUIET)
    (out / "eval.json").write_text("{}")
    (out / "tensorboard" / "notes.txt").write_text("mine")
    fit(tiny_config, out, overwrite=True, **QUIET)
    assert not list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert not (out / "eval.json").exists()
    assert (out / "tensorboard" / "notes.txt").read_text() == "mine"  # only pyro-vae's own files go


def test_missing_tensorboard_package_is_a_one_line_error_naming_the_extra(tmp_path, tiny_config, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    with pytest.raises(ConfigError, match=r'pip install -e "\.\[tensorboard\]"') as error:
        fit(tiny_config, tmp_path / "r", tensorboard=True, **QUIET)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "r").exists()  # refused before the run folder was made
    assert main(["train", "--limit", "200", "--epochs", "1", "--tensorboard", "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pyro-vae: error: TensorBoard logging needs the tensorboard package")
    assert err.count("\n") == 1 and 'pip install -e ".[tensorboard]"' in err


def test_tensorboard_needs_a_run_folder(tiny_config):
    with pytest.raises(ConfigError, match="out=RUN_DIR"):
        fit(tiny_config, None, tensorboard=True, **QUIET)
    with pytest.raises(ConfigError, match="out=RUN_DIR"):
        fit(tiny_config, None, callbacks=[TensorBoardWriter()], **QUIET)


def test_train_tensorboard_flag(tmp_path):
    out = tmp_path / "r"
    assert main(["train", "--limit", "200", "--val-size", "100", "--epochs", "1", "--batch-size", "50",
                 "--hidden", "32", "--z-dim", "2", "--quiet", "--tensorboard", "--out", str(out)]) == 0
    assert {"elbo/train", "elbo/validation", "hparam/val_elbo"} <= set(read_events(out).Tags()["scalars"])


class Recorder(Callback):
    """Records what the loop hands each hook."""

    def __init__(self):
        self.calls, self.steps, self.records, self.grads_present = [], 0, [], True

    def on_train_begin(self, trainer):
        self.calls.append("begin")
        self.num_data = len(trainer.train_data)

    def on_step_end(self, trainer, loss):
        self.steps += 1
        self.grads_present &= all(p.grad is not None for p in trainer.params)
        assert loss.ndim == 0 and torch.isfinite(loss)

    def on_epoch_end(self, trainer, record):
        self.calls.append("epoch")
        assert trainer.run.history[-1] is record and trainer.run.vae is trainer.vae
        self.records.append(dict(record))

    def on_train_end(self, trainer):
        self.calls.append("end")


def test_callbacks_see_every_step_every_epoch_and_the_end(tiny_config):
    recorder = Recorder()
    run = fit(tiny_config.replace(epochs=2), callbacks=[recorder], **QUIET)
    assert recorder.calls == ["begin", "epoch", "epoch", "end"]
    assert recorder.num_data == 200 and recorder.steps == 2 * math.ceil(200 / 50)  # 2 epochs of 4 steps
    assert recorder.grads_present and recorder.records == run.history


def test_writer_settings_are_checked():
    with pytest.raises(ConfigError, match="images_every must be a positive integer"):
        TensorBoardWriter(images_every=0)


def test_a_vector_data_set_gets_scalars_and_no_images(tmp_path):
    data = ImageData(torch.rand(60, 12), None, "vectors", "train", "dynamic", (12,))
    config = VAEConfig(z_dim=2, hidden=(8,), batch_size=20, epochs=1, val_size=0, event_shape=(12,))
    fit(config, tmp_path / "v", train_data=data, tensorboard=True, **QUIET)
    events = read_events(tmp_path / "v")
    assert "elbo/kl" in events.Tags()["scalars"] and not events.Tags()["images"]


def test_readme_mlflow_adapter_runs(tmp_path, tiny_config, monkeypatch):
    """The documentation's MLflow example, against a stand-in ``mlflow`` that records the calls."""
    readme = (Path(__file__).parents[1] / "docs" / "guide" / "evaluation.md").read_text()
    (code,) = [block for block in re.findall(r"```python\n(.*?)```", readme, re.S) if "MLflowCallback" in block]
    calls = []
    mlflow = types.ModuleType("mlflow")
    for name in ("start_run", "log_params", "log_metrics", "end_run"):
        setattr(mlflow, name, lambda *args, _name=name, **kwargs: calls.append((_name, args, kwargs)))
    monkeypatch.setitem(sys.modules, "mlflow", mlflow)
    monkeypatch.chdir(tmp_path)
    exec(code, {"config": tiny_config.replace(epochs=2)})
    assert [name for name, _, _ in calls] == ["start_run", "log_params", "log_metrics", "log_metrics", "end_run"]
    assert calls[3][1][0]["val_elbo"] < 0 and calls[3][2] == {"step": 2}
