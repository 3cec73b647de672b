"""A7: a 2-D map of the collection's embeddings: clusters, outliers, label issues and near-duplicates at a glance.

Places every featurized image of proc/<datasetName>/features.npy (or any features store given with --features, such
as A2's) in the plane with UMAP (map_method; t-SNE where umap-learn is missing), coloured by label, with thumbnails
up to map_maxThumbnails images. A6's flagged label issues get a red ring and step 1's near-duplicates a line between
them. Writes results/<datasetName>/embedding_map.png and proc/<datasetName>/embedding_map.json, which the web
service (A4) shows as its map view; with --features, <store>_map.png and <store>_map.json beside the store.
"""
from pathlib import Path

import helpers


def add_arguments(parser):
    parser.add_argument("--features", type=Path, help="a features store (.npy with its .json), e.g. A2's --out "
                                                      "(default: the dataset's, from 3_featurizeImages.py)")
    parser.add_argument("--images", type=Path, help="the folder its keys are relative to, for thumbnails "
                                                    "(default: the dataset's images)")


def main(args, P):
    from image_similarity.apps import embedding_map, label_issues
    from image_similarity.data.features import load_features
    from image_similarity.pipeline import plots
    helpers.require_choice(P, "map_method", embedding_map.METHODS)
    if args.features is None:
        store, images = helpers.require(P.featuresPath, "3_featurizeImages.py"), args.images or P.imgDir
        json_out, png_out = P.embeddingMapPath, P.embeddingMapPlotPath
        flagged = embedding_map.read_flagged_keys(P.labelIssuesPath)
        groups = label_issues.read_near_duplicate_groups(P.nearDuplicatesPath)
    else:
        store, images, flagged, groups = args.features, args.images, set(), []
        json_out, png_out = (store.with_name(f"{store.stem}_map{suffix}") for suffix in (".json", ".png"))
    try:
        features = load_features(store, mmap=True)
        print(f"Mapping {len(features)} images of {store} with {P.map_method} ...")
        emap = embedding_map.build_map(list(features.keys), features.matrix, P.map_method, flagged, groups,
                                       random_state=P.randomSeed)
    except (FileNotFoundError, ValueError) as err:
        raise helpers.UsageError(str(err)) from None
    print(f"Wrote {embedding_map.save_map(json_out, emap)}")
    shown = images if images is not None and P.map_maxThumbnails else None
    print(f"Wrote {plots.plot_embedding_map(emap, png_out, shown, P.map_maxThumbnails)}")
    print(f"Done: {len(emap.keys)} images in {len(set(emap.labels))} label(s) mapped with {emap.method}; "
          f"{sum(emap.suspects)} label issue(s), {len(emap.duplicate_pairs)} near-duplicate link(s) marked.")


if __name__ == "__main__":
    helpers.run(main, __doc__, add_arguments)
