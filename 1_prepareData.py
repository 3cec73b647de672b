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
    from image_similarity.data.splits import SPLITS, label_of, splits_and_ranking_sets
    from image_similarity.pipeline.steps import save_prepared
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

    keys_by_label = {}
    for key in encodings.keys:
        if "/" not in key:
            skipped.add(P.imgDir / key, "not inside a label folder")
        elif key not in removed:
            keys_by_label.setdefault(label_of(key), []).append(key)
    if not keys_by_label:
        skipped.save(P.skippedImagesPath)
        raise helpers.UsageError(f"no readable image in a label folder under {P.imgDir} ({P.skippedImagesPath})")
    folders = {d.name for d in P.imgDir.iterdir() if d.is_dir() and not d.name.startswith(".")}
    for label in sorted(folders - set(keys_by_label)):
        if P.includeLabels is None or label in P.includeLabels:
            logger.warning("label folder %s has no usable image: left out", P.imgDir / label)
    for label in sorted(label for label, keys in keys_by_label.items() if len(keys) < 2):
        logger.warning("label %r has only %d image: it gives no query images", label, len(keys_by_label[label]))

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
