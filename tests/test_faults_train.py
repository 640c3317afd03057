"""Training faults: a run killed mid-epoch resumes to the end with one results.csv row per epoch; a checkpoint
naming a block this version lacks fails with a message naming the block and the versions
(so_det_ultra/integration/checkpoint.py).
"""

from __future__ import annotations

import csv
import signal
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import FAST, clean_env, python, yolo

# ----------------------------------------------------------------------------------------------- kill and resume


@pytest.fixture(scope="module")
def resume_data(tmp_path_factory):
    """32 training images (8 batches of 4: an epoch long enough to be killed in), with a ``so_det:`` key so that our
    results.csv columns are part of what must survive."""
    from so_det_ultra.data.synthetic import make_dataset

    path = make_dataset(tmp_path_factory.mktemp("resume"), n_train=32, n_val=4, imgsz=64, objects=(2, 6), seed=1)
    data = yaml.safe_load(path.read_text())
    data["so_det"] = {"eval": "soda-d", "max_det": 100}
    path.write_text(yaml.safe_dump(data))
    return path


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


KILL_IN_EPOCH_2 = """
import os, signal
from ultralytics import YOLO

seen = []

def kill_mid_epoch_2(trainer):  # SIGKILL after the 3rd of 8 batches of epoch 2 (last.pt of epoch 1 on disk)
    if trainer.epoch == 1:
        seen.append(1)
        if len(seen) == 3 and os.path.exists(r"{last}"):
            os.kill(os.getpid(), signal.SIGKILL)

model = YOLO("so-det-n.yaml")
model.add_callback("on_train_batch_end", kill_mid_epoch_2)
model.train({args})
"""


def test_killed_mid_epoch_resumes_to_the_same_epochs(resume_data, workdir, tmp_path):
    """SIGKILL in the middle of epoch 2 (from a training callback, so it lands there on any machine speed), then the
    stock ``yolo train resume=True``: 3 epochs, each once in results.csv, our so_det/ columns aligned."""
    run = tmp_path / "run"
    args = [f"data={resume_data}", f"project={tmp_path}", "name=run", *FAST, "epochs=3", "patience=0"]
    given = dict(a.split("=", 1) for a in args)  # later wins, as on the yolo command line
    kwargs = ", ".join(f"{k}={yaml.safe_load(v)!r}" for k, v in given.items())
    code = KILL_IN_EPOCH_2.format(last=run / "weights" / "last.pt", args=kwargs)
    proc = subprocess.run([sys.executable, "-c", code], cwd=workdir, env=clean_env(), capture_output=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    killed = _rows(run / "results.csv")
    assert [int(float(r[0])) for r in killed[1:]] == [1], "the kill must land in epoch 2"
    assert torch.load(run / "weights" / "last.pt", map_location="cpu", weights_only=False)["epoch"] == 0

    yolo("train", "resume=True", f"model={run / 'weights' / 'last.pt'}", cwd=workdir)

    rows = _rows(run / "results.csv")
    header, body = rows[0], rows[1:]
    assert [int(float(r[0])) for r in body] == [1, 2, 3]  # each epoch exactly once, none missing
    assert all(len(r) == len(header) for r in body), "a row's columns shifted against the header"
    assert "so_det/AP" in header and all(r[header.index("so_det/AP")] != "" for r in body)
    final = torch.load(run / "weights" / "last.pt", map_location="cpu", weights_only=False)
    assert final["train_args"]["epochs"] == 3 and len(final["train_results"]["epoch"]) == 3


# ------------------------------------------------------------------------------- checkpoint names a missing block

BLOCKS_PY = """
import torch
from torch import nn

from so_det_ultra import channels
from so_det_ultra.registry import register_block


@register_block(channels=channels.same)
class KeepBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c

    def forward(self, x):
        return x
{extra}"""

TMP_BLOCK = """

@register_block(channels=channels.same)
class TmpScale(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.w = nn.Parameter(torch.ones(1, c, 1, 1))

    def forward(self, x):
        return x * self.w
"""

MODEL_YAML = """
nc: 3
backbone:
  - [-1, 1, Conv, [16, 3, 2]]
  - [-1, 1, Conv, [32, 3, 2]]
  - [-1, 1, TmpScale, []]
  - [-1, 1, KeepBlock, []]
  - [-1, 1, Conv, [32, 3, 2]]
head:
  - [[4], 1, Detect, [nc]]
"""

TRAIN = """
import so_det_ultra._version
so_det_ultra._version.__version__ = "0.0.9"  # as if an older release wrote the checkpoint
import my_blocks
from ultralytics import YOLO
YOLO("tmp-model.yaml").train(
    data=r"{data}", project=r"{project}", name="w", epochs=1, imgsz=64, batch=4, workers=0, device="cpu", plots=False
)
"""

LOAD = """
import my_blocks
from ultralytics import YOLO
YOLO(r"{ckpt}")
"""


@pytest.fixture(scope="module")
def stamped(tiny_data, tmp_path_factory):
    """A checkpoint trained (stock trainer, 1 epoch) with a user block ``TmpScale`` registered from ``my_blocks``,
    under a plugin that calls itself 0.0.9; afterwards ``my_blocks`` no longer has ``TmpScale``."""
    work = tmp_path_factory.mktemp("blocks")
    (work / "my_blocks.py").write_text(BLOCKS_PY.format(extra=TMP_BLOCK))
    (work / "tmp-model.yaml").write_text(MODEL_YAML)
    python(TRAIN.format(data=tiny_data, project=work), cwd=work)
    ckpt = work / "w" / "weights" / "last.pt"
    (work / "my_blocks.py").write_text(BLOCKS_PY.format(extra=""))  # the block is renamed/removed
    return work, ckpt


def test_checkpoint_records_the_plugin_version(stamped):
    from so_det_ultra.integration.checkpoint import written_by

    _, ckpt = stamped
    assert written_by(ckpt) == "0.0.9"


@pytest.mark.parametrize("safe", ["0", "1"], ids=["default-load", "safe-load"])
def test_checkpoint_with_missing_block_names_block_and_versions(stamped, safe):
    import so_det_ultra

    work, ckpt = stamped
    proc = subprocess.run(
        [sys.executable, "-c", LOAD.format(ckpt=ckpt)],
        cwd=work,
        env=clean_env(ULTRALYTICS_SAFE_LOAD=safe),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("so_det_ultra.integration.checkpoint.CheckpointBlockError:"), proc.stderr[-3000:]
    assert "TmpScale (my_blocks.TmpScale)" in last and "so-det-ultra 0.0.9" in last
    assert f"(this is so-det-ultra {so_det_ultra.__version__})" in last
    assert "KeepBlock" not in last  # only what is missing


def test_missing_plugin_block_is_caught_before_unpickling(tmp_path):
    """A ``so_det_ultra.*`` class the installed version lacks (a removed block): clear error in both load modes,
    also for a checkpoint without a version stamp."""
    import ultralytics.nn.tasks as tasks
    from torch import nn
    from ultralytics import YOLO

    import so_det_ultra.nn.fusion as fusion
    from so_det_ultra.integration.checkpoint import CheckpointBlockError

    class OldFusion(nn.Module):
        pass

    OldFusion.__module__, OldFusion.__qualname__ = fusion.__name__, "OldFusion"
    model = YOLO("so-det-n.yaml").model
    model.model[1].old = OldFusion()
    fusion.OldFusion = OldFusion
    try:
        torch.save({"model": model, "train_args": {}}, tmp_path / "old.pt")
    finally:
        del fusion.OldFusion
    for safe in (False, True):
        with pytest.raises(CheckpointBlockError, match=r"OldFusion \(so_det_ultra\.nn\.fusion\.OldFusion\)") as e:
            tasks.torch_safe_load(str(tmp_path / "old.pt"), safe_only=safe)
        assert "did not record itself" in str(e.value)
