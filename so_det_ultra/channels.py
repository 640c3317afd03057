"""Channel rules: how a model parser turns a YAML row into constructor arguments for a so-det-ultra block.

Every rule takes a :class:`~so_det_ultra.registry.LayerSpec` and returns ``(c2, args, n)``. They mirror what
Ultralytics does for its own layers, so ``scales:`` (width, max_channels, depth) apply to plugin blocks the same way.
"""

from __future__ import annotations

from so_det_ultra.registry import LayerSpec


def scaled(spec: LayerSpec):
    """Conv-like ``(c1, c2, *rest)``: YAML gives c2, which is width-scaled and capped like Ultralytics' ``Conv``."""
    if not spec.args or not isinstance(spec.args[0], (int, float)):
        spec.fail(f"first argument must be the output channels, got args={spec.args}")
    c1, c2 = spec.c_in(), spec.scale_channels(spec.args[0])
    return c2, [c1, c2, *spec.args[1:]], spec.n


def same(spec: LayerSpec):
    """Channel-preserving single-input layer ``(channels, *rest)`` (attention layers)."""
    c = spec.c_in()
    return c, [c, *spec.args], spec.n


def concat(spec: LayerSpec):
    """Concat-like ``(channels_list, *rest)``: output is the sum of the inputs' channels."""
    cs = spec.c_ins()
    return sum(cs), [cs, *spec.args], spec.n


def equal_inputs(spec: LayerSpec):
    """Element-wise fusion ``(channels, *rest)`` of inputs that must all have the same channels."""
    cs = spec.c_ins()
    if len(set(cs)) != 1:
        spec.fail(
            f"inputs must have equal channels, got {dict(zip(spec.f, cs))} (layer -> channels); "
            "check `from` or the widths of the layers it points to"
        )
    return cs[0], [cs[0], *spec.args], spec.n
