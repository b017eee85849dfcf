"""Draw a pipeline timeline as a PNG: one row per rank, one box per compute instruction, labeled
with its micro-batch, like the figures in deepseek-ai/DualPipe's README. An overlapped F&B pair is
one box with a black border, split into its forward and backward halves.

matplotlib is an optional dependency (extra "bench"); it is imported only when drawing.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from .schedule import Instr, Op
from .simulator import Block, SimResult

# forward blue, full backward green, input backward teal, weight backward purple; micro-batches
# fed from the far end (DualPipe's second direction) get the darker shade
COLORS = {
    Op.F: ("#9ecae1", "#4292c6"),
    Op.B: ("#a1d99b", "#41ab5d"),
    Op.I: ("#99d8c9", "#2ca25f"),
    Op.W: ("#dadaeb", "#9e9ac8"),
}


def draw_timeline(blocks: Iterable[Block] | SimResult, path: str | Path, title: str = "",
                  pp: int | None = None) -> Path:
    """Write the timeline of `blocks` (or of a `SimResult`) to `path` (PNG) and return it."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Rectangle
    except ImportError as e:   # optional dependency: say how to get it
        raise ImportError("drawing timelines needs matplotlib: pip install 'dsv3[bench]'") from e

    route_of = None
    if isinstance(blocks, SimResult):
        pp = blocks.schedule.pp
        route_of = blocks.schedule.route_of
        blocks = blocks.blocks
    blocks = list(blocks)
    pp = pp if pp is not None else 1 + max(b.rank for b in blocks)
    end = max(b.end for b in blocks)
    fig, ax = plt.subplots(figsize=(max(8.0, min(40.0, 0.35 * len(blocks) / pp + 4)), 0.5 * pp + 1))

    def shade(part: Instr) -> str:
        light, dark = COLORS[part.op]
        return dark if route_of is not None and route_of[part.mb] == 1 else light

    for b in blocks:
        y = pp - 1 - b.rank
        parts = b.instr.parts()
        width = (b.end - b.start) / len(parts)
        for k, part in enumerate(parts):
            x = b.start + k * width
            ax.add_patch(Rectangle((x, y + 0.05), width, 0.9, facecolor=shade(part),
                                   edgecolor="white", linewidth=0.5))
            ax.text(x + width / 2, y + 0.5, str(part.mb), ha="center", va="center",
                    fontsize=6 if width < 0.02 * end else 8)
        if b.instr.op is Op.FB:
            ax.add_patch(Rectangle((b.start, y + 0.05), b.end - b.start, 0.9, fill=False,
                                   edgecolor="black", linewidth=1.2))
    ax.set_xlim(0, end)
    ax.set_ylim(0, pp)
    ax.set_yticks([pp - 1 - r + 0.5 for r in range(pp)], [f"rank {r}" for r in range(pp)])
    ax.set_xlabel("time")
    handles = [Rectangle((0, 0), 1, 1, facecolor=COLORS[op][0]) for op in (Op.F, Op.B, Op.I, Op.W)]
    ax.legend(handles, ["F", "B (full)", "I (input)", "W (weight)"], loc="upper center",
              bbox_to_anchor=(0.5, -0.25 if pp <= 4 else -0.12), ncol=4, frameon=False)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
