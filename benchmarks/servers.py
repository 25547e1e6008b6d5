"""A server process for the benchmark scripts: started in its own process group with its output
in a log file, waited for until ``/health`` answers, asked for JSON, and stopped as a whole group.

Import it either way (like ``benchmarks.common``):

    from benchmarks.servers import Server, free_port     # repository root on sys.path
    from servers import Server, free_port                 # benchmarks/ on sys.path

    with Server("twilight", argv, port, log_dir / "server_twilight.log") as srv:
        srv.wait_ready(600)                     # raises with the log's tail if it died or hung
        status, info = srv.get("/server_info")  # (HTTP status, parsed JSON or the text)
        status, out = srv.post("/generate", {"input_ids": [1, 2], "sampling_params": {}})

The group matters: ``sglang.launch_server`` runs its scheduler and detokenizer as child
processes, and a stopped server must give its GPU memory back before the next one starts.
``stop()`` sends SIGTERM to the group, waits for the launcher, then SIGKILLs whatever of the
group is still there (a child that outlived its launcher included), and returns once the group
is gone.

Two guards against a server outliving its run: ``start()`` refuses a port something already
listens on (a benchmark would otherwise time the stray server, unaware), and a SIGTERM to the
benchmark (``timeout``, a job scheduler) unwinds it like Ctrl-C, so every live server is stopped
on the way out (an ``atexit`` hook stops any left).
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

__all__ = ["Server", "free_port", "port_in_use"]

_live: "set[Server]" = set()  # started and not yet stopped


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something listens on ``host:port``: a bind with SO_REUSEADDR (as servers set it)
    fails only then, not for the TIME_WAIT sockets a stopped server leaves behind."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def _stop_live() -> None:
    for srv in list(_live):
        srv.stop()


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)


def _guard_process() -> None:
    """Once per process: SIGTERM raises SystemExit (when it still has Python's default action,
    and from the main thread only), and the servers still live at exit are stopped."""
    if getattr(_guard_process, "done", False):
        return
    _guard_process.done = True
    atexit.register(_stop_live)
    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _exit_on_sigterm)


def free_port(start: Optional[int] = None) -> int:
    """A TCP port free on 127.0.0.1: the first of ``start`` .. ``start + 199`` that binds, or,
    without ``start``, one the system picks."""
    if start is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    for port in range(start, start + 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError(f"no free port in {start}..{start + 199}")


def _group_alive(pgid: int) -> bool:
    """Whether process group ``pgid`` still has a live member. Zombies do not count (an
    orphan's zombie lasts until init reaps it, and it holds nothing)."""
    try:
        pids = [d for d in os.listdir("/proc") if d.isdigit()]
    except OSError:  # no /proc: ask the kernel, zombies included
        try:
            os.killpg(pgid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:  # gone meanwhile
            continue
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses
        state, _ppid, pgrp = stat[stat.rindex(")") + 2:].split()[:3]
        if int(pgrp) == pgid and state != "Z":
            return True
    return False


class Server:
    """One server process on 127.0.0.1:``port`` (see the module's docstring).

    ``argv`` runs with ``env`` (None: this process's environment), its stdout and stderr
    appended to ``log_path`` (``append=False``: the file is started afresh). ``log``, when
    given, gets a line when the server starts, is ready and stops. ``ready_s`` is the seconds
    from ``start()`` to the first healthy answer (None until then)."""

    TERM_WAIT_S = 30.0   # for the launcher to exit after SIGTERM
    GROUP_GRACE_S = 5.0  # then for the rest of its group, before SIGKILL
    KILL_WAIT_S = 10.0   # for the group to go after SIGKILL

    def __init__(self, name: str, argv: Sequence[str], port: int, log_path, *,
                 env: Optional[dict] = None, log: Optional[Callable[[str], Any]] = None,
                 append: bool = True):
        self.name, self.argv, self.port, self.env = name, list(argv), port, env
        self.log_path = Path(log_path)
        self.url = f"http://127.0.0.1:{port}"
        self.p: Optional[subprocess.Popen] = None
        self.t_start = 0.0
        self.ready_s: Optional[float] = None
        self._log = log
        self._append = append
        self._logf = None

    # ------------------------------------------------------------------ the process

    def start(self) -> "Server":
        """Start the process. Raises RuntimeError, starting nothing, when something already
        listens on the port."""
        if port_in_use(self.port):
            raise RuntimeError(
                f"{self.name} server: port {self.port} on 127.0.0.1 is already in use (a server "
                f"left from an earlier run?): stop it or pick another port")
        _guard_process()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._logf = open(self.log_path, "a" if self._append else "w")
        self.t_start = time.monotonic()
        self.ready_s = None
        self.p = subprocess.Popen(self.argv, env=self.env, stdout=self._logf,
                                  stderr=subprocess.STDOUT, start_new_session=True)
        _live.add(self)
        self._say(f"{self.name}: started (port {self.port}, log {self.log_path})")
        return self

    def __enter__(self) -> "Server":
        return self.start() if self.p is None else self

    def __exit__(self, *exc) -> None:
        self.stop()

    def alive(self) -> bool:
        return self.p is not None and self.p.poll() is None

    def tail(self, n: int = 25) -> str:
        """The log's last ``n`` lines (at most its last 3000 characters); "" when unreadable."""
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-n:])[-3000:]
        except OSError:
            return ""

    def healthy(self) -> bool:
        """Whether ``/health`` answers 200 (within 5 s)."""
        try:
            return self.request("GET", "/health", timeout=5)[0] == 200
        except Exception:  # noqa: BLE001 - not up yet
            return False

    def wait_ready(self, timeout: float, poll: float = 1.0) -> "Server":
        """Until ``/health`` answers 200. Raises RuntimeError, with the log's tail, when the
        process exits first or ``timeout`` seconds pass; the server is stopped then."""
        self._wait(self.healthy, timeout, poll, "not healthy")
        if self.ready_s is None:
            self.ready_s = time.monotonic() - self.t_start
            self._say(f"{self.name}: ready after {self.ready_s:.0f}s")
        return self

    def wait_log(self, needle: str, timeout: float, poll: float = 0.5) -> "Server":
        """Until ``needle`` is in the log or ``/health`` answers 200 (e.g. the line saying the
        KV pool is allocated, so that the next server sizes its pool with this one's memory
        taken). Raises and stops like ``wait_ready``."""
        def seen() -> bool:
            try:
                if needle in self.log_path.read_text(errors="replace"):
                    return True
            except OSError:
                pass
            return self.healthy()
        return self._wait(seen, timeout, poll, f"logged no {needle!r}")

    def _wait(self, done: Callable[[], bool], timeout: float, poll: float,
              failed: str) -> "Server":
        if self.p is None:
            raise RuntimeError(f"{self.name} server: not started")
        t_end = time.monotonic() + timeout
        while time.monotonic() < t_end:
            if self.p.poll() is not None:
                rc = self.p.returncode
                self.stop()
                raise RuntimeError(f"{self.name} server exited with {rc} (log {self.log_path}):"
                                   f"\n{self.tail()}")
            if done():
                return self
            time.sleep(poll)
        self.stop()
        raise RuntimeError(f"{self.name} server {failed} within {timeout:.0f} s "
                           f"(log {self.log_path}):\n{self.tail()}")

    def stop(self) -> None:
        """SIGTERM to the process group; SIGKILL to what is left of it when the launcher has
        not exited within ``TERM_WAIT_S`` or the rest of the group within ``GROUP_GRACE_S``
        more. Returns once the group is gone (or ``KILL_WAIT_S`` after the SIGKILL). A server
        not started, or stopped already, is left alone."""
        if self.p is None:
            return
        _live.discard(self)
        pgid = self.p.pid
        self._signal(pgid, signal.SIGTERM)
        try:
            self.p.wait(timeout=self.TERM_WAIT_S)
            left = not self._group_gone(pgid, self.GROUP_GRACE_S)
        except subprocess.TimeoutExpired:
            left = True
        if left:
            self._signal(pgid, signal.SIGKILL)
            try:
                self.p.wait(timeout=self.KILL_WAIT_S)
            except subprocess.TimeoutExpired:
                pass
            self._group_gone(pgid, self.KILL_WAIT_S)
        if self._logf is not None:
            self._logf.close()
            self._logf = None
        self.p = None
        self._say(f"{self.name}: stopped")

    @staticmethod
    def _signal(pgid: int, sig: int) -> None:
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):  # the group is gone already
            pass

    @staticmethod
    def _group_gone(pgid: int, wait_s: float) -> bool:
        t_end = time.monotonic() + wait_s
        while _group_alive(pgid):
            if time.monotonic() >= t_end:
                return False
            time.sleep(0.05)
        return True

    def _say(self, msg: str) -> None:
        if self._log is not None:
            self._log(msg)

    # ------------------------------------------------------------------ HTTP

    def request(self, method: str, path: str, body: Any = None, timeout: float = 300):
        """``(status, answer)``: the answer parsed as JSON, else its text. An HTTP error status
        is returned, not raised; a connection failure or timeout raises (OSError)."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                st, text = r.status, r.read().decode(errors="replace")
        except urllib.error.HTTPError as e:
            st, text = e.code, e.read().decode(errors="replace")
        try:
            return st, json.loads(text)
        except ValueError:
            return st, text

    def get(self, path: str, timeout: float = 30):
        return self.request("GET", path, timeout=timeout)

    def post(self, path: str, body: Any, timeout: float = 300):
        return self.request("POST", path, body, timeout=timeout)

    def get_text(self, path: str, timeout: float = 30) -> str:
        """The body of a GET as text (``/metrics``); an HTTP error status raises
        (urllib.error.HTTPError)."""
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return r.read().decode(errors="replace")

    def flush_cache(self, timeout: float = 60) -> bool:
        """SGLang's ``/flush_cache`` (refused while requests run or wait): retried until it
        works or ``timeout`` seconds pass; whether it worked."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.post("/flush_cache", {}, timeout=30)[0] == 200:
                return True
            time.sleep(0.5)
        return False
