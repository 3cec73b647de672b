"""Step 3 on Ray Data: embed every image of a folder on all local cores, or on a Ray cluster when RAY_ADDRESS is set.

Writes what 3_featurizeImages.py writes, in the same format: proc/<datasetName>/features.npy (float32, N x D) with
features.json beside it (keys relative to the folder in sorted order, model_id, backbone, dim), and the unreadable files
to results/<datasetName>/skipped_images.tsv. The model is the refined proc/<datasetName>/model.pt, or with
rf_maxEpochs=0 the pretrained rf_backbone, unless --model names another; batches are run_mbSize images.

    python A5_featurizeWithRay.py                                   # data/<datasetName>/ on a local Ray instance
    RAY_ADDRESS=ray://head:10001 python A5_featurizeWithRay.py --dir /shared/images --out /shared/features.npy

On a cluster, every node needs this package installed and the images (and a checkpoint) at the same paths.
Needs the optional dependency: pip install .[scale]
"""
import logging
from pathlib import Path

import helpers

logger = logging.getLogger("A5_featurizeWithRay")


def add_arguments(parser):
    parser.add_argument("--dir", type=Path, help="folder of images (default: data/<datasetName>/)")
    parser.add_argument("--out", type=Path, help="output .npy (default: proc/<datasetName>/features.npy)")
    parser.add_argument("--model", help="backbone name or refined checkpoint path (default: see above)")
    parser.add_argument("--actors", type=int, help="model actors (default: the cluster's CPUs / --cpus-per-actor)")
    parser.add_argument("--cpus-per-actor", type=int, default=1, help="CPUs (torch threads) per actor (default 1)")


def main(args, P):
    from image_similarity.models import backbones
    from image_similarity.data import features, images
    try:
        from image_similarity.apps import scaleout
    except ImportError as err:
        raise helpers.UsageError(f"Ray is not installed ({err}): pip install .[scale]") from None
    root, out = args.dir or P.imgDir, args.out or P.featuresPath
    model = args.model or helpers.featurizing_model(P)
    skipped = images.SkippedImages()
    paths = images.list_images(root, skipped=skipped) if root.is_dir() else []
    if not paths:
        raise helpers.UsageError(f"no images in {root}: put them in {root}/<label>/ or run 0_downloadImages.py")
    where = scaleout.init_ray()
    print(f"Featurizing {len(paths)} images under {root} with {backbones.model_id(model)} on Ray ({where}), "
          f"batches of {P.run_mbSize} ...")
    keys, matrix, info = scaleout.featurize_ray(paths, root, model, P.run_mbSize, args.actors, args.cpus_per_actor,
                                                skipped, helpers.inference_config(P))
    # A refined checkpoint may project its embedding (rf_embeddingDim); the pretrained network has the registry's dim.
    expected = backbones.get_backbone(info["backbone"]).embedding_dim if model == info["backbone"] else info["dim"]
    if matrix.shape[1] != expected:
        raise ValueError(f"{out}: features have {matrix.shape[1]} dims but {info['backbone']} gives {expected}")
    features.save_features(out, keys, matrix, {"model_id": info["model_id"], "backbone": info["backbone"]})
    skipped.save(P.skippedImagesPath)
    print(f"Featurized {len(keys)} of {len(paths)} images on {info['n_actors']} actor(s): {matrix.shape[0]} x "
          f"{matrix.shape[1]} float32")
    print(f"Wrote {out}, {features.sidecar_path(out)}, {P.skippedImagesPath}")
    if skipped:
        logger.warning(skipped.summary())
    print(f"Done: {len(keys)} feature vectors from {info['model_id']} on Ray ({where}), "
          f"{len(skipped)} image(s) skipped.")


if __name__ == "__main__":
    helpers.run(main, __doc__, add_arguments)
