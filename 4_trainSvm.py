"""Step 4: learn the weighted L2 distance (linear SVM on pair differences) and the class-probability classifier.

Training pairs are (query, reference) of the train ranking sets. C is chosen on the validation ranking sets (lowest
mean rank of the positive), optional hard-negative mining adds misranked different-label train pairs, and Platt
scaling is fitted on the validation pairs. A logistic regression on the embeddings (C: the best validation
svm_classProbCCriterion) gives the class-probability rankers; the hybrid ranker puts label agreement first, in
bands, and orders each band by the embeddings' cosine distance; of the band widths that keep the validation top-1
and mean rank, the one with the best validation label mAP (ties: the narrowest).
Writes svm.skops and classprob.skops (skops: read back without running code) to proc/<datasetName>/ and svm_score_vs_probability.png to
results/<datasetName>/. The test split is only reported, never used to choose.
Images listed in labelIssuesExcludeFile (train/val keys, e.g. from A6_findLabelIssues.py) are left out of fitting
and choosing; test images are never left out.
"""
import helpers


def main(args, P):
    from image_similarity.models import backbones
    from image_similarity.pipeline import plots, steps, training
    from image_similarity.data.features import load_features
    from image_similarity.data.splits import SPLITS, label_of
    helpers.require_choice(P, "svm_classProbCCriterion", training.C_CRITERIA)
    for split in SPLITS:
        helpers.require(P.imgInfosPath[split], "1_prepareData.py")
        helpers.require(P.imgFilenamesPath[split], "1_prepareData.py")
    features = load_features(helpers.require(P.featuresPath, "3_featurizeImages.py"))
    model_id = features.meta["model_id"]
    current = backbones.model_id(helpers.featurizing_model(P, fallback=True))
    if current != model_id:
        raise helpers.UsageError(f"{P.featuresPath} holds features of {model_id} but the current model is "
                                 f"{current}: run 3_featurizeImages.py again")
    sets, keys = steps.load_prepared(P.layout, SPLITS, helpers.training_exclusions(P))
    helpers.require_features(features, [k for split in SPLITS for k in keys[split]], P.featuresPath)
    print(f"Features: {len(features)} x {features.meta['dim']} from {model_id}")
    svm = steps.train_weighted_l2(features, sets, keys, P.svm_CValCandidates, P.svm_boL2Normalize,
                                  P.svm_probabilityCalibrationNegPosRatio, P.svm_hardNegMining_nrIterations,
                                  P.svm_hardNegMining_nrAddPerIter, P.svm_hardNegMining_maxNrRoundsPerIter, P.randomSeed)
    for split, (diffs, same) in svm.pairs.items():
        print(f"{split:5}: {len(same):6} pairs ({int(same.sum())} same label) from {len(sets[split])} ranking sets")
    print(f"Choosing the SVM's C among {P.svm_CValCandidates} by validation mean rank ...")
    fit = svm.fit
    for C, rank in fit.C_table.items():
        print(f"   C = {C:<8g} validation mean rank {rank:7.3f}" + ("   <- chosen" if C == fit.ranker.C else ""))
    for n, (added, total) in enumerate(fit.mining, 1):
        print(f"Hard-negative mining {n} of {P.svm_hardNegMining_nrIterations}: added {added} pairs "
              f"({total} training pairs now)")
    print("SVM pair accuracy (plain; balanced accuracy, as the tutorial's 'accuracy'):")
    for split, acc in svm.pair_accuracy.items():
        print(f"   {split:5} accuracy {100 * acc['accuracy']:6.2f}%   balanced accuracy "
              f"{100 * acc['balanced_accuracy']:6.2f}%   ({acc['n_pairs']} pairs)")

    classprob = steps.train_classprob(
        {split: (features.rows(keys[split]), [label_of(k) for k in keys[split]]) for split in SPLITS}, features,
        sets["val"], P.svm_classProbCValCandidates, P.randomSeed, P.svm_classProbCCriterion,
        P.svm_hybridBandCandidates, P.svm_hybridMaxTop1Drop, P.svm_hybridMaxMeanRankRise)
    print(f"Class-probability classifier (logistic regression, C = {classprob['ranker'].C:g} of "
          f"{list(classprob['C_table'])} by validation {P.svm_classProbCCriterion.replace('_', ' ')}): "
          + ", ".join(f"{s} accuracy {100 * a:.2f}%" for s, a in classprob["accuracy"].items()))
    if classprob["hybrid_table"]:
        print(f"Hybrid ranker (label agreement in bands, cosine within a band): band width among "
              f"{P.svm_hybridBandCandidates}, the best validation label mAP (ties: the narrowest) within "
              f"{100 * P.svm_hybridMaxTop1Drop:g} point(s) of classprob_same's validation top-1 and "
              f"{100 * P.svm_hybridMaxMeanRankRise:g}% of its mean rank:")
        for band, m in classprob["hybrid_table"].items():
            print(f"   band = {band:<14} validation top-1 {100 * m['top1']:5.1f}%  mean rank {m['mean_rank']:6.2f}  "
                  f"label mAP {m['map']:.3f}" + ("   <- chosen" if band == classprob["hybrid_band"] else ""))
    steps.save_rankers(P.layout, model_id, svm, classprob)
    plots.plot_score_vs_probability(fit.calibrated, fit.ranker.decision_function(svm.pairs["val"][0]),
                                    svm.pairs["val"][1], P.svmCurvePath)
    print(f"Wrote {P.svmPath}, {P.classifierPath}, {P.svmCurvePath}")
    print(f"Done: weighted L2 SVM C = {fit.ranker.C:g} on {fit.n_train_pairs} pairs ({fit.n_hard_negatives} hard "
          f"negatives), Platt-calibrated on {len(svm.pairs['val'][1])} validation pairs; class-probability test "
          f"accuracy {100 * classprob['accuracy']['test']:.1f}%.")


if __name__ == "__main__":
    helpers.run(main, __doc__)
