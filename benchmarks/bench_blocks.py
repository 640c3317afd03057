"""Block-level ONNX Runtime CPU latency of every rewritten block: reference formula vs fast form, same run.

Shapes are so-det-s's at 640 (EAFusion and SimAM at stride 4 with 64 channels, the three CDown layers, the DFL over
33,600 anchors). Each pair is exported to ONNX (opset 18, onnxslim as Ultralytics does) and timed in interleaved
rounds; the ratio fast / reference is computed per round (median [25th-75th percentile]). Parity is checked too.

    python benchmarks/bench_blocks.py --runs 30 --threads 2
"""

from __future__ import annotations

import argparse
import io
import time
import warnings

import numpy as np
import torch


class _Call(torch.nn.Module):
    def __init__(self, fn, owner: torch.nn.Module | None = None):
        super().__init__()
        self.fn, self.owner = fn, owner

    def forward(self, *xs):
        return self.fn(*xs)


def ort_session(fn, owner, inputs, threads: int, sessions: int = 3):
    """(run callable, output) of ``fn`` exported to ONNX, loaded in ``sessions`` ONNX Runtime sessions used in turn.

    Identical sessions of one graph can differ by tens of percent (allocation, thread placement), so each call
    uses the next session.
    """
    import itertools

    import onnx
    import onnxruntime as ort

    f, names = io.BytesIO(), [f"x{i}" for i in range(len(inputs))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Call(fn, owner).eval(), tuple(inputs), f, opset_version=18, input_names=names, dynamo=False)
    model = onnx.load_from_string(f.getvalue())
    try:
        import onnxslim

        model = onnxslim.slim(model)
    except ImportError:
        pass
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    pool = [
        ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]) for _ in range(sessions)
    ]
    feed = {n: x.numpy() for n, x in zip(names, inputs)}
    cycle = itertools.cycle(pool)
    return (lambda: next(cycle).run(None, feed)), pool[0].run(None, feed)[0]


def cases():
    """(name, reference fn, fast fn, owner module, inputs) at so-det-s shapes, with random non-trivial weights."""
    from ultralytics.nn.modules.block import DFL

    from so_det_ultra.nn import CDown, EAFusion, FastDFL
    from so_det_ultra.nn.fusion import CGASpatialAttention, channel_max, simam, simam_reference

    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(tuple(shape), generator=g)

    def randomized(m):
        for p in m.parameters():
            p.data = rnd(*p.shape) * 0.3 + (1.0 if p.ndim == 0 else 0.0)
        return m.eval()

    x64 = rnd(1, 64, 160, 160)
    ea, sa = randomized(EAFusion(64)), randomized(CGASpatialAttention(64))
    y64 = rnd(1, 64, 160, 160)
    out = [
        ("SimAM 2x2 windows (64x160x160)", lambda t: simam_reference(t, 2), lambda t: simam(t, 2), None, [x64]),
        ("channel max (64x160x160)", lambda t: t.amax(1, keepdim=True), channel_max, None, [x64]),
        ("CGA spatial attention (64x160x160)", sa.forward_reference, sa.forward, sa, [x64]),
        ("EAFusion (64x160x160)", lambda a, b: ea.forward_reference([a, b]), lambda a, b: ea([a, b]), ea, [x64, y64]),
    ]
    for c1, c2, hw in ((16, 32, 320), (64, 64, 160), (128, 128, 80)):
        m = randomized(CDown(c1, c2))
        out.append((f"CDown {c1}->{c2} ({hw}x{hw} in)", m.forward_reference, m.forward, m, [rnd(1, c1, hw, hw)]))
    dfl, fast = DFL(16), FastDFL(16)
    out.append(("DFL decode (64x33600)", dfl, fast, None, [rnd(1, 64, 33600) * 3]))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sessions", type=int, default=3, help="identical ORT sessions per variant, used in turn")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    rows = []
    for name, ref, fast, owner, inputs in cases():
        run_ref, out_ref = ort_session(ref, owner, inputs, a.threads, a.sessions)
        run_fast, out_fast = ort_session(fast, owner, inputs, a.threads, a.sessions)
        err = float(np.abs(out_fast - out_ref).max() / max(np.abs(out_ref).max(), 1e-12))
        for _ in range(a.warmup):
            run_ref(), run_fast()
        t = {"ref": [], "fast": []}
        for _ in range(a.runs):
            for k, fn in (("ref", run_ref), ("fast", run_fast)):
                t0 = time.perf_counter()
                fn()
                t[k].append((time.perf_counter() - t0) * 1e3)
        r = np.array(t["fast"]) / np.array(t["ref"])
        rows.append((name, np.median(t["ref"]), np.median(t["fast"]), *np.percentile(r, [50, 25, 75]), err))
        print(rows[-1], flush=True)
    print(
        f"\nONNX Runtime CPU, {a.threads} threads, batch 1, median of {a.runs} interleaved rounds, "
        f"{a.sessions} sessions each\n"
    )
    print("| block (so-det-s shape) | reference ms | fast ms | fast / reference | max err / scale |")
    print("|---|---|---|---|---|")
    for name, ref_ms, fast_ms, med, lo, hi, err in rows:
        print(f"| {name} | {ref_ms:.2f} | {fast_ms:.2f} | {med:.2f} [{lo:.2f}-{hi:.2f}] | {err:.1e} |")


if __name__ == "__main__":
    main()
