"""The ranking-accuracy tables of doc/RESULTS.md and the README's summary, rendered from bench/accuracy.py's JSON.

One table per protocol: every ranker's test top-1, top-5 and mean rank (mean ± std over seeds) with the frozen
(pretrained) backbone beside the refined one, the tutorial's published rows where it has them, the ranker chosen on
validation, the training minutes and the commands that made both columns. doc/RESULTS.md holds each table between
``<!-- accuracy:NAME [--tutorial] -->`` and ``<!-- /accuracy -->``; the README's summary (the recommended ranker on
each protocol) sits between ``<!-- accuracy-summary -->`` and ``<!-- /accuracy-summary -->``. ``--update`` rewrites
every marked block of both files from the JSON, and tests/test_readme.py checks that they still match it.

    .venv/bin/python bench/accuracy_table.py fashionTexture11_3labels --tutorial   # print one table
    .venv/bin/python bench/accuracy_table.py --summary                            # print the README's summary
    .venv/bin/python bench/accuracy_table.py --update                             # rewrite doc/RESULTS.md, README.md
"""
import argparse
import json
import re
import sys
from pathlib import Path

from image_similarity.data.fileio import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from accuracy import summarise  # noqa: E402  (the one mean ± std over seeds)

RESULTS = REPO / "bench" / "results"
DOCUMENTS = (REPO / "doc" / "RESULTS.md", REPO / "README.md")  # the files whose marked blocks --update rewrites
TABLE = re.compile(r"<!-- accuracy:(?P<name>\S+)(?P<tutorial> --tutorial)? -->\n(?P<body>.*?)\n<!-- /accuracy -->",
                   flags=re.S)
SUMMARY = re.compile(r"<!-- accuracy-summary -->\n(?P<body>.*?)\n<!-- /accuracy-summary -->", flags=re.S)
# The original tutorial's table (3 labels, 60 test queries, one run): top-1, top-5, mean rank.
TUTORIAL = {"L2": (0.383, 0.567, 13.4), "weightedl2": (0.433, 0.617, 10.7)}
RANKER_TITLES = {"random": "random", "L1": "L1", "L2": "L2", "cosine": "cosine", "weightedl2": "weighted L2 (SVM)",
                 "weightedl2prob": "weighted L2, Platt probability", "classprob_L2": "class probability, L2",
                 "classprob_cosine": "class probability, cosine",
                 "classprob_same": "class probability, 1 - P(same label)",
                 "hybrid": "hybrid: label bands, cosine within a band",
                 "best_on_val": "**the recommended ranker** (chosen on validation)"}
# The README's summary: (bench/accuracy.py --name, row title, whether the tutorial's weighted L2 is shown beside it).
SUMMARY_ROWS = (("fashionTexture11_3labels", "3 texture labels, the tutorial's protocol", True),
                ("fashionTexture11", "all 11 texture labels", False),
                ("fridgeObjects", "the bundled sample, 4 fridge objects", False))


def load_result(name):
    """The JSON of ``bench/accuracy.py --name NAME`` (``bench/results/accuracy_NAME.json``), its summary taken
    afresh from its runs (so that a metric added to bench/accuracy.py's summary reaches older runs' tables)."""
    path = RESULTS / f"accuracy_{name}.json"
    if not path.is_file():
        raise SystemExit(f"error: {path} is missing: run bench/accuracy.py with --name {name} first")
    result = json.loads(path.read_text())
    result["summary"] = summarise(result["runs"])
    return result


def cell(summary, n_seeds, with_map=False):
    """'top-1 / top-5 / mean rank' (and ' / mAP') as mean ± std over the seeds, or the value alone for one seed."""
    def fmt(metric, scale, digits):
        mean, std = summary[metric]["mean"] * scale, summary[metric]["std"] * scale
        return f"{mean:.{digits}f}" if n_seeds == 1 else f"{mean:.{digits}f} ± {std:.{digits}f}"
    if summary is None:
        return "not measured"  # a ranker added after this run
    return (f"{fmt('top1', 100, 1)}% / {fmt('top5', 100, 1)}% / {fmt('mean_rank', 1, 2)}"
            + ((f" / {fmt('map', 1, 3)}" if "map" in summary else " / -") if with_map else ""))


def tutorial_cell(ranker, with_map=False):
    """The tutorial's published 'top-1 / top-5 / mean rank' for ``ranker``, or '' where it published none."""
    if ranker not in TUTORIAL:
        return ""
    top1, top5, mean_rank = TUTORIAL[ranker]
    return f"{100 * top1:.1f}% / {100 * top5:.1f}% / {mean_rank:.1f}" + (" / -" if with_map else "")  # no mAP published


def seed_list(result):
    seeds = result["seeds"]
    return ("seeds " if len(seeds) > 1 else "seed ") + ", ".join(map(str, seeds))


def table_lines(header, rows):
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(row) + " |"
                                                                            for row in rows]


def render(name, tutorial=False):
    """Markdown for the protocol ``name``: ``accuracy_NAME.json`` (refined) and ``accuracy_NAME_frozen.json``."""
    refined, frozen = load_result(name), load_result(f"{name}_frozen")
    header = ["ranker: top-1 / top-5 / mean rank / mAP"] + (["tutorial (CNTK ResNet-18, 1 run)"] if tutorial else [])
    header += [f"frozen Lite0 ({seed_list(frozen)})", f"refined Lite0 ({seed_list(refined)})"]
    rows = [[title] + ([tutorial_cell(ranker, with_map=True)] if tutorial else [])
            + [cell(result["summary"].get(ranker), len(result["seeds"]), with_map=True) for result in (frozen, refined)]
            for ranker, title in RANKER_TITLES.items()]
    chosen = [", ".join(sorted({run["best"] for run in result["runs"]})) for result in (frozen, refined)]
    minutes = [", ".join(f"{run['train_minutes']:.1f}" for run in result["runs"]) for result in (frozen, refined)]
    lines = table_lines(header, rows)
    lines.append("| which ranker validation chose | " + ("| " if tutorial else "") + " | ".join(chosen) + " |")
    lines.append("| step 2 training minutes per seed | " + ("GPU | " if tutorial else "") + " | ".join(minutes) + " |")
    for result in (frozen, refined):  # a gathered JSON (bench/accuracy.py --gather): each part's command and seeds
        lines += [line for part in result.get("gathered_from", [result]) for line in (
            "", f"`{part['command']}`" + (f" ({seed_list(part)})" if "gathered_from" in result else ""))]
    return "\n".join(lines)


def render_summary():
    """Markdown for the README: the recommended ranker's test top-1 / top-5 / mean rank on each protocol."""
    header = ["top-1 / top-5 / mean rank on test", "tutorial (weighted L2)", "frozen Lite0", "refined Lite0 (default)"]
    rows = []
    for name, title, tutorial in SUMMARY_ROWS:
        refined, frozen = load_result(name), load_result(f"{name}_frozen")
        n_queries = refined["runs"][0]["metrics"]["random"]["n_queries"]
        rows.append([f"{title} ({n_queries} queries)", tutorial_cell("weightedl2") if tutorial else ""]
                    + [cell(result["summary"]["best_on_val"], len(result["seeds"])) for result in (frozen, refined)])
    return "\n".join(table_lines(header, rows))


def marked_blocks(text):
    """Every marked block of ``text``: a list of (how to print it, its regex match, its fresh rendering)."""
    blocks = [(f"{m['name']}{m['tutorial'] or ''}", m, render(m["name"], bool(m["tutorial"])))
              for m in TABLE.finditer(text)]
    return blocks + [("--summary", m, render_summary()) for m in SUMMARY.finditer(text)]


def updated(text):
    """``text`` with the body of every marked block replaced by its fresh rendering."""
    for _, match, fresh in sorted(marked_blocks(text), key=lambda block: block[1].start(), reverse=True):
        text = text[:match.start("body")] + fresh + text[match.end("body"):]
    return text


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", nargs="?", help="the --name given to bench/accuracy.py (its _frozen twin is read too)")
    parser.add_argument("--tutorial", action="store_true", help="add the tutorial's published column (3 labels)")
    parser.add_argument("--summary", action="store_true", help="print the README's summary table")
    parser.add_argument("--update", action="store_true", help="rewrite the marked tables of doc/RESULTS.md, README.md")
    args = parser.parse_args()
    if args.update:
        for path in DOCUMENTS:
            text = path.read_text(encoding="utf-8")
            new = updated(text)
            if new != text:
                atomic_write_text(path, new)
            print(f"{path.relative_to(REPO)}: {len(marked_blocks(text))} table(s), "
                  + ("rewritten" if new != text else "already up to date"))
    elif args.summary:
        print(render_summary())
    elif args.name:
        print(render(args.name, args.tutorial))
    else:
        parser.error("give a NAME, --summary or --update")


if __name__ == "__main__":
    main()
