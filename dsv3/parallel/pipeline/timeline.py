"""Draw a pipeline timeline as a PNG: one row per rank, one box per compute instruction, labeled
with its micro-batch, like the figures in deepseek-ai/DualPipe's README. An overlapped F&B pair is
one box with a black border, split into its forward and backward halves.

matplotlib is an optional dependency (extra "bench"); it is imported only when drawing.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from .schedule import Instr, Op, Schedule
from .simulator import Block, SimResult

# forward blue, full backward green, input backward teal, weight backward purple; the darker
# shade marks DualPipe's second direction and the second (returning) half of DualPipeV's V
COLORS = {
    Op.F: ("#9ecae1", "#4292c6"),
    Op.B: ("#a1d99b", "#41ab5d"),
    Op.I: ("#99d8c9", "#2ca25f"),
    Op.W: ("#dadaeb", "#9e9ac8"),
}


def draw_timeline(blocks: Iterable[Block] | SimResult, path: str | Path, title: str = "",
                  schedule: Schedule | None = None) -> Path:
    """Write the timeline of `blocks` (or of a `SimResult`) to `path` (PNG) and return it.

    `schedule` (taken from a `SimResult`) sets the number of rows and the shading."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Rectangle
    except ImportError as e:   # optional dependency: say how to get it
        raise ImportError("drawing timelines needs matplotlib: pip install 'dsv3[bench]'") from e

    if isinstance(blocks, SimResult):
        schedule, blocks = blocks.schedule, blocks.blocks
    blocks = list(blocks)
    pp = schedule.pp if schedule is not None else 1 + max(b.rank for b in blocks)
    end = max(b.end for b in blocks)
    fig, ax = plt.subplots(figsize=(max(8.0, min(40.0, 0.35 * len(blocks) / pp + 4)), 0.5 * pp + 1))

    def shade(part: Instr) -> str:
        light, dark = COLORS[part.op]
        if schedule is None:
            return light
        second = schedule.route_of[part.mb] == 1 or part.stage >= schedule.pp
        return dark if second else light

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
    handles.append(Rectangle((0, 0), 1, 1, fill=False, edgecolor="black", linewidth=1.2))
    ax.legend(handles, ["F", "B (full)", "I (input)", "W (weight)", "F&B pair"],
              loc="upper left", bbox_to_anchor=(1.005, 1.0), frameon=False)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
