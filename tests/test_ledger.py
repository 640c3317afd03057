"""The patch ledger: install() records every change to Ultralytics and torch; uninstall() restores the originals."""

from __future__ import annotations

import sys

import pytest
import torch

import so_det_ultra
from so_det_ultra.integration import PATCHES, install, installed, uninstall
from so_det_ultra.integration.ledger import ABSENT, Ledger

KINDS = {"function", "class attribute", "global", "callback", "safe global"}


def _host_state():
    """Everything install() may touch, as object identities: module functions (in every ultralytics module holding
    one of the patched names), init_criterion and loss of the two model classes, the tasks globals, the callback
    lists, safe globals."""
    import ultralytics.nn.tasks as tasks
    from ultralytics.utils.callbacks import base

    names = ("parse_model", "check_file", "guess_model_scale", "guess_model_task", "torch_safe_load")
    functions = {
        (mod.__name__, n): getattr(mod, n)
        for mod in list(sys.modules.values())
        if getattr(mod, "__name__", "").startswith("ultralytics")
        for n in names
        if hasattr(mod, n)
    }
    methods = {
        (c.__name__, n): c.__dict__.get(n, ABSENT)
        for c in (tasks.DetectionModel, tasks.RTDETRDetectionModel)
        for n in ("init_criterion", "loss")
    }
    callbacks = {event: list(fns) for event, fns in base.default_callbacks.items()}
    return functions, methods, set(vars(tasks)), callbacks, set(torch.serialization.get_safe_globals())


def _same(a, b):
    """Equal structure and, at the leaves, the very same objects."""
    fa, ma, ga, ca, sa = a
    fb, mb, gb, cb, sb = b
    assert fa.keys() <= fb.keys() and all(fa[k] is fb[k] for k in fa), "module functions"
    originals = {name: f for (_, name), f in fa.items()}
    assert all(fb[k] is originals[k[1]] for k in fb.keys() - fa.keys()), "functions of modules imported since"
    assert all(ma[k] is mb[k] for k in ma), "init_criterion methods"
    assert ga == gb, f"ultralytics.nn.tasks globals differ: {ga ^ gb}"
    assert ca.keys() == cb.keys() and all(
        len(ca[e]) == len(cb[e]) and all(x is y for x, y in zip(ca[e], cb[e])) for e in ca
    ), "callback lists"
    assert sa == sb, f"safe globals differ: {sa ^ sb}"


@pytest.fixture
def host():
    """The host as it is with no plugin; the plugin installed again afterwards, whatever the test did."""
    import ultralytics  # noqa: F401  (its lazily imported modules loaded before the snapshot)
    from ultralytics import YOLO

    so_det_ultra.register()
    YOLO("yolo11n.yaml")
    uninstall()
    try:
        yield _host_state()
    finally:
        install(strict=True)


def test_ledger_records_every_kind_of_change():
    so_det_ultra.register()
    kinds = {c.kind for c in PATCHES.values()}
    assert kinds == KINDS, kinds
    for target in (
        "ultralytics.nn.tasks.parse_model",
        "ultralytics.nn.tasks._so_det_ultra_parse",
        "ultralytics.utils.checks.check_file",
        "ultralytics.nn.tasks.guess_model_scale",
        "ultralytics.nn.tasks.guess_model_task",
        "ultralytics.nn.tasks.DetectionModel.init_criterion",
        "ultralytics.nn.tasks.RTDETRDetectionModel.init_criterion",
    ):
        assert target in PATCHES, target
    assert sum(c.kind == "callback" for c in PATCHES.values()) >= 4
    assert any(c.kind == "safe global" and c.new.__name__ == "CDown" for c in PATCHES.values())


def test_uninstall_restores_the_host_and_install_runs_again(host, tmp_path, monkeypatch):
    from ultralytics import YOLO

    monkeypatch.chdir(tmp_path)
    before = host
    install(strict=True)
    assert installed() and len(PATCHES) > 0
    changed = _host_state()
    for c in PATCHES.values():  # each change recorded the object that was there before
        if c.kind == "function":
            module, name = c.target.rsplit(".", 1)
            assert c.original is before[0][(module, name)] and changed[0][(module, name)] is c.new
        elif c.kind == "class attribute":
            assert c.original is before[1][tuple(c.target.split(".")[-2:])]
        else:
            assert c.original is ABSENT
    with pytest.raises(AssertionError):
        _same(before, changed)  # the check below can fail

    uninstall()
    assert not installed() and len(PATCHES) == 0
    _same(before, _host_state())
    with pytest.raises(FileNotFoundError):  # our YAML names are unknown to the bare host
        YOLO("so-det-n.yaml")

    install(strict=True)  # and again, from scratch
    assert installed() and YOLO("so-det-n.yaml").model.yaml["scale"] == "n"
    uninstall()
    _same(before, _host_state())


def test_uninstall_also_restores_modules_imported_after_the_patch(host):
    import types

    import ultralytics.nn.tasks as tasks

    install(strict=True)
    late = types.ModuleType("ultralytics._so_det_late_import")  # a module that imported parse_model by value later
    late.parse_model = tasks.parse_model
    sys.modules[late.__name__] = late
    try:
        uninstall()
        assert late.parse_model is host[0][("ultralytics.nn.tasks", "parse_model")]
    finally:
        del sys.modules[late.__name__]


def test_ledger_refuses_to_patch_twice_and_to_overwrite_globals():
    import types

    mod = types.ModuleType("ultralytics._so_det_fake")
    mod.f, mod.g = (lambda: 1), 0
    ledger = Ledger()
    original = mod.f
    ledger.rebind(mod, "f", lambda: 2)
    with pytest.raises(RuntimeError, match="already patched"):
        ledger.rebind(mod, "f", lambda: 3)
    with pytest.raises(RuntimeError, match="already exists"):
        ledger.add_global(mod, "g", 1)
    ledger.undo()
    assert mod.f is original and mod.g == 0 and len(ledger) == 0
