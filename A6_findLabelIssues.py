"""A6: find the images whose label looks wrong, so a person can look at them first.

After step 3, it reads the splits and features.npy; with --folder DIR it embeds that labelled folder (one sub-folder
per label) itself with the pretrained rf_backbone and scores every image. Out-of-sample class probabilities come
from li_nrFolds-fold cross-validation of the class-probability classifier (logistic regression on the embeddings)
over the train + validation images, averaged over li_nrRepeats fold assignments (C: the best validation
svm_classProbCCriterion, or step 4's choice when classprob.skops holds one by that rule); the test images are scored by a
classifier fitted on train + validation only. cleanlab ranks them (li_rankedBy) and flags its estimate of the wrong
ones; near-duplicates with different labels (step 1's near_duplicates.csv, or dhash with --folder) are named too.
Writes label_issues.csv (every image, most suspect first) and label_issues.png (the top li_nrShown) to
results/<datasetName>/ (with --folder: results/<folder name>/).
To train without some of them, save their keys as a TSV and set labelIssuesExcludeFile (steps 2 and 4).
"""
import logging
import time
from pathlib import Path

import helpers


def add_arguments(parser):
    parser.add_argument("--folder", type=Path, metavar="DIR",
                        help="any labelled image folder (DIR/<label>/...): embedded here with the pretrained network")


def main(args, P):
    from image_similarity.apps import label_issues
    from image_similarity.data import images
    from image_similarity.pipeline import steps
    from image_similarity.data.splits import SPLITS
    from image_similarity.pipeline.training import C_CRITERIA
    helpers.require_choice(P, "svm_classProbCCriterion", C_CRITERIA)  # before any embedding
    helpers.require_choice(P, "li_rankedBy", label_issues.RANKING_METHODS)
    start, skipped = time.perf_counter(), images.SkippedImages()
    if args.folder:
        if not args.folder.is_dir():
            raise helpers.UsageError(f"--folder {args.folder} is not a folder")
        img_dir, results_dir = args.folder, P.rootDir / "results" / args.folder.resolve().name
        print(f"Embedding the images under {img_dir} with the pretrained {P.rf_backbone} ...")
        run = steps.folder_label_issue_inputs(img_dir, P.rf_backbone, P.run_mbSize, P.run_nrWorkers, P.dedup_hashSize,
                                              P.dedup_maxHammingDistance, skipped)
    else:
        img_dir, results_dir = P.imgDir, P.resultsDir
        helpers.require(P.featuresPath, "3_featurizeImages.py")
        for split in SPLITS:
            helpers.require(P.imgFilenamesPath[split], "1_prepareData.py")
        run = steps.label_issue_inputs(P.layout, P.svm_classProbCValCandidates, P.svm_classProbCCriterion)
        print(f"Scoring {len(run.keys)} images ({', '.join(f'{run.splits.count(s)} {s}' for s in SPLITS)}) "
              f"with features of {run.model_id}")
    candidates = run.C_candidates or P.svm_classProbCValCandidates
    issues, C, duplicates = steps.score_label_issues(run, candidates, P.li_nrFolds, P.randomSeed, P.li_nrRepeats,
                                                     P.svm_classProbCCriterion, P.li_rankedBy)
    csv_path, sheet_path = results_dir / P.labelIssuesPath.name, results_dir / P.labelIssuesSheetPath.name
    label_issues.save_label_issues(csv_path, issues)
    n_shown = steps.save_label_issue_sheet(sheet_path, issues, img_dir, P.li_nrShown, P.li_rankedBy)
    print(f"Class-probability classifier C = {C:g}" + (" (step 4's)" if len(candidates) == 1 else
                                                        f" (best validation {P.svm_classProbCCriterion.replace('_', ' ')})")
          + f", {P.li_nrFolds}-fold out-of-fold" + (f", {P.li_nrRepeats} fold assignments averaged"
                                                      if P.li_nrRepeats > 1 else "") + "; top suspects:")
    for row in issues.rows[:10]:
        print(f"  {row['rank']:4}. {row['key']:32} {row['split']:7} given {row['given_label']:12} "
              f"p={row['p_given_label']:.3f}  suggested {row['suggested_label']}")
    for key, others in sorted(duplicates.items()):
        print(f"Near-duplicates with different labels: {key} and {', '.join(others)}")
    print(f"Wrote {csv_path}" + (f", {sheet_path}" if n_shown else ""))
    if skipped:
        logging.getLogger("A6_findLabelIssues").warning(skipped.summary())
    print(f"Done: {len(run.keys)} images scored, {issues.n_flagged} flagged by cleanlab, {len(duplicates)} in "
          f"different-label near-duplicate pairs, {time.perf_counter() - start:.1f} s.")


if __name__ == "__main__":
    helpers.run(main, __doc__, add_arguments)
