"""The README and doc/ stay true: the README's Python examples run, the files they link to exist, and the accuracy
tables match bench/results/."""
import re
import subprocess
import sys

import pytest

from conftest import REPO

README = (REPO / "README.md").read_text(encoding="utf-8")
DOCUMENTS = ["README.md", "doc/RESULTS.md", "doc/EXPERIMENTS.md"]  # doc/ARCHITECTURE.md has its own test


def test_python_examples_run(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert blocks, "the README has no Python example"
    for n, code in enumerate(blocks):
        # Saved models go under proc/, which is git-ignored; run from the repo root as a reader would.
        script = tmp_path / f"example_{n}.py"
        script.write_text(code)
        result = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"README example {n} failed:\n{code}\n{result.stderr[-2000:]}"
        assert result.stdout.strip(), f"README example {n} printed nothing"


@pytest.mark.parametrize("document", DOCUMENTS)
def test_local_links_and_figures_exist(document):
    path = REPO / document
    targets = re.findall(r"\]\((?!https?://|#)([^)\s]+)\)", path.read_text(encoding="utf-8"))
    missing = [t for t in targets if not (path.parent / t.split("#")[0]).exists()]
    assert not missing, f"{document} links to missing files: {missing}"


def test_scripts_named_in_the_readme_exist():
    ours = README.split("## How the CNTK original maps")[0]  # that table names the original's files too
    named = set(re.findall(r"\b((?:\d|A\d)_\w+\.py)\b", ours)) | set(re.findall(r"\b(bench/\w+\.py)\b", ours))
    missing = sorted(name for name in named if not (REPO / name).exists())
    assert not missing, f"the README names scripts that do not exist: {missing}"


@pytest.mark.parametrize("document, n_tables", [("doc/RESULTS.md", 3), ("README.md", 1)])
def test_accuracy_tables_match_their_bench_results(document, n_tables):
    """Each marked table (doc/RESULTS.md's per protocol, the README's summary) is bench/accuracy_table.py's output."""
    sys.path.insert(0, str(REPO / "bench"))
    import accuracy_table

    blocks = accuracy_table.marked_blocks((REPO / document).read_text(encoding="utf-8"))
    assert len(blocks) == n_tables, f"{document} has {len(blocks)} accuracy table(s), not {n_tables}"
    for label, match, fresh in blocks:
        assert match["body"].strip() == fresh.strip(), (
            f"{document}'s table {label} differs from bench/accuracy_table.py {label}: run it with --update")
