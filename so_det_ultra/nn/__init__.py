"""so-det-ultra layers, one module per block family; importing this package registers them all.

- :mod:`.downsample`: SpaceToDepth, ECA, CDown (SO-Det).
- :mod:`.fusion`: SimAM, SWSConv, CGA attentions, EAFusion, WeightedConcat (SO-Det CLWA).
"""

import importlib

from so_det_ultra.nn.downsample import CDown, ECA, SpaceToDepth, eca_kernel_size, space_to_depth
from so_det_ultra.nn.fusion import (
    CGAChannelAttention,
    CGAPixelAttention,
    CGASpatialAttention,
    EAFusion,
    SimAM,
    Sum,
    SWSConv,
    WeightedConcat,
    simam,
)

# Further block families (one module each, registering themselves on import); add yours here.
FAMILIES = ("mrae", "efpn", "sgdm", "detr", "esod")

for _name in FAMILIES:
    importlib.import_module(f"so_det_ultra.nn.{_name}")

__all__ = (
    "CDown",
    "CGAChannelAttention",
    "CGAPixelAttention",
    "CGASpatialAttention",
    "EAFusion",
    "ECA",
    "SWSConv",
    "SimAM",
    "SpaceToDepth",
    "Sum",
    "WeightedConcat",
    "eca_kernel_size",
    "simam",
    "space_to_depth",
)
