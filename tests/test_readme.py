"""The README stays true: its Python examples run, and the files it links to exist."""
import re
import subprocess
import sys

from conftest import REPO

README = (REPO / "README.md").read_text(encoding="utf-8")


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


def test_local_links_and_figures_exist():
    targets = re.findall(r"\]\((?!https?://|#)([^)\s]+)\)", README)
    missing = [t for t in targets if not (REPO / t.split("#")[0]).exists()]
    assert not missing, f"README links to missing files: {missing}"


def test_scripts_named_in_the_readme_exist():
    ours = README.split("## How the CNTK original maps")[0]  # that table names the original's files too
    named = set(re.findall(r"\b((?:\d|A\d)_\w+\.py)\b", ours)) | set(re.findall(r"\b(bench/\w+\.py)\b", ours))
    missing = sorted(name for name in named if not (REPO / name).exists())
    assert not missing, f"the README names scripts that do not exist: {missing}"


def test_accuracy_tables_match_their_bench_results():
    """Each table between <!-- accuracy:NAME [--tutorial] --> markers is bench/accuracy_table.py's output for it."""
    sys.path.insert(0, str(REPO / "bench"))
    import accuracy_table

    blocks = re.findall(r"<!-- accuracy:(\S+)( --tutorial)? -->\n(.*?)\n<!-- /accuracy -->", README, flags=re.S)
    assert blocks, "the README has no accuracy table"
    for name, tutorial, table in blocks:
        assert table.strip() == accuracy_table.render(name, bool(tutorial)).strip(), (
            f"the README's {name} table differs from bench/accuracy_table.py {name}{tutorial}: paste its output")
