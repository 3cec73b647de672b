"""Nothing the project reads back runs code: crafted files in every artefact are refused, naming the file.

A crafted pickle would create a marker file when unpickled; through every door (the scripts, the service, the SQL
variant, the API's ``load``) the marker never appears and the refusal names the file (or the table row). A source scan
fails when a general unpickler (``pickle.load``, ``torch.load`` without ``weights_only``) comes back.
"""
import ast
import pickle
import shutil

import numpy as np
import pytest
import skops.io

import helpers
from conftest import REPO, make_labelled_images, run_script
from image_similarity.apps import store
from image_similarity.search import ranker_files, rankers

BASE = ["--set", "datasetName=tiny", "--set", "rf_maxEpochs=0", "--set", "dedup_enabled=False",
        "--set", "ratioValFromTrain=0.3", "--set", "run_nrWorkers=0", "--set", "svm_CValCandidates=[1.0]",
        "--set", "svm_classProbCValCandidates=[10.0]", "--set", "eval_boVisualizeResults=False",
        *(arg for split in ("train", "val", "test") for arg in ("--set", f"{split}_maxNegImgsPerQueryImg=10"))]


class Marker:
    """Unpickling (or building) one of these creates the file ``path``: proof that code from a file ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")

    def __setstate__(self, state):
        open(state["path"], "w").close()


def crafted(marker):
    return pickle.dumps(Marker(marker))


def run(work, script, *args):
    return run_script(script, *BASE, "--set", f"workDir={work}", *args)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A workDir taken through steps 1, 3, 4 and 5 on 3 labels x 10 generated images."""
    work = tmp_path_factory.mktemp("run")
    make_labelled_images(work / "data" / "tiny", 10)
    for script in ("1_prepareData.py", "3_featurizeImages.py", "4_trainSvm.py", "5_evaluate.py"):
        result = run(work, script)
        assert result.returncode == 0, f"{script}: {result.stderr[-2000:]}"
    return work


@pytest.fixture
def work(finished, tmp_path):
    """A copy of the finished run to tamper with, and the marker path a crafted file would create."""
    copy = tmp_path / "work"
    shutil.copytree(finished, copy, symlinks=True)
    return copy, tmp_path / "MARKER"


# (door, extra arguments, crafted artefact under proc/tiny/)
DOORS = [("5_evaluate.py", (), "imgInfosTest.json"), ("5_evaluate.py", (), "imgFilenamesTest.json"),
         ("5_evaluate.py", (), "svm.skops"), ("5_evaluate.py", (), "classprob.skops"),
         ("4_trainSvm.py", (), "imgInfosTrain.json"), ("4_trainSvm.py", (), "imgFilenamesVal.json"),
         ("2_refineDNN.py", ("--set", "rf_maxEpochs=1"), "lutLabel2Id.json"),
         ("3_featurizeImages.py", ("--set", "rf_maxEpochs=1"), "model.pt"),
         ("A1_imageRetrieval.py", ("--references", "test"), "imgFilenamesTest.json"),
         ("A1_imageRetrieval.py", (), "classprob.skops"), ("A1_imageRetrieval.py", (), "run.json"),
         ("A6_findLabelIssues.py", (), "imgFilenamesTrain.json")]


@pytest.mark.parametrize("script, args, artefact", DOORS)
def test_crafted_artefact_is_refused_and_runs_nothing(work, script, args, artefact):
    work, marker = work
    target = work / "proc" / "tiny" / artefact
    target.write_bytes(crafted(marker))
    query = [str(work / "data" / "tiny" / "red" / "red_0.jpg")] if script.startswith("A1") else []
    result = run(work, script, *query, *args)
    assert not marker.exists(), f"{script} ran code from {target}"
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    assert str(target) in result.stderr, result.stderr
    if artefact != "model.pt":  # torch's refusal of a checkpoint spans several lines (checkpoints.load_checkpoint)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a6_leaves_a_crafted_classifier_aside(work):
    """A6 only borrows step 4's C: a crafted classprob.skops is named in a warning, and A6 chooses C itself."""
    work, marker = work
    target = work / "proc" / "tiny" / "classprob.skops"
    target.write_bytes(crafted(marker))
    result = run(work, "A6_findLabelIssues.py")
    assert not marker.exists() and result.returncode == 0, result.stderr
    assert str(target) in result.stderr and "choosing C here instead" in result.stderr


def test_skops_payload_with_a_foreign_type_is_refused(work):
    """A real skops file, but holding a type outside the rankers' allow-list: refused before anything is built."""
    work, marker = work
    target = work / "proc" / "tiny" / "svm.skops"
    payload = ranker_files.load_payload(target, None)
    target.write_bytes(skops.io.dumps({**payload, "calibrated": Marker(marker)}))
    result = run(work, "5_evaluate.py")
    assert not marker.exists() and result.returncode == 1
    assert f"{target} refused" in result.stderr and "Marker" in result.stderr, result.stderr


def test_a_received_attribute_model_is_refused(work):
    work, marker = work
    received = work / "received" / "svm.skops"
    received.parent.mkdir()
    shutil.copy(work / "proc" / "tiny" / "features.json", received.parent / "features.json")
    received.write_bytes(crafted(marker))
    result = run(work, "A1_imageRetrieval.py", str(work / "data" / "tiny" / "red" / "red_0.jpg"),
                 "--set", f"attributeModels={{'received': '{received}'}}")
    assert not marker.exists() and result.returncode == 1
    assert str(received) in result.stderr and "older version" in result.stderr, result.stderr


def test_the_service_refuses_a_crafted_payload(work):
    work, marker = work
    target = work / "proc" / "tiny" / "classprob.skops"
    target.write_bytes(crafted(marker))
    P = helpers.load_parameters([*BASE[1::2], f"workDir={work}"])
    with pytest.raises(ValueError, match=str(target)):
        helpers.load_service(P)
    assert not marker.exists()


def test_an_older_versions_pickles_name_the_step_to_rerun(work):
    """Files of an older version (.pickle beside the new names) are never read: the message says what to re-run."""
    work, marker = work
    proc = work / "proc" / "tiny"
    (proc / "svm.skops").rename(proc / "svm.pickle")
    result = run(work, "5_evaluate.py")
    assert result.returncode == 2 and not marker.exists()
    assert f"{proc / 'svm.pickle'} is a pickle from an older version" in result.stderr
    assert "run 4_trainSvm.py again" in result.stderr
    (proc / "svm.pickle").rename(proc / "svm.skops")
    (proc / "imgInfosTest.json").write_bytes(pickle.dumps([{"query": "red/red_0.jpg"}]))
    result = run(work, "5_evaluate.py")
    assert "imgInfosTest.json is a pickle, from an older version" in result.stderr
    assert "run 1_prepareData.py again" in result.stderr


def test_the_sql_model_row_is_refused(work):
    """A pickle written into the ``model`` table does not run on ``--steps 4``; the row is named."""
    work, marker = work
    assert run(work, "A3_sqlPipeline.py", "--steps", "1", "2", "3").returncode == 0
    engine = store.connect(f"sqlite:///{work / 'proc' / 'tiny' / 'image_similarity.sqlite'}")
    with engine.begin() as conn:
        conn.execute(store.model_table.update().values(payload=crafted(marker)))
    engine.dispose()
    result = run(work, "A3_sqlPipeline.py", "--steps", "4")
    assert not marker.exists() and result.returncode == 1
    assert "table model, row name=" in result.stderr and "older version" in result.stderr, result.stderr


def test_a_saved_api_model_with_crafted_files_runs_nothing(tmp_path):
    """``image_similarity.load``: a crafted features.npy (object array) or checkpoint is refused, naming it."""
    import image_similarity
    from image_similarity.models import checkpoints

    marker = tmp_path / "MARKER"
    images = make_labelled_images(tmp_path / "images", 2)
    folder = image_similarity.create(images, label="folder", n_workers=0).save(tmp_path / "saved")
    original = (folder / "features.npy").read_bytes()
    np.save(folder / "features.npy", np.array([Marker(marker)], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="features.npy|allow_pickle"):
        image_similarity.load(folder)
    (folder / "features.npy").write_bytes(original)
    checkpoint = folder / "model.pt"
    import torch
    torch.save({"state": Marker(marker)}, checkpoint)
    with pytest.raises(ValueError, match=str(checkpoint)):
        checkpoints.checkpoint_meta(checkpoint)
    assert not marker.exists()


GENERAL_UNPICKLERS = ("pickle.load(", "pickle.loads(", "load_pickle(", "pickle.Unpickler(", "dill.load", "joblib.load(")


def test_no_general_unpickler_in_the_source():
    """Every Python file of the library, the scripts, helpers.py and bench/: no general unpickler, and torch.load
    only with weights_only=True."""
    files = [*(REPO / "image_similarity").rglob("*.py"), *REPO.glob("*.py"), *(REPO / "bench").glob("*.py")]
    offenders = []
    for path in files:
        source = path.read_text(encoding="utf-8")
        offenders += [f"{path.name}: {name}" for name in GENERAL_UNPICKLERS if name in source]
        for node in ast.walk(ast.parse(source, str(path))):
            if isinstance(node, ast.Call) and ast.unparse(node.func).endswith("torch.load"):
                weights_only = [k for k in node.keywords if k.arg == "weights_only"]
                if not weights_only or not (isinstance(weights_only[0].value, ast.Constant)
                                            and weights_only[0].value.value is True):
                    offenders.append(f"{path.name}:{node.lineno}: torch.load without weights_only=True")
            if isinstance(node, ast.Call) and ast.unparse(node.func).endswith("np.load"):
                if any(k.arg == "allow_pickle" and not (isinstance(k.value, ast.Constant) and k.value.value is False)
                       for k in node.keywords):
                    offenders.append(f"{path.name}:{node.lineno}: np.load with allow_pickle")
    assert len(files) > 40 and not offenders, offenders
