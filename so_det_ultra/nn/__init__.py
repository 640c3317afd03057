"""so-det-ultra layers (``nn.Module`` blocks), one module per block family; importing this package registers them all.

Owns: the blocks and their channel rules. May import torch, Ultralytics' public modules (``ultralytics.nn.modules``,
``ultralytics.utils``) and :mod:`so_det_ultra.registry`/:mod:`so_det_ultra.channels`; never the integration layer
(:mod:`so_det_ultra.integration`), which is what teaches Ultralytics' parser about these blocks.

- :mod:`.downsample`: SpaceToDepth, ECA, CDown (SO-Det).
- :mod:`.fusion`: SimAM, SWSConv, CGA attentions, EAFusion, WeightedConcat (SO-Det CLWA).
- :mod:`.mrae`: MRAE (MultiResolution Attention Extractor).
- :mod:`.efpn`: CEM, FBSM (E-FPN-BS).
- :mod:`.sgdm`: RDConv, SGDM.
- :mod:`.detr`: SamplingRTDETRDecoder, SampleWeightGenerator (Better Sampling).
- :mod:`.esod`: ObjectSeeker, SeekerDetect (ESOD).
- :mod:`.head`: FastDetect, FastDFL (Ultralytics Detect with an equal, faster DFL decode).

A new family is a new module here, imported below and listed in ``__all__`` (docs/adding-a-block.md).
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
