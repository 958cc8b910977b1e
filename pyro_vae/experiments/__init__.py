"""Experiments: guide comparisons, the gradient-variance lab, figures."""
