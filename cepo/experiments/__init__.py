"""Experiments built on cepo: the reward experiment grid (``python -m cepo.experiments.grid``)."""
