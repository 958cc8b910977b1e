"""Inference: the SVI loop and its collaborators, objectives, gradient estimators, evaluation,
local fits."""
