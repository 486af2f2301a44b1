"""python -m benchmarks.plot [PATH ...] [--out DIR]: one PNG per results JSON (one op on one machine), fusenn's
time over each baseline's against the size of the case (its FLOPs, else bytes, else its order), one line
per baseline (and per family of cases: the case name without its size fields); below 1 fusenn is faster.

PATH: results JSON files or folders holding them (default: benchmarks/results). Each PNG is written beside
its JSON (or under --out). Needs matplotlib (the `bench` extra).
"""

import argparse
import glob
import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


# Size fields of case names: T50, B32, I256, H256, N1048576, D64, 64x64, C32-64, and L512 (a length, not L2 layers).
_SIZE = re.compile(r"^([TBIHNSD]\d+|L\d{3,}|\d+x\d+|C\d+|\d+)$")


def family(case: str) -> str:
    return "-".join(part for part in case.split("-") if not _SIZE.match(part))


def ratios(results: dict) -> tuple[str, dict[str, list[tuple[float, float, str]]]]:
    """(x-axis label, {line: [(size, fusenn ms / baseline ms, case), ...] sorted by size}); a line is a
    baseline, or "family vs baseline" where the cases fall into several families."""
    records = results["results"]
    key = "flops" if all(r.get("flops") for r in records) else "bytes" if all(r.get("bytes") for r in records) \
        else None
    lines: dict[str, list] = {}
    for i, record in enumerate(records):
        ours = record["timings"].get("fusenn", {}).get("ms")
        size = record[key] if key else i
        for impl, t in record["timings"].items():
            if impl != "fusenn" and ours and t.get("ms"):
                lines.setdefault(impl, []).append((size, ours / t["ms"], record["case"]))
    label = {"flops": "work per call (FLOP)", "bytes": "bytes per call", None: "case"}[key]
    families = {family(r["case"]) for r in records}
    if len(families) > 1:
        split: dict[str, list] = {}
        for impl, points in lines.items():
            for point in points:
                split.setdefault(f"{family(point[2])} vs {impl}", []).append(point)
        lines = split
    return label, {name: sorted(points) for name, points in lines.items()}


def plot(path: str, out_dir=None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(path) as f:
        results = json.load(f)
    label, lines = ratios(results)
    env = results.get("environment", {})
    machine = env.get("gpu") or env.get("processor") or "?"
    fig, ax = plt.subplots(figsize=(8.0, 3.6), dpi=80)
    for impl, points in lines.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=impl, markersize=4)
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    if label != "case":
        ax.set_xscale("log")
    ax.set_xlabel(label)
    ax.set_ylabel("fusenn time / baseline time")
    threads = f", {env['threads']} thread{'s' * (env['threads'] > 1)}" if env.get("threads") else ""
    ax.set_title(f"{results['op']} on {machine}{threads}", fontsize=10)
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    target = os.path.join(out_dir or os.path.dirname(path), os.path.splitext(os.path.basename(path))[0] + ".png")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    fig.savefig(target)
    plt.close(fig)
    return target


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.plot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="*", default=[os.path.join(HERE, "results")])
    parser.add_argument("--out", default=None, help="folder for the PNGs (default: beside each JSON)")
    args = parser.parse_args(argv)
    files = []
    for p in args.paths:
        files += sorted(glob.glob(os.path.join(p, "**", "*.json"), recursive=True)) if os.path.isdir(p) else [p]
    if not files:
        print(f"no results JSON under {', '.join(args.paths)}", file=sys.stderr)
        return 1
    for path in files:
        print(plot(path, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
