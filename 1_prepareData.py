"""Step 1: check the images, remove near-duplicates, split into train/val/test and build the ranking sets.

Reads data/<datasetName>/<label>/... (any depth below the label folder). Every image is decoded once: unreadable
files are skipped and named, near-duplicates (dhash) are reported and, with dedup_enabled, reduced to one image per
group before splitting, so no duplicate straddles train and test. Writes the split lists, label tables, ranking sets
and pair CSVs to proc/<datasetName>/, and split_counts.csv, near_duplicates.csv, skipped_images.tsv to
results/<datasetName>/.
"""
import logging

import helpers

logger = logging.getLogger("1_prepareData")


def main(args, P):
    import pandas as pd
    from image_similarity.apps import dedup
    from image_similarity.data import fileio, images
    from image_similarity.data.splits import SPLITS, splits_and_ranking_sets
    from image_similarity.pipeline.steps import save_prepared, usable_keys_by_label
    skipped = images.SkippedImages()
    paths = helpers.dataset_images(P, skipped)
    print(f"Reading and hashing {len(paths)} images under {P.imgDir} ...")
    encodings = dedup.encode(paths, root=P.imgDir, path=P.dedupEncodingsPath, method=P.dedup_method,
                             hash_size=P.dedup_hashSize, skipped=skipped)
    groups = dedup.find_duplicates(encodings, P.dedup_maxHammingDistance)
    fileio.save_csv(P.nearDuplicatesPath, ["group", "key", "kept"], [
        (number, key, "yes" if position == 0 else "no")
        for number, group in enumerate(groups, 1) for position, (key, _) in enumerate(group)])
    removed = {key for group in groups for key, _ in group[1:]} if P.dedup_enabled else set()
    print(f"{len(groups)} group(s) of near-duplicates ({P.nearDuplicatesPath}); "
          + (f"removed {len(removed)} image(s), keeping one per group" if P.dedup_enabled else "report only"))

    keys_by_label = usable_keys_by_label(encodings.keys, removed, P.imgDir, P.includeLabels, skipped)
    if not keys_by_label:
        skipped.save(P.skippedImagesPath)
        raise helpers.UsageError(f"no readable image in a label folder under {P.imgDir} ({P.skippedImagesPath})")

    excluded = removed | {images.image_key(path, P.imgDir) for path, _ in skipped}
    splits, infos = splits_and_ranking_sets(keys_by_label, **helpers.split_settings(P), excluded_keys=excluded,
                                            group_file_rows=helpers.group_file_rows(P))
    print("Check passed: train, val and test share no image" + (f" and no group of {P.groupsFilePath}."
                                                                  if P.groupsFilePath else "."))

    labels = sorted(keys_by_label)
    save_prepared(P.layout, labels, splits, infos)
    for split in SPLITS:
        print(f"{split:5}: {len(infos[split]):4} ranking sets -> "
              f"{P.imgFilenamesPath[split]}, {P.imgInfosPath[split]}, {P.pairsCsvPath[split]}")
    counts = pd.DataFrame({split: {label: len(splits[split][label]) for label in labels} for split in SPLITS})
    counts["total"] = counts.sum(axis=1)
    fileio.save_csv(P.splitCountsPath, ["label", *counts.columns], counts.reset_index().values.tolist())
    print(pd.concat([counts, counts.sum().to_frame("all").T]).to_string())
    skipped.save(P.skippedImagesPath)
    print(f"Wrote {P.lutLabel2IdPath}, {P.lutId2LabelPath}, {P.splitCountsPath}, {P.skippedImagesPath}")
    if skipped:
        logger.warning(skipped.summary())
    print(f"Done: {counts['total'].sum()} images in {len(labels)} labels split "
          f"{'/'.join(str(counts[split].sum()) for split in SPLITS)} (train/val/test), {len(removed)} near-duplicate(s) removed, {len(skipped)} file(s) skipped.")


if __name__ == "__main__":
    helpers.run(main, __doc__)
