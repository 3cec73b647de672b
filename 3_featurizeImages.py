"""Step 3: embed every image of data/<datasetName>/ with the refined DNN (or the pretrained backbone).

Uses proc/<datasetName>/model.pt from 2_refineDNN.py, or, with rf_maxEpochs=0, the pretrained rf_backbone. Writes the
float32 (N, D) matrix to proc/<datasetName>/features.npy with features.json beside it (keys, model_id, backbone,
dim; written last, so an interrupted run is never taken for a finished one), and the unreadable files to
results/<datasetName>/skipped_images.tsv. The same model on the same images gives bit-identical features.
"""
import logging

import helpers

logger = logging.getLogger("3_featurizeImages")


def main(args, P):
    from image_similarity.models import backbones
    from image_similarity.data import features, images
    helpers.require_int_at_least(P, "run_mbSize", 1)
    helpers.require_int_at_least(P, "run_nrWorkers", 0)
    model = helpers.featurizing_model(P)
    if P.rf_maxEpochs == 0 and P.modelPath.exists():
        print(f"rf_maxEpochs = 0: using the pretrained {P.rf_backbone}, not {P.modelPath}")
    elif P.rf_maxEpochs > 0 and model == P.rf_backbone:
        print(f"Step 2 found that the pretrained {P.rf_backbone} ranks validation better than {P.modelPath}: using it "
              "(rf_fallbackToPretrained=False to use the refined one)")
    skipped = images.SkippedImages()
    paths = helpers.dataset_images(P, skipped)
    embedder = helpers.load_network(P, model)
    print(f"Featurizing {len(paths)} images under {P.imgDir} with {embedder.model_id} ({embedder.backbone}, "
          f"{embedder.input_resolution} px, dim {embedder.dim}) on {embedder.runs_on}, batches of {P.run_mbSize}, "
          f"{P.run_nrWorkers} workers ...")
    feats = features.featurize_to_file(paths, P.imgDir, embedder, P.featuresPath, P.run_mbSize, P.run_nrWorkers,
                                       skipped)
    # A refined checkpoint may project its embedding (rf_embeddingDim); the pretrained network has the registry's dim.
    expected = embedder.dim if embedder.checkpoint else backbones.get_backbone(embedder.backbone).embedding_dim
    if feats.matrix.shape[1] != expected:
        raise ValueError(f"{P.featuresPath}: features have {feats.matrix.shape[1]} dims but {embedder.backbone} "
                         f"gives {expected}")
    skipped.save(P.skippedImagesPath)
    print(f"Featurized {len(feats)} of {len(paths)} images: {feats.matrix.shape[0]} x {feats.matrix.shape[1]} float32")
    print(f"Wrote {P.featuresPath}, {features.sidecar_path(P.featuresPath)}, {P.skippedImagesPath}")
    if skipped:
        logger.warning(skipped.summary())
    print(f"Done: {len(feats)} feature vectors from {embedder.model_id}, {len(skipped)} image(s) skipped.")


if __name__ == "__main__":
    helpers.run(main, __doc__)
