#!/usr/bin/env bash
# Creates .venv/ at the repo root and installs the project (editable) with its pinned dependencies.
# Idempotent: when pyproject.toml has not changed since the last successful run, it only checks and exits.
set -euo pipefail
cd "$(dirname "$0")"
python="${PYTHON:-python3}"

if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $($python --version)"
    "$python" -m venv .venv
fi
stamp=".venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)"
if [ -f "$stamp" ] && .venv/bin/python -c "import image_similarity" 2>/dev/null; then
    echo "setup: .venv is up to date (pyproject.toml unchanged)"
    exit 0
fi
echo "setup: installing the project and its pinned dependencies into .venv (first time: several minutes)"
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet --editable ".[dev,scale,inference]"
rm -f .venv/.installed-*
touch "$stamp"
echo "setup: done; use .venv/bin/python"
