"""so-det26: SO-Det's backbone and neck on Ultralytics' YOLO26 end-to-end head (cfg/models/so-det26.yaml).

In-process: every scale builds as documented, names resolve, fused == unfused for both head branches. Fresh processes
(stock CLI, no import of so_det_ultra): one ``yolo train`` on a data YAML with a ``so_det:`` key, then from its best.pt
``yolo val`` / ``yolo predict`` / ``yolo export`` with ``nms=False`` (the NMS-free one-to-one head), ONNX parity and
checkpoint reloads.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import FAST, LOAD_MODES, REPO, clean_env, python, yolo

import so_det_ultra
from so_det_ultra import paths

YAML_FILE = REPO / "cfg" / "models" / "so-det26.yaml"
SCALES = "nsmlx"


def _build(name):
    from ultralytics import YOLO

    return YOLO(name).model


def _documented_params():
    """The ``# summary: ... N parameters`` comment of every scale in the YAML."""
    found = dict(re.findall(r"^  ([nsmlx]): \[.*# summary: .*?([\d,]+) parameters", YAML_FILE.read_text(), re.M))
    return {k: int(v.replace(",", "")) for k, v in found.items()}


def test_every_scale_is_so_det_on_an_end2end_p2_head():
    """Strides 4/8/16, a one-to-one branch without DFL, the YAML's documented parameter count, and layers 0-21
    identical in type and size to so-det.yaml's (the backbone and neck are SO-Det's)."""
    from ultralytics.nn.modules import Detect

    documented = _documented_params()
    assert sorted(documented) == sorted(SCALES)
    for s in SCALES:
        m, ref = _build(f"so-det26-{s}.yaml"), _build(f"so-det-{s}.yaml")
        head = m.model[-1]
        assert type(head) is Detect and m.stride.tolist() == [4.0, 8.0, 16.0], s
        assert head.one2one_cv2 is not None and head.one2one_cv3 is not None, s
        assert head.reg_max == 1 and isinstance(head.dfl, torch.nn.Identity), s
        assert head.one2one_cv2[0][-1].out_channels == 4, s  # box regression without bins
        assert m.yaml["end2end"] is True and m.yaml["scale"] == s
        assert [(type(a), a.np) for a in m.model[:-1]] == [(type(b), b.np) for b in ref.model[:-1]], s
        assert sum(p.numel() for p in m.parameters()) == documented[s], s
    assert [documented[s] for s in SCALES] == sorted(documented.values())


def test_names_resolve_to_the_shipped_yaml(tmp_path, monkeypatch):
    import ultralytics.nn.tasks as tasks
    from ultralytics.utils.checks import check_yaml

    so_det_ultra.register()
    monkeypatch.chdir(tmp_path)
    for s in SCALES:
        assert Path(check_yaml(f"so-det26-{s}.yaml")) == paths.cfg_root() / "models" / "so-det26.yaml"
        assert tasks.guess_model_scale(f"so-det26-{s}.yaml") == s
        assert tasks.guess_model_scale(f"/runs/v8/so-det26-{s}.yaml") == s  # digits elsewhere in the path


def _decoded(model, x):
    """The selected branch's decoded (B, 4 + nc, anchors) predictions, before the one-to-one top-k."""
    with torch.no_grad():
        _, preds = model(x)
    head = model.model[-1]
    return head._inference(preds[("one2one" if head.end2end else "one2many")] if "one2one" in preds else preds)


@pytest.mark.parametrize("end2end", [True, False], ids=["one2one", "one2many"])
def test_fused_equals_unfused(end2end):
    from copy import deepcopy

    torch.manual_seed(0)
    model = _build("so-det26-n.yaml").eval()
    for p in model.modules():  # non-trivial BN statistics, so that folding them into the convs is really tested
        if isinstance(p, torch.nn.BatchNorm2d):
            p.running_mean.uniform_(-0.5, 0.5)
            p.running_var.uniform_(0.5, 2.0)
    model.end2end = end2end
    x = torch.rand(2, 3, 96, 96)
    ref = _decoded(model, x)
    fused = deepcopy(model).fuse(verbose=False)
    out = _decoded(fused, x)
    assert fused.end2end is end2end
    gone = "cv2" if end2end else "one2one_cv2"
    assert getattr(fused.model[-1], gone) is None  # fuse() dropped the unused branch
    assert out.shape == ref.shape == (2, 4 + 10, 24 * 24 + 12 * 12 + 6 * 6)
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()


# ------------------------------------------------------------------------------------------ stock CLI, fresh processes


@pytest.fixture(scope="module")
def so_det_data(tiny_data, tmp_path_factory):
    """The tiny synthetic set with a ``so_det:`` key (VisDrone protocol: size-wise APs, max_det 500)."""
    d = yaml.safe_load(tiny_data.read_text())
    d["so_det"] = {"eval": "visdrone", "max_det": 500}
    out = tmp_path_factory.mktemp("so_det_data") / "so_det.yaml"
    out.write_text(yaml.safe_dump(d, sort_keys=False))
    return out


@pytest.fixture(scope="module")
def trained(so_det_data, tmp_path_factory):
    """best.pt of so-det26-n trained 1 epoch by the stock ``yolo train`` in a fresh process from a foreign directory."""
    cwd, proj = tmp_path_factory.mktemp("cwd"), tmp_path_factory.mktemp("runs")
    out = yolo("train", "model=so-det26-n.yaml", f"data={so_det_data}", *FAST, f"project={proj}", "name=t", cwd=cwd)
    log = out.stdout + out.stderr
    assert "so-det26-n summary" in log and "l1_loss" in log  # E2ELoss of a reg_max=1 head logs an L1 box term
    assert "so-det visdrone AP" in log  # our metrics ran in the trainer's validation
    best = proj / "t" / "weights" / "best.pt"
    assert best.is_file(), "training wrote no best.pt"
    return best


@pytest.fixture(scope="module")
def image(tiny_data):
    return next((tiny_data.parent / "images" / "val").glob("*.png"))


@pytest.mark.cli
def test_nms_free_val_with_so_det_metrics_and_predict(trained, so_det_data, image, workdir, tmp_path):
    out = yolo(
        "val",
        f"model={trained}",
        f"data={so_det_data}",
        "imgsz=64",
        "batch=4",
        "device=cpu",
        "plots=False",
        "nms=False",
        f"project={tmp_path}",
        "name=v",
        cwd=workdir,
    )
    log = out.stdout + out.stderr
    assert "mAP50-95" in log and "max_det=500" in log and "so-det visdrone AP" in log
    import json

    metrics = json.loads((tmp_path / "v" / "so_det_metrics.json").read_text())
    assert all(metrics[k] is None or 0.0 <= metrics[k] <= 1.0 for k in ("AP", "AP50", "AP_small"))
    assert metrics["counts"]["gt"] > 0 and metrics["counts"]["det"] > 0

    yolo(
        "predict",
        f"model={trained}",
        f"source={image}",
        "imgsz=64",
        "device=cpu",
        "nms=False",
        "conf=0.0",
        "save_txt=True",
        "save_conf=True",
        f"project={tmp_path}",
        "name=p",
        cwd=workdir,
    )
    rows = (tmp_path / "p" / "labels" / f"{image.stem}.txt").read_text().splitlines()
    assert 0 < len(rows) <= 300 and all(len(r.split()) == 6 for r in rows)  # class, xywh, conf: top-k, no NMS


def _rel(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-9))


def _same_detections(a, b, tol=1e-4):
    """(k, 6) end-to-end outputs agree up to the order of near-equal scores: sorted scores match, and every row not
    tied with the k-th score has a row of the same class and box in the other output."""
    scale = max(np.abs(b[:, :4]).max(), 1e-9)
    sa, sb = np.sort(a[:, 4])[::-1], np.sort(b[:, 4])[::-1]
    assert np.abs(sa - sb).max() <= tol, f"scores differ by {np.abs(sa - sb).max():.2e}"
    for row in a[a[:, 4] > sb[-1] + tol]:
        same_cls = b[b[:, 5] == row[5]]
        assert len(same_cls), f"class {row[5]} missing"
        d = np.abs(same_cls[:, :5] - row[:5]).max(1).min() / scale
        assert d <= tol, f"no match for detection {row} (closest differs by {d:.2e} of the box scale)"


@pytest.mark.cli
def test_onnx_export_is_nms_free_and_matches_pytorch(trained, workdir, tmp_path):
    import onnx
    import onnxruntime as ort
    from ultralytics import YOLO

    ckpt = tmp_path / "best.pt"
    shutil.copy(trained, ckpt)
    yolo("export", f"model={ckpt}", "format=onnx", "imgsz=64", "nms=False", cwd=workdir)
    graph = onnx.load(str(tmp_path / "best.onnx"))
    ops = {n.op_type for n in graph.graph.node}
    assert "NonMaxSuppression" not in ops and "TopK" in ops  # one-to-one top-k, no NMS
    assert {p.key: p.value for p in graph.metadata_props}["end2end"] == "True"

    sess = ort.InferenceSession(str(tmp_path / "best.onnx"), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random((1, 3, 64, 64), dtype=np.float32)
    onnx_out = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    assert onnx_out.shape == (1, 300, 6)

    model = YOLO(str(ckpt)).model
    model.end2end = True
    model = model.fuse(verbose=False).eval()
    with torch.no_grad():
        ref = model(torch.from_numpy(x))[0].numpy()
    assert ref.shape == onnx_out.shape
    _same_detections(onnx_out[0], ref[0])
    model.model[-1].max_det = 10_000  # every one of the 336 anchors: equal sorted scores is a strong check
    with torch.no_grad():
        assert model(torch.from_numpy(x))[0].shape == (1, 336, 6)


@pytest.mark.cli
def test_exported_graph_adds_only_documented_operators(trained, workdir, tmp_path):
    """Beyond a stock yolo26n NMS-free export, the graph uses only operators listed in docs/export.md."""
    ckpt = tmp_path / "best.pt"
    shutil.copy(trained, ckpt)
    yolo("export", f"model={ckpt}", "format=onnx", "imgsz=64", "nms=False", cwd=workdir)
    python(
        "from ultralytics import YOLO; YOLO('yolo26n.yaml').export(format='onnx', imgsz=64, nms=False)", cwd=tmp_path
    )
    import onnx

    def ops(p):
        return {n.op_type for n in onnx.load(str(p)).graph.node}

    text = (REPO / "docs" / "export.md").read_text().split("<!-- ops-begin -->")[1].split("<!-- ops-end -->")[0]
    documented = {line.split("|")[1].strip().strip("`") for line in text.splitlines() if line.startswith("| `")}
    extra = ops(tmp_path / "best.onnx") - ops(tmp_path / "yolo26n.onnx")
    assert extra and not extra - documented, f"operators not in docs/export.md: {sorted(extra - documented)}"


RELOAD = """
{pre}
from ultralytics import YOLO
m = YOLO(r"{ckpt}")
r = m.predict(r"{img}", imgsz=64, nms=False, conf=0.0, verbose=False)
print("OK", type(m.model.model[1]).__name__, m.predictor.model.end2end, len(r[0].boxes))  # NMS-free path
"""


@pytest.mark.cli
@LOAD_MODES
def test_checkpoint_reloads_in_fresh_process(trained, image, workdir, pre, env):
    out = python(RELOAD.format(pre=pre, ckpt=trained, img=image), cwd=workdir, env=clean_env(**env))
    line = out.stdout.strip().splitlines()[-1].split()
    assert line[:3] == ["OK", "CDown", "True"] and 0 < int(line[3]) <= 300, out.stdout
