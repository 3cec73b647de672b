# Every knob of the pipeline, grouped by the script that reads it.
# Override any of them for one run with:  python <script>.py --set NAME=VALUE [--set NAME=VALUE ...]
# The derived block at the bottom rebuilds every path after the overrides are applied.

datasetName = "fridgeObjects"           # Folder under data/; also names proc/<datasetName>/ and results/<datasetName>/
workDir = None                          # Folder holding data/, proc/ and results/; None = this repository

# Reproducibility (all scripts)
randomSeed = 0                          # Seed for every shuffle, split and sample

# Download (script: 0_downloadImages.py)
dl_urlsFile = None                      # label<TAB>url list; None = resources/<datasetName>Urls.tsv
dl_nrWorkers = 8                        # Concurrent downloads
dl_timeoutSec = 10.0                    # Per-request timeout in seconds
dl_maxRetries = 3                       # Retries on timeouts, connection errors and 5xx (never on 4xx); 0 = no retry
dl_backoffSec = 0.5                     # Retry back-off factor in seconds: waits 0, 2x, 4x ... before retries; 0 = none
dl_maxBytes = 20_000_000                # Largest accepted response body in bytes
dl_maxImagePixels = 40_000_000          # Largest accepted image in pixels (width x height), checked before decoding; 89_478_485 = the reader's own limit
dl_deadlineSec = 120.0                  # Most seconds one URL may take in all (retries and a slow trickle included); 0 = no deadline

# Near-duplicate removal (script: 1_prepareData.py)
dedup_enabled = True                    # Keep one image per group of near-duplicates; False = report only
dedup_method = "dhash"                  # Perceptual hash: 'dhash', 'phash', 'ahash' or 'whash' (image_similarity.apps.dedup)
dedup_hashSize = 16                     # Hash grid side: 16 gives a 256-bit hash
dedup_maxHammingDistance = 10           # Images whose hashes differ in at most this many bits are near-duplicates

# Train, validation and test splits (script: 1_prepareData.py)
imagesSplitBy = "filename"              # 'filename' or 'subdir': with 'subdir', whole sub-folders go to train or test
ratioTrainTest = 0.75                   # Fraction of each label's images used for training (DNN and SVM)
ratioValFromTrain = 0.2                 # Fraction of train carved out for validation (model selection, calibration); 0 = none
splitFile = None                        # TSV of relative/path<TAB>train|test under data/<datasetName>/; None = random split
groupsFile = ""                         # TSV of relative/path<TAB>group id under data/<datasetName>/ (same object): groups stay on one side of the split, step 5 adds instance recall/mAP; "" = off
includeLabels = None                    # Label folders to use, e.g. ["dotted", "striped", "leopard"]; None = all (steps 1 and 3)
train_maxQueryImgsPerSubdir = 100       # Query images per label used to train the SVM
train_maxNegImgsPerQueryImg = 100       # Negative images per training query image
val_maxQueryImgsPerSubdir = 20          # Query images per label used for model selection
val_maxNegImgsPerQueryImg = 100         # Negative images per validation query image
test_maxQueryImgsPerSubdir = 20         # Query images per label used to evaluate
test_maxNegImgsPerQueryImg = 100        # Negative images per test query image

# Label issues (script: A6_findLabelIssues.py; the exclude file: steps 2 and 4)
li_nrFolds = 5                          # Cross-validation folds for the out-of-fold class probabilities
li_nrRepeats = 3                        # k-fold repeats (other fold assignments) whose probabilities are averaged; 1 = one k-fold
li_rankedBy = "self_confidence"         # cleanlab label-quality score that ranks the suspects, or "normalized_margin"
li_nrShown = 24                         # Suspects shown in label_issues.png; 0 = no contact sheet
labelIssuesExcludeFile = ""             # TSV of keys (first column) left out of training in steps 2 and 4, path from the root; "" = none

# DNN refinement (script: 2_refineDNN.py)
rf_backbone = "efficientnet_lite0"      # Backbone registry name (image_similarity.models.backbones.list_backbones())
rf_inputResolution = "auto"             # Refined DNN's input width and height in pixels (resized to 256/224 of it first), e.g. 224 or 320;
                                        # "auto": 320 when the training images' median shorter side has 320 px, else 224 (thumbnails; doc/RESULTS.md)
rf_dropoutRate = 0.5                    # Dropout before the classification head; 0 = none
rf_mbSize = 32                          # Minibatch size (reduce if running out of memory)
rf_maxEpochs = 12                       # Training epochs; 0 = no refinement: pretrained features only
rf_maxTrainImages = None                # Most training images per epoch; None = all
rf_lrPerMb = [0.01]                     # Learning rate per epoch (the last value repeats); the cosine schedule uses the first
rf_lrSchedule = "cosine"                # 'cosine': rf_lrPerMb[0] decays along a half cosine over rf_maxEpochs; 'step' = off (rf_lrPerMb as listed)
rf_backboneLrFactor = 1.0               # The backbone learns at this fraction of the head's learning rate; 1.0 = off
rf_head = "normsoftmax"                 # 'normsoftmax': cosine classifier on L2-normalised embeddings (Zhai & Wu 2018); 'linear' = off (the tutorial's)
rf_normSoftmaxTemperature = 0.05        # Temperature of the normalised softmax: logits = cosine / temperature
rf_embeddingDim = 0                     # Normalised softmax only: project the embedding to this many dims first; 0 = off
rf_randomResizedCropScale = 0.5         # Training crops of this to 100% of the image area (random-resized-crop); None = off (pad and crop)
rf_fallbackToPretrained = True          # Steps 3+ keep the pretrained network when it ranks validation better than the refined one; False = off
rf_momentumPerMb = 0.9                  # SGD momentum
rf_l2RegWeight = 0.0005                 # L2 weight decay
rf_boFreezeWeights = False              # True = train only the head; False = refine the whole network
rf_boBalanceTrainingSet = False         # True = oversample small labels so every label has as many images as the largest
rf_nrWorkers = 2                        # DataLoader worker processes; 0 = load in the main process
rf_activationCheckpointing = True       # Recompute activations in the backward pass: the same weights in about half the memory (bench/refine_memory.py); False = off
rf_cpuBf16 = False                      # True: train under bf16 autocast where the CPU has it natively (bench/refine_speed.py --bf16; validation accuracy unmeasured); False = off

# Featurization and every forward pass (scripts: 3_featurizeImages.py, A1, A2, A4_webService.py, A5)
run_mbSize = 16                         # Images per forward pass (CPU: 8-16 is fastest, 64 overflows the cache; bench/featurize.py)
run_nrWorkers = 2                       # DataLoader worker processes; 0 = load in the main process
run_backend = "auto"                    # Inference engine: 'openvino', 'onnxruntime', or 'auto' (CPU: OpenVINO, else ONNX Runtime; CUDA: PyTorch); 'torch' = off
run_precision = "f32"                   # 'bf16': OpenVINO in bfloat16, only where the CPU has it natively (else f32, with a warning); 'f32' = off

# Weighted L2 distance (script: 4_trainSvm.py)
svm_CValCandidates = [0.001, 0.01, 0.1, 1.0, 10.0]  # SVM slack penalty C: the best on the validation split is kept
svm_boL2Normalize = True                # L2-normalise embeddings before taking squared differences
svm_hardNegMining_nrIterations = 0      # Hard-negative mining iterations; 0 = off
svm_hardNegMining_nrAddPerIter = 5000   # Most hard negatives added per iteration
svm_hardNegMining_maxNrRoundsPerIter = 100000  # Most different-label pairs scored per iteration
svm_probabilityCalibrationNegPosRatio = 5.0    # Platt scaling weighs negatives to total this many times the positives
svm_classProbCValCandidates = [0.1, 1.0, 10.0, 100.0]  # C of the class-probability logistic regression (steps 4, A3 and A6): the best by svm_classProbCCriterion on validation is kept
svm_classProbCCriterion = "log_loss"   # Validation log loss: how well the probabilities fit, which ranking by them needs; "accuracy" = off (the best validation accuracy, ties to the smaller C)
svm_hybridBandCandidates = [0.02, 0.05, 0.1, 0.2, 0.3, 0.5]  # label-agreement band widths of the hybrid ranker (labels in bands first, cosine within a band): among those within svm_hybridMaxTop1Drop and svm_hybridMaxMeanRankRise of classprob_same on validation, the best validation label mAP is kept (ties: the narrowest); [] = no hybrid ranker
svm_hybridMaxTop1Drop = 0.01            # Validation top-1 (fraction) the hybrid may lose against classprob_same
svm_hybridMaxMeanRankRise = 0.1         # Relative rise of the validation mean rank the hybrid may cause against classprob_same; 1e9 = no limit

# Evaluation and retrieval (scripts: 5_evaluate.py, A1_imageRetrieval.py)
eval_topNs = [1, 2, 4, 5, 8, 10, 15, 20, 28, 32]  # Top-N accuracies to report (the SQL variant's list)
eval_boVisualizeResults = True          # Save per-query figures for the best ranker; False = skip
eval_nrVisualizations = 12              # Most per-query figures saved
TOP_K_CANDIDATES = 10                   # Candidates ranked for every query image in ranking_results.csv
eval_reRankK1 = 0                       # k-reciprocal re-ranking (Zhong et al. 2017) of the recommended ranker, k1 reciprocal neighbours (paper: 20); 0 = off
eval_reRankK2 = 6                       # Its query-expansion neighbours; 1 = no expansion
eval_reRankLambda = 0.3                 # Its weight of the original distance, in [0, 1]; 1 = the original order
attributeModels = {}                    # Extra attributes (A1 --attributes, the service): {name: svm/classprob.skops of a run on this network}; {} = none

# Web service (script: A4_webService.py)
svc_maxUploadBytes = 10_000_000         # Largest accepted image upload in bytes (larger: 413)
svc_thumbnailPx = 160                   # Longest side of the thumbnails served by /images/<id>?thumb=1, in pixels
svc_requestTimeoutSec = 60              # A request's headers, and a query's upload, must arrive within this (else closed / 408); 0 = off
svc_maxConnections = 200                # Connections and requests at once; more get 503 at once; 0 = off
svc_maxDecodes = 0                      # Queries decoded and searched at once (each holds one decoded image); 0 = one per core
svc_maxImagePixels = 40_000_000         # Largest accepted upload in pixels (width x height), checked before decoding (larger: 422); 89_478_485 = the reader's own limit

###################
# Embedding map (script: A7_embeddingMap.py; the web page's map view)
map_method = "auto"                     # 'umap' (needs umap-learn), 'tsne', or 'auto' (UMAP when installed, else t-SNE)
map_maxThumbnails = 300                 # Draw thumbnails instead of dots up to this many images; 0 = dots only

# Derived paths (do not modify: they follow datasetName)
###################
from pathlib import Path  # noqa: E402

from image_similarity.pipeline.layout import RunLayout  # noqa: E402

repoDir = Path(__file__).resolve().parent
rootDir = Path(workDir).resolve() if workDir else repoDir
imgDir = rootDir / "data" / datasetName
resourcesDir = repoDir / "resources"
layout = RunLayout(rootDir / "proc" / datasetName, rootDir / "results" / datasetName)  # every artefact of the run
procDir, resultsDir = layout.proc_dir, layout.results_dir

imgUrlsPath = Path(dl_urlsFile) if dl_urlsFile else resourcesDir / f"{datasetName}Urls.tsv"
splitFilePath = imgDir / splitFile if splitFile else None
groupsFilePath = imgDir / groupsFile if groupsFile else None
labelIssuesExcludePath = rootDir / labelIssuesExcludeFile if labelIssuesExcludeFile else None
# The tutorial's names for the layout's paths
imgFilenamesPath, imgInfosPath, pairsCsvPath = layout.split_keys, layout.ranking_sets, layout.pairs_csv
lutLabel2IdPath, lutId2LabelPath = layout.label_to_id, layout.id_to_label
splitCountsPath, nearDuplicatesPath = layout.split_counts, layout.near_duplicates
dedupEncodingsPath = layout.dedup_encodings        # hashes of every readable image (+ .json): for --against
downloadFailuresPath, skippedImagesPath = layout.download_failures, layout.skipped_images
modelPath, refineCheckpointPath = layout.model, layout.refine_checkpoint
refineLogPath, refineCurvesPath = layout.refine_log, layout.refine_curves
featuresPath, sqlDbPath = layout.features, layout.sql_db
svmPath, classifierPath, svmCurvePath = layout.svm, layout.classifier, layout.svm_curve
evaluationJsonPath, evaluationCsvPath = layout.evaluation_json, layout.evaluation_csv
topNPlotPath, rankHistogramPath, rankingResultsPath = layout.top_n_plot, layout.rank_histogram, layout.ranking_results
labelIssuesPath, labelIssuesSheetPath = layout.label_issues, layout.label_issues_sheet
embeddingMapPath, embeddingMapPlotPath = layout.embedding_map, layout.embedding_map_plot
