"""A1: find the featurized images most similar to one image file, from inside or outside the dataset.

The image is embedded with the same network as the stored features (the pretrained rf_backbone when the
features came from it, else the refined proc/<datasetName>/model.pt; any other model is refused), then ranked
against every featurized image (or only the test split) with one ranker: by default hybrid (labels first, looks within
a label) when step 4 made a classifier, else cosine; or, with --attributes a,b, by the mean of those attributes' calibrated
match probabilities (this run's svm.skops is the attribute named after the dataset; attributeModels adds others).
With eval_reRankK1 > 0 the ranking is k-reciprocally re-ranked (Zhong et al. 2017) among all the references.
Prints the top K with labels and distances and the time spent loading, in the network and searching, and saves
results/<datasetName>/retrieval_<image stem>.png and .csv (rank, key, label, distance). Any ranker of 5_evaluate.py's
table can be named, cosine+colour too (the images' colour histograms are then cached beside the features).
"""
import time
from pathlib import Path

import helpers


def add_arguments(parser):
    parser.add_argument("image", type=Path, help="query image file (any location)")
    parser.add_argument("--top", type=int, default=15, help="matches shown (default: 15)")
    parser.add_argument("--ranker", help="a ranker of 5_evaluate.py's table, e.g. cosine or classprob_same (default: "
                                         "hybrid when step 4 ran, else cosine)")
    parser.add_argument("--attributes", help="comma-separated attribute names to combine instead of one ranker "
                                             "(the dataset's own name, plus the keys of attributeModels)")
    parser.add_argument("--references", choices=("all", "test"), default="all",
                        help="rank every featurized image (default) or only the test split")


def main(args, P):
    from image_similarity.apps import attributes
    from image_similarity.data import fileio, images
    from image_similarity.pipeline import plots
    from image_similarity.search import core
    from image_similarity.data.splits import label_of, split_keys
    start = time.perf_counter()
    if args.top < 1:
        raise helpers.UsageError(f"--top must be at least 1, got {args.top}")
    query = images.read_image(args.image)
    helpers.require(P.featuresPath, "3_featurizeImages.py")
    run = helpers.load_run(P, network=False)  # the network is loaded once the arguments are known to be good
    available, name = dict(run.rankers), args.ranker or run.default_ranker
    if args.attributes:
        chosen = [a for a in args.attributes.split(",") if a]
        unknown = [a for a in chosen if a not in run.attributes]
        if unknown or not chosen:
            raise helpers.UsageError(f"unknown attribute(s) {unknown or args.attributes!r}: configured are "
                                     f"{sorted(run.attributes) or 'none (run 4_trainSvm.py)'}")
        name = "attributes:" + "+".join(chosen)
        available[name] = attributes.combine([run.attributes[a] for a in chosen])
    try:
        ranker = core.resolve_ranker(name, available)
    except ValueError as err:
        raise helpers.UsageError(f"--ranker: {err}") from None
    re_ranker = helpers.re_ranked(P, ranker)  # None unless eval_reRankK1 > 0
    if re_ranker is not None:
        ranker, name = re_ranker, f"{name}+kreciprocal"
    gallery = core.run_gallery(run.features, P.featuresPath, P.imgDir, run.load_network)
    if args.references == "test":
        keys = split_keys(helpers.require(P.imgFilenamesPath["test"], "1_prepareData.py"))
        helpers.require_features(run.features, keys, P.featuresPath)
        gallery = gallery.subset(keys)
    keys, model_id = gallery.keys, run.model_id
    embedder = run.embedder
    loaded = time.perf_counter()

    vector, colours = core.embed_query(embedder, query)
    embedded = time.perf_counter()
    found = core.search(gallery, ranker, vector, args.top, colours)
    order, distances = found.indices[0], found.distances[0]
    searched = time.perf_counter()

    print(f"Top {len(order)} of {len(keys)} {args.references} references for {args.image} ({name} on {model_id}):")
    for rank, i in enumerate(order, 1):
        print(f"{rank:4}. {distances[rank - 1]:10.4g}  {label_of(keys[i]):20} {P.imgDir / keys[i]}")
    print(f"Time: loading {loaded - start:.2f} s, network {embedded - loaded:.3f} s, "
          f"search {searched - embedded:.4f} s")
    skipped = images.SkippedImages()
    matches = [(images.load_image(P.imgDir / keys[i], skipped), label_of(keys[i]), d) for i, d in zip(order, distances)]
    figure = P.layout.retrieval_figure(args.image.stem, name)  # one per query and ranker: none overwrites another's
    out = plots.plot_retrieval_grid(query, matches, figure, title=f"query: {args.image.name}\n({name})")
    table = fileio.save_csv(figure.with_suffix(".csv"), ["rank", "key", "label", "distance"],
                            [(rank, keys[i], label_of(keys[i]), repr(float(d)))
                             for rank, (i, d) in enumerate(zip(order, distances), 1)])
    print(f"Wrote {out} and {table}")
    if skipped:
        print(skipped.summary())
    print(f"Done: best match {keys[order[0]]} ({label_of(keys[order[0]])}, distance {distances[0]:.4g}) "
          f"among {len(keys)} references in {searched - start:.1f} s.")


if __name__ == "__main__":
    helpers.run(main, __doc__, add_arguments)
