"""Step 4: learn the weighted L2 distance (linear SVM on pair differences) and the class-probability classifier.

Training pairs are (query, reference) of the train ranking sets. C is chosen on the validation ranking sets (lowest
mean rank of the positive), optional hard-negative mining adds misranked different-label train pairs, and Platt
scaling is fitted on the validation pairs. A logistic regression on the embeddings (C: the best validation
svm_classProbCCriterion) gives the class-probability rankers; the hybrid ranker puts label agreement first, in
bands, and orders each band by the embeddings' cosine distance; of the band widths that keep the validation top-1
and mean rank, the one with the best validation label mAP (ties: the narrowest).
Writes svm.pickle and classprob.pickle to proc/<datasetName>/ and svm_score_vs_probability.png to
results/<datasetName>/. The test split is only reported, never used to choose.
Images listed in labelIssuesExcludeFile (train/val keys, e.g. from A6_findLabelIssues.py) are left out of fitting
and choosing; test images are never left out.
"""
import helpers


def main(args, P):
    from image_similarity.models import backbones
    from image_similarity.data import fileio
    from image_similarity.apps import label_issues
    from image_similarity.pipeline import plots, training
    from image_similarity.search import rankers
    from image_similarity.data.features import load_features
    from image_similarity.data.splits import SPLITS, label_of
    helpers.require_choice(P, "svm_classProbCCriterion", training.C_CRITERIA)
    for split in SPLITS:
        helpers.require(P.imgInfosPath[split], "1_prepareData.py")
        helpers.require(P.imgFilenamesPath[split], "1_prepareData.py")
    helpers.require(P.featuresPath, "3_featurizeImages.py")
    features = load_features(P.featuresPath)
    model_id = features.meta["model_id"]
    current = backbones.model_id(helpers.featurizing_model(P, fallback=True))
    if current != model_id:
        raise helpers.UsageError(f"{P.featuresPath} holds features of {model_id} but the current model is "
                                 f"{current}: run 3_featurizeImages.py again")
    sets = {split: fileio.load_pickle(P.imgInfosPath[split]) for split in SPLITS}
    keys = {split: sorted(k for ks in fileio.load_pickle(P.imgFilenamesPath[split]).values() for k in ks)
            for split in SPLITS}
    helpers.require_features(features, [k for split in SPLITS for k in keys[split]], P.featuresPath)
    excluded = helpers.training_exclusions(P)
    for split in ("train", "val"):
        sets[split] = label_issues.without_keys(sets[split], excluded)
        keys[split] = [k for k in keys[split] if k not in excluded]
    print(f"Features: {len(features)} x {features.meta['dim']} from {model_id}")

    data = {split: training.ranking_set_pairs(features, sets[split], P.svm_boL2Normalize) for split in SPLITS}
    for split, (diffs, same) in data.items():
        print(f"{split:5}: {len(same):6} pairs ({int(same.sum())} same label) from {len(sets[split])} ranking sets")

    print(f"Choosing the SVM's C among {P.svm_CValCandidates} by validation mean rank ...")
    fit = training.fit_weighted_l2(
        data["train"], data["val"], features, sets["val"], P.svm_CValCandidates, P.svm_boL2Normalize,
        P.svm_probabilityCalibrationNegPosRatio, (features.rows(keys["train"]), [label_of(k) for k in keys["train"]]),
        P.svm_hardNegMining_nrIterations, P.svm_hardNegMining_nrAddPerIter, P.svm_hardNegMining_maxNrRoundsPerIter,
        P.randomSeed)
    ranker, calibrated = fit.ranker, fit.calibrated
    for C, rank in fit.C_table.items():
        print(f"   C = {C:<8g} validation mean rank {rank:7.3f}" + ("   <- chosen" if C == ranker.C else ""))
    for n, (added, total) in enumerate(fit.mining, 1):
        print(f"Hard-negative mining {n} of {P.svm_hardNegMining_nrIterations}: added {added} pairs "
              f"({total} training pairs now)")

    print("SVM pair accuracy (plain; balanced accuracy, as the tutorial's 'accuracy'):")
    for split in SPLITS:
        acc = training.pair_accuracies(ranker, *data[split])
        print(f"   {split:5} accuracy {100 * acc['accuracy']:6.2f}%   balanced accuracy "
              f"{100 * acc['balanced_accuracy']:6.2f}%   ({acc['n_pairs']} pairs)")

    xy = {split: (features.rows(keys[split]), [label_of(k) for k in keys[split]]) for split in SPLITS}
    classprob, cp_table = training.select_classprob_C(*xy["train"], *xy["val"], P.svm_classProbCValCandidates,
                                                     P.randomSeed, P.svm_classProbCCriterion)
    cp_acc = {split: classprob.score(*xy[split]) for split in SPLITS}
    print(f"Class-probability classifier (logistic regression, C = {classprob.C:g} of {list(cp_table)} by "
          f"validation {P.svm_classProbCCriterion.replace('_', ' ')}): "
          + ", ".join(f"{s} accuracy {100 * a:.2f}%" for s, a in cp_acc.items()))

    hybrid, hybrid_table = None, {}
    if P.svm_hybridBandCandidates:
        hybrid, hybrid_table = training.select_hybrid_band(classprob, features, sets["val"], P.svm_hybridBandCandidates,
                                                           P.svm_hybridMaxTop1Drop, P.svm_hybridMaxMeanRankRise)
        print(f"Hybrid ranker (label agreement in bands, cosine within a band): band width among "
              f"{P.svm_hybridBandCandidates}, the best validation label mAP (ties: the narrowest) within "
              f"{100 * P.svm_hybridMaxTop1Drop:g} point(s) of classprob_same's validation top-1 and "
              f"{100 * P.svm_hybridMaxMeanRankRise:g}% of its mean rank:")
        for band, m in hybrid_table.items():
            print(f"   band = {band:<14} validation top-1 {100 * m['top1']:5.1f}%  mean rank {m['mean_rank']:6.2f}  "
                  f"label mAP {m['map']:.3f}" + ("   <- chosen" if band == hybrid.band else ""))

    rankers.save_payload(P.svmPath, model_id, ranker=ranker, calibrated=calibrated, C_table=fit.C_table,
                         n_hard_negatives=fit.n_hard_negatives)
    rankers.save_payload(P.classifierPath, model_id, ranker=classprob, C_table=cp_table, accuracy=cp_acc,
                         C_criterion=P.svm_classProbCCriterion,
                         hybrid_band=None if hybrid is None else hybrid.band, hybrid_table=hybrid_table)
    plots.plot_score_vs_probability(calibrated, ranker.decision_function(data["val"][0]), data["val"][1],
                                    P.svmCurvePath)
    print(f"Wrote {P.svmPath}, {P.classifierPath}, {P.svmCurvePath}")
    print(f"Done: weighted L2 SVM C = {ranker.C:g} on {fit.n_train_pairs} pairs ({fit.n_hard_negatives} hard "
          "negatives), "
          f"Platt-calibrated on {len(data['val'][1])} validation pairs; class-probability test accuracy "
          f"{100 * cp_acc['test']:.1f}%.")


if __name__ == "__main__":
    helpers.run(main, __doc__)
