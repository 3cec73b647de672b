"""Step 2: refine the pretrained backbone as an image classifier on the training split.

Reads the split lists, validation ranking sets and label table written by 1_prepareData.py. Trains backbone +
dropout + head (rf_head: linear or normalised softmax) with SGD for rf_maxEpochs epochs (rf_lrPerMb and
rf_lrSchedule give the learning rate), evaluates on the validation split after every epoch and keeps the best epoch
by validation accuracy (the test split is never used). Then it ranks the validation ranking sets by cosine distance
with the refined and with the pretrained embedding: when the pretrained one ranks better, it says so, and steps 3+
keep the pretrained network (rf_fallbackToPretrained=False uses the refined one anyway). Writes the best model, with
that comparison, to proc/<datasetName>/model.pt, refine_log.csv and refine_curves.png to results/<datasetName>/,
and a resume checkpoint after every epoch: run again with --resume to continue an interrupted run (or to add
epochs). rf_maxEpochs=0 skips refinement: step 3 then uses the pretrained backbone's features. Images listed in
labelIssuesExcludeFile (train/val keys, e.g. from A6_findLabelIssues.py) are left out of training and validation.
"""
import os

# Set before torch loads OpenMP: idle threads sleep instead of spinning, which on a CPU shared with other processes
# made every training step up to 10x slower. An OMP_WAIT_POLICY already in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import helpers  # noqa: E402


def add_arguments(parser):
    parser.add_argument("--resume", action="store_true",
                        help="continue from the resume checkpoint (proc/<datasetName>/refine_checkpoint.pt)")


def main(args, P):
    from image_similarity.models import refine, refine_compare, refine_config
    from image_similarity.models.inference import default_device, set_thread_count
    from image_similarity.pipeline import steps
    if P.rf_maxEpochs == 0:
        print("rf_maxEpochs = 0: no refinement, nothing written; step 3 will use the pretrained "
              f"{P.rf_backbone} features.")
        return
    for path in (P.imgFilenamesPath["train"], P.imgFilenamesPath["val"], P.imgInfosPath["val"], P.lutLabel2IdPath):
        helpers.require(path, "1_prepareData.py")
    excluded = helpers.training_exclusions(P)
    classes, items = steps.refine_items(P.layout, excluded)
    chosen = {}
    if P.rf_inputResolution == "auto":
        chosen["input_resolution"], median = refine_config.auto_input_resolution_of(
            P.imgDir, [key for key, _ in items["train"]])
        print(f"rf_inputResolution = 'auto': {chosen['input_resolution']} px, for training images whose median "
              f"shorter side is {median:.0f} px." if median else
              f"rf_inputResolution = 'auto': {chosen['input_resolution']} px (no training image size could be read).")
    config = helpers.refine_config(P, **chosen)
    device = default_device()
    n_threads = set_thread_count()
    print(f"Refining {config.backbone} at {config.input_resolution} px on {len(items['train'])} train / "
          f"{len(items['val'])} val images, {len(classes)} labels, {config.max_epochs} epochs; device: {device}"
          + (f" ({n_threads} threads)" if device.type == "cpu" else ""))
    if P.refineCheckpointPath.exists() and not args.resume:
        print(f"Ignoring the existing checkpoint {P.refineCheckpointPath} (pass --resume to continue it): "
              "it will be overwritten.")
    elif args.resume and not P.refineCheckpointPath.exists():
        print(f"--resume: no checkpoint at {P.refineCheckpointPath}, starting from epoch 1.")

    skipped = steps.earlier_skipped(P.skippedImagesPath)  # keep what earlier steps recorded
    n_skipped_before = len(skipped)
    result = refine.fine_tune(config, items["train"], items["val"], P.imgDir, classes, device,
                              checkpoint_path=P.refineCheckpointPath, resume=args.resume, skipped=skipped)
    if result.resumed_after_epoch:
        print(f"Resumed after epoch {result.resumed_after_epoch} from {P.refineCheckpointPath}.")

    val_sets = steps.load_prepared(P.layout, ["val"], excluded)[0]["val"]
    comparison = refine_compare.compare_on_validation(result.model, config.backbone, config.data_config, P.imgDir,
                                                      val_sets, device, config.batch_size, config.n_workers, skipped)
    worse = refine_compare.pretrained_ranks_better(comparison)
    print(f"Validation ranking by cosine distance ({comparison['refined']['n_sets']} ranking sets): " + ", ".join(
        f"{name} top-1 {100 * m['top1']:.1f}% mean rank {m['mean_rank']:.2f}" for name, m in comparison.items()))
    if worse:
        print("The refined network ranks validation WORSE than the pretrained one: "
              + (f"steps 3+ will use the pretrained {config.backbone} (rf_fallbackToPretrained=False to use the "
                 "refined one)." if P.rf_fallbackToPretrained else
                 "rf_fallbackToPretrained = False, so steps 3+ use the refined one anyway."))
    steps.save_refined(P.layout, result, config, classes, comparison, worse)
    print(f"Wrote {P.modelPath}, {P.refineCheckpointPath}, {P.refineLogPath}, {P.refineCurvesPath}")
    if len(skipped) > n_skipped_before:
        skipped.save(P.skippedImagesPath)
        print(f"{len(skipped) - n_skipped_before} unreadable image(s) skipped, listed in {P.skippedImagesPath}")
    kept = "pretrained" if worse and P.rf_fallbackToPretrained else "refined"
    print(f"Done: best epoch {result.best_epoch} of {len(result.log_rows)}, val accuracy "
          f"{100 * result.best_val_accuracy:.1f}%, {result.seconds / 60:.1f} min; steps 3+ use the {kept} network.")


if __name__ == "__main__":
    helpers.run(main, __doc__, add_arguments)
