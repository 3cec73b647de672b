"""The README's shell commands stay true: every command of its ```bash blocks runs, in README order.

A command whose comment carries a tag (``[needs ../shared]``, ``[needs a server]``, ``[needs a cluster]``,
``[runs until stopped]``) is reported as skipped with that reason. The others run with bash, one after the other, in
a scratch copy of the repository (its git files plus a link to the real .venv), so they never touch the developer's
proc/ or results/. Command 1, the main job (the default pipeline on the bundled sample), must also keep the ranking
accuracy it was measured to have. The fast tests check that every command parses and names existing scripts, that
its tags are known, and that the figures and console excerpts match doc/figures and doc/console (excerpts up to
timings).
"""
import csv
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import REPO

README = (REPO / "README.md").read_text(encoding="utf-8")
MEASURED = REPO / "bench" / "results" / "accuracy_fridgeObjects.json"
# 5 of the 35 test queries: another CPU's float order changes the fine-tuning a little. On seed 0 the class-probability
# rankers lead the others on validation by 53 points of top-1 (12 of 17 queries against 3), so the choice stays among
# them, and they range over 51-74% on test; a broken step (preprocessing, labels, ranker) falls towards random, 1-3%.
FLOOR_MARGIN = 0.15
KNOWN_TAGS = {"needs ../shared", "needs a server", "needs a cluster", "runs until stopped"}
ELISION = {"...", "…"}


def split_comment(line):
    """``(command, comment)``: the comment starts at the first ``#`` outside quotes that begins a word."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].strip(), line[i + 1:].strip()
    return line.strip(), ""


def readme_commands(text):
    """Every command of the ```bash blocks, in order: ``[(command, [tag, ...]), ...]``; continuation lines joined."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in re.sub(r"\s*\\\n\s*", " ", block).splitlines():
            command, comment = split_comment(line)
            if command:
                commands.append((command, re.findall(r"\[([^\]]+)\]", comment)))
    return commands


COMMANDS = readme_commands(README)


def command_id(n, command):
    named = re.findall(r"[\w./-]+\.py|-m [\w.]+|mkdir", command)
    return f"{n:02d}-" + "+".join(name.replace("-m ", "").replace(".venv/bin/python", "") for name in named[:2])


IDS = [command_id(n, command) for n, (command, _) in enumerate(COMMANDS, 1)]


def test_the_readme_has_commands_and_the_parser_reads_comments():
    assert len(COMMANDS) >= 10, COMMANDS
    assert split_comment('echo "a # b" x  # note [needs a server]') == ('echo "a # b" x', "note [needs a server]")
    assert split_comment("python a.py --set x=1#2") == ("python a.py --set x=1#2", "")
    assert readme_commands("```bash\na \\\n  b   # c [d]\n\n# only a comment\n```\n") == [("a b", ["d"])]


def test_the_first_command_is_the_main_job_whose_accuracy_is_checked():
    command, tags = COMMANDS[0]
    assert not tags and re.fullmatch(r"\./setup\.sh && \.venv/bin/python run_pipeline\.py", command), command
    assert 0.5 < measured_floor() <= 1.0


@pytest.mark.parametrize("command, tags", COMMANDS, ids=IDS)
def test_command_is_tagged_or_parses_and_names_what_exists(command, tags):
    unknown = sorted(set(tags) - KNOWN_TAGS)
    assert not unknown, f"unknown tag(s) {unknown} in the README; known: {sorted(KNOWN_TAGS)}"
    parsed = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
    assert parsed.returncode == 0, f"bash cannot parse {command!r}: {parsed.stderr}"
    for script in re.findall(r"\.venv/bin/python\s+(\S+\.py)\b", command):
        assert (REPO / script).is_file(), f"{command!r} names {script}, which does not exist"
    for module in re.findall(r"\.venv/bin/python\s+-m\s+([\w.]+)", command):
        assert importlib.util.find_spec(module) is not None, f"{command!r} runs module {module}, which is missing"
    for script in re.findall(r"(?:^|&&\s*)\./(\S+)", command):
        assert os.access(REPO / script, os.X_OK), f"{command!r} runs ./{script}, which is not an executable file"


def test_every_figure_in_doc_is_shown_in_the_readme_and_every_shown_one_exists():
    on_disk = {path.relative_to(REPO).as_posix() for path in (REPO / "doc" / "figures").glob("*.png")}
    shown = set(re.findall(r"!\[[^\]]*\]\((doc/figures/[^)\s]+)\)", README))
    assert on_disk, "doc/figures/ is empty: run doc/make_figures.py"
    assert shown - on_disk == set(), "the README shows figures that doc/make_figures.py did not make"
    assert on_disk - shown == set(), "figures in doc/figures/ that the README does not show"


def without_noise(line):
    """A console line with what changes from run to run masked: durations and the network's id."""
    line = re.sub(r"\b\d+(?:\.\d+)?( ?)(ms|s|min)\b", r"#\1\2", line.rstrip())
    return re.sub(r"sha256:[0-9a-f]+", "sha256:#", line)


def test_console_excerpts_are_copied_from_real_runs():
    logs = {without_noise(line) for path in (REPO / "doc" / "console").glob("*.txt")
            for line in path.read_text(encoding="utf-8").splitlines()}
    excerpts = re.findall(r"```text\n(.*?)```", README, flags=re.S)
    assert excerpts, "the README shows no console excerpt"
    masked = without_noise("Done: best epoch 4 of 8, 2.0 min; network 1.717 s")
    assert masked == "Done: best epoch 4 of 8, # min; network # s"
    invented = [line for block in excerpts for line in block.splitlines()
                if line.strip() not in ELISION and without_noise(line) not in logs]
    assert not invented, f"README console lines not found in doc/console/*.txt (run doc/make_figures.py): {invented}"


def test_make_figures_has_help():
    result = subprocess.run([sys.executable, str(REPO / "doc" / "make_figures.py"), "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "doc/figures/" in result.stdout and "--work" in result.stdout


def measured_floor():
    """Seed 0's test top-1 of the ranker chosen on validation in ``bench/accuracy.py data/fridgeObjects --seeds 0,1,2``.

    Seed 0 is the default, and README command 1 runs it. Not the lowest seed: on 17 validation images the choice of
    ranker is noisy, and seed 1 chose the weighted L2 distance (11% on test), which would leave no floor at all.
    """
    run = next(run for run in json.loads(MEASURED.read_text())["runs"] if run["seed"] == 0)
    return run["metrics"][run["best"]]["top1"]


def assert_keeps_its_accuracy(results):
    """The ranker that step 5 chose on validation ranks within FLOOR_MARGIN of the measured floor, far above random."""
    with open(results / "evaluation.csv", newline="") as handle:
        best = next(row["ranker"] for row in csv.DictReader(handle) if row["best_on_val"] == "1")
    metrics = json.loads((results / "evaluation.json").read_text())
    assert metrics[best]["top1"] >= measured_floor() - FLOOR_MARGIN, (best, metrics[best])
    assert metrics[best]["top1"] > metrics["random"]["top1"] + 0.3


@pytest.fixture(scope="module")
def scratch_repo(tmp_path_factory):
    """A copy of the repository's git files (tracked, and untracked but not ignored) with a link to the real .venv."""
    root = tmp_path_factory.mktemp("readme_repo")
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode("utf-8")
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if source.is_file():  # a tracked file deleted in the working tree is not copied
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, root / name)
    (root / ".venv").symlink_to(REPO / ".venv")
    return root


@pytest.mark.slow  # the whole README: the pipeline three times, A1, A2, A3; about 15 minutes on 2 shared cores
@pytest.mark.parametrize("command, tags", COMMANDS, ids=IDS)
def test_readme_command_runs(scratch_repo, command, tags):
    if tags:
        pytest.skip(f"the README marks it [{'], ['.join(tags)}]")
    if re.search(r"-m pytest\b", command):
        pytest.skip("the test suite itself: .ci/run runs it")
    if "./setup.sh" in command:
        stamp = hashlib.sha1((scratch_repo / "pyproject.toml").read_bytes()).hexdigest()[:12]
        if not (REPO / ".venv" / f".installed-{stamp}").is_file():
            # From the copy, setup.sh would reinstall the real .venv in editable mode pointing at the copy.
            pytest.skip("run ./setup.sh in the repository first: .venv does not match pyproject.toml")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    result = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", command], cwd=scratch_repo, env=env,
                            capture_output=True, text=True, timeout=3600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{command!r} exited with {result.returncode}:\n{output[-4000:]}"
    assert "Traceback" not in output, f"{command!r} printed a traceback:\n{output[-4000:]}"
    if command == COMMANDS[0][0]:  # the main job: its run is also the accuracy regression check
        assert_keeps_its_accuracy(scratch_repo / "results" / "fridgeObjects")
