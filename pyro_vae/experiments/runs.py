"""Runs side by side: :func:`compare_runs`, behind ``pyro-vae runs RUN_DIR [RUN_DIR ...]``.

A table with one row per run folder: the settings in which the runs differ (from their
``config.json``), the final numbers of their ``history.json`` (the last epoch's train and validation
ELBO, the epochs trained, the seconds they took) and, for a run evaluated with
``pyro-vae evaluate RUN_DIR --save``, that evaluation (``eval.json``: its split, ELBO, IWAE bound and
active units), used only while it describes the run's current ``checkpoint.pt``. And one figure:
every run's validation ELBO against the epoch on shared axes. Only the JSON files are read (no
checkpoint is loaded, no model is built), so comparing many runs is quick.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import matplotlib
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

from ..core.config import VAEConfig
from ..core.errors import CheckpointError, ConfigError
from ..core.rundir import atomic_write
from ..infer.evaluate import EVAL_FILE, checkpoint_digest
from ..program.files import ProgramFile

__all__ = ["RunSummary", "read_run", "differing_settings", "runs_table", "to_markdown", "plot_runs", "compare_runs",
           "TABLE_FILE", "FIGURE_FILE"]

TABLE_FILE, FIGURE_FILE = "runs.md", "runs.png"
#: what a row shows of an ``eval.json`` (the row's keys get the prefix ``eval_``)
EVAL_KEYS = ("split", "n", "elbo", "iwae", "iwae_k", "active_units")
#: settings that only the built-in programs read: a run of your own program (``config.program``)
#: shows none (``–``), whatever its config.json holds
BUILT_IN_SETTINGS = ("model", "num_labels", "alpha", "labelled_batch", "num_classes", "z_dim", "arch", "hidden",
                     "custom_modules", "likelihood", "min_scale", "guide", "local_lr", "refine_steps", "refine_lr",
                     "flow_steps", "prior", "prior_components", "fused")


@dataclass
class RunSummary:
    """What :func:`read_run` reads from a run folder."""

    path: Path
    config: dict  # config.json, completed with the defaults of settings it predates
    history: List[dict]  # history.json
    evaluation: Optional[dict] = None  # eval.json, when it describes the current checkpoint.pt
    note: Optional[str] = None  # why an eval.json there was left out


def _read_json(file: Path):
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{file}: unreadable ({str(e).splitlines()[0]})") from None


def read_run(path) -> RunSummary:
    """Read a run folder's ``config.json``, ``history.json`` and ``eval.json`` (if any).

    :raises CheckpointError: ``path`` is not a run folder, or its files are not pyro-vae's.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such run folder")
    missing = [name for name in ("config.json", "history.json") if not (path / name).is_file()]
    if missing:
        raise CheckpointError(f"{path}: not a run folder (no {' or '.join(missing)}); "
                              "pyro-vae runs compares folders written by pyro-vae train")
    try:
        config = VAEConfig.from_dict(_read_json(path / "config.json")).to_dict()
    except ConfigError as e:
        raise CheckpointError(f"{path / 'config.json'}: not a pyro-vae config ({e})") from None
    history = _read_json(path / "history.json")
    if not (isinstance(history, list) and all(isinstance(h, dict) and "epoch" in h for h in history)):
        raise CheckpointError(f"{path / 'history.json'}: not a pyro-vae history (a list of epoch records)")
    evaluation, note = _current_evaluation(path)
    return RunSummary(path, config, history, evaluation, note)


def _current_evaluation(path: Path):
    """``(eval.json's dict or None, a note or None)``: the saved evaluation if it was made on the
    ``checkpoint.pt`` the folder holds now."""
    file, checkpoint = path / EVAL_FILE, path / "checkpoint.pt"
    if not file.is_file():
        return None, None
    saved = _read_json(file)
    if not isinstance(saved, dict):
        raise CheckpointError(f"{file}: not an evaluation written by pyro-vae evaluate --save")
    if not checkpoint.is_file() or saved.get("checkpoint_sha256") != checkpoint_digest(checkpoint):
        return None, (f"{file} evaluated another checkpoint than {checkpoint} (the run was resumed or replaced "
                      f"since): left out; pyro-vae evaluate {path} --save updates it")
    return saved, None


def differing_settings(configs: Sequence[dict]) -> List[str]:
    """The config keys whose values are not the same in every config (in the config's order)."""
    keys = list(dict.fromkeys(key for config in configs for key in config))
    return [key for key in keys if any(config.get(key) != configs[0].get(key) for config in configs)]


def runs_table(runs: Sequence[RunSummary]) -> List[dict]:
    """One dict per run, every dict with the same keys: ``run``, the settings that differ,
    ``epochs``, ``train_elbo``, ``val_elbo``, ``seconds`` (the sum over epochs) and, when any run
    has a current ``eval.json``, ``eval_split``, ``eval_n``, ``eval_elbo``, ``eval_iwae``,
    ``eval_iwae_k``, ``eval_active_units`` (``None`` for runs without one)."""
    configs = [_shown_settings(run.config) for run in runs]
    settings = differing_settings(configs)
    evaluated = any(run.evaluation is not None for run in runs)
    rows = []
    for run, config in zip(runs, configs):
        last = run.history[-1] if run.history else {}
        row = {"run": str(run.path), **{key: config.get(key) for key in settings}}
        row.update(epochs=len(run.history), train_elbo=last.get("train_elbo"), val_elbo=last.get("val_elbo"),
                   seconds=sum(h.get("seconds", 0.0) for h in run.history))
        if evaluated:
            row.update({f"eval_{key}": (run.evaluation or {}).get(key) for key in EVAL_KEYS})
        rows.append(row)
    return rows


def _shown_settings(config: dict) -> dict:
    """``config`` as a row shows it: a run of your own program without the built-in programs' settings."""
    if config.get("program") is None:
        return config
    return {key: (None if key in BUILT_IN_SETTINGS else value) for key, value in config.items()}


def _cell(key: str, value) -> str:
    if value is None:
        return "–"
    if key == "program_sha256":
        value = value[:12]  # enough to tell two versions of a program file apart
    elif isinstance(value, dict):
        value = json.dumps(value)
    elif isinstance(value, (list, tuple)):
        value = ",".join(str(v) for v in value)
    elif isinstance(value, float):
        value = f"{value:.1f}" if key == "seconds" else f"{value:.2f}"
    return str(value).replace("|", "\\|")


def to_markdown(rows: Sequence[dict]) -> str:
    """The table as Markdown (ELBOs in nats per image, two decimals; ``–``: no value)."""
    keys = list(rows[0]) if rows else ["run"]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_cell(key, row.get(key)) for key in keys) + " |" for row in rows]
    return "\n".join(lines)


def _labels(runs: Sequence[RunSummary]) -> List[str]:
    """Folder names, or the paths where two runs share a name."""
    names = [run.path.name or str(run.path) for run in runs]
    return [name if names.count(name) == 1 else str(run.path) for name, run in zip(names, runs)]


def plot_runs(runs: Sequence[RunSummary]):
    """Every run's validation ELBO against the epoch, shared axes (a run without validation
    ELBOs: its training ELBO, dashed). Returns the matplotlib figure."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run, label in zip(runs, _labels(runs)):
        epochs = [h["epoch"] for h in run.history]
        marker = "o" if len(epochs) <= 20 else None
        if any(h.get("val_elbo") is not None for h in run.history):
            ax.plot(epochs, [h.get("val_elbo") for h in run.history], marker=marker, ms=3, label=label)
        else:
            ax.plot(epochs, [h.get("train_elbo") for h in run.history], "--", marker=marker, ms=3,
                    label=f"{label} (train: no validation ELBO)")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("validation ELBO (nats / image)")
    ax.grid(alpha=0.3)
    if runs:
        ax.legend()
    fig.tight_layout()
    return fig


def _draws_inline() -> bool:
    """Whether matplotlib draws figures into the page (a Jupyter notebook's inline backend)."""
    return "inline" in matplotlib.get_backend().lower()


def _to_stderr(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


def compare_runs(run_dirs, out=None, *, show: Optional[bool] = None,
                 log: Callable[[str], None] = _to_stderr) -> List[dict]:
    """Compare run folders: return the table (:func:`runs_table`, one dict per run) and draw the
    validation-ELBO curves (:func:`plot_runs`).

    :param run_dirs: run folders written by ``pyro-vae train`` or ``fit(config, out=...)``.
    :param out: also write the table (``runs.md``) and the figure (``runs.png``) into this folder.
    :param show: leave the figure open for the notebook to draw under the cell; default: when
        matplotlib draws inline (Jupyter). Otherwise the figure is closed.
    :param log: where notes go (an ``eval.json`` left out because it is for another checkpoint).
    :raises CheckpointError: a folder that is not a run (one line naming it).
    """
    if isinstance(run_dirs, (str, Path)):
        run_dirs = [run_dirs]
    runs = [read_run(path) for path in run_dirs]
    if not runs:
        raise ConfigError("compare_runs needs at least one run folder")
    for run in runs:
        for note in (run.note, _program_file_note(run)):
            if note:
                log(note)
    rows = runs_table(runs)
    fig = plot_runs(runs)
    show = _draws_inline() if show is None else show
    try:
        if out is not None:
            _write(Path(out), to_markdown(rows), fig)
    finally:
        if not show:
            plt.close(fig)
    return rows


def _program_file_note(run: RunSummary) -> Optional[str]:
    """For a run trained with ``--program FILE:CLASS`` whose file has changed or gone since: what
    ``evaluate`` and ``--resume`` will say about it."""
    if run.config.get("program_file") is None:
        return None
    try:
        ProgramFile.from_record(VAEConfig.from_dict(run.config), run=run.path)
    except (CheckpointError, ConfigError) as e:
        return str(e)
    return None


def _write(out: Path, table: str, fig) -> None:
    """``runs.md`` and ``runs.png`` into ``out`` (created), each written atomically."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: exists and is not a folder (the table and figure go into a folder)")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / TABLE_FILE, lambda f: f.write((table + "\n").encode()))
    atomic_write(out / FIGURE_FILE, lambda f: fig.savefig(f, format="png", dpi=80))
