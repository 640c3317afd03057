"""Safe (weights-only) checkpoint loading: every registered so-det-ultra class goes on torch's allow-list."""

from __future__ import annotations

import torch

from so_det_ultra.registry import BLOCKS, LOSSES


def _allow(entry):
    torch.serialization.add_safe_globals([entry.cls])


def install():
    """Allow-list registered classes now and any registered later (block modules may still be importing)."""
    import so_det_ultra.nn  # noqa: F401  (registers every block family)

    BLOCKS.subscribe(_allow)
    LOSSES.subscribe(_allow)
