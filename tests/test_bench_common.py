"""benchmarks/common.py: what every benchmark's results file records about its run."""

import importlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import common

REPO = Path(__file__).resolve().parent.parent


def test_write_result_adds_the_run_and_keeps_the_payload(tmp_path, monkeypatch):
    monkeypatch.setenv("TWILIGHT_COMMIT", "abc1234+x")
    path = tmp_path / "sub" / "r.json"
    out = common.write_result(path, dict(rows=[1, 2], card="given card"))
    back = json.loads(path.read_text())
    assert back == out
    assert back["rows"] == [1, 2] and back["card"] == "given card"  # the payload's own wins
    assert back["commit"] == "abc1234+x"
    assert back["command"].startswith("python ")
    assert set(back["versions"]) >= {"torch", "triton", "sglang", "flashinfer", "sglang-twilight"}
    assert back["versions"]["torch"]  # installed here


def test_card_slug_names_result_files():
    assert common.card_slug("NVIDIA H100 80GB HBM3") == "h100"
    assert common.card_slug("NVIDIA H200") == "h200"
    assert common.card_slug("cpu") == "cpu"
    assert common.card_slug("Some GPU 9000") == "some-gpu-9000"
    assert common.card_slug("") == "cpu"


def test_smi_card_name_without_nvidia_smi_is_cpu(monkeypatch):
    def missing(*a, **k):
        raise FileNotFoundError("nvidia-smi")

    monkeypatch.setattr(common.subprocess, "run", missing)
    assert common.smi_card_name() == "cpu"
    monkeypatch.setattr(common.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(
        a, 0, stdout="NVIDIA H200\nNVIDIA H200\n", stderr=""))
    assert common.smi_card_name() == "NVIDIA H200"


def test_commit_without_the_variable_is_this_checkout(monkeypatch):
    monkeypatch.delenv("TWILIGHT_COMMIT", raising=False)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True,
                          capture_output=True)
    want = head.stdout.strip() if head.returncode == 0 else "unknown"
    assert common.commit() == want


def test_progress_without_a_terminal_writes_a_line_per_item():
    buf = io.StringIO()
    assert list(common.progress(range(3), "cases", stream=buf)) == [0, 1, 2]
    lines = buf.getvalue().splitlines()
    assert [ln.split(",")[0] for ln in lines] == ["cases: 1/3", "cases: 2/3", "cases: 3/3"]
    buf = io.StringIO()
    assert list(common.progress(iter("ab"), stream=buf)) == ["a", "b"]  # no length
    assert [ln.split(",")[0] for ln in buf.getvalue().splitlines()] == ["1", "2"]


def test_int_list():
    assert common.int_list("8,16, 32") == [8, 16, 32]
    with pytest.raises(ValueError, match="8,x"):
        common.int_list("8,x")


def test_importable_from_the_benchmarks_folder():
    """Scripts that put benchmarks/ on sys.path import it as ``common``: the same functions."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        mod = importlib.import_module("common")
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
        sys.modules.pop("common", None)
    assert Path(mod.__file__).resolve() == Path(common.__file__).resolve()
    assert sorted(mod.__all__) == sorted(common.__all__)
