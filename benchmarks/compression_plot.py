"""One figure per workload with every compression variant, alone and with a SideNet: measured time per
sample against accuracy, drawn from the stacking results' JSON (so BENCHMARKS.md's figures are
regenerated with its text)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sidenet.plotting import pyplot, save_figure

# workload: (result files whose variants come in (alone, + SideNet) pairs, MainNet's pair first;
#            the batch size timed; the figure's file name; its title)
WORKLOADS: dict[str, tuple[tuple[str, ...], str, str, str]] = {
    "sst2": (
        ("stacking", "text_pruning", "distillation"),
        "batch32",
        "compression_sst2.png",
        "SST-2 / MiniLM: compression alone (○) and with a SideNet (★), half of dev",
    ),
    "fmnist": (
        ("resnet_compression",),
        "batch64",
        "compression_fmnist.png",
        "Fashion-MNIST / ResNet-20: compression alone (○) and with a SideNet (★), test set",
    ),
}


def variant_pairs(results: Path, names: tuple[str, ...]) -> list[tuple[str, dict, dict]]:
    """(label, alone, with a SideNet) of every pair in the result files ``names`` present; the MainNet's
    pair is taken once, from the first file (each file measures it again in its own run, and each
    file's speed-ups are against its own MainNet run)."""
    pairs: list[tuple[str, dict, dict]] = []
    for name in names:
        path = results / f"{name}.json"
        if not path.is_file():
            continue
        variants: dict[str, Any] = json.loads(path.read_text())["variants"]
        labels = list(variants)
        start = 0 if not pairs else 2
        for i in range(start, len(labels) - 1, 2):
            pairs.append((labels[i], variants[labels[i]], variants[labels[i + 1]]))
    return pairs


def plot_compression(results: Path, workload: str) -> Path | None:
    """Write the workload's figure beside its results; None when none of its results exist."""
    names, batch, filename, title = WORKLOADS[workload]
    pairs = variant_pairs(results, names)
    if not pairs:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 4.6), dpi=120)
    for i, (label, alone, side) in enumerate(pairs):
        points = [(1.0 / v["speedup"][batch], 100 * v["accuracy"]) for v in (alone, side)]
        colour = f"C{i}"
        ax.scatter(
            *points[0],
            s=55,
            color=colour,
            marker="o",
            zorder=3,
            label=f"{label}: {alone['speedup'][batch]:.2f}× → {side['speedup'][batch]:.2f}×",
        )
        ax.scatter(*points[1], s=110, color=colour, marker="*", zorder=3)
        ax.annotate("", xy=points[1], xytext=points[0], arrowprops={"arrowstyle": "->", "color": colour, "alpha": 0.6})
    ax.set_xlabel(f"measured time per sample relative to the MainNet ({batch.replace('batch', 'batch ')})")
    ax.set_ylabel("accuracy (%)")
    ax.set_xlim(left=0)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best", title="speed-up alone → with a SideNet", title_fontsize=7)
    return save_figure(fig, results / filename)
