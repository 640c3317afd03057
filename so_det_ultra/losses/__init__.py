"""Training criteria selectable from a model YAML's ``loss:`` section; importing this package registers them all.

Owns: the loss classes (each registered with ``@register_loss``) and the formulas they use, as plain functions.
May import torch, Ultralytics' public loss/metric modules (``ultralytics.utils.loss``,
``ultralytics.models.utils.loss``, ``ultralytics.utils.metrics``), :mod:`so_det_ultra.registry` and the blocks of
:mod:`so_det_ultra.nn` whose outputs they score; never the integration layer. A criterion gets everything it scores
as arguments (the predictions the model returned for this batch), never from state left on a module by the forward
pass.

- :mod:`.dcloss`: DCLoss (E-FPN-BS).
- :mod:`.better_sampling`: BetterSampling (ST, SR, SPR) for RT-DETR.
- :mod:`.esod`: ESODLoss (detection loss + objectness heatmap).
"""

from so_det_ultra.losses.better_sampling import BetterSampling, sample_reweight, scale_aligned_target, spr_losses
from so_det_ultra.losses.dcloss import DCLoss, scale_weights
from so_det_ultra.losses.esod import ESODLoss, heatmap_target

__all__ = (
    "BetterSampling",
    "DCLoss",
    "ESODLoss",
    "heatmap_target",
    "sample_reweight",
    "scale_aligned_target",
    "scale_weights",
    "spr_losses",
)
