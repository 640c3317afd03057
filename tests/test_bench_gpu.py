"""benchmarks/bench_gpu.py on a machine without CUDA: a dry run that builds every model and exits 0."""

import sys

from conftest import REPO, clean_env, run


def test_dry_run_without_cuda_exits_cleanly(workdir):
    env = clean_env(CUDA_VISIBLE_DEVICES="")  # a dry run even where a GPU exists
    out = run([sys.executable, REPO / "benchmarks" / "bench_gpu.py", "--out", workdir / "gpu"], cwd=workdir, env=env)
    log = out.stdout + out.stderr
    assert "no CUDA device: dry run" in log
    for name in ("so-det-s", "so-det-l", "so-det26-s", "yolov8n-p2", "yolo26n-p2"):
        assert f"built {name}:" in log, name
    assert "end2end True, out (1, 300, 6)" in log  # so-det26-s and yolo26n-p2 run their NMS-free head
    assert "plan on a CUDA machine" in log and "could not build" not in log
    assert not (workdir / "gpu").exists()  # a dry run writes no results
