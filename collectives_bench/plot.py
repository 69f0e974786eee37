"""busbw vs message size, one panel per op, one line per scope (and dtype, placement)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from tierzero.collectives_bench.report import Row


def write_plot(rows: Sequence[Row], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = list(dict.fromkeys(r.op for r in rows))
    cols = min(4, len(ops))
    nrows = math.ceil(len(ops) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
    # one colour per scope and dtype across every panel; dashed = in place
    series = list(dict.fromkeys((r.scope, r.dtype) for r in rows))
    colours = {key: f"C{i % 10}" for i, key in enumerate(series)}
    for ax, op in zip(axes.flat, ops):
        mine = [r for r in rows if r.op == op]
        for key in dict.fromkeys((r.scope, r.dtype, r.placement) for r in mine):
            pts = {}
            for r in mine:
                if (r.scope, r.dtype, r.placement) == key:
                    pts.setdefault(r.size_bytes, []).append(r.busbw_gbps)
            sizes = sorted(pts)
            # every group of a scope at once: plot their mean, the pooled figure
            ax.plot(sizes, [sum(pts[s]) / len(pts[s]) for s in sizes], marker=".", color=colours[key[:2]],
                    linestyle="--" if key[2] == "in" else "-",
                    label=f"{key[0]} {key[1]}{' in-place' if key[2] == 'in' else ''}")
        ax.set_xscale("log", base=2)
        ax.set_title(op)
        ax.set_xlabel("size (B)")
        ax.set_ylabel("busbw (GB/s)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(ops):]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
