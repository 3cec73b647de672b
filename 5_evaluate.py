"""Step 5: rank every ranking set's references with every ranker and report where the positive lands.

For each ranker (random, L1, L2, cosine, weighted L2, its calibrated probability, and the class probabilities under L2,
cosine and 1 - P(same label)) prints and saves top-N accuracies, mean and median rank and MRR on the chosen split
(default test), and the mAP of retrieving, for every image of that split, the others of its label among all of
them (in evaluation.json/.csv as ``map``; printed below the table). With a groupsFile, also the instance
``instance_recall@1``, ``@5`` and ``instance_map``: the positives are the other images of the query's group. The best ranker on the validation split (top-1, then mean rank; never on test, never the random baseline) is
marked in evaluation.csv and recorded in proc/<datasetName>/run.json. The recommended ranker (hybrid when step 4 made it, as A1 and the service use; else that best
one) draws the per-query figures and ranks, for every test query image, its TOP_K_CANDIDATES closest featurized images
(ranking_results.csv). With eval_reRankK1 > 0 the table gains that ranker k-reciprocally re-ranked (Zhong et al.
2017), as "<name>+kreciprocal".
"""
import helpers


def add_arguments(parser):
    from image_similarity.data.splits import SPLITS
    parser.add_argument("--on", choices=SPLITS, default="test", help="split to evaluate (default: test)")
    parser.add_argument("--ranker", help="ranker of the per-query figures and ranking_results.csv (default: the "
                                         "recommended one, as A1's and the service's)")


def visualize(ranker, features, ranking_sets, P, folder, skipped):
    """The tutorial's per-query figures: query, closest reference and the positive, framed green or red."""
    import numpy as np
    from image_similarity.data import images
    from image_similarity.pipeline import plots
    for ranking_set in ranking_sets:
        d = ranker.distances(features.rows([ranking_set.query]), features.rows(ranking_set.references))[0]
        best, positive = int(np.argmin(d)), int(np.flatnonzero(ranking_set.is_positive)[0])
        shown = [images.load_image(P.imgDir / k, skipped) for k in
                 (ranking_set.query, ranking_set.references[best], ranking_set.positive)]
        plots.plot_query_result(*shown, d[best], d[positive], best == positive,
                                folder / (ranking_set.query.replace("/", "-") + ".png"), title=ranking_set.query)


def main(args, P):
    from image_similarity.pipeline import evaluation, steps
    from image_similarity.data import fileio, images
    from image_similarity.pipeline.runs import recommended_ranker
    from image_similarity.search import core
    from image_similarity.data.splits import label_of
    helpers.require(P.featuresPath, "3_featurizeImages.py")
    for split in {args.on, "val", "test"}:
        helpers.require(P.imgInfosPath[split], "1_prepareData.py")
        helpers.require(P.imgFilenamesPath[split], "1_prepareData.py")
    for path in (P.svmPath, P.classifierPath):
        helpers.require(path, "4_trainSvm.py")
    groups = helpers.image_groups(P)
    run = helpers.load_run(P, network=False, attributes=False)
    features, model_id, all_rankers = run.features, run.model_id, run.rankers
    if args.ranker:
        try:
            core.resolve_ranker(args.ranker, all_rankers)
        except ValueError as err:
            raise helpers.UsageError(f"--ranker: {err}") from None
    gallery = core.run_gallery(features, P.featuresPath, P.imgDir, run.load_network)
    re_ranker = helpers.re_ranked(P, all_rankers[run.default_ranker])
    if re_ranker is not None:  # eval_reRankK1 > 0: the recommended ranker, k-reciprocally re-ranked, as one more
        all_rankers[f"{run.default_ranker}+kreciprocal"] = re_ranker
    sets, keys = steps.load_prepared(P.layout, sorted({args.on, "val", "test"}))
    split_keys = keys[args.on]
    helpers.require_features(features, {k for ss in sets.values() for s in ss for k in (s.query, *s.references)}
                             | set(split_keys), P.featuresPath)
    if not sets[args.on] or not sets["val"]:
        raise helpers.UsageError(f"no ranking sets in {P.imgInfosPath[args.on if not sets[args.on] else 'val']}: "
                                 "too few images per label (run 1_prepareData.py with more images)")

    print(f"Ranking {len(sets[args.on])} {args.on} ranking sets ({len(sets[args.on][0].references)} references "
          f"each) with {len(all_rankers)} rankers on {model_id} features ...")
    ranks = {name: evaluation.rank_ranking_sets(r, gallery.features_for(r), sets[args.on])
             for name, r in all_rankers.items()}
    results = {name: evaluation.evaluate(r, P.eval_topNs) for name, r in ranks.items()}
    val = results if args.on == "val" else {
        name: evaluation.evaluate(evaluation.rank_ranking_sets(r, gallery.features_for(r), sets["val"]), [1])
        for name, r in all_rankers.items()}
    best = steps.best_on_validation(val)
    labels = {key: label_of(key) for key in split_keys}
    n_instance = 0
    for name, ranker in all_rankers.items():
        inputs = gallery.features_for(ranker)
        results[name]["map"] = evaluation.retrieval_metrics(ranker, inputs, split_keys, labels, ks=())["map"]
        if groups:
            instance = evaluation.retrieval_metrics(ranker, inputs, split_keys, groups, ks=(1, 5))
            n_instance = instance.pop("n_queries", 0)
            results[name].update({f"instance_{m}": v for m, v in instance.items()})

    print("\n".join(steps.evaluation_table(results, P.eval_topNs, best)))
    print(f"mAP over {len(split_keys)} {args.on} images (positives: the query's label): "
          + ", ".join(f"{name} {m['map']:.3f}" for name, m in results.items()))
    if groups and not n_instance:
        print(f"Instance retrieval: no group of {P.groupsFilePath} has two {args.on} images: not measured")
    elif groups:
        print(f"Instance retrieval over {n_instance} {args.on} images with another image of their group in "
              f"{P.groupsFilePath} (recall@1, recall@5, mAP): " + "; ".join(
                  f"{name} {m['instance_recall@1']:.3f} {m['instance_recall@5']:.3f} {m['instance_map']:.3f}"
                  for name, m in results.items()))
    steps.save_evaluation(P.layout, results, ranks, P.eval_topNs, best, model_id, args.on)
    print(f"Wrote {P.evaluationJsonPath}, {P.evaluationCsvPath}, {P.topNPlotPath}, {P.rankHistogramPath}, "
          f"{P.layout.record}")

    skipped = images.SkippedImages()
    shown = args.ranker or recommended_ranker(P.layout.load_record(), all_rankers)
    if P.eval_boVisualizeResults and P.eval_nrVisualizations > 0:
        folder = P.layout.visualizations(shown)
        visualize(all_rankers[shown], gallery.features_for(all_rankers[shown]),
                  sets[args.on][:P.eval_nrVisualizations], P, folder, skipped)
        print(f"Wrote {min(P.eval_nrVisualizations, len(sets[args.on]))} per-query figures of {shown} to {folder}")
    queries = sorted({s.query for s in sets["test"]})
    found = core.search_keys(gallery, all_rankers[shown], queries, P.TOP_K_CANDIDATES)
    fileio.save_csv(P.rankingResultsPath, ["query", "rank", "candidate", "distance", "same_label"], [
        (queries[q], n, key, repr(dist), int(label_of(key) == label_of(queries[q])))
        for q, n, _, key, dist in found.rows()])
    print(f"Wrote the top {P.TOP_K_CANDIDATES} of {len(features) - 1} candidates for {len(queries)} test queries "
          f"({shown}) to {P.rankingResultsPath}")
    if skipped:
        skipped.save(P.skippedImagesPath)
        print(skipped.summary())
    top1 = {name: f"{100 * m['top1']:.1f}%" for name, m in results.items()}
    print(f"Done: {args.on} top-1 over {len(sets[args.on])} queries: "
          + ", ".join(f"{n} {v}" for n, v in top1.items()) + f"; best on val: {best}.")


if __name__ == "__main__":
    helpers.run(main, __doc__, add_arguments)
