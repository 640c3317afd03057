"""Training recipes that change how a model is trained, reached from Ultralytics' trainer through the integration.

Owns: ESOD's patch training (:mod:`.esod`: the training forward on uniform patches, its ``esod_train:`` options and
trainer callbacks), the original-frame object areas its heatmap weights use (:mod:`.frames`), and seeker fitting
(:mod:`.seeker`, :mod:`.seeker_data`, the ``so-det fit-seeker`` command in :mod:`.cli`: an ObjectSeeker trained onto a
frozen detector, its threshold chosen from held-out recall). May import torch, Ultralytics' public utilities,
:mod:`so_det_ultra.losses`, :mod:`so_det_ultra.nn` and :mod:`so_det_ultra.data`; never the integration layer nor
:mod:`so_det_ultra.highres` (an import-linter contract). docs/highres.md describes both recipes.
"""
