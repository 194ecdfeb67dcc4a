"""The name -> object table of the RL component families (defined in :mod:`cepo.registry`, shared with
the dataset adapters and the scoring networks)."""

from cepo.registry import Registry

__all__ = ["Registry"]
