"""PNG of AP by object size (all IoU thresholds, 0.5 and 0.75) and, for VisDrone, AP per class."""

from __future__ import annotations

from pathlib import Path


def plot_ap(result, path) -> Path:
    """Draw ``result`` (:class:`so_det_ultra.metrics.evaluate.Result`) to ``path``; bins without ground truth are blank.

    Left: AP (0.5:0.95) over all sizes and per size bin. Right, when the protocol asks for it: AP per class.
    """
    import matplotlib
    import numpy as np

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    path = Path(path)
    m, p = result.metrics, result.protocol
    labels = ["all" if p.all_range[1] >= 1e9 else f"all <= {p.all_range[1]:g}"] + [b[0] for b in p.bins]
    values = [m["AP"]] + [m[f"AP_{b[0]}"] for b in p.bins]
    counts = [result.counts["gt"]] + [result.counts["gt_per_bin"][b[0]] for b in p.bins]
    panels = 2 if p.per_class and result.per_class else 1
    fig, axes = plt.subplots(1, panels, figsize=(5 + 4 * (panels - 1), 3.6), squeeze=False)
    ax = axes[0, 0]
    bars = ax.bar(labels, [v or 0.0 for v in values], color=["#555"] + ["#3b75af"] * len(p.bins))
    for bar, v, n in zip(bars, values, counts):
        ax.annotate(
            "no GT" if v is None else f"{v:.3f}\n{n} obj",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=7,
        )
    ax.set(
        ylim=(0, 1.22),
        yticks=np.linspace(0, 1, 6),
        ylabel="AP @ IoU 0.5:0.95",
        title=f"{p.name}: AP by object size (maxDets {p.max_det})",
    )
    if panels == 2:
        ax = axes[0, 1]
        names = list(result.per_class)
        ax.barh(names, [v or 0.0 for v in result.per_class.values()], color="#3b75af")
        ax.invert_yaxis()
        ax.set(xlim=(0, 1), xlabel="AP @ IoU 0.5:0.95", title="AP per class")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path
