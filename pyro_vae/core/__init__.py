"""Foundations: configuration, data, run folders and checkpoints, errors. Imports nothing above."""
