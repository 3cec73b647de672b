"""Variant A3: the pipeline of Microsoft's "Image Similarity with SQL Server Machine Learning Services", on a database.

Each step reads its inputs from tables and writes its outputs to tables in one transaction (a re-run replaces them):
  1  ImageStore, features: every image of data/<datasetName>/ and its float32 embedding as a blob, made by the
     refined proc/<datasetName>/model.pt when it exists (and rf_maxEpochs > 0), else by the pretrained rf_backbone
  2  training_images, evaluation_images (validation), testing_images, query_images (ranking sets), as 1_prepareData.py
  3  model: the class-probability classifier of 4_trainSvm.py (its skops bytes), with the hybrid ranker's band
  4  scores: every image's class probabilities (one row per image and class)
  5  evaluation_results: top-N accuracies, mean/median rank, MRR under the hybrid ranker (labels first, looks
     within) and L2, cosine and 1 - P(same label) between score vectors
  6  ranking_results: the TOP_K_CANDIDATES closest images to every test query image, for each ranker (hybrid first,
     the recommended one)
--db takes an SQLAlchemy URL (postgresql://user@host:port/database ...);
default: proc/<datasetName>/image_similarity.sqlite.
"""
import helpers


def add_arguments(parser):
    parser.add_argument("--db", help="SQLAlchemy database URL (default: sqlite:///<procDir>/image_similarity.sqlite)")
    parser.add_argument("--steps", type=int, nargs="+", choices=range(1, 7), default=list(range(1, 7)), metavar="N",
                        help="steps to run, in this order (default: 1 2 3 4 5 6)")
    parser.add_argument("--rankers", nargs="+", metavar="NAME",
                        help="step 6 ranks with these rankers of 5_evaluate.py's table instead (e.g. cosine hybrid)")


def featurize(P, engine):
    from image_similarity.data import images
    from image_similarity.apps import store
    from image_similarity.pipeline.steps import labelled_images
    model = helpers.featurizing_model(P, fallback=True)
    skipped = images.SkippedImages()
    labelled = labelled_images(P.imgDir, skipped)
    if not labelled:
        raise helpers.UsageError(f"no images in {P.imgDir}/<label>/: put them there or run 0_downloadImages.py")
    embedder = helpers.load_network(P, model)
    which = f"the refined {model}" if embedder.checkpoint else f"the pretrained {model} (no refined network)"
    print(f"Step 1: featurizing {len(labelled)} images under {P.imgDir} with {which}, {embedder.model_id} ...")
    keys, matrix = embedder.embed_files(labelled, P.imgDir, P.run_mbSize, P.run_nrWorkers, skipped)
    if not keys:
        raise helpers.UsageError(f"no readable image under {P.imgDir} ({skipped.summary()})")
    store.write_image_store(engine, [images.image_key(p, P.imgDir) for p in labelled], keys, matrix,
                            embedder.model_id)
    skipped.save(P.skippedImagesPath)
    print(f"        {len(labelled)} rows in ImageStore, {len(keys)} x {matrix.shape[1]} float32 vectors in features; "
          f"{len(skipped)} file(s) skipped ({P.skippedImagesPath})")


def main(args, P):
    from image_similarity.apps import store
    from image_similarity.pipeline import steps, training
    helpers.require_choice(P, "svm_classProbCCriterion", training.C_CRITERIA)
    P.procDir.mkdir(parents=True, exist_ok=True)
    try:
        engine = store.connect(args.db or f"sqlite:///{P.sqlDbPath}")
    except ValueError as err:
        raise helpers.UsageError(str(err)) from None
    where = store.describe_url(engine.url)
    print(f"Database: {where}")
    for step in args.steps:
        if step == 1:
            featurize(P, engine)
        elif step == 2:
            splits, sets = store.write_splits(engine, **helpers.split_settings(P))
            print("Step 2: " + ", ".join(f"{s} {sum(map(len, splits[s].values()))} images / {len(sets[s])} ranking sets"
                                         for s in splits) + " -> training/evaluation/testing_images, query_images")
        elif step == 3:
            payload = store.train_classifier(engine, P.svm_classProbCValCandidates, P.randomSeed,
                                             P.svm_hybridBandCandidates, P.svm_hybridMaxTop1Drop,
                                             P.svm_hybridMaxMeanRankRise, P.svm_classProbCCriterion)
            band = payload["hybrid_band"]
            print(f"Step 3: class-probability classifier, C = {payload['ranker'].C:g} of {list(payload['C_table'])} "
                  f"by validation {P.svm_classProbCCriterion.replace('_', ' ')}, "
                  + ", ".join(f"{s} accuracy {100 * a:.1f}%" for s, a in payload["accuracy"].items())
                  + (f"; hybrid band {band:g} of {P.svm_hybridBandCandidates}" if band is not None else "")
                  + " -> model")
        elif step == 4:
            scores = store.write_scores(engine)
            print(f"Step 4: {len(scores)} images x {len(scores.meta['classes'])} class probabilities -> scores")
        elif step == 5:
            store.evaluate_scores(engine, P.eval_topNs)
            print("Step 5: ranking evaluation -> evaluation_results\n" + steps.sql_evaluation_table(
                engine, P.eval_topNs).to_string(float_format=lambda v: f"{v:.3f}"))
        else:
            found = store.rank_candidates(engine, P.TOP_K_CANDIDATES, args.rankers)
            print(f"Step 6: top {P.TOP_K_CANDIDATES} candidates of {len(next(iter(found.values())))} test query "
                  f"images for {', '.join(found)} -> ranking_results")
    counts = store.count_rows(engine)
    engine.dispose()
    print(f"Done: steps {' '.join(map(str, args.steps))} on {where}; rows: "
          + ", ".join(f"{name} {n}" for name, n in counts.items()) + ".")


if __name__ == "__main__":
    helpers.run(main, __doc__, add_arguments)
