"""Training recipes that change how a model is trained, reached from Ultralytics' trainer through the integration.

Owns: ESOD's patch training (:mod:`.esod`: the training forward on uniform patches, its ``esod_train:`` options and
trainer callbacks) and the original-frame object areas its heatmap weights use (:mod:`.frames`). May import torch,
Ultralytics' public utilities, :mod:`so_det_ultra.losses`, :mod:`so_det_ultra.nn` and :mod:`so_det_ultra.data`;
never the integration layer nor :mod:`so_det_ultra.highres`. docs/highres.md describes the recipe.
"""
