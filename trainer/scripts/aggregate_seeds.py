"""Prints Markdown tables of Recall@K mean and standard deviation over training runs.

Usage: aggregate_seeds.py MODEL_DIR [MODEL_DIR ...]

Each MODEL_DIR holds the metrics.json of one densebert4ret-train run. The standard deviation
is the sample standard deviation (n - 1 in the denominator).
"""

import json
import statistics
import sys
from pathlib import Path

CUTOFFS = ["R@1", "R@5", "R@10", "R@50"]
ORDER = ["fusion", "tirg", "late_fusion", "text_only", "image_only"]
TITLES = {
    "fusion": "DenseBert4Ret (fusion MLP)",
    "tirg": "TIRG (gated residual)",
    "late_fusion": "Late fusion (image + text)",
    "text_only": "Text only",
    "image_only": "Image only (raw backbone cosine)",
}


def cell(values):
    mean = 100 * statistics.fmean(values)
    spread = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.1f} ± {spread:.1f}"


def table(runs, field, title, kind=None):
    print(f"| {title} | " + " | ".join(CUTOFFS) + " |")
    print("|---|" + "---:|" * len(CUTOFFS))
    for method in ORDER:
        results = [run[field].get(method) for run in runs]
        if any(result is None for result in results):
            continue
        recalls = [result["per_kind"][kind] if kind else result["recalls"] for result in results]
        cells = [cell([recall[k] for recall in recalls]) for k in CUTOFFS]
        print(f"| {TITLES[method]} | " + " | ".join(cells) + " |")
    print()


def main():
    runs = [json.loads((Path(d) / "metrics.json").read_text()) for d in sys.argv[1:]]
    if not runs:
        sys.exit("usage: aggregate_seeds.py MODEL_DIR [MODEL_DIR ...]")
    print(f"Seeds: {', '.join(str(run['seed']) for run in runs)}\n")
    table(runs, "methods", "Single-step queries")
    for kind in ["colour", "class", "both"]:
        table(runs, "methods", f"Single-step, {kind} only", kind)
    if all(run.get("two_step_methods") for run in runs):
        table(runs, "two_step_methods", "Two-step queries")
    for stage in ["train_fusion", "train_tirg", "train_text_only", "evaluate", "total"]:
        times = [run["timings_seconds"].get(stage) for run in runs]
        if all(time is not None for time in times):
            print(f"- {stage}: {statistics.fmean(times):.0f} s mean over {len(times)} runs")
    for variant in ["fusion", "tirg", "text_only"]:
        epochs = [run["training"][variant]["best_epoch"] for run in runs if variant in run["training"]]
        if epochs:
            print(f"- best epoch of {variant}: {epochs}")


if __name__ == "__main__":
    main()
