"""``so-det demo``: the whole job end to end on a synthetic tiny-object set, offline, in 1-3 minutes on 2 CPU cores.

Data, training (the stock Ultralytics trainer), small-object validation, prediction, ONNX export with a parity check,
and the pictures (predictions, AP by object size, training curves). :func:`so_det_ultra.demo.pipeline.run_demo` is
the Python entry; :mod:`.cli` the command. See docs/demo.md.
"""
