"""Pictures of one or more runs from their run directories (metrics.jsonl, expert_load.jsonl).

    python launch/plot.py runs/moe_small                       # -> runs/moe_small/plots/*.png
    python launch/plot.py runs/a runs/b --out compare/         # runs overlaid

Writes loss.png (training and held-out loss, runs overlaid), lr.png, grad_norm.png, max_vio.png
(MaxVio of the training batches and of the held-out slice) and, per run, expert_load_<run>.png (a
layer x expert heatmap of each expert's share of the routed tokens over the steps). See
dsv3/train/plots.py.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dsv3.train.plots import plot_runs  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="+", help="run directories (each with a metrics.jsonl)")
    p.add_argument("--out", help="where the PNGs go (default: <first run dir>/plots)")
    p.add_argument("--window", type=int, default=20, help="moving-average window, in logged steps")
    args = p.parse_args(argv)
    out = args.out or os.path.join(args.run_dirs[0], "plots")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("error: launch/plot.py needs matplotlib: pip install matplotlib (or the package's [plot] extra)",
              file=sys.stderr)
        return 2
    try:
        written = plot_runs(args.run_dirs, out, args.window)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
