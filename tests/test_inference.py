"""image_similarity.models.inference: one InferenceConfig whose defaults are PARAMETERS.py's, and one thread setter."""
import ast
import os

import pytest
import torch

import helpers
from conftest import REPO
from image_similarity.models.inference import InferenceConfig, cpu_cores, set_thread_count

PACKAGE = REPO / "image_similarity"


def _package_trees():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path.relative_to(REPO), ast.parse(path.read_text(encoding="utf-8"))


def test_the_library_defaults_are_parameters_run_knobs():
    P = helpers.load_parameters([])
    default = InferenceConfig()
    assert (default.backend, default.precision) == (P.run_backend, P.run_precision)
    assert helpers.inference_config(P) == default


def _defaulted_arguments(function):
    positional = function.args.posonlyargs + function.args.args
    yield from positional[len(positional) - len(function.args.defaults):]
    yield from (arg for arg, default in zip(function.args.kwonlyargs, function.args.kw_defaults) if default)


def test_no_function_has_its_own_default_backend_or_precision():
    """They travel inside one InferenceConfig, so no library function can default to another engine."""
    defaulted = [f"{path}:{node.lineno} {node.name}({arg.arg}=...)" for path, tree in _package_trees()
                 for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                 for arg in _defaulted_arguments(node) if arg.arg in ("backend", "precision")]
    assert not defaulted, defaulted


def test_set_thread_count_is_the_only_caller_of_torch_set_num_threads():
    callers = []
    for path, tree in _package_trees():
        for function in ast.walk(tree):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                        and node.func.attr == "set_num_threads":
                    callers.append(f"{path}:{function.name}")
    assert callers == ["image_similarity/models/inference.py:set_thread_count"]
    source = "\n".join(path.read_text(encoding="utf-8") for path in PACKAGE.rglob("*.py"))
    assert source.count("torch.set_num_threads(") == 1  # none at module level either


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_set_thread_count_applies_a_count_or_every_core(restore_threads, monkeypatch):
    assert set_thread_count(1) == 1 == torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert set_thread_count() == cpu_cores() == len(os.sched_getaffinity(0))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the user's count: torch took it at start-up, None leaves it
    set_thread_count(1)
    assert set_thread_count() == 1


def test_a_bad_config_is_refused_naming_the_knob():
    with pytest.raises(ValueError, match=r"run_backend='tensorrt': expected one of auto, torch, openvino"):
        InferenceConfig("tensorrt")
    with pytest.raises(ValueError, match="threads=1.5"):
        InferenceConfig(threads=1.5)
    with pytest.raises(helpers.UsageError, match="run_precision='bf16' runs on OpenVINO only"):
        helpers.inference_config(helpers.load_parameters(["run_backend=torch", "run_precision=bf16"]))
