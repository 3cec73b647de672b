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
import csv
import logging
import time
from pathlib import Path

import helpers


def add_arguments(parser):
    parser.add_argument("--folder", type=Path, metavar="DIR",
                        help="any labelled image folder (DIR/<label>/...): embedded here with the pretrained network")


def near_duplicate_groups(path):
    """Groups of keys from step 1's near_duplicates.csv (group,key,kept); [] when the file is absent."""
    if not Path(path).is_file():
        return []
    groups = {}
    with open(path, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            groups.setdefault(row["group"], []).append(row["key"])
    return list(groups.values())


def main(args, P):
    from image_similarity.apps import dedup, label_issues
    from image_similarity.models import embedder
    from image_similarity.data import features, images
    from image_similarity.pipeline import plots
    from image_similarity.search import rankers
    from image_similarity.data.splits import SPLITS, label_of, split_keys as keys_of_split
    from image_similarity.pipeline.training import C_CRITERIA
    helpers.require_choice(P, "svm_classProbCCriterion", C_CRITERIA)  # before any embedding
    helpers.require_choice(P, "li_rankedBy", label_issues.RANKING_METHODS)
    start = time.perf_counter()
    skipped, candidates = images.SkippedImages(), P.svm_classProbCValCandidates
    if args.folder:
        if not args.folder.is_dir():
            raise helpers.UsageError(f"--folder {args.folder} is not a folder")
        img_dir, results_dir = args.folder, P.rootDir / "results" / args.folder.resolve().name
        paths = [p for p in images.list_images(args.folder, skipped=skipped) if len(p.relative_to(img_dir).parts) > 1]
        print(f"Embedding {len(paths)} images under {img_dir} with the pretrained {P.rf_backbone} ...")
        keys, X = embedder.load_embedder(P.rf_backbone).embed_files(paths, img_dir, P.run_mbSize, P.run_nrWorkers,
                                                                     skipped)
        splits = ["unsplit"] * len(keys)
        groups = dedup.find_near_duplicate_groups(dedup.hash_images([img_dir / k for k in keys], img_dir,
                                                                    P.dedup_hashSize), P.dedup_maxHammingDistance)
    else:
        img_dir, results_dir = P.imgDir, P.resultsDir
        helpers.require(P.featuresPath, "3_featurizeImages.py")
        split_keys = {split: keys_of_split(helpers.require(P.imgFilenamesPath[split], "1_prepareData.py"))
                      for split in SPLITS}
        keys = [k for split in SPLITS for k in split_keys[split]]
        splits = [split for split in SPLITS for _ in split_keys[split]]
        stored = features.load_features(P.featuresPath)
        helpers.require_features(stored, keys, P.featuresPath)
        X = stored.rows(keys)
        groups = near_duplicate_groups(P.nearDuplicatesPath)
        if P.classifierPath.is_file():  # step 4 chose C on the same splits: reused by the same rule, 4 fewer fits
            try:
                step4 = rankers.load_payload(P.classifierPath, stored.meta["model_id"])
            except ValueError as err:  # older features or not step 4's file: A6 does not need it, so it chooses C
                logging.getLogger("A6_findLabelIssues").warning("%s; choosing C here instead", err)
            else:
                if step4.get("C_criterion", "accuracy") == P.svm_classProbCCriterion:
                    candidates = [step4["ranker"].C]
        print(f"Scoring {len(keys)} images ({', '.join(f'{len(v)} {s}' for s, v in split_keys.items())}) "
              f"with features of {stored.meta['model_id']}")
    labels = [label_of(k) for k in keys]
    proba, classes, C = label_issues.out_of_sample_probabilities(X, labels, splits, candidates, P.li_nrFolds,
                                                                 P.randomSeed, n_jobs=-1, n_repeats=P.li_nrRepeats,
                                                                 C_criterion=P.svm_classProbCCriterion)
    duplicates = label_issues.different_label_duplicates(groups, label_of)
    issues = label_issues.find_label_issues(keys, splits, labels, proba, classes, P.li_rankedBy, duplicates)
    csv_path, sheet_path = results_dir / P.labelIssuesPath.name, results_dir / P.labelIssuesSheetPath.name
    label_issues.save_label_issues(csv_path, issues)
    shown = issues.rows[:P.li_nrShown]
    if shown:
        plots.plot_contact_sheet([(images.load_image(img_dir / row["key"]),
                                   f"{row['rank']}. {row['key'].split('/')[-1]} ({row['split']})\n"
                                   f"given {row['given_label']} p={row['p_given_label']:.2f}\n"
                                   f"suggested {row['suggested_label']}") for row in shown], sheet_path,
                                 title=f"Top {len(shown)} label-issue suspects ({P.li_rankedBy})")
    print(f"Class-probability classifier C = {C:g}" + (" (step 4's)" if len(candidates) == 1 else
                                                        f" (best validation {P.svm_classProbCCriterion.replace('_', ' ')})")
          + f", {P.li_nrFolds}-fold out-of-fold" + (f", {P.li_nrRepeats} fold assignments averaged"
                                                      if P.li_nrRepeats > 1 else "") + "; top suspects:")
    for row in issues.rows[:10]:
        print(f"  {row['rank']:4}. {row['key']:32} {row['split']:7} given {row['given_label']:12} "
              f"p={row['p_given_label']:.3f}  suggested {row['suggested_label']}")
    for key, others in sorted(duplicates.items()):
        print(f"Near-duplicates with different labels: {key} and {', '.join(others)}")
    print(f"Wrote {csv_path}" + (f", {sheet_path}" if shown else ""))
    if skipped:
        logging.getLogger("A6_findLabelIssues").warning(skipped.summary())
    print(f"Done: {len(keys)} images scored, {issues.n_flagged} flagged by cleanlab, {len(duplicates)} in "
          f"different-label near-duplicate pairs, {time.perf_counter() - start:.1f} s.")


if __name__ == "__main__":
    helpers.run(main, __doc__, add_arguments)
