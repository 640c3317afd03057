"""so-det-ultra layers (``nn.Module`` blocks), one module per block family; importing this package registers them all
(the registry imports it on its first lookup: ``BLOCKS`` lists ``so_det_ultra.nn`` as its location).

Owns: the blocks and their channel rules. Imports torch, Ultralytics' public modules, :mod:`so_det_ultra.registry` and
:mod:`so_det_ultra.channels` (``data`` is allowed too); nothing above it (docs/architecture.md). Families:
:mod:`.downsample` (SpaceToDepth, ECA, CDown), :mod:`.fusion` (SimAM, SWSConv, CGA attentions, EAFusion,
WeightedConcat), :mod:`.mrae` (MRAE), :mod:`.efpn` (CEM, FBSM), :mod:`.sgdm` (RDConv, SGDM), :mod:`.detr`
(SamplingRTDETRDecoder, SampleWeightGenerator), :mod:`.esod` (ObjectSeeker, SeekerDetect), :mod:`.head` (FastDetect,
FastDFL); :mod:`.graph` walks a built model (the seeker, ``from`` indices) and inserts a layer into it;
:mod:`.slicer` is ESOD's patch selection from a heatmap (shared by sparse inference and seeker fitting). A new family
is a new module here, imported below and listed in ``__all__`` (docs/adding-a-block.md).
"""

from so_det_ultra.nn.detr import SampleWeightGenerator, SamplingRTDETRDecoder
from so_det_ultra.nn.downsample import ECA, CDown, SpaceToDepth, eca_kernel_size, space_to_depth
from so_det_ultra.nn.efpn import CEM, FBSM
from so_det_ultra.nn.esod import ObjectSeeker, SeekerDetect
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
from so_det_ultra.nn.head import FastDetect, FastDFL
from so_det_ultra.nn.mrae import MRAE
from so_det_ultra.nn.sgdm import SGDM, RDConv

__all__ = (
    "CEM",
    "ECA",
    "FBSM",
    "MRAE",
    "SGDM",
    "CDown",
    "CGAChannelAttention",
    "CGAPixelAttention",
    "CGASpatialAttention",
    "EAFusion",
    "FastDFL",
    "FastDetect",
    "ObjectSeeker",
    "RDConv",
    "SWSConv",
    "SampleWeightGenerator",
    "SamplingRTDETRDecoder",
    "SeekerDetect",
    "SimAM",
    "SpaceToDepth",
    "Sum",
    "WeightedConcat",
    "eca_kernel_size",
    "simam",
    "space_to_depth",
)
