"""Plumbing shared by the numbered scripts: arguments, PARAMETERS.py overrides, logging and clean exits.

Nothing here computes anything; the work lives in the ``image_similarity`` package.
"""
import argparse
import ast
import difflib
import logging
import sys
import types
from contextlib import contextmanager
from pathlib import Path

PARAMETERS_FILE = Path(__file__).resolve().parent / "PARAMETERS.py"
DERIVED_MARKER = "# Derived paths"
# image_similarity.models.refine_config.RefineConfig's fields and the PARAMETERS.py knobs that set them.
REFINE_KNOBS = {"backbone": "rf_backbone", "input_resolution": "rf_inputResolution", "dropout": "rf_dropoutRate",
                "batch_size": "rf_mbSize", "max_epochs": "rf_maxEpochs", "lr_per_epoch": "rf_lrPerMb",
                "momentum": "rf_momentumPerMb", "weight_decay": "rf_l2RegWeight",
                "freeze_backbone": "rf_boFreezeWeights", "balance": "rf_boBalanceTrainingSet", "max_train_images": "rf_maxTrainImages",
                "n_workers": "rf_nrWorkers", "lr_schedule": "rf_lrSchedule", "backbone_lr_factor": "rf_backboneLrFactor",
                "head": "rf_head", "temperature": "rf_normSoftmaxTemperature", "embedding_dim": "rf_embeddingDim",
                "crop_scale": "rf_randomResizedCropScale", "cpu_bf16": "rf_cpuBf16",
                "activation_checkpointing": "rf_activationCheckpointing", "seed": "randomSeed"}


class UsageError(Exception):
    """A problem the user can fix (bad argument, missing input): printed as one line, exit status 2."""


def parse_override(text):
    """Split ``NAME=VALUE`` and read VALUE as a Python literal, else as a plain string."""
    name, sep, raw = text.partition("=")
    if not sep or not name.strip():
        raise UsageError(f"--set expects NAME=VALUE, got {text!r}")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    return name.strip(), value


def _check_type(name, default, value):
    """Refuse a value whose type cannot stand in for the default's (None and numbers are lenient, and an "auto"
    knob also takes a number, e.g. rf_inputResolution=320)."""
    if default is None or value is None:
        return value
    if default == "auto" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    if isinstance(default, bool) or isinstance(value, bool):
        ok = isinstance(default, bool) and isinstance(value, bool)
    elif isinstance(default, (int, float)):
        ok = isinstance(value, (int, float))
        value = float(value) if ok and isinstance(default, float) else value
    else:
        ok = isinstance(value, type(default)) or (isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)))
    if not ok:
        raise UsageError(f"--set {name}={value!r}: expected {type(default).__name__} like the default {default!r}, "
                         f"got {type(value).__name__}")
    return value


def load_parameters(overrides=(), path=PARAMETERS_FILE):
    """Execute PARAMETERS.py with ``--set`` overrides applied before its derived paths are built.

    Parameters
    ----------
    overrides : iterable of str
        ``NAME=VALUE`` strings.

    Returns
    -------
    module
        A module object named ``PARAMETERS`` (also registered in ``sys.modules``).
    """
    source = Path(path).read_text(encoding="utf-8")
    cut = source.find(DERIVED_MARKER)
    knobs_src, derived_src = (source, "") if cut < 0 else (source[:cut], source[cut:])
    module = types.ModuleType("PARAMETERS")
    module.__file__ = str(path)
    exec(compile(knobs_src, str(path), "exec"), module.__dict__)
    knobs = {k: v for k, v in module.__dict__.items() if not k.startswith("_")}
    for text in overrides:
        name, value = parse_override(text)
        if name not in knobs:
            close = difflib.get_close_matches(name, knobs, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise UsageError(f"--set {name}: no such parameter in PARAMETERS.py{hint}")
        setattr(module, name, _check_type(name, knobs[name], value))
    padding = "\n" * knobs_src.count("\n")  # keep line numbers right in tracebacks
    exec(compile(padding + derived_src, str(path), "exec"), module.__dict__)
    sys.modules["PARAMETERS"] = module
    return module


def make_parser(doc):
    """An ArgumentParser whose help is the script's docstring, with the shared ``--set`` option."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="NAME=VALUE",
                        help="override a PARAMETERS.py value for this run (repeatable); VALUE is a Python literal "
                             "or a plain string")
    return parser


def setup_logging(verbose=False):
    """Scripts, not the library, attach handlers: warnings and errors go to stderr, one line each."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s: %(message)s",
                        stream=sys.stderr)
    # FAISS reports at INFO which CPU build it loaded, and the library now loads after this: keep that quiet.
    logging.getLogger("faiss").setLevel(logging.WARNING)


def dataset_images(P, skipped):
    """The image files of ``P.imgDir``, limited to ``P.includeLabels``; a UsageError when there are none."""
    from image_similarity.data.images import list_images

    paths = list_images(P.imgDir, skipped=skipped) if P.imgDir.is_dir() else []
    if not paths:
        raise UsageError(f"no images in {P.imgDir}: put them in {P.imgDir}/<label>/ or run 0_downloadImages.py")
    if P.includeLabels is None:
        return paths
    include = {P.includeLabels} if isinstance(P.includeLabels, str) else set(P.includeLabels)
    found = {path.relative_to(P.imgDir).parts[0] for path in paths}
    if include - found:
        raise UsageError(f"includeLabels {sorted(include - found)} not found in {P.imgDir} "
                         f"(its labels: {', '.join(sorted(found))})")
    return [path for path in paths if path.relative_to(P.imgDir).parts[0] in include]


def require(path, step):
    """Raise a one-line UsageError when an earlier step's output is missing (or only an older version's pickle)."""
    from image_similarity.pipeline.layout import missing_message

    if not Path(path).exists():
        raise UsageError(missing_message(path, step))
    return path


def require_choice(P, name, choices):
    """Raise a one-line UsageError, before any work, when knob ``name`` is not one of ``choices``."""
    value = getattr(P, name)
    if value not in choices:
        raise UsageError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def require_int_at_least(P, name, low):
    """Raise a one-line UsageError, before any work, unless knob ``name`` is an integer >= ``low``."""
    value = getattr(P, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise UsageError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def split_settings(P):
    """Step 1's split and ranking-set knobs as the keyword arguments of ``splits.splits_and_ranking_sets``."""
    from image_similarity.data.fileio import read_tsv
    from image_similarity.data.splits import SPLITS

    if P.splitFilePath is not None and not P.splitFilePath.is_file():
        raise UsageError(f"splitFile {P.splitFilePath} not found (set splitFile=None for a random split)")
    return {"ratio_train": P.ratioTrainTest, "ratio_val": P.ratioValFromTrain,
            "max_queries": {split: getattr(P, f"{split}_maxQueryImgsPerSubdir") for split in SPLITS},
            "max_negatives": {split: getattr(P, f"{split}_maxNegImgsPerQueryImg") for split in SPLITS},
            "split_by": P.imagesSplitBy, "seed": P.randomSeed,
            "split_file_rows": read_tsv(P.splitFilePath) if P.splitFilePath is not None else None}


def group_file_rows(P):
    """The groupsFile's rows (relative/path, group id), or None when ``groupsFile`` is off."""
    from image_similarity.data.fileio import read_tsv

    if P.groupsFilePath is None:
        return None
    if not P.groupsFilePath.is_file():
        raise UsageError(f"groupsFile {P.groupsFilePath} not found (set groupsFile='' to turn groups off)")
    return read_tsv(P.groupsFilePath)


def image_groups(P):
    """``{key: group id}`` from the groupsFile (``splits.parse_groups_file``), or None when it is off."""
    from image_similarity.data.splits import parse_groups_file

    rows = group_file_rows(P)
    try:
        return None if rows is None else parse_groups_file(rows)
    except ValueError as error:
        raise UsageError(f"{P.groupsFilePath}: {error}") from None


def refine_config(P, **fields):
    """The ``rf_*`` knobs (and ``randomSeed``) as a ``RefineConfig``, ``fields`` in place of theirs (e.g. the
    ``input_resolution`` that ``rf_inputResolution = "auto"`` came to); a bad value is a UsageError naming its knob."""
    from image_similarity.models.refine_config import RefineConfig

    try:
        return RefineConfig(**{**{field: getattr(P, knob) for field, knob in REFINE_KNOBS.items()}, **fields})
    except ValueError as err:
        field = str(err).split(" ", 1)[0]
        raise UsageError(f"{REFINE_KNOBS[field]}: {err}" if field in REFINE_KNOBS else str(err)) from None


def featurizing_model(P, fallback=False):
    """The network to embed with (:func:`image_similarity.pipeline.runs.featurizing_model` on ``P``'s knobs);
    with ``fallback``, the pretrained ``P.rf_backbone`` while step 2 has not run; a missing checkpoint is a
    UsageError naming step 2."""
    from image_similarity.pipeline.runs import featurizing_model as choose

    try:
        return choose(P.layout, P.rf_backbone, P.rf_maxEpochs, P.rf_fallbackToPretrained, before_step2=fallback)
    except FileNotFoundError as err:
        raise UsageError(str(err)) from None


def load_run(P, network=True, attributes=True):
    """The finished run of ``P``'s dataset (:func:`image_similarity.pipeline.runs.load_run` on ``P.layout``)."""
    from image_similarity.pipeline.runs import load_run as load

    return load(P.layout, P.rf_backbone, P.datasetName if attributes else None, P.attributeModels, P.randomSeed,
                network, engine=inference_config(P))


def re_ranked(P, ranker):
    """``ranker`` k-reciprocally re-ranked with the ``eval_reRank*`` knobs, or None when ``eval_reRankK1`` is 0."""
    from image_similarity.search.rankers import KReciprocalRanker

    if not P.eval_reRankK1:
        return None
    if P.eval_reRankK1 < 1 or P.eval_reRankK2 < 1 or not 0 <= P.eval_reRankLambda <= 1:
        raise UsageError(f"eval_reRankK1={P.eval_reRankK1}, eval_reRankK2={P.eval_reRankK2}, eval_reRankLambda="
                         f"{P.eval_reRankLambda}: need k1 >= 0 (0 = off), k2 >= 1 and lambda in [0, 1]")
    return KReciprocalRanker(ranker, P.eval_reRankK1, P.eval_reRankK2, P.eval_reRankLambda)


def inference_config(P):
    """The ``run_*`` knobs as the one ``InferenceConfig`` every forward pass runs on; a bad value is a UsageError."""
    from image_similarity.models.inference import InferenceConfig

    try:
        return InferenceConfig(backend=P.run_backend, precision=P.run_precision)
    except ValueError as err:
        raise UsageError(str(err)) from None


def load_network(P, model):
    """The :class:`image_similarity.models.embedder.Embedder` of ``model`` on ``P``'s :func:`inference_config`."""
    from image_similarity.models.embedder import load_embedder

    return load_embedder(model, inference_config(P))


def load_service(P):
    """The web service of ``P``'s finished run (``svc_*`` knobs applied)."""
    from image_similarity.apps.service import SimilarityService

    return SimilarityService.from_run(load_run(P), P.imgDir, P.svc_maxUploadBytes, P.svc_thumbnailPx,
                                      P.labelIssuesPath, P.svc_maxImagePixels, P.embeddingMapPath)


def require_features(features, keys, path):
    """Raise a one-line UsageError when the stored features lack some of ``keys`` (the splits changed after step 3)."""
    missing = sorted(set(keys) - set(features.keys))
    if missing:
        raise UsageError(f"{path} lacks {len(missing)} image(s) of the splits, e.g. {missing[0]}: "
                         "run 3_featurizeImages.py again")


def training_exclusions(P):
    """The train/val keys that ``P.labelIssuesExcludeFile`` leaves out of training (steps 2 and 4); set() when "".

    Test keys in the file are ignored with a warning; a key that is not in step 1's splits is refused (ValueError
    naming it).
    """
    from image_similarity.data import fileio
    from image_similarity.data.splits import split_keys
    from image_similarity.apps import label_issues

    if P.labelIssuesExcludePath is None:
        return set()
    keys_by_split = {split: split_keys(require(path, "1_prepareData.py")) for split, path in P.layout.split_keys.items()}
    if not P.labelIssuesExcludePath.is_file():
        raise UsageError(f"labelIssuesExcludeFile {P.labelIssuesExcludePath} not found (set labelIssuesExcludeFile='' "
                         "to train on every image)")
    split_of = {key: split for split, keys in keys_by_split.items() for key in keys}
    excluded = label_issues.read_exclude_file(fileio.read_tsv(P.labelIssuesExcludePath), split_of,
                                              str(P.labelIssuesExcludePath))
    print(f"labelIssuesExcludeFile: leaving {len(excluded)} train/val image(s) of {P.labelIssuesExcludePath} "
          "out of training")
    return excluded


@contextmanager
def clean_exit():
    """Turn expected failures into one-line messages and a non-zero exit instead of a traceback."""
    try:
        yield
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except (OSError, ValueError) as err:
        # Full disk, read-only folder, unreadable input: say what and where, not a buried traceback.
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def run(main, doc, add_arguments=None, argv=None):
    """Parse arguments, load PARAMETERS with overrides and call ``main(args, P)`` inside ``clean_exit``.

    Scripts import the library inside ``main`` (and the functions it calls), not at the top, so that ``--help`` and
    a usage error answer at once instead of after loading torch.
    """
    parser = make_parser(doc)
    if add_arguments:
        add_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging()
    with clean_exit():
        params = load_parameters(args.overrides)
        main(args, params)
