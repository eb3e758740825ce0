"""Prints Markdown tables of Recall@K mean and standard deviation over training runs.

Usage: aggregate_seeds.py MODEL_DIR [MODEL_DIR ...]

Each MODEL_DIR contains the metrics.json of one densebert4ret-train run, all on the same dataset.
The cut-offs and query kinds come from the metrics files, so every dataset's protocol is
reported as recorded. The standard deviation is the sample standard deviation (n - 1 in the
denominator).
"""

import json
import statistics
import sys
from pathlib import Path

KIND_ORDER = ["colour", "class", "shape", "both"]
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


def cutoffs_of(results):
    """Recall keys of the first method of the first run, ordered by K."""
    first = next(iter(results[0].values()))
    return sorted(first["recalls"], key=lambda key: int(key.removeprefix("R@")))


def kinds_of(runs):
    kinds = {kind for run in runs for result in run["methods"].values() for kind in result["per_kind"]}
    order = lambda kind: (KIND_ORDER.index(kind) if kind in KIND_ORDER else len(KIND_ORDER), kind)
    return sorted(kinds, key=order)


def table(by_run, title, kind=None):
    """Prints one table; by_run contains each run's results keyed by method."""
    cutoffs = cutoffs_of(by_run)
    print(f"| {title} | " + " | ".join(cutoffs) + " |")
    print("|---|" + "---:|" * len(cutoffs))
    for method in ORDER:
        results = [methods.get(method) for methods in by_run]
        if any(result is None for result in results):
            continue
        recalls = [result["per_kind"][kind] if kind else result["recalls"] for result in results]
        cells = [cell([recall[k] for recall in recalls]) for k in cutoffs]
        print(f"| {TITLES[method]} | " + " | ".join(cells) + " |")
    print()


def main():
    runs = [json.loads((Path(d) / "metrics.json").read_text()) for d in sys.argv[1:]]
    if not runs:
        sys.exit("usage: aggregate_seeds.py MODEL_DIR [MODEL_DIR ...]")
    datasets = {run["config"]["benchmark"].get("dataset", {}).get("dataset", "fmnist-colours") for run in runs}
    if len(datasets) > 1:
        sys.exit(f"the runs are on different datasets: {sorted(datasets)}")
    print(f"Dataset: {datasets.pop()}; seeds: {', '.join(str(run['seed']) for run in runs)}\n")
    single = [run["methods"] for run in runs]
    table(single, "Single-step queries")
    for kind in kinds_of(runs):
        table(single, f"Single-step, {kind} only", kind)
    if all(run.get("per_set_methods") for run in runs):
        for name in sorted(runs[0]["per_set_methods"]):
            table([run["per_set_methods"][name] for run in runs], f"Test set {name}")
    if all(run.get("two_step_methods") for run in runs):
        table([run["two_step_methods"] for run in runs], "Two-step queries")
    for stage in ["features", "train_fusion", "train_tirg", "train_text_only", "evaluate", "total"]:
        times = [run["timings_seconds"].get(stage) for run in runs]
        if all(time is not None for time in times):
            per_seed = ", ".join(f"{time:.0f}" for time in times)
            print(f"- {stage}: {statistics.fmean(times):.0f} s mean over {len(times)} runs ({per_seed} s per seed)")
    for variant in ["fusion", "tirg", "text_only"]:
        epochs = [run["training"][variant]["best_epoch"] for run in runs if variant in run["training"]]
        if epochs:
            print(f"- best epoch of {variant}: {epochs}")


if __name__ == "__main__":
    main()
