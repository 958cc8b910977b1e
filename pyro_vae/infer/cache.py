"""The run cache: train a config once, load it afterwards (``fit(config, cache=True)``).

Notebooks (and ``pyro-vae compare-guides --cache``) show models trained as long as the command line
trains them; the cache keeps them, so only the first execution pays for the training. An entry is a
folder ``$PYRO_VAE_CACHE/<key>`` (default ``~/.cache/pyro-vae/runs``) holding an ordinary run folder
(``config.json``, ``history.json``, ``checkpoint.pt``) plus ``cache.json``, written last:

- the **key** is the SHA-256 of the settings that change what is trained (the config without
  :data:`IGNORED`; a field left at its default is left out of the key, so a setting added later
  with a default that keeps the old behaviour keeps the old keys) and of the training and
  validation images themselves (their bytes, not their names);
- an entry is **used** only if ``cache.json`` names the same key and settings, its checkpoint loads
  through :func:`~pyro_vae.core.rundir.load_checkpoint` (refusing corrupt, truncated or unsafe
  files like any checkpoint), its config asks for the same settings, and its history holds every
  epoch with no interrupted position. Anything else (a killed training, a truncated file, an entry
  of an older version) is trained again, in place: an entry is never trusted half-way.

:func:`remember` caches JSON results (the evaluation of ``compare_guides``, the gradient-variance
lab) the same way, keyed by every setting and by digests of the parameters and images they read.
One process should fill an entry at a time (two that train the same key write the same files).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import torch

from ..core.config import VAEConfig, resolve_device
from ..core.data import ImageData, load_splits
from ..core.errors import CheckpointError, ConfigError
from ..core.rundir import load_checkpoint, write_json
from ..program.programs import fit_to_data
from .checkpointing import data_fingerprint
from .run import Run, load_run

__all__ = [
    "CACHE_ENV", "IGNORED", "cache_root", "run_settings", "run_key", "cached_run", "remember", "digest",
    "entries", "clear",
]

CACHE_ENV = "PYRO_VAE_CACHE"

#: settings that change how a run is computed, not what it computes: left out of the key.
#: ``device`` (an entry trained on a GPU serves a CPU request), ``validate`` (checks only),
#: ``fused`` (the same estimate, step for step: tests/test_fused.py), ``on_nonfinite`` (the same
#: run unless a step was non-finite; an entry with skipped steps never serves ``"stop"``)
IGNORED = ("device", "validate", "fused", "on_nonfinite")
FROM_DATA = ("event_shape",)  # fit sets it from the images, whose digest is in the key
MARKER = "cache.json"  # written last: the entry was filled by a training that finished
RESULT = "result.json"  # a remembered result


def cache_root(root=None) -> Path:
    """The cache folder: ``root`` if given (not ``True``), else ``$PYRO_VAE_CACHE``, else
    ``~/.cache/pyro-vae/runs``."""
    if root is not None and root is not True:
        return Path(root)
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "pyro-vae" / "runs")


def run_settings(config: VAEConfig) -> dict:
    """The settings that decide what a run trains: every config field that differs from its default,
    except :data:`IGNORED` and ``event_shape``."""
    defaults = {f.name: f.default for f in dataclasses.fields(VAEConfig) if f.default is not dataclasses.MISSING}
    defaults = VAEConfig(**defaults).to_dict()
    return {k: v for k, v in config.to_dict().items()
            if k not in IGNORED + FROM_DATA and (k not in defaults or v != defaults[k])}


def digest(*items) -> str:
    """SHA-256 of tensors (shape, dtype and bytes) and of modules' ``state_dict`` tensors, in order."""
    h = hashlib.sha256()
    for item in items:
        tensors = item.state_dict().items() if isinstance(item, torch.nn.Module) else [("", item)]
        for name, t in tensors:
            t = t.detach().cpu().contiguous()
            h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
            h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


def _data_digest(data: Optional[ImageData]) -> Optional[dict]:
    if data is None:
        return None
    return {"images": digest(data.images), "event_shape": list(data.event_shape), "binarize": data.binarize}


def _hash(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def run_key(config: VAEConfig, train: ImageData, val: Optional[ImageData]) -> tuple:
    """``(key, description)`` of the run ``config`` trains on ``train`` (scored on ``val``)."""
    described = {"kind": "run", "settings": run_settings(config), "train": _data_digest(train),
                 "val": _data_digest(val)}
    return _hash(described), described


# ----------------------------------------------------------------------------- runs


def cached_run(
    config: VAEConfig,
    train_into: Callable[[Path, ImageData, Optional[ImageData]], Run],
    *,
    train_data: Optional[ImageData] = None,
    val_data: Optional[ImageData] = None,
    retrain: bool = False,
    root=None,
    log: Callable[[str], None] = print,
) -> Run:
    """The run of ``config`` from the cache, or trained by ``train_into(folder, train, val)`` into
    the cache (``fit`` passes its trainer). ``retrain`` replaces an entry that would serve."""
    if train_data is None:
        train_data, val_data = load_splits(config)
    config = fit_to_data(config, train_data)  # what training fills in from the data (M1+M2: M1's checksum) keys the run too
    key, described = run_key(config, train_data, val_data)
    folder = cache_root(root) / key
    if not retrain:
        try:
            run = _load_entry(folder, config, described, train_data)
            log(f"run cache: loaded {folder} ({_summary(run)})")
            return run
        except FileNotFoundError:
            log(f"run cache: training into {folder}")
        except CheckpointError as e:
            log(f"run cache: not using {folder} ({e}); training it again")
    folder.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        (folder / MARKER).unlink()  # from here until training ends the entry is incomplete
    run = train_into(folder, train_data, val_data)
    write_json(folder / MARKER, dict(described, key=key, created=time.strftime("%Y-%m-%d %H:%M:%S"),
                                     device=str(run.device), seconds=_seconds(run)))
    return run


def _load_entry(folder: Path, config: VAEConfig, described: dict, train: ImageData) -> Run:
    """The entry's run, checked; ``FileNotFoundError`` if there is none, :class:`CheckpointError`
    (with the reason) if it must not be used."""
    if not folder.is_dir():
        raise FileNotFoundError(folder)
    marker = _read_json(folder / MARKER)
    if marker is None or {k: marker.get(k) for k in described} != json.loads(json.dumps(described)):
        raise CheckpointError("no record of a finished training")
    state = load_checkpoint(folder / "checkpoint.pt")  # CheckpointError if corrupt, truncated or unsafe
    history = state.get("history", [])
    if state.get("progress") is not None or [h.get("epoch") for h in history] != list(range(1, config.epochs + 1)):
        raise CheckpointError(f"the checkpoint holds {len(history)} of {config.epochs} epochs")
    try:
        saved = VAEConfig.from_dict(state.get("config"))
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"its config is invalid ({e})") from None
    if run_settings(saved) != run_settings(config) or state.get("data") != data_fingerprint(train.images):
        raise CheckpointError("its checkpoint was trained with other settings or images")
    if config.on_nonfinite == "stop" and any(h.get("skipped_steps") for h in history):
        raise CheckpointError("it skipped non-finite steps, and on_nonfinite='stop' asks for a run that did not")
    run = load_run(folder, resolve_device(config.device))
    run.config = saved.replace(**{k: getattr(config, k) for k in IGNORED})
    return run


def _seconds(run: Run) -> float:
    return float(sum(h.get("seconds", 0.0) for h in run.history))


def _summary(run: Run) -> str:
    last = run.history[-1] if run.history else {}
    val = "" if last.get("val_elbo") is None else f", validation ELBO {last['val_elbo']:.2f}"
    return f"{run.config.guide}, {len(run.history)} epochs{val}, trained in {_seconds(run) / 60:.1f} min"


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------- results


def remember(kind: str, settings: dict, compute: Callable[[], dict], *, root=None,
             log: Callable[[str], None] = print) -> dict:
    """``compute()``'s JSON result, computed once per ``kind`` and ``settings`` (which must name
    everything the result depends on, e.g. :func:`digest` of the parameters and images)."""
    settings = json.loads(json.dumps(settings))  # tuples -> lists, as stored
    key = _hash({"kind": kind, "settings": settings})
    path = cache_root(root) / key / RESULT
    stored = _read_json(path)
    if isinstance(stored, dict) and stored.get("kind") == kind and stored.get("settings") == settings \
            and "result" in stored:
        log(f"run cache: loaded {kind} from {path.parent}")
        return stored["result"]
    start = time.perf_counter()
    result = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {"kind": kind, "settings": settings, "result": result, "key": key,
                      "created": time.strftime("%Y-%m-%d %H:%M:%S"), "seconds": time.perf_counter() - start})
    return result


# ----------------------------------------------------------------------------- pyro-vae cache


def entries(root=None) -> List[dict]:
    """One dict per cache entry (``key``, ``what`` (a run's guide, or the kind of result), ``epochs``,
    ``val_elbo``, ``bytes``, ``date``, ``status``: ``ok``, ``partial`` or ``corrupt``, and
    ``settings``: a run's other settings that differ from the defaults), oldest first."""
    folder = cache_root(root)
    found = []
    for entry in sorted(folder.iterdir()) if folder.is_dir() else []:
        if entry.is_dir():
            found.append(_describe(entry))
    return sorted(found, key=lambda e: e["date"])


def _describe(entry: Path) -> dict:
    size = sum(p.stat().st_size for p in entry.rglob("*") if p.is_file())
    dates = [p.stat().st_mtime for p in entry.iterdir() if p.is_file()] or [entry.stat().st_mtime]
    row = {"key": entry.name, "what": "?", "epochs": None, "val_elbo": None, "bytes": size,
           "date": time.strftime("%Y-%m-%d %H:%M", time.localtime(max(dates))), "status": "partial",
           "settings": ""}
    result = _read_json(entry / RESULT)
    if isinstance(result, dict) and "result" in result:
        return dict(row, what=str(result.get("kind")), status="ok")
    marker = _read_json(entry / MARKER)
    try:
        state = load_checkpoint(entry / "checkpoint.pt")
    except CheckpointError:
        bad = (entry / "checkpoint.pt").exists()
        return dict(row, status="corrupt" if bad else "partial", what="run")
    config, history = state.get("config") or {}, state.get("history") or []
    try:
        other = run_settings(VAEConfig.from_dict(config))
    except (ConfigError, TypeError):
        other = {}
    row.update(what=str(config.get("guide", "?")), epochs=len(history),
               val_elbo=history[-1].get("val_elbo") if history else None,
               settings=" ".join(f"{k}={v}" for k, v in other.items() if k not in ("guide", "epochs")))
    complete = marker is not None and state.get("progress") is None and len(history) == config.get("epochs")
    return dict(row, status="ok" if complete else "partial")


def clear(keys: Sequence[str] = (), root=None) -> List[str]:
    """Delete the entries whose key starts with one of ``keys`` (every entry if none); return the
    deleted keys. Only folders directly inside the cache folder are touched."""
    folder = cache_root(root)
    names = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    chosen = names if not keys else [n for n in names if any(n.startswith(k) for k in keys)]
    unknown = [k for k in keys if not any(n.startswith(k) for n in names)]
    if unknown:
        raise ConfigError(f"no cache entry {', '.join(unknown)} in {folder} (pyro-vae cache list shows them)")
    for name in chosen:
        shutil.rmtree(folder / name)
    return chosen
