"""The README's ranking-accuracy tables, rendered from the JSON files that bench/accuracy.py wrote.

One table per protocol: every ranker's test top-1, top-5 and mean rank (mean ± std over seeds) with the frozen
(pretrained) backbone beside the refined one, the tutorial's published rows where it has them, the ranker chosen on
validation, the training minutes and the commands that made both columns. The README pastes the output between
``<!-- accuracy:NAME -->`` markers, and tests/test_readme.py checks that it still matches the JSON.

    .venv/bin/python bench/accuracy_table.py fashionTexture11_3labels --tutorial
    .venv/bin/python bench/accuracy_table.py fridgeObjects
"""
import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
# The original tutorial's table (3 labels, 60 test queries, one run): top-1, top-5, mean rank.
TUTORIAL = {"L2": (0.383, 0.567, 13.4), "weightedl2": (0.433, 0.617, 10.7)}
RANKER_TITLES = {"random": "random", "L1": "L1", "L2": "L2", "cosine": "cosine", "weightedl2": "weighted L2 (SVM)",
                 "weightedl2prob": "weighted L2, Platt probability", "classprob_L2": "class probability, L2",
                 "classprob_cosine": "class probability, cosine",
                 "classprob_same": "class probability, 1 - P(same label)",
                 "best_on_val": "**the recommended ranker** (chosen on validation)"}


def load_result(name):
    """The JSON of ``bench/accuracy.py --name NAME`` (``bench/results/accuracy_NAME.json``)."""
    path = RESULTS / f"accuracy_{name}.json"
    if not path.is_file():
        raise SystemExit(f"error: {path} is missing: run bench/accuracy.py with --name {name} first")
    return json.loads(path.read_text())


def cell(summary, n_seeds):
    """'top-1 / top-5 / mean rank' as mean ± std over the seeds, or the value alone for one seed."""
    def fmt(metric, scale, digits):
        mean, std = summary[metric]["mean"] * scale, summary[metric]["std"] * scale
        return f"{mean:.{digits}f}" if n_seeds == 1 else f"{mean:.{digits}f} ± {std:.{digits}f}"
    return f"{fmt('top1', 100, 1)}% / {fmt('top5', 100, 1)}% / {fmt('mean_rank', 1, 2)}"


def seed_list(result):
    seeds = result["seeds"]
    return ("seeds " if len(seeds) > 1 else "seed ") + ", ".join(map(str, seeds))


def render(name, tutorial=False):
    """Markdown for the protocol ``name``: ``accuracy_NAME.json`` (refined) and ``accuracy_NAME_frozen.json``."""
    refined, frozen = load_result(name), load_result(f"{name}_frozen")
    header = ["ranker: top-1 / top-5 / mean rank"] + (["tutorial (CNTK ResNet-18, 1 run)"] if tutorial else [])
    header += [f"frozen Lite0 ({seed_list(frozen)})", f"refined Lite0 ({seed_list(refined)})"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for ranker, title in RANKER_TITLES.items():
        row = [title]
        if tutorial:
            row.append("{:.1f}% / {:.1f}% / {:.1f}".format(100 * TUTORIAL[ranker][0], 100 * TUTORIAL[ranker][1],
                                                          TUTORIAL[ranker][2]) if ranker in TUTORIAL else "")
        row += [cell(result["summary"][ranker], len(result["seeds"])) for result in (frozen, refined)]
        lines.append("| " + " | ".join(row) + " |")
    chosen = [", ".join(sorted({run["best"] for run in result["runs"]})) for result in (frozen, refined)]
    minutes = [", ".join(f"{run['train_minutes']:.1f}" for run in result["runs"]) for result in (frozen, refined)]
    lines.append("| which ranker validation chose | " + ("| " if tutorial else "") + " | ".join(chosen) + " |")
    lines.append("| step 2 training minutes per seed | " + ("GPU | " if tutorial else "") + " | ".join(minutes) + " |")
    lines += ["", f"`{frozen['command']}`", "", f"`{refined['command']}`"]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", help="the --name given to bench/accuracy.py (its _frozen twin is read too)")
    parser.add_argument("--tutorial", action="store_true", help="add the tutorial's published column (3 labels)")
    args = parser.parse_args()
    print(render(args.name, args.tutorial))


if __name__ == "__main__":
    main()
