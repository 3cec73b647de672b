"""Embed every image in a folder (anywhere on disk) into one features store, incrementally.

The store is what step 3 writes: OUT (.npy, float32, N x D) with OUT's .json beside it (keys relative to DIR with
forward slashes, model_id, backbone, dim, and each file's size and modification time). Run it again after adding,
changing or deleting images: only new or changed files are embedded, deleted ones are dropped, and a different model
recomputes everything. The model defaults to the refined proc/<datasetName>/model.pt when rf_maxEpochs > 0 and it
exists, else the pretrained rf_backbone. Unreadable files are listed in <out>_skipped.tsv beside the output.
"""
import logging
from pathlib import Path

import helpers

logger = logging.getLogger("A2_featurizeImagesInDir")


def add_arguments(parser):
    parser.add_argument("dir", type=Path, help="folder of images")
    parser.add_argument("--recursive", action="store_true", help="include sub-folders")
    parser.add_argument("--model", help="backbone name or refined checkpoint path (default: see above)")
    parser.add_argument("--out", type=Path, required=True, help="output .npy file (its .json is written beside it)")


def main(args, P):
    from image_similarity.models import backbones
    from image_similarity.data import features, images
    helpers.require_int_at_least(P, "run_mbSize", 1)
    helpers.require_int_at_least(P, "run_nrWorkers", 0)
    if not args.dir.is_dir():
        raise helpers.UsageError(f"{args.dir} is not a folder")
    model = args.model or helpers.featurizing_model(P, fallback=True)
    skipped = images.SkippedImages()
    paths = images.list_images(args.dir, recursive=args.recursive, skipped=skipped)
    if not paths:
        raise helpers.UsageError(f"no images in {args.dir}" + ("" if args.recursive else " (try --recursive)"))
    print(f"{len(paths)} images under {args.dir}; embedding the new or changed ones with {backbones.model_id(model)}")
    try:
        stored, counts = features.update_features(paths, args.dir, args.out, model, P.run_mbSize, P.run_nrWorkers,
                                                  skipped, helpers.inference_config(P))
    except ValueError as err:
        raise helpers.UsageError(str(err)) from None
    if counts["recomputed"]:
        print(f"{args.out} was made with another model, not {stored.meta['model_id']}: recomputed all")
    print(f"Wrote {args.out}, {features.sidecar_path(args.out)}: {len(stored)} x {stored.meta['dim']} float32")
    if skipped:
        skipped.save(args.out.with_name(args.out.stem + "_skipped.tsv"))
        logger.warning(skipped.summary())
    print(f"Done: embedded {counts['embedded']}, reused {counts['reused']}, dropped {counts['dropped']} removed, "
          f"skipped {len(skipped)}.")


if __name__ == "__main__":
    helpers.run(main, __doc__, add_arguments)
