"""Every label band of the hybrid ranker on a finished run (steps 1, 3 and 4): the label protocol and, with groups,
instance retrieval, on validation and test.

For ``classprob_same``, the cosine and each band: top-1, mean rank (the tutorial's ranking sets), label mAP (every
image of the split retrieves the others of its label) and, with ``--groups`` (a groupsFile), instance recall@1 and
mAP. Step 4 chooses the band on validation alone; the test rows only show what that choice gives up.

    python bench/hybrid_bands.py /tmp/run fridgeCopies --groups /tmp/run/data/fridgeCopies/groups.tsv
"""
import argparse
import copy
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from image_similarity.pipeline import evaluation
from image_similarity.data import fileio
from image_similarity.search import ranker_files, rankers  # noqa: E402
from image_similarity.data.features import load_features  # noqa: E402
from image_similarity.data.splits import label_of, load_ranking_sets, parse_groups_file, split_keys  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work", type=Path, help="the run's workDir")
    parser.add_argument("dataset", help="its datasetName")
    parser.add_argument("--groups", type=Path, help="its groupsFile (relative/path<TAB>group id)")
    parser.add_argument("--bands", type=float, nargs="+", default=[0.02, 0.05, 0.1, 0.2, 0.3, 0.5])
    parser.add_argument("--out", type=Path, help="JSON (default bench/results/hybrid_bands_<dataset>.json)")
    args = parser.parse_args()
    proc = args.work / "proc" / args.dataset
    features = load_features(proc / "features.npy")
    payload = ranker_files.load_payload(proc / "classprob.skops", None)
    classifier = payload["ranker"]
    groups = parse_groups_file(fileio.read_tsv(args.groups)) if args.groups else None
    arms = {"cosine": rankers.CosineRanker(),
            "classprob_same": copy.deepcopy(classifier).set_params(metric="same_label"),
            **{f"band {b:g}": rankers.HybridRanker(classifier, b).fit() for b in args.bands}}
    results = {"run": str(args.work), "dataset": args.dataset, "chosen_band": payload.get("hybrid_band"), "splits": {}}
    for split in ("val", "test"):
        sets = load_ranking_sets(proc / f"imgInfos{split.title()}.json")
        keys = split_keys(proc / f"imgFilenames{split.title()}.json")
        print(f"{split}: {len(sets)} ranking sets, {len(keys)} images (band chosen by step 4: "
              f"{payload.get('hybrid_band')})")
        results["splits"][split] = {}
        for name, ranker in arms.items():
            ranks = evaluation.rank_ranking_sets(ranker, features, sets)
            row = {"top1": evaluation.top_k_accuracy(ranks, 1), "mean_rank": evaluation.mean_rank(ranks),
                   "label_map": evaluation.retrieval_metrics(ranker, features, keys, {k: label_of(k) for k in keys},
                                                             ks=())["map"]}
            line = f"   {name:15} top-1 {100 * row['top1']:5.1f}%  mean rank {row['mean_rank']:6.2f}  " \
                   f"label mAP {row['label_map']:.3f}"
            if groups:
                instance = evaluation.retrieval_metrics(ranker, features, keys, groups, ks=(1,))
                row.update(instance_recall1=instance["recall@1"], instance_map=instance["map"])
                line += f"  instance recall@1 {instance['recall@1']:.3f}  mAP {instance['map']:.3f}"
            results["splits"][split][name] = row
            print(line, flush=True)
    out = args.out or REPO / "bench" / "results" / f"hybrid_bands_{args.dataset}.json"
    fileio.save_json(out, results)
    print(f"Wrote {out}")


if __name__ == "__main__":
    main()
