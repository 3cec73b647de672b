"""The scripts' plumbing: --set overrides, derived paths, require(), clean exits, and --help of every script."""
import re
import subprocess
import sys

import pytest

import helpers
from conftest import REPO, run_script

SCRIPTS = sorted(p.name for p in REPO.glob("*.py") if re.match(r"^[0-9A]", p.name))


@pytest.mark.parametrize("text, expected", [
    ("ratioTrainTest=0.5", ("ratioTrainTest", 0.5)),
    ("rf_maxEpochs=3", ("rf_maxEpochs", 3)),
    ("rf_lrPerMb=[0.1, 0.01]", ("rf_lrPerMb", [0.1, 0.01])),
    ("splitFile=None", ("splitFile", None)),
    ("dedup_enabled=False", ("dedup_enabled", False)),
    ("datasetName=fashionTexture", ("datasetName", "fashionTexture")),
    ("datasetName='123'", ("datasetName", "123")),
    ("workDir=/tmp/some dir/x=y", ("workDir", "/tmp/some dir/x=y")),
    (" datasetName =abc", ("datasetName", "abc")),
    ("splitFile=", ("splitFile", "")),
])
def test_parse_override_reads_literals_else_strings(text, expected):
    assert helpers.parse_override(text) == expected


@pytest.mark.parametrize("text", ["datasetName", "=3", " =3"])
def test_parse_override_needs_name_and_value(text):
    with pytest.raises(helpers.UsageError, match="--set expects NAME=VALUE"):
        helpers.parse_override(text)


def test_unknown_name_lists_close_matches():
    with pytest.raises(helpers.UsageError, match=r"--set datasetname: no such parameter.*did you mean datasetName"):
        helpers.load_parameters(["datasetname=x"])
    with pytest.raises(helpers.UsageError, match=r"no such parameter in PARAMETERS.py$"):
        helpers.load_parameters(["zzzzzz=1"])
    with pytest.raises(helpers.UsageError, match="no such parameter"):
        helpers.load_parameters(["imgDir=/tmp"])  # derived paths are not knobs


@pytest.mark.parametrize("text, message", [
    ("ratioTrainTest='half'", "expected float like the default 0.75, got str"),
    ("rf_maxEpochs=True", "expected int like the default 12, got bool"),
    ("dedup_enabled=1", "expected bool like the default True, got int"),
    ("datasetName=123", "expected str like the default 'fridgeObjects', got int"),
    ("rf_lrPerMb=0.1", "expected list like the default"),
    ("rf_inputResolution=True", "expected str like the default 'auto', got bool"),
])
def test_wrong_type_is_refused(text, message):
    with pytest.raises(helpers.UsageError, match=re.escape(message)):
        helpers.load_parameters([text])


def test_lenient_types():
    P = helpers.load_parameters(["ratioTrainTest=1", "splitFile=my.tsv", "rf_maxTrainImages=500",
                                 "rf_lrPerMb=(0.1, 0.01)", "eval_topNs=None", "rf_inputResolution=320"])
    assert P.ratioTrainTest == 1.0 and isinstance(P.ratioTrainTest, float)
    assert P.rf_maxTrainImages == 500 and P.rf_lrPerMb == (0.1, 0.01) and P.eval_topNs is None
    assert P.rf_inputResolution == 320  # an "auto" knob takes a number too


def test_derived_paths_follow_dataset_name_and_work_dir(tmp_path):
    default = helpers.load_parameters()
    assert default.rootDir == REPO and default.imgDir == REPO / "data" / default.datasetName
    P = helpers.load_parameters([f"workDir={tmp_path}", "datasetName=shoes", "splitFile=split.tsv"])
    assert P.datasetName == "shoes" and P.rootDir == tmp_path
    assert P.imgDir == tmp_path / "data" / "shoes"
    assert P.procDir == tmp_path / "proc" / "shoes" and P.resultsDir == tmp_path / "results" / "shoes"
    assert P.splitFilePath == tmp_path / "data" / "shoes" / "split.tsv"
    assert P.resourcesDir == REPO / "resources" and P.imgUrlsPath == REPO / "resources" / "shoesUrls.tsv"
    for split in ("train", "val", "test"):
        for paths in (P.imgFilenamesPath, P.imgInfosPath, P.pairsCsvPath):
            assert paths[split].parent == P.procDir and split in paths[split].name.lower()
    assert P.nearDuplicatesPath.parent == P.resultsDir and P.skippedImagesPath.parent == P.resultsDir
    assert default.procDir == REPO / "proc" / default.datasetName  # each load starts from the file again


def test_require(tmp_path):
    present = tmp_path / "here.pickle"
    present.write_bytes(b"")
    assert helpers.require(present, "1_prepareData.py") == present
    missing = tmp_path / "proc" / "features.npy"
    with pytest.raises(helpers.UsageError) as info:
        helpers.require(missing, "3_featurizeImages.py")
    assert str(info.value) == f"{missing} not found: run 3_featurizeImages.py first"


def test_refine_config_names_the_knob_at_fault():
    P = helpers.load_parameters(["rf_mbSize=0", "rf_inputResolution=224"])
    with pytest.raises(helpers.UsageError, match=r"^rf_mbSize: batch_size = 0: must be >= 1$"):
        helpers.refine_config(P)
    with pytest.raises(helpers.UsageError, match=r"^rf_inputResolution: input_resolution = 'auto': must be"):
        helpers.refine_config(helpers.load_parameters())  # step 2 resolves "auto" from the images first
    config = helpers.refine_config(helpers.load_parameters(["rf_lrPerMb=[0.5]"]), input_resolution=320)
    assert config.lr_per_epoch == (0.5,) and config.backbone == "efficientnet_lite0"
    assert config.input_resolution == 320


def test_featurizing_model(tmp_path):
    P = helpers.load_parameters([f"workDir={tmp_path}"])
    with pytest.raises(helpers.UsageError, match="model.pt not found: run 2_refineDNN.py first"):
        helpers.featurizing_model(P)
    assert helpers.featurizing_model(P, fallback=True) == P.rf_backbone
    P.modelPath.parent.mkdir(parents=True)
    P.modelPath.write_bytes(b"")
    assert helpers.featurizing_model(P) == helpers.featurizing_model(P, fallback=True) == P.modelPath
    pretrained = helpers.load_parameters([f"workDir={tmp_path}", "rf_maxEpochs=0"])
    assert helpers.featurizing_model(pretrained) == "efficientnet_lite0"


@pytest.mark.parametrize("error, status", [
    (helpers.UsageError("bad input"), 2), (ValueError("bad value"), 1), (FileNotFoundError("no such file"), 1),
])
def test_run_turns_expected_errors_into_one_line_exits(capsys, error, status):
    def main(args, P):
        raise error

    with pytest.raises(SystemExit) as info:
        helpers.run(main, "doc", argv=[])
    assert info.value.code == status
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {error}"]


def test_run_passes_overrides_and_extra_arguments():
    seen = {}

    def add_arguments(parser):
        parser.add_argument("--top", type=int, default=3)

    def main(args, P):
        seen.update(top=args.top, name=P.datasetName, seed=P.randomSeed)

    helpers.run(main, "doc", add_arguments, argv=["--top", "7", "--set", "datasetName=x", "--set", "randomSeed=5"])
    assert seen == {"top": 7, "name": "x", "seed": 5}
    with pytest.raises(SystemExit) as info:
        helpers.run(main, "doc", argv=["--set", "nope=1"])
    assert info.value.code == 2


def test_scripts_are_found():
    assert "1_prepareData.py" in SCRIPTS


HEAVY_MODULES = ("torch", "torchvision", "timm", "sklearn", "faiss", "matplotlib", "pandas", "openvino", "onnxruntime",
                 "ray", "cleanlab", "fastapi", "sqlalchemy")


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_loads_no_heavy_library(script):
    """--help answers without importing torch and friends, which take seconds to load."""
    probe = (f"import runpy, sys; sys.argv = [{script!r}, '--help']\n"
             f"try:\n    runpy.run_path({script!r}, run_name='__main__')\nexcept SystemExit:\n    pass\n"
             f"print(sorted(m for m in {HEAVY_MODULES!r} if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "[]", f"{script} --help imported {result.stdout.splitlines()[-1]}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_answers_help(script):
    result = run_script(script, "--help", timeout=300)
    assert result.returncode == 0, result.stderr
    assert "--set NAME=VALUE" in result.stdout and result.stdout.startswith("usage:")
