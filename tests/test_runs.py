"""``pyro-vae runs`` / :func:`pyro_vae.compare_runs`: a table of exactly the settings in which runs
differ and their final numbers (with ``evaluate --save`` results while they describe the run's
checkpoint), a figure of the validation-ELBO curves, and one-line errors for folders that are not runs."""

import json
import re

import matplotlib.pyplot as plt
import pytest

from pyro_vae import CheckpointError, VAEConfig, compare_runs, fit
from pyro_vae.cli import main
from pyro_vae.experiments.runs import plot_runs, read_run

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two small runs that differ in z_dim and beta only (and a third epoch for the second)."""
    root = tmp_path_factory.mktemp("runs")
    config = VAEConfig(z_dim=4, hidden=(32,), epochs=2, batch_size=50, limit=200, val_size=100)
    fit(config, root / "a", progress=False, log=lambda s: None)
    fit(config.replace(z_dim=3, beta=2.0, epochs=3), root / "b", progress=False, log=lambda s: None)
    return root / "a", root / "b"


def history(run_dir):
    return json.loads((run_dir / "history.json").read_text())


def test_table_lists_exactly_the_settings_that_differ_and_the_final_numbers(two_runs, tmp_path):
    a, b = two_runs
    rows = compare_runs([a, b], out=tmp_path / "cmp")
    assert [list(row) for row in rows] == [["run", "z_dim", "beta", "epochs", "train_elbo", "val_elbo", "seconds"]] * 2
    assert [(row["run"], row["z_dim"], row["beta"], row["epochs"]) for row in rows] == [(str(a), 4, 1.0, 2),
                                                                                      (str(b), 3, 2.0, 3)]
    for row, run_dir in zip(rows, two_runs):
        last = history(run_dir)[-1]
        assert (row["train_elbo"], row["val_elbo"]) == (last["train_elbo"], last["val_elbo"])
        assert row["seconds"] == pytest.approx(sum(h["seconds"] for h in history(run_dir)))
    table = (tmp_path / "cmp" / "runs.md").read_text().splitlines()
    assert table[0] == "| run | z_dim | beta | epochs | train_elbo | val_elbo | seconds |" and len(table) == 4
    assert table[3].startswith(f"| {b} | 3 | 2.00 | 3 | ")
    assert (tmp_path / "cmp" / "runs.png").read_bytes().startswith(PNG)


def test_one_run_has_no_differing_settings(two_runs):
    (row,) = compare_runs([two_runs[0]])
    assert list(row) == ["run", "epochs", "train_elbo", "val_elbo", "seconds"]


def test_figure_has_every_runs_validation_curve_on_shared_axes(two_runs):
    fig = plot_runs([read_run(path) for path in two_runs])
    (ax,) = fig.axes
    assert [line.get_label() for line in ax.lines] == ["a", "b"]
    for line, run_dir in zip(ax.lines, two_runs):
        assert list(line.get_xdata()) == [h["epoch"] for h in history(run_dir)]
        assert list(line.get_ydata()) == [h["val_elbo"] for h in history(run_dir)]
    plt.close(fig)


def test_figure_stays_open_for_the_notebook_only_when_shown(two_runs):
    before = set(plt.get_fignums())
    compare_runs(two_runs)  # the tests' backend (Agg) does not draw inline: closed
    assert set(plt.get_fignums()) == before
    compare_runs(two_runs, show=True)
    (opened,) = set(plt.get_fignums()) - before
    plt.close(opened)


def test_cli_writes_table_and_figure_and_prints_json(two_runs, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["runs", *map(str, two_runs), "--out", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == compare_runs(two_runs)
    assert (out / "runs.md").is_file() and (out / "runs.png").read_bytes().startswith(PNG)
    assert main(["runs", *map(str, two_runs), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("| run | z_dim | beta |") and f"written: {out / 'runs.md'}" in printed


def test_saved_evaluation_joins_the_table_while_it_describes_the_checkpoint(two_runs, tmp_path, capsys):
    a, b = two_runs
    assert main(["evaluate", str(a), "--iwae-k", "4", "--elbo-samples", "2", "--limit", "20", "--quiet", "--json",
                 "--save"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)  # stdout: the JSON alone
    assert f"saved: {a / 'eval.json'}" in captured.err
    try:
        rows = compare_runs([a, b])
        assert [row["eval_elbo"] for row in rows] == [result["elbo"], None]
        assert (rows[0]["eval_iwae"], rows[0]["eval_iwae_k"], rows[0]["eval_n"]) == (result["iwae"], 4, 20)
        assert rows[0]["eval_split"] == "val" and rows[0]["eval_active_units"] == result["active_units"]

        saved = json.loads((a / "eval.json").read_text())
        (a / "eval.json").write_text(json.dumps(dict(saved, checkpoint_sha256="0" * 64)))  # another checkpoint's
        notes = []
        rows = compare_runs([a, b], log=notes.append)
        assert "eval_elbo" not in rows[0]
        assert len(notes) == 1 and str(a / "eval.json") in notes[0] and "--save" in notes[0]
    finally:
        (a / "eval.json").unlink()


@pytest.mark.parametrize("make, what", [
    (lambda p: p.mkdir(), "not a run folder (no config.json or history.json)"),
    (lambda p: None, "no such run folder"),
    (lambda p: p.write_text("x"), "no such run folder"),
])
def test_a_folder_that_is_not_a_run_is_a_one_line_error_naming_it(two_runs, tmp_path, capsys, make, what):
    bad = tmp_path / "not-a-run"
    make(bad)
    with pytest.raises(CheckpointError, match=re.escape(f"{bad}: {what}")):
        compare_runs([two_runs[0], bad])
    assert main(["runs", str(two_runs[0]), str(bad), "--out", str(tmp_path / "cmp")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"pyro-vae: error: {bad}: ") and err.count("\n") == 1
    assert not (tmp_path / "cmp").exists()


def test_damaged_run_files_are_named(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"z_dim": 2, "colour": "red"}))
    (run / "history.json").write_text("[]")
    with pytest.raises(CheckpointError, match="config.json: not a pyro-vae config .*colour"):
        compare_runs([run])
    (run / "config.json").write_text(json.dumps({"z_dim": 2}))
    (run / "history.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="history.json: unreadable"):
        compare_runs([run])
