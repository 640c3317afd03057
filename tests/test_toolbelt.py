"""The Ultralytics tool belt with SO-Det models, each in a fresh process as a user runs it: ``yolo benchmark``, the
TensorBoard integration, ``model.tune()`` and the stock trainer's own DDP launch (docs/models.md, docs/multi-gpu.md)."""

from __future__ import annotations

import csv
import json
import sys

import pytest
import yaml
from conftest import BIN, clean_env, python, run

from so_det_ultra.data.contract import SO_DET_KEY, so_det_key


@pytest.fixture(scope="module")
def visdrone_like(tmp_path_factory):
    """A synthetic data YAML evaluated with the VisDrone protocol (``so_det: {eval: visdrone}``), 8 + 4 images."""
    from so_det_ultra.data.synthetic import make_dataset

    path = make_dataset(tmp_path_factory.mktemp("vd"), n_train=8, n_val=4, imgsz=64, nc=3, seed=0)
    data = yaml.safe_load(path.read_text())
    data[SO_DET_KEY] = so_det_key("visdrone", 500)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _env(tmp_path, **extra) -> dict:
    """Offline child environment with its own Ultralytics settings folder and no pytest marker (Ultralytics switches
    its logger integrations off while ``PYTEST_CURRENT_TEST`` is set)."""
    env = clean_env(YOLO_CONFIG_DIR=tmp_path / "cfgdir", **extra)
    env.pop("PYTEST_CURRENT_TEST", None)
    return env


@pytest.mark.cli
def test_yolo_benchmark_with_so_det_checkpoint_and_data(visdrone_like, tmp_path):
    """``yolo benchmark`` (ultralytics.utils.benchmarks.benchmark) exports, predicts and validates offline."""
    python("from ultralytics import YOLO; YOLO('so-det-n.yaml').save('so-det-n.pt')", cwd=tmp_path, env=_env(tmp_path))
    out = run(
        [BIN / "yolo", "benchmark", "model=so-det-n.pt", f"data={visdrone_like}", "imgsz=64", "format=onnx"],
        cwd=tmp_path,
        env=_env(tmp_path),
        timeout=600,
    )
    log = (tmp_path / "benchmarks.log").read_text()
    assert "ONNX" in log and "✅" in log, out.stdout[-3000:] + out.stderr[-3000:]
    row = next(line for line in log.splitlines() if " ONNX " in line).split()  # | 1 ONNX ✅ size mAP ms fps |
    assert row[3] == "✅" and 0.0 <= float(row[5]) <= 1.0 and float(row[6]) > 0, row  # mAP50-95, ms per image
    assert (tmp_path / "so-det-n.onnx").stat().st_size > 10_000


TB_TRAIN = """
from ultralytics import YOLO
YOLO("so-det-n.yaml").train(data=r"{data}", epochs=1, imgsz=64, batch=4, workers=0, device="cpu", plots=False,
                            project=r"{proj}", name="tb", exist_ok=True)
"""


@pytest.mark.cli
def test_tensorboard_event_file_has_so_det_metrics(visdrone_like, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    env = _env(tmp_path)
    run([BIN / "yolo", "settings", "tensorboard=True"], cwd=tmp_path, env=env)
    python(TB_TRAIN.format(data=visdrone_like, proj=tmp_path), cwd=tmp_path, env=env, timeout=600)
    events = sorted((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert events, sorted(p.name for p in (tmp_path / "tb").iterdir())
    acc = EventAccumulator(str(events[-1])).Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"so_det/AP", "so_det/AP50", "so_det/AP_small", "metrics/mAP50(B)"} <= tags, sorted(tags)
    events = acc.Scalars("so_det/AP")
    assert events and events[0].step == 1, events  # epoch 1 (Ultralytics logs its final validation as a next step)
    row = next(csv.DictReader((tmp_path / "tb" / "results.csv").open()))
    ap = {k.strip(): v for k, v in row.items()}["so_det/AP"]
    assert events[0].value == pytest.approx(float(ap), abs=1e-5)  # the value results.csv has for epoch 1


TUNE = """
from ultralytics import YOLO
YOLO("so-det-n.yaml").tune(data=r"{data}", epochs=1, iterations=2, imgsz=64, batch=4, workers=0, device="cpu",
                           plots=False, save=False, project=r"{proj}", name="tune")
"""


@pytest.mark.cli
@pytest.mark.slow  # two 1-epoch trainings; run with -m slow
def test_model_tune_two_iterations(visdrone_like, tmp_path):
    python(TUNE.format(data=visdrone_like, proj=tmp_path), cwd=tmp_path, env=_env(tmp_path), timeout=900)
    lines = (tmp_path / "tune" / "tune_results.ndjson").read_text().splitlines()
    records = [json.loads(x) for x in lines if x.strip()]
    assert len(records) == 2, records
    assert all("fitness" in r and r.get("hyperparameters") for r in records)
    assert (tmp_path / "tune" / "best_hyperparameters.yaml").is_file()


# Test-only patch, loaded in the launching process and in every DDP worker (PYTHONPATH sitecustomize): the stock
# trainer picks its DDP path from a multi-GPU device string and binds each worker to a CUDA device; here the worker
# count comes from SO_DET_TEST_CPU_DDP and the process group is gloo on CPU. Everything else (generate_ddp_command,
# torch.distributed.run, the pickled trainer state, DistributedDataParallel, rank-0 saving, the final validation) is
# Ultralytics' own code. Each worker records what it did as a file in SO_DET_TEST_DDP_MARKS: the workers share one
# unbuffered stdout, where their prints interleave mid-line ("CPU-DDP wrappedCPU-DDP wrapped DetectionModel").
SITECUSTOMIZE = """
import os
_N = int(os.environ.get("SO_DET_TEST_CPU_DDP", "0"))
if _N:
    from pathlib import Path

    import torch
    import torch.distributed as dist
    from ultralytics.engine import trainer as T

    _init, _DDP = T.BaseTrainer.__init__, torch.nn.parallel.DistributedDataParallel

    def _mark(name):
        (Path(os.environ["SO_DET_TEST_DDP_MARKS"]) / name).touch(exist_ok=False)

    def __init__(self, *args, **kwargs):
        _init(self, *args, **kwargs)
        self.world_size, self.ddp = _N, T.LOCAL_RANK == -1  # as for device="0,1"

    def _setup_ddp(self):
        dist.init_process_group("gloo", rank=T.RANK, world_size=self.world_size)
        _mark(f"rank {dist.get_rank()} of {dist.get_world_size()}")

    class CpuDDP(_DDP):
        def __init__(self, module, device_ids=None, **kwargs):  # CPU modules take no device_ids
            super().__init__(module, **kwargs)
            _mark(f"rank {dist.get_rank()} wrapped {type(module).__name__}")

    T.BaseTrainer.__init__, T.BaseTrainer._setup_ddp = __init__, _setup_ddp
    torch.nn.parallel.DistributedDataParallel = CpuDDP

    from types import SimpleNamespace

    from ultralytics.engine import validator as V

    _AutoBackend = V.AutoBackend  # a DDP rank's final validation asks for the rank's CUDA device: CPU here
    V.get_torch_device_backend = lambda device_type: SimpleNamespace(current_device=lambda: 0)
    V.AutoBackend = lambda *args, device=None, **kwargs: _AutoBackend(*args, device=torch.device("cpu"), **kwargs)
"""

DDP_TRAIN = """
{pre}from ultralytics import YOLO
YOLO("so-det-n.yaml").train(data=r"{data}", epochs=1, imgsz=64, batch=4, workers=0, device="cpu", plots=False,
                            project=r"{proj}", name="ddp", exist_ok=True)
"""


@pytest.mark.cli
@pytest.mark.parametrize("autoload", ["1", pytest.param("0", marks=pytest.mark.slow)])
def test_stock_ddp_launch_two_cpu_workers(visdrone_like, tmp_path, autoload):
    """``model.train`` with two workers goes through Ultralytics' own DDP launch (generate_ddp_command ->
    torch.distributed.run -> pickled trainer) and trains an SO-Det model in both ranks."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    marks = tmp_path / "marks"
    marks.mkdir()
    env = _env(
        tmp_path,
        PYTHONPATH=tmp_path / "site",
        SO_DET_TEST_CPU_DDP=2,
        SO_DET_TEST_DDP_MARKS=marks,
        SO_DET_ULTRA_AUTOLOAD=autoload,
    )
    pre = "" if autoload == "1" else "import so_det_ultra\n"
    code = DDP_TRAIN.format(pre=pre, data=visdrone_like, proj=tmp_path)
    proc = run([sys.executable, "-c", code], cwd=tmp_path, env=env, timeout=900)
    text = proc.stdout + proc.stderr
    assert "debug command" in text and "torch.distributed.run --nproc_per_node 2" in text, text[-3000:]
    assert sorted(p.name for p in marks.iterdir()) == [
        "rank 0 of 2",
        "rank 0 wrapped DetectionModel",
        "rank 1 of 2",
        "rank 1 wrapped DetectionModel",
    ], text[-3000:]
    assert (tmp_path / "ddp" / "weights" / "best.pt").is_file()
    assert (tmp_path / "ddp" / "results.csv").read_text().count("\n") >= 2
