"""What a user does, for real: the stock Ultralytics CLI and Python API in NEW processes, from a foreign directory.

One model is trained once per test session (module fixture) and reused by the predict/val/export/reload tests.
"""

from __future__ import annotations

import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST, LOAD_MODES, REPO, clean_env, python, run, yolo

pytestmark = pytest.mark.cli


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_data):
    """best.pt of so-det-n trained 1 epoch by `yolo train` in a fresh process, from an unrelated directory."""
    cwd = tmp_path_factory.mktemp("cwd")
    proj = tmp_path_factory.mktemp("runs")
    out = yolo("train", "model=so-det-n.yaml", f"data={tiny_data}", *FAST, f"project={proj}", "name=train", cwd=cwd)
    assert "so-det-n summary" in out.stdout + out.stderr
    best = proj / "train" / "weights" / "best.pt"
    assert best.is_file(), "training wrote no best.pt"
    return best


@pytest.fixture(scope="module")
def image(tiny_data):
    return next((tiny_data.parent / "images" / "val").glob("*.png"))


def test_autoload_costs_no_torch_at_startup(workdir):
    code = "import sys; print(sorted(m for m in ('torch', 'ultralytics', 'so_det_ultra') if m in sys.modules))"
    assert python(code, cwd=workdir).stdout.strip() == "['so_det_ultra']"
    off = python(code, cwd=workdir, env=clean_env(SO_DET_ULTRA_AUTOLOAD="0")).stdout.strip()
    assert off == "[]"


def test_autoload_off_really_off(workdir):
    """Negative control: with auto-loading off and no import, Ultralytics does not know our YAML names."""
    code = (
        "from ultralytics import YOLO\ntry:\n    YOLO('so-det-s.yaml')\nexcept FileNotFoundError:\n"
        "    print('NOT FOUND')"
    )
    assert "NOT FOUND" in python(code, cwd=workdir, env=clean_env(SO_DET_ULTRA_AUTOLOAD="0")).stdout
    code = "import so_det_ultra\nfrom ultralytics import YOLO\nprint(YOLO('so-det-s.yaml').model.yaml['scale'])"
    assert python(code, cwd=workdir, env=clean_env(SO_DET_ULTRA_AUTOLOAD="0")).stdout.strip().endswith("s")


def test_python_api_builds_named_scale(workdir):
    code = (
        "from ultralytics import YOLO; m = YOLO('so-det-s.yaml'); print(sum(p.numel() for p in m.model.parameters()))"
    )
    assert python(code, cwd=workdir).stdout.strip().splitlines()[-1] == "1072440"


def test_yolo_train_wrote_checkpoint(trained):
    assert trained.stat().st_size > 100_000
    assert (trained.parent.parent / "results.csv").is_file()


def test_yolo_predict_and_val(trained, image, tiny_data, workdir, tmp_path):
    out = yolo(
        "predict",
        f"model={trained}",
        f"source={image}",
        "imgsz=64",
        "device=cpu",
        f"project={tmp_path}",
        "name=pred",
        "save=True",
        cwd=workdir,
    )
    assert (tmp_path / "pred" / image.name.replace(".png", ".jpg")).exists() or any((tmp_path / "pred").iterdir())
    out = yolo(
        "val",
        f"model={trained}",
        f"data={tiny_data}",
        "imgsz=64",
        "batch=4",
        "device=cpu",
        "plots=False",
        f"project={tmp_path}",
        "name=val",
        cwd=workdir,
    )
    assert "mAP50-95" in out.stdout + out.stderr


RELOAD = """
import sys
{pre}
from ultralytics import YOLO
m = YOLO(r"{ckpt}")
r = m.predict(r"{img}", imgsz=64, verbose=False)
print("OK", type(m.model.model[1]).__name__, len(r))
"""


@LOAD_MODES
def test_checkpoint_reloads_in_fresh_process(trained, image, workdir, pre, env):
    out = python(RELOAD.format(pre=pre, ckpt=trained, img=image), cwd=workdir, env=clean_env(**env))
    assert "OK CDown 1" in out.stdout


def _torch_output(ckpt, x):
    import torch
    from ultralytics import YOLO

    model = YOLO(str(ckpt)).model.fuse().eval()
    with torch.no_grad():
        y = model(torch.from_numpy(x))
    return (y[0] if isinstance(y, (list, tuple)) else y).numpy()


def _rel_diff(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-9))


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_onnx_export_matches_pytorch(trained, workdir, tmp_path, dynamic):
    import onnxruntime as ort

    ckpt = tmp_path / "best.pt"
    shutil.copy(trained, ckpt)
    yolo("export", f"model={ckpt}", "format=onnx", "imgsz=64", f"dynamic={dynamic}", cwd=workdir)
    sess = ort.InferenceSession(str(tmp_path / "best.onnx"), providers=["CPUExecutionProvider"])
    sizes = [64, 96] if dynamic else [64]
    for s in sizes:
        x = np.random.default_rng(0).random((1, 3, s, s), dtype=np.float32)
        onnx_out = sess.run(None, {sess.get_inputs()[0].name: x})[0]
        ref = _torch_output(ckpt, x)
        assert onnx_out.shape == ref.shape
        d = _rel_diff(onnx_out, ref)
        assert d <= 1e-4, f"ONNX vs PyTorch at {s}px: max abs diff {d:.2e} of output scale"


def _documented_ops():
    text = (REPO / "docs" / "export.md").read_text()
    section = text.split("<!-- ops-begin -->")[1].split("<!-- ops-end -->")[0]
    return {line.split("|")[1].strip().strip("`") for line in section.splitlines() if line.startswith("| `")}


def _onnx_ops(path):
    import onnx

    return {n.op_type for n in onnx.load(str(path)).graph.node}


def test_exported_graph_uses_only_documented_operators(trained, workdir, tmp_path):
    """Every operator our blocks add beyond a stock yolo11 export is listed (TensorRT support too) in docs/export.md."""
    ckpt = tmp_path / "best.pt"
    shutil.copy(trained, ckpt)
    yolo("export", f"model={ckpt}", "format=onnx", "imgsz=64", cwd=workdir)
    python("from ultralytics import YOLO; YOLO('yolo11n.yaml').export(format='onnx', imgsz=64)", cwd=tmp_path)
    extra = _onnx_ops(tmp_path / "best.onnx") - _onnx_ops(tmp_path / "yolo11n.onnx")
    undocumented = extra - _documented_ops()
    assert not undocumented, f"operators not in docs/export.md: {sorted(undocumented)}"


def test_openvino_export_matches_pytorch(trained, workdir, tmp_path):
    import openvino as ov

    ckpt = tmp_path / "best.pt"
    shutil.copy(trained, ckpt)
    yolo("export", f"model={ckpt}", "format=openvino", "imgsz=64", cwd=workdir)
    xml = next((tmp_path / "best_openvino_model").glob("*.xml"))
    compiled = ov.Core().compile_model(str(xml), "CPU")
    x = np.random.default_rng(0).random((1, 3, 64, 64), dtype=np.float32)
    out = compiled(x)[0]
    d = _rel_diff(out, _torch_output(ckpt, x))
    assert d <= 1e-3, f"OpenVINO vs PyTorch: max abs diff {d:.2e} of output scale"  # CPU plugin may use fast math


DDP_PREP = """
from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.utils.dist import generate_ddp_file
t = DetectionTrainer(overrides=dict(model="so-det-n.yaml", data=r"{data}", epochs=1, imgsz=64, batch=4, workers=0,
                                    device="cpu", plots=False, project=r"{proj}", name="ddp", exist_ok=True))
t.model = t.get_model(cfg="so-det-n.yaml", verbose=False)
print(generate_ddp_file(t))
"""


@pytest.mark.parametrize("autoload", ["1", "0"])
def test_ddp_worker_sees_registration(tiny_data, workdir, tmp_path, autoload):
    """Ultralytics' generated DDP script, launched through torch.distributed.run (1 CPU process), trains our model."""
    env = clean_env(SO_DET_ULTRA_AUTOLOAD=autoload)
    pre = "" if autoload == "1" else "import so_det_ultra\n"  # a user with auto-loading off imports us before training
    script = (
        python(pre + DDP_PREP.format(data=tiny_data, proj=tmp_path), cwd=workdir, env=env)
        .stdout.strip()
        .splitlines()[-1]
    )
    try:
        run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", "0", script],
            cwd=workdir,
            env=env,
            timeout=300,
        )
    finally:
        Path(script).unlink(missing_ok=True)
        Path(script).with_suffix(".pt").unlink(missing_ok=True)
    assert (tmp_path / "ddp" / "weights" / "best.pt").is_file()


def test_unsupported_ultralytics_version_is_one_clear_message(workdir):
    code = (
        "import warnings, ultralytics\nultralytics.__version__ = '8.9.0'\n"
        "with warnings.catch_warnings(record=True) as w:\n    warnings.simplefilter('always')\n"
        "    import ultralytics.nn.tasks as t\n"
        "print('PATCHED' if hasattr(t, '_so_det_ultra_parse') else 'UNTOUCHED')\n"
        "print([str(x.message) for x in w if 'so-det-ultra supports' in str(x.message)])\n"
        "import so_det_ultra\ntry:\n    so_det_ultra.register()\nexcept RuntimeError as e:\n    print('RAISED', e)"
    )
    out = python(code, cwd=workdir).stdout
    assert "UNTOUCHED" in out and "8.9.0" in out and "RAISED" in out
    assert "8.4.115" in out and "8.4.190" in out


def test_wheel_ships_configs_and_autoload_hook(tmp_path):
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(REPO),
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            "-q",
        ],
        cwd=tmp_path,
    )
    whl = next(tmp_path.glob("so_det_ultra-*.whl"))
    names = set(zipfile.ZipFile(whl).namelist())
    assert "so_det_ultra_autoload.pth" in names
    assert "so_det_ultra/cfg/models/so-det.yaml" in names
    assert any(n.startswith("so_det_ultra/cfg/datasets/") for n in names)
    assert "so_det_ultra/_bootstrap.py" in names


DDP_GLOO = """
import os, torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from ultralytics import YOLO
from ultralytics.cfg import get_cfg
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = YOLO("so-det-n.yaml").model.train()
model.args = get_cfg()
ddp = DDP(model)  # Ultralytics' settings: find_unused_parameters=False, so every parameter must be used
torch.manual_seed(rank)  # different data per rank
batch = {"img": torch.rand(2, 3, 64, 64), "batch_idx": torch.tensor([0., 1.]), "cls": torch.tensor([[0.], [1.]]),
         "bboxes": torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.1]])}
loss, _ = model.loss(batch, ddp(batch["img"]))
loss.sum().backward()
g = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
ref = g.clone()
dist.broadcast(ref, 0)
print("RANK", rank, "SAME_GRAD", bool(torch.allclose(g, ref)), "N", g.numel(), flush=True)
dist.destroy_process_group()
"""


def test_ddp_gloo_two_cpu_processes_sync_gradients(workdir):
    """Our blocks under DistributedDataParallel (gloo, 2 CPU processes): every parameter used, gradients all-reduced."""
    script = workdir / "ddp_gloo.py"
    script.write_text(DDP_GLOO)
    from ultralytics.utils.dist import find_free_network_port

    port = find_free_network_port()
    out = run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port, script],
        cwd=workdir,
        timeout=300,
    ).stdout
    assert out.count("SAME_GRAD True") == 2, out[-2000:]
