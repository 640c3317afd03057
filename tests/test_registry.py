"""The registries: they import their own entries on the first lookup, layers and the safe-load allow-list are separate
tables, and a channel rule sees the scale letter the YAML names."""

from __future__ import annotations

import sys

import pytest
import torch
import yaml
from conftest import REPO, clean_env, python

from so_det_ultra import channels
from so_det_ultra.registry import BLOCKS, SAFE_GLOBALS, AllowList, Registry, register_block

FILL = """
import sys
from so_det_ultra.registry import BLOCKS, LOSSES, SAFE_GLOBALS
assert "so_det_ultra.nn" not in sys.modules and "so_det_ultra.losses" not in sys.modules
assert "CDown" in BLOCKS and "so_det_ultra.nn" in sys.modules  # the first lookup imported the block families
assert "so_det_ultra.losses" not in sys.modules
assert LOSSES.get("ESODLoss").cls.__module__ == "so_det_ultra.losses.esod"
print("filled", len(BLOCKS.names()), len(SAFE_GLOBALS.classes()))
"""


def test_tables_import_their_locations_on_first_lookup(tmp_path):
    out = python(FILL, cwd=tmp_path, env=clean_env(SO_DET_ULTRA_AUTOLOAD="0"))
    assert "filled" in out.stdout


def test_location_imported_once_and_reentrant(tmp_path, monkeypatch):
    (tmp_path / "_reg_probe.py").write_text(
        "from test_registry_probe import REG\nREG.register(type('Probe', (), {}), channels=lambda s: s)\n"
        "assert 'Probe' in REG  # a lookup while the location is being imported does not import it again\n"
    )
    probe = type(sys)("test_registry_probe")
    probe.REG = Registry("probe", locations=("_reg_probe",))
    monkeypatch.setitem(sys.modules, "test_registry_probe", probe)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert probe.REG.names() == ["Probe"]
    assert "_reg_probe" in sys.modules
    del sys.modules["_reg_probe"]
    assert "Probe" in probe.REG and "_reg_probe" not in sys.modules  # not imported a second time


def test_safe_globals_separate_from_layers():
    from so_det_ultra.nn.head import FastDFL
    from so_det_ultra.nn.sgdm import RDConv

    assert FastDFL in SAFE_GLOBALS and "FastDFL" not in BLOCKS  # allowed in checkpoints, not a YAML layer
    assert RDConv in SAFE_GLOBALS and BLOCKS.get("CDown").cls in SAFE_GLOBALS  # layers are allowed too
    local = Registry("block")  # a registry without an allow-list adds nothing to it
    cls = local.register(type("Local", (torch.nn.Module,), {}), channels=channels.same)
    assert cls not in SAFE_GLOBALS
    allow = AllowList()
    seen = []
    allow.subscribers.append(seen.append)
    Registry("block", allow=allow).register(cls, channels=channels.same)
    assert allow.classes() == [cls] and seen == [cls]


def test_channel_rule_sees_the_true_scale_letter(tmp_path):
    """With ``c3k_scales`` the parser hands Ultralytics an alias of the scale; channel rules get the YAML's letter."""
    from ultralytics.nn.tasks import DetectionModel

    seen = []

    def rule(spec):
        seen.append(spec.scale)
        return channels.same(spec)

    @register_block(name="_ScaleProbe", channels=rule)
    class _ScaleProbe(torch.nn.Identity):
        def __init__(self, c, *args):
            super().__init__()

    try:
        d = yaml.safe_load((REPO / "cfg" / "models" / "so-det.yaml").read_text())
        assert "m" in d["scales"] and d.get("c3k_scales") is not None
        d["backbone"].insert(1, [-1, 1, "_ScaleProbe", []])
        for row in d["backbone"][2:] + d["head"]:  # one layer more: shift the absolute `from` indices
            row[0] = [f + 1 if f >= 1 else f for f in row[0]] if isinstance(row[0], list) else row[0]
        DetectionModel(dict(d, scale="m"), nc=2, verbose=False)
    finally:
        BLOCKS._entries.pop("_ScaleProbe")
    assert seen == ["m"]


@pytest.mark.parametrize("name", ["so-det-rtdetr-n.yaml"])
def test_decoder_scales_read_the_true_letter(name):
    from ultralytics import RTDETR

    decoder = RTDETR(name).model.model[-1]
    assert decoder.hidden_dim == 128  # decoder_scales.n of cfg/models/so-det-rtdetr.yaml (hd: 128)
