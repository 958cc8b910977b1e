import json

import pytest

from pyro_vae import VAEConfig
from pyro_vae.cli import main
from pyro_vae.experiments.compare import compare_guides


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    config = VAEConfig(z_dim=8, hidden=(128,), epochs=6, limit=1200, val_size=300, refine_steps=3)
    result = compare_guides(config, limit=80, iwae_k=64, local_steps=150, star_steps=300, out=out, log=lambda s: None)
    return out, result


def test_gaps_are_non_negative_within_standard_errors(comparison):
    _, result = comparison
    assert [r["guide"] for r in result["guides"]] == ["amortized", "mean-field", "semi-amortized"]
    for r in result["guides"]:
        assert r["approximation_gap"] > -3 * r["approximation_gap_se"], r
        assert r["amortization_gap"] > -3 * r["amortization_gap_se"] - 0.05, r
        assert r["iwae"] == pytest.approx(r["elbo_star"] + r["approximation_gap"], abs=1e-6)
        assert r["train_seconds"] > 0 and r["n"] == 80
    amortized = result["guides"][0]
    assert amortized["amortization_gap"] > 0.5  # a briefly trained encoder leaves a clear gap


def test_comparison_files(comparison):
    out, result = comparison
    assert json.loads((out / "comparison.json").read_text())["guides"] == result["guides"]
    table = (out / "comparison.md").read_text()
    assert "amortization gap" in table and table.count("\n| ") == 4  # header + 3 guides
    assert (out / "local_fit.png").stat().st_size > 1000
    curves = result["local_fit"]
    assert set(curves) == {"zero init", "encoder init"}
    assert curves["zero init"]["elbo"][-1] > curves["zero init"]["elbo"][0]


def test_compare_cli_on_existing_runs(tmp_path, capsys):
    small = ["--limit", "300", "--val-size", "100", "--epochs", "1", "--batch-size", "50", "--hidden", "32", "--quiet"]
    assert main(["train", *small, "--out", str(tmp_path / "a")]) == 0
    capsys.readouterr()
    code = main(["compare-guides", "--runs", str(tmp_path / "a"), "--eval-limit", "20", "--iwae-k", "8",
                 "--local-steps", "20", "--star-steps", "30", "--out", str(tmp_path / "cmp"), "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["guides"][0]["guide"] == "amortized" and result["guides"][0]["train_seconds"] is None
