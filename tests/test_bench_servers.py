"""benchmarks/servers.py against real processes: a small HTTP server started through ``Server``
(ready, JSON and text answers, the log's tail, a stop that leaves nothing of its process group),
and servers that die or never answer."""

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from benchmarks import servers
from benchmarks.servers import Server, free_port

REPO = Path(__file__).resolve().parent.parent

# /health answers 503 for its first second, then 200; /echo returns the JSON it was sent, /text
# plain text, /teapot a 418 with a JSON body. Before serving it starts a child in its own process
# group that ignores SIGTERM, the way a launcher's worker can outlive it.
TINY_SERVER = textwrap.dedent(r'''
    import json, signal, subprocess, sys, time
    from http.server import BaseHTTPRequestHandler, HTTPServer

    port = int(sys.argv[1])
    t0 = time.monotonic()
    child = subprocess.Popen([sys.executable, "-c",
                              "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
                              " time.sleep(600)"])
    print(f"tiny server: child {child.pid}", flush=True)

    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def _send(self, code, data, ctype="application/json"):
            self.send_response(code)
            for key, value in (("Content-Type", ctype), ("Content-Length", str(len(data)))):
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == "/health":
                up = time.monotonic() - t0 > 1.0
                return self._send(200 if up else 503, b"{}")
            if self.path == "/text":
                return self._send(200, b"plain words\n", "text/plain")
            if self.path == "/teapot":
                return self._send(418, json.dumps({"error": "short and stout"}).encode())
            self._send(404, b"{}")

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            print(f"tiny server: POST {self.path} {body}", flush=True)
            self._send(200, json.dumps({"got": body, "path": self.path}).encode())

    print(f"tiny server: listening on {port}", flush=True)
    HTTPServer(("127.0.0.1", port), H).serve_forever()
''')


def _live_members(pgid):
    """Pids of live (not zombie) processes whose process group is ``pgid``, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            found.append(int(entry.name))
    return found


needs_proc = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")


@needs_proc
def test_start_ready_request_tail_stop(tmp_path):
    script = tmp_path / "tiny_server.py"
    script.write_text(TINY_SERVER)
    port = free_port()
    lines = []
    srv = Server("tiny", [sys.executable, str(script), str(port)], port, tmp_path / "logs" / "tiny.log",
                 log=lines.append)
    with srv:
        assert srv.alive() and srv.url == f"http://127.0.0.1:{port}"
        pgid = srv.p.pid
        assert srv.wait_ready(30) is srv
        assert 1.0 <= srv.ready_s < 30  # /health said 503 for its first second
        assert srv.healthy()
        assert srv.get("/health") == (200, {})
        assert srv.request("POST", "/echo", {"a": [1, 2]}, timeout=10) == \
            (200, {"got": {"a": [1, 2]}, "path": "/echo"})
        assert srv.post("/x", {"b": None}) == (200, {"got": {"b": None}, "path": "/x"})
        assert srv.get("/text") == (200, "plain words\n")
        assert srv.get_text("/text") == "plain words\n"
        assert srv.get("/teapot") == (418, {"error": "short and stout"})  # returned, not raised
        assert srv.get("/nothing")[0] == 404
        child = int(srv.tail().split("tiny server: child ")[1].split()[0])
        assert child in _live_members(pgid) and pgid in _live_members(pgid)
        assert srv.tail(3).splitlines() == [f"tiny server: listening on {port}",
                                            "tiny server: POST /echo {'a': [1, 2]}",
                                            "tiny server: POST /x {'b': None}"]
        assert srv.tail().splitlines()[0] == f"tiny server: child {child}"
        srv.GROUP_GRACE_S = 1.0  # the child ignores SIGTERM: SIGKILL after this
        t = time.monotonic()
    # left the with block: stopped, the child that ignored SIGTERM as well
    assert srv.p is None and not srv.alive()
    assert _live_members(pgid) == []
    assert time.monotonic() - t < 5
    assert lines[0] == f"tiny: started (port {port}, log {tmp_path / 'logs' / 'tiny.log'})"
    assert lines[1].startswith("tiny: ready after ") and lines[-1] == "tiny: stopped"
    srv.stop()  # a second stop does nothing
    with pytest.raises(OSError):  # nothing listens any more
        srv.get("/health", timeout=2)


def test_log_append_or_fresh(tmp_path):
    log = tmp_path / "s.log"
    log.write_text("earlier run\n")
    say = [sys.executable, "-c", "print('this run', flush=True)"]
    for append, want in ((True, "earlier run\nthis run\n"), (False, "this run\n")):
        srv = Server("say", say, free_port(), log, append=append).start()
        srv.p.wait(timeout=30)
        srv.stop()
        assert log.read_text() == want
        log.write_text("earlier run\n")


def test_a_server_that_dies_raises_with_its_log(tmp_path):
    argv = [sys.executable, "-c", "import sys; print('bad flag --foo', flush=True); sys.exit(3)"]
    srv = Server("broken", argv, free_port(), tmp_path / "broken.log", env=dict(os.environ))
    with pytest.raises(RuntimeError, match=r"(?s)broken server exited with 3 .*bad flag --foo"):
        srv.start().wait_ready(30)
    assert srv.p is None and srv.ready_s is None


@needs_proc
def test_a_server_that_never_answers_is_stopped(tmp_path):
    argv = [sys.executable, "-c", "import time; print('loading', flush=True); time.sleep(600)"]
    srv = Server("slow", argv, free_port(), tmp_path / "slow.log")
    srv.start()
    pgid = srv.p.pid
    t = time.monotonic()
    with pytest.raises(RuntimeError, match=r"(?s)slow server not healthy within 2 s .*loading"):
        srv.wait_ready(2, poll=0.2)
    assert 2 <= time.monotonic() - t < 20
    assert srv.p is None and _live_members(pgid) == []


def test_wait_log(tmp_path):
    argv = [sys.executable, "-c",
            "import time; time.sleep(0.5); print('KV Cache is allocated', flush=True); time.sleep(600)"]
    with Server("kv", argv, free_port(), tmp_path / "kv.log") as srv:
        assert srv.wait_log("KV Cache is allocated", 30, poll=0.1) is srv
        assert srv.alive() and srv.ready_s is None  # in its log, not healthy: not ready
        with pytest.raises(RuntimeError, match="kv server logged no 'never said' within 1 s"):
            srv.wait_log("never said", 1, poll=0.1)
        assert srv.p is None


def test_start_refuses_a_port_in_use(tmp_path):
    """A stray server on the port would be timed in place of the one asked for."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert servers.port_in_use(port)
        srv = Server("late", [sys.executable, "-c", "print('started')"], port, tmp_path / "l.log")
        with pytest.raises(RuntimeError, match=rf"late server: port {port} on 127.0.0.1 is "
                                               r"already in use"):
            srv.start()
        assert srv.p is None and not (tmp_path / "l.log").exists()
    assert not servers.port_in_use(port)


# A benchmark holding a server: started in a with block (SIGTERM must unwind it) or left
# running without one (the atexit hook must stop it); prints its server's process group.
HOLDER = textwrap.dedent(r'''
    import sys, time
    sys.path.insert(0, sys.argv[1])
    from benchmarks.servers import Server
    script, port, log, how = sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
    srv = Server("held", [sys.executable, script, str(port)], port, log)
    if how == "with":
        with srv:
            srv.wait_ready(30)
            print("PGID", srv.p.pid, flush=True)
            time.sleep(600)
    else:
        srv.start().wait_ready(30)
        print("PGID", srv.p.pid, flush=True)
        sys.exit(0)
''')


@needs_proc
@pytest.mark.parametrize("how", ["with", "exit"])
def test_a_killed_or_exiting_benchmark_stops_its_servers(tmp_path, how):
    """``timeout`` sends SIGTERM to a benchmark: its servers (their own sessions) must not live
    on holding the GPU and the port; nor those a script leaves running when it exits."""
    import signal

    (tmp_path / "tiny.py").write_text(TINY_SERVER)
    (tmp_path / "holder.py").write_text(HOLDER)
    port = free_port()
    p = subprocess.Popen([sys.executable, str(tmp_path / "holder.py"), str(REPO),
                          str(tmp_path / "tiny.py"), str(port), str(tmp_path / "s.log"), how],
                         stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    assert line.startswith("PGID"), line
    pgid = int(line.split()[1])
    if how == "with":  # (the other holder is exiting already)
        assert pgid in _live_members(pgid)
        p.send_signal(signal.SIGTERM)
    rc = p.wait(timeout=60)
    assert rc == (128 + signal.SIGTERM if how == "with" else 0)
    assert _live_members(pgid) == []  # the tiny server and its SIGTERM-deaf child
    assert not servers.port_in_use(port)


def test_free_port():
    p = free_port()
    assert 0 < p < 65536
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        taken = s.getsockname()[1]
        assert taken < free_port(taken) < taken + 200


def test_importable_from_the_benchmarks_folder():
    """A script run as ``python benchmarks/<script>.py`` has benchmarks/ on sys.path and
    imports the helper as ``servers``: the same file."""
    probe = "import servers; print(servers.__file__); print(*sorted(servers.__all__))"
    r = subprocess.run([sys.executable, "-c", probe], cwd=REPO / "benchmarks",
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    path, names = r.stdout.splitlines()
    assert Path(path).resolve() == Path(servers.__file__).resolve()
    assert names.split() == ["Server", "free_port", "port_in_use"]


def test_scripts_use_the_helper():
    """The three scripts that start servers use this class (no copy of their own)."""
    from benchmarks import bench_tpot, eval_accuracy, load_test

    for mod in (bench_tpot, eval_accuracy, load_test):
        assert mod.Server is Server, mod.__name__
    assert eval_accuracy.free_port is free_port and load_test.free_port is free_port
