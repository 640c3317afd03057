"""Datasets: the data contract, dataset converters (VisDrone, SODA-D), tiling, and a synthetic tiny-object generator.

Owns: the layout of a converted dataset, the sidecar schema, YOLO label rows and the size bins
(:mod:`.contract`); the tile grid (:mod:`.tiling`); the converter skeleton (:mod:`.converter`) and the converters
(:mod:`.visdrone`, :mod:`.soda`); :mod:`.synthetic`; the ``so-det synthetic`` / ``so-det convert`` commands
(:mod:`.cli`). May import: the standard library, numpy, PyYAML, OpenCV, Pillow and Ultralytics' utilities (logger,
progress bar); never torch, and nothing else from so_det_ultra (other packages import from here).
"""
