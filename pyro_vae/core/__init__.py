"""Foundations: configuration, data, run folders and checkpoints, errors. Imports nothing above."""

# first, before anything imports pyro (pyro.infer imports tqdm.auto): the progress bars' choice, without
# tqdm's "IProgress not found" warning in notebooks that lack ipywidgets
from . import progress  # noqa: F401
