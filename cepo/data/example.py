"""The one record type every dataset adapter produces (defined in :mod:`cepo.records`, the bottom layer;
this path stays for imports)."""

from cepo.records import PROMPT_FAMILIES, Example

__all__ = ["PROMPT_FAMILIES", "Example"]
