"""bench/accuracy.py --gather: the seeds of earlier JSONs of one protocol joined into one, refused across protocols."""
import json
import subprocess
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import accuracy  # noqa: E402


def part(seeds, top1s, overrides=("rf_inputResolution=320",), command="bench/accuracy.py DIR", code="abc1234"):
    runs = [{"seed": seed, "best": "cosine", "train_minutes": 1.0, "wall_minutes": 2.0,
             "metrics": {"cosine": {"top1": top1, "top5": 1.0, "mean_rank": 1.5, "map": 0.5}},
             "val_metrics": {"cosine": {"top1": top1}}, "refine_val_ranking": None} for seed, top1 in zip(seeds, top1s)]
    return {"command": command, "code": code, "from_step": 1, "dataset": "x", "labels": "all", "seeds": list(seeds),
            "overrides": list(overrides), "machine": "x86_64, 2 CPUs", "summary": accuracy.summarise(runs),
            "runs": runs}


@pytest.fixture
def results(tmp_path, monkeypatch):
    monkeypatch.setattr(accuracy, "RESULTS", tmp_path)
    return tmp_path


def write(results, name, content):
    (results / f"accuracy_{name}.json").write_text(json.dumps(content))


def test_gather_joins_seeds_with_their_own_commands(results):
    write(results, "later", part([2, 1], [0.6, 0.9], command="bench/accuracy.py DIR --seeds 1,2", code="new5678"))
    write(results, "first", part([0], [0.3], command="bench/accuracy.py DIR --seeds 0"))
    out = accuracy.gather(["first", "later"], "joined")
    joined = json.loads(out.read_text())
    assert out == results / "accuracy_joined.json"
    assert joined["seeds"] == [0, 1, 2] and [run["code"] for run in joined["runs"]] == ["abc1234", "new5678", "new5678"]
    assert [run["command"] for run in joined["runs"]][:2] == ["bench/accuracy.py DIR --seeds 0",
                                                              "bench/accuracy.py DIR --seeds 1,2"]
    assert joined["summary"]["cosine"]["top1"]["mean"] == pytest.approx(0.6)  # (0.3 + 0.9 + 0.6) / 3
    assert joined["summary"]["best_on_val"]["top1"]["std"] == pytest.approx(0.2449, abs=1e-4)
    assert joined["code"] == "abc1234, new5678" and joined["overrides"] == ["rf_inputResolution=320"]
    assert [p["name"] for p in joined["gathered_from"]] == ["first", "later"]


def test_gather_refuses_other_settings_and_repeated_seeds(results):
    write(results, "a", part([0], [0.3]))
    write(results, "b", part([1], [0.5], overrides=()))
    write(results, "c", part([0, 1], [0.5, 0.5]))
    with pytest.raises(SystemExit, match="the parts differ in overrides"):
        accuracy.gather(["a", "b"], "out")
    with pytest.raises(SystemExit, match=r"a seed appears twice among a, c \(seeds \[0, 0, 1\]\)"):
        accuracy.gather(["a", "c"], "out")
    with pytest.raises(SystemExit, match="accuracy_nope.json is missing"):
        accuracy.gather(["a", "nope"], "out")
    assert not (results / "accuracy_out.json").exists()


def test_gather_needs_a_name():
    done = subprocess.run([sys.executable, str(REPO / "bench" / "accuracy.py"), "--gather", "a"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "--gather needs --name" in done.stderr


def test_code_version_is_dirty_for_code_not_for_results(tmp_path, monkeypatch):
    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)
    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "step.py").write_text("print(1)\n")
    (tmp_path / "bench" / "results" / "accuracy_x.json").write_text("{}")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first")
    monkeypatch.setattr(accuracy, "REPO", tmp_path)
    clean = accuracy.code_version()
    assert clean and not clean.endswith("-dirty")
    (tmp_path / "bench" / "results" / "accuracy_x.json").write_text('{"runs": []}')  # an earlier run's result
    (tmp_path / "notes.txt").write_text("untracked")
    assert accuracy.code_version() == clean
    (tmp_path / "step.py").write_text("print(2)\n")
    assert accuracy.code_version() == clean + "-dirty"
    monkeypatch.setattr(accuracy, "REPO", tmp_path / "nowhere")
    assert accuracy.code_version() is None
