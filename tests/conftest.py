"""Shared fixtures: a tiny synthetic dataset and a runner for the stock Ultralytics CLI in a fresh process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
VISDRONE_SAMPLE = Path(os.environ.get("SO_DET_VISDRONE_SAMPLE", REPO.parent / "shared" / "data" / "visdrone-sample"))
# Small and fast everywhere: CLI training tests use these unless they need otherwise.
FAST = ["epochs=1", "imgsz=64", "batch=4", "workers=0", "device=cpu", "plots=False", "exist_ok=True"]
# The four ways a user loads a checkpoint in a fresh process: (code run before `from ultralytics import YOLO`, env).
LOAD_MODES = pytest.mark.parametrize(
    "pre,env",
    [
        ("", {}),
        ("import so_det_ultra", {"SO_DET_ULTRA_AUTOLOAD": "0"}),
        ("", {"ULTRALYTICS_SAFE_LOAD": "1"}),
        ("import so_det_ultra", {"ULTRALYTICS_SAFE_LOAD": "1", "SO_DET_ULTRA_AUTOLOAD": "0"}),
    ],
    ids=["autoload", "explicit-import", "safe-load", "safe-load-explicit"],
)


class RunsCode:
    """Pickled into a checkpoint, it runs ``os.mkdir(marker)`` when the file is loaded with full pickle: what safe
    loading must refuse."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def clean_env(**extra) -> dict:
    """Environment for a child process: offline Ultralytics, no inherited PYTHONPATH tricks."""
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "SO_DET_ULTRA_AUTOLOAD"}}
    env.update(YOLO_OFFLINE="1", OMP_NUM_THREADS="1", **{k: str(v) for k, v in extra.items()})
    return env


def run(cmd, cwd, env=None, timeout=900) -> subprocess.CompletedProcess:
    """Run ``cmd`` (list) and fail the test with the tail of its output if it exits non-zero."""
    proc = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env or clean_env(), capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        pytest.fail(
            f"command failed ({proc.returncode}): {' '.join(map(str, cmd))}\n--- stdout ---\n{proc.stdout[-4000:]}"
            f"\n--- stderr ---\n{proc.stderr[-6000:]}",
            pytrace=False,
        )
    return proc


def yolo(*args, cwd, env=None, timeout=900) -> subprocess.CompletedProcess:
    """The stock ``yolo`` console script of this environment, in a new process."""
    return run([BIN / "yolo", *args], cwd=cwd, env=env, timeout=timeout)


def python(code: str, cwd, env=None, timeout=900) -> subprocess.CompletedProcess:
    """``python -c code`` in a new process."""
    return run([sys.executable, "-c", code], cwd=cwd, env=env, timeout=timeout)


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Tests run small forwards, two pytest workers on two cores: one torch thread each avoids OpenMP
    oversubscription (two 2-thread workers on 2 cores ran a so-det-n forward 17x slower than one thread)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """data.yaml of an 8+4 image, 64 px, 3-class synthetic tiny-object dataset."""
    from so_det_ultra.data.synthetic import make_dataset

    return make_dataset(
        tmp_path_factory.mktemp("tiny"),
        n_train=8,
        n_val=4,
        imgsz=64,
        nc=3,
        objects=(2, 6),
        size_range=(3.0, 14.0),
        seed=0,
    )


@pytest.fixture
def workdir(tmp_path) -> Path:
    """An empty working directory far from the repository (so nothing resolves by accident)."""
    d = tmp_path / "work"
    d.mkdir()
    return d
