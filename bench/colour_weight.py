"""How much plain colour should count in the API's distances (``image_similarity.create(colour_weight=...)``).

For each colour weight: copy detection (bench/copy_detection.py's seeded copies of every image under DIR, each
queried against all originals: recall@1, mAP) and label retrieval (every original queries the others; recall@1 and
mAP of finding its own label, the folder). The embeddings are computed once; each weight only rebuilds the index.

    nice -n 10 python bench/colour_weight.py data/fridgeObjects --weights 0 0.05 0.1 0.2 0.3
"""
import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
import image_similarity  # noqa: E402
from copy_detection import make_copies  # noqa: E402
from image_similarity.pipeline import evaluation
from image_similarity.data import fileio  # noqa: E402
from image_similarity.search.colour import with_colour  # noqa: E402
from image_similarity.data.features import Features  # noqa: E402
from image_similarity.data.images import list_images  # noqa: E402
from image_similarity.search.rankers import CosineRanker  # noqa: E402
from image_similarity.data.splits import label_of  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", type=Path, help="folder of label sub-folders, e.g. data/fridgeObjects")
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.05, 0.1, 0.2, 0.3])
    parser.add_argument("--copies", type=int, default=2)
    parser.add_argument("--out", type=Path, help="JSON (default bench/results/colour_weight_<dir name>.json)")
    args = parser.parse_args()
    keys = [p.relative_to(args.dir).as_posix() for p in list_images(args.dir)]
    model = image_similarity.create(args.dir, colour_weight=0.0)
    with tempfile.TemporaryDirectory(prefix="colour_weight_") as tmp:
        copies = make_copies(args.dir, keys, args.copies, tmp)
        _, copy_embeddings, copy_colours = model.embed([str(p) for p, _ in copies], colours=True)
    originals = [key for _, key in copies]
    results = {"dir": str(args.dir), "n_originals": len(keys), "n_copies": len(copies), "weights": {}}
    print(f"{'weight':>7} {'copy recall@1':>14} {'copy mAP':>9} {'label recall@1':>15} {'label mAP':>10}")
    for weight in args.weights:
        references = with_colour(model.features, model.colours, weight)
        queries = with_colour(copy_embeddings, copy_colours, weight)
        distances = CosineRanker().distances(queries, references)
        column = {key: j for j, key in enumerate(model.keys)}
        ranks = np.array([evaluation.positive_rank(row, np.arange(len(model.keys)) == column[original])
                          for row, original in zip(distances, originals)])
        label = evaluation.retrieval_metrics(CosineRanker(), Features(model.keys, references, {}), model.keys,
                                             {key: label_of(key) for key in model.keys}, ks=(1,))
        row = {"copy_recall@1": evaluation.top_k_accuracy(ranks, 1), "copy_map": evaluation.mean_reciprocal_rank(ranks),
               "label_recall@1": label["recall@1"], "label_map": label["map"]}
        results["weights"][str(weight)] = row
        print(f"{weight:7g} {row['copy_recall@1']:14.3f} {row['copy_map']:9.3f} {row['label_recall@1']:15.3f} "
              f"{row['label_map']:10.3f}")
    out = args.out or REPO / "bench" / "results" / f"colour_weight_{args.dir.resolve().name}.json"
    fileio.save_json(out, results)
    print(f"Wrote {out}")


if __name__ == "__main__":
    main()
