"""The rollout batch (defined in :mod:`cepo.records`, the bottom layer; this path stays for imports)."""

from cepo.records import Rollout

__all__ = ["Rollout"]
