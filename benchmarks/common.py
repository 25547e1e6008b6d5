"""What every benchmark script shares: where it ran and how its results are written.

Import it either way:

    from benchmarks.common import write_result          # repository root on sys.path
    from common import write_result                      # benchmarks/ on sys.path

The API is small and kept stable:

* ``card_name()``: the GPU's name (``torch.cuda.get_device_name()``), or ``"cpu"``;
* ``smi_card_name()``: the same from ``nvidia-smi``, without a CUDA context in this process (for
  scripts that start servers and leave them the memory), or ``"cpu"``;
* ``card_slug(name)``: ``"NVIDIA H100 80GB HBM3"`` -> ``"h100"``, the result files' suffix;
* ``versions()``: versions of torch, triton, sglang, flashinfer, sglang-twilight and Python;
* ``commit()``: the commit measured: ``$TWILIGHT_COMMIT``, else ``git rev-parse --short HEAD``
  of this checkout, else ``"unknown"`` (set the variable when the tree was copied without its
  git metadata);
* ``command()``: the command line that is running, as ``python <script> <args>``;
* ``write_result(path, payload)``: the payload as pretty JSON, with ``card``, ``versions``,
  ``commit`` and ``command`` added where it has none;
* ``progress(iterable, desc)``: a progress bar on a terminal, one line per item otherwise;
* ``int_list(text)``: ``"8,16,32"`` -> ``[8, 16, 32]`` (an ``argparse`` type).
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Iterable, Iterator, TypeVar

__all__ = ["card_name", "smi_card_name", "card_slug", "versions", "commit", "command",
           "write_result", "progress", "int_list"]

_REPO = Path(__file__).resolve().parent.parent

# distribution name -> key in versions()
_DISTRIBUTIONS = {
    "torch": "torch",
    "triton": "triton",
    "sglang": "sglang",
    "flashinfer-python": "flashinfer",
    "sglang-twilight": "sglang-twilight",
}

T = TypeVar("T")


def card_name() -> str:
    """The name of the current CUDA device, or ``"cpu"`` when there is none."""
    try:
        import torch
    except ImportError:
        return "cpu"
    if not torch.cuda.is_available():
        return "cpu"
    return torch.cuda.get_device_name()


def smi_card_name() -> str:
    """The first GPU's name from ``nvidia-smi``, or ``"cpu"`` when there is none."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "cpu"
    return out.splitlines()[0].strip() if out else "cpu"


def card_slug(name: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"h100"`` (the suffix of a result file's name)."""
    for tag in ("h200", "h100", "a100", "l40s", "b200"):
        if tag in name.lower():
            return tag
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "cpu"


def versions() -> dict[str, str | None]:
    """Installed versions (None where a package is missing), read from the package metadata, so
    that nothing heavy is imported; torch's own ``__version__`` when torch is loaded (it carries
    the CUDA build, e.g. ``2.11.0+cu130``)."""
    out: dict[str, str | None] = {}
    for dist, key in _DISTRIBUTIONS.items():
        try:
            out[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[key] = None
    torch = sys.modules.get("torch")
    if torch is not None:
        out["torch"] = torch.__version__
    out["python"] = platform.python_version()
    return out


def commit() -> str:
    """``$TWILIGHT_COMMIT`` when set, else the short hash of this checkout's HEAD, else
    ``"unknown"``."""
    env = os.environ.get("TWILIGHT_COMMIT")
    if env:
        return env
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=_REPO,
                                       text=True, stderr=subprocess.DEVNULL).strip() or "unknown"
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def command() -> str:
    """The command line that is running, as ``python <script> <args>``."""
    return " ".join(["python"] + sys.argv)


def write_result(path, payload: dict) -> dict:
    """Write ``payload`` to ``path`` as indented JSON (parent folders made), after adding
    ``card``, ``versions``, ``commit`` and ``command`` where the payload has none. Returns the
    dict written (the payload itself is not changed)."""
    out = dict(card=payload.get("card") or card_name(),
               versions=payload.get("versions") or versions(),
               commit=payload.get("commit") or commit(),
               command=payload.get("command") or command())
    out.update((k, v) for k, v in payload.items() if k not in out)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    return out


def progress(iterable: Iterable[T], desc: str = "", stream=None) -> Iterator[T]:
    """Yield the items of ``iterable`` while showing how far it got on ``stream`` (stderr): a
    bar redrawn in place on a terminal, else one line per item (``desc: 3/8, 12.4 s``), so that
    a log file stays readable."""
    stream = sys.stderr if stream is None else stream
    try:
        total = len(iterable)  # type: ignore[arg-type]
    except TypeError:
        total = None
    tty = hasattr(stream, "isatty") and stream.isatty()
    t0 = time.monotonic()

    def show(done: int, end: str):
        took = f"{time.monotonic() - t0:.1f} s"
        count = f"{done}/{total}" if total is not None else str(done)
        if tty and total:
            width = 30
            fill = width * done // total
            line = f"\r{desc} [{'#' * fill}{'.' * (width - fill)}] {count}, {took}"
        else:
            line = f"{desc}: {count}, {took}" if desc else f"{count}, {took}"
        stream.write(line + end)
        stream.flush()

    done = 0
    if tty:
        show(0, "")
    for item in iterable:
        yield item
        done += 1
        show(done, "" if tty else "\n")
    if tty:
        stream.write("\n")
        stream.flush()


def int_list(text: str) -> list[int]:
    """``"8,16,32"`` -> ``[8, 16, 32]``; for ``argparse`` (``type=int_list``): a bad entry is
    an error that names it."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from None
