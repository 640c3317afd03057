"""Loading code from files: checkpoints go through Ultralytics' safe loader by default, model YAMLs with so-det-ultra
blocks accept only a plain ``nn.<Name>(<literal args>)`` activation, and empty YAML sections are a clear error.

A YAML without plugin blocks keeps Ultralytics' own treatment of ``activation:`` (``eval``), unchanged.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml
from conftest import RunsCode
from ultralytics import YOLO

from so_det_ultra import paths
from so_det_ultra.highres.common import load_model
from so_det_ultra.nn.checkpoints import UnsafeCheckpointError
from so_det_ultra.registry import ModelBuildError


def _yaml(tmp_path: Path, name: str, base: dict, **changes) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump({**base, **changes}))
    return path


@pytest.fixture(scope="module")
def so_det_cfg() -> dict:
    return yaml.safe_load(paths.model_cfg("so-det-n.yaml").read_text())


@pytest.fixture(scope="module")
def stock_cfg() -> dict:
    import ultralytics

    return yaml.safe_load((Path(ultralytics.__file__).parent / "cfg" / "models" / "11" / "yolo11.yaml").read_text())


def test_code_in_activation_of_a_plugin_yaml_is_refused_not_run(tmp_path, so_det_cfg):
    marker = tmp_path / "ran"
    evil = _yaml(tmp_path, "evil-n.yaml", so_det_cfg, activation=f"__import__('pathlib').Path('{marker}').touch()")
    with pytest.raises(ModelBuildError, match=r"evil-n\.yaml: activation .* is refused.*nn\.SiLU\(\)"):
        YOLO(str(evil))
    assert not marker.exists(), "the activation string was executed"
    for act in (
        "nn.ReLU(inplace=bool(1))",
        "torch.nn.modules.activation.ReLU()",
        "nn.ReLU",
        "nn.Nope()",
        "nn.SiLU(**{})",
    ):
        with pytest.raises(ModelBuildError, match="is refused"):
            YOLO(str(_yaml(tmp_path, "act-n.yaml", so_det_cfg, activation=act)))


def test_plain_activations_build(tmp_path, so_det_cfg):
    for act in ("nn.LeakyReLU(0.1)", "torch.nn.Hardswish()", "nn.ReLU(inplace=True)"):
        model = YOLO(str(_yaml(tmp_path, "ok-n.yaml", so_det_cfg, activation=act))).model
        name = re.match(r"(?:torch\.)?nn\.(\w+)", act).group(1)
        assert any(type(m).__name__ == name for m in model.modules()), act


def test_stock_yaml_activation_is_left_to_ultralytics(tmp_path, stock_cfg):
    """An expression Ultralytics evaluates (not a plain literal call) still builds a stock YAML."""
    model = YOLO(str(_yaml(tmp_path, "yolo11n.yaml", stock_cfg, activation="nn.ReLU(inplace=bool(1))"))).model
    assert any(isinstance(m, torch.nn.ReLU) for m in model.modules())


@pytest.mark.parametrize("head", [None, []])
def test_empty_head_is_a_clear_error(tmp_path, so_det_cfg, head):
    path = _yaml(tmp_path, "empty-n.yaml", so_det_cfg, head=head)
    with pytest.raises(ModelBuildError, match=r"empty-n\.yaml: 'head:' is empty; list its layers as"):
        YOLO(str(path))


@pytest.fixture(scope="module")
def saved_checkpoints(tmp_path_factory):
    """A plain so-det-n checkpoint and one whose pickle runs ``os.mkdir(marker)`` when loaded in full."""
    root = tmp_path_factory.mktemp("ckpt")
    good = root / "good.pt"
    YOLO("so-det-n.yaml").save(good)
    ckpt = torch.load(good, weights_only=False)
    ckpt["extra"] = RunsCode(root / "ran")
    evil = root / "evil.pt"
    torch.save(ckpt, evil)
    return good, evil, root / "ran"


@pytest.fixture
def checkpoints(saved_checkpoints):
    """The module's checkpoints, the marker removed: every test starts without it, whatever ran before (the
    full-pickle test makes it on purpose)."""
    marker = saved_checkpoints[2]
    if marker.exists():
        marker.rmdir()
    return saved_checkpoints


def test_load_model_is_safe_by_default(checkpoints):
    good, evil, marker = checkpoints
    model = load_model(good)
    assert type(model).__name__ == "DetectionModel" and not model.training and model.pt_path == str(good)
    with pytest.raises(
        UnsafeCheckpointError, match=r"evil\.pt: safe loading refused it \(it names .*mkdir.*--unsafe-load"
    ):
        load_model(evil)
    assert not marker.exists(), "the checkpoint's code ran under the safe loader"


def test_unsafe_load_opts_out(checkpoints):
    _, evil, marker = checkpoints
    load_model(evil, unsafe_load=True)
    assert marker.exists()  # full pickle: the stock behaviour, only on request


def test_predict_has_the_unsafe_load_option():
    from so_det_ultra.cli import build_parser

    p = build_parser()
    assert p.parse_args(["predict", "--model", "m.pt", "--source", "x", "--unsafe-load"]).unsafe_load is True
    assert p.parse_args(["predict", "--model", "m.pt", "--source", "x"]).unsafe_load is False


@pytest.mark.parametrize("mode", ["dense", "sliced", "sparse"])
def test_every_predict_mode_refuses_an_unsafe_checkpoint(checkpoints, mode):
    from so_det_ultra.highres.engines import open_predictor

    _, evil, marker = checkpoints
    with pytest.raises(UnsafeCheckpointError, match="--unsafe-load"):
        open_predictor(evil, mode, device="cpu")
    assert not marker.exists(), f"{mode}: the checkpoint's code ran"
