#!/usr/bin/env bash
# Serving smoke + decode speed, Twilight vs dense FlashInfer, on one GPU (issue 4 point 6a).
#
# On a machine with an NVIDIA GPU, from the repository root, the tree installed (python3 -m pip
# install -e .); the script ends within SMOKE_BUDGET_S=500 s, results and server logs under $OUT
# (default /tmp/serve_smoke_out):
#   bash benchmarks/serve_smoke.sh
# The model is a Llama-3.1-8B config folder served with dummy weights: $GPUBUNDLE/llama8b-dummy
# (GPUBUNDLE defaults to .gpubundle, an offline copy of the pinned environment whose devenv.sh is
# sourced first when sglang is not importable).
#
# 1. Twilight server (python -m sglang_twilight.launch_server) on the Llama-3.1-8B-shaped dummy model
#    (copied to /tmp), --load-format dummy, --mem-fraction-static 0.85
#    (SMOKE_MEM_FRACTION; 0.92 gives the twilight pool room for 12 x 32000-token requests),
#    --context-length 33000, --max-running-requests 12, --chunked-prefill-size 8192, CUDA graphs on,
#    --twilight-max-budget 512: dummy weights give nearly flat attention, so top-p alone would keep
#    almost every candidate; the clamp stands in for the pruning real weights give (say so with the
#    numbers). Waits for /health, warms up, then 12 concurrent streaming /generate requests of random
#    token ids (max_new_tokens 32, ignore_eos), /v1/completions, /v1/chat/completions, a per-request
#    p (custom_params.top_p_attn) and an invalid one (must be HTTP 400), /metrics.
# 2. The same with the dense FlashInfer backend (python -m sglang.launch_server
#    --attention-backend flashinfer, same flags, same page size 16) and the same requests.
# 3. $OUT/serve_smoke.json: card, versions, both runs' decode throughput (all 12 decoding) and
#    per-token latency, TTFT, the server logs' own gen throughput, errors; ratios. Written after
#    every phase, so a cut-off run still leaves what it measured. Server logs: $OUT/server_*.log.
#
# The request length: the sidecar is counted in the KV budget, so the twilight pool holds ~15% fewer
# tokens than the dense one (Llama-8B: +24000 B on 131072 B per token). Both runs use the same
# length, min(32000, 97% of the twilight pool / 12 - new tokens), so that all 12 requests fit at once
# in both (12 x 32k fits only the dense pool). Knobs (env): SMOKE_BUDGET_S=500 SMOKE_INPUT_LEN
# SMOKE_NEW_TOKENS=128 SMOKE_CONCURRENCY=12 SMOKE_MEM_FRACTION=0.85 SMOKE_TWILIGHT_ARGS="..." SMOKE_ONLY=twilight|dense PORT=30000
set -o pipefail
T0=$(date +%s)
OUT="${OUT:-/tmp/serve_smoke_out}"; mkdir -p "$OUT"
ts(){ echo "[serve_smoke +$(( $(date +%s)-T0 ))s] $*"; }
BUDGET="${SMOKE_BUDGET_S:-500}"
B="${GPUBUNDLE:-.gpubundle}"

if ! python3 -c "import sglang, sglang_twilight" >/dev/null 2>&1; then
  ts "sglang / sglang_twilight not importable: setting up ($B)"
  # shellcheck disable=SC1090
  source "$B/devenv.sh" "$B" || { ts "devenv failed"; exit 1; }
  python3 -m pip install -q --no-deps --no-build-isolation -e . || { ts "pip install failed"; exit 1; }
fi
M=/tmp/llama8b-dummy
if [ ! -f "$M/config.json" ]; then rm -rf "$M"; cp -r "$B/llama8b-dummy" "$M" || { ts "no $B/llama8b-dummy"; exit 1; }; fi
ts "$(nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv,noheader 2>/dev/null)"

LEFT=$(( BUDGET - ($(date +%s) - T0) ))
SMOKE_T0="$T0" SMOKE_BUDGET_S="$BUDGET" SMOKE_MODEL="$M" OUT="$OUT" \
  timeout --signal=TERM --kill-after=10 "$LEFT" python3 - <<'PY' 2>&1 | tee "$OUT/serve_smoke_log.txt"
import concurrent.futures as cf
import http.client
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request

T0 = float(os.environ["SMOKE_T0"])
T_END = T0 + float(os.environ["SMOKE_BUDGET_S"])
OUT = os.environ["OUT"]
MODEL = os.environ["SMOKE_MODEL"]
NEW = int(os.environ.get("SMOKE_NEW_TOKENS", "128"))
CONC = int(os.environ.get("SMOKE_CONCURRENCY", "12"))
CTX = 33000
PORT = int(os.environ.get("PORT", "30000"))
ONLY = os.environ.get("SMOKE_ONLY", "")
TWILIGHT_ARGS = ["--twilight-max-budget", "512"] + os.environ.get("SMOKE_TWILIGHT_ARGS", "").split()
JSON_PATH = os.path.join(OUT, "serve_smoke.json")
TEMPLATE = "/tmp/serve_smoke_chat.jinja"

with open(TEMPLATE, "w") as f:
    f.write("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")

MEM = os.environ.get("SMOKE_MEM_FRACTION", "0.85")
COMMON = ["--model-path", MODEL, "--load-format", "dummy", "--mem-fraction-static", MEM,
          "--context-length", str(CTX), "--max-running-requests", str(CONC),
          "--chunked-prefill-size", "8192", "--cuda-graph-max-bs-decode", "16",
          "--page-size", "16", "--chat-template", TEMPLATE, "--decode-log-interval", "8",
          "--enable-metrics", "--host", "127.0.0.1", "--port", str(PORT)]
CMDS = {
    "twilight": [sys.executable, "-m", "sglang_twilight.launch_server"] + COMMON + TWILIGHT_ARGS,
    "dense": [sys.executable, "-m", "sglang.launch_server"] + COMMON
    + ["--attention-backend", "flashinfer"],
}
CMDS.update(json.loads(os.environ.get("SMOKE_CMD_OVERRIDE", "{}")))  # for testing the driver


def log(*a):
    print(f"[serve_smoke +{time.time() - T0:.0f}s]", *a, flush=True)


def left():
    return T_END - time.time()


def sh(cmd):
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception as e:  # noqa: BLE001
        return f"? ({e})"


def _commit():
    """$TWILIGHT_COMMIT when set (a copied tree's git metadata may be stale), else HEAD."""
    if os.environ.get("TWILIGHT_COMMIT"):
        return os.environ["TWILIGHT_COMMIT"]
    c = sh("git rev-parse HEAD 2>/dev/null")
    return c if re.fullmatch(r"[0-9a-f]{40}", c or "") else "unknown"


def versions():
    from importlib.metadata import PackageNotFoundError, version
    out = {}
    for d in ("sglang", "sglang-kernel", "flashinfer-python", "torch", "triton", "transformers",
              "sglang-twilight"):
        try:
            out[d] = version(d)
        except PackageNotFoundError:
            out[d] = None
    out["python"] = sys.version.split()[0]
    return out


RESULT = {
    "script": "benchmarks/serve_smoke.sh",
    "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(T0)),
    "card": sh("nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader"),
    "git": {"commit": _commit(), "dirty": bool(sh("git status --porcelain -uno"))},
    "versions": versions(),
    "config": {
        "model": "Llama-3.1-8B shape (llama8b-dummy config), --load-format dummy",
        "common_flags": COMMON[2:],
        "twilight_flags": TWILIGHT_ARGS,
        "concurrency": CONC, "max_new_tokens": NEW, "ignore_eos": True, "temperature": 0,
        "note": "dummy weights give nearly flat attention: top-p keeps almost every candidate, so "
                "the kept budget is clamped with --twilight-max-budget 512 (a stand-in for the "
                "pruning real weights give); the speed ratio is the sparse-decode cost at that "
                "budget, not an accuracy claim",
    },
    "runs": {},
    "errors": [],
}


def save():
    RESULT["elapsed_s"] = round(time.time() - T0, 1)
    tmp = JSON_PATH + ".tmp"
    with open(tmp, "w") as f:
        json.dump(RESULT, f, indent=1)
    os.replace(tmp, JSON_PATH)


def err(run, msg):
    log("ERROR", run, msg)
    RESULT["errors"].append(f"{run}: {msg}")
    save()


# ------------------------------------------------------------------ HTTP
BASE = f"http://127.0.0.1:{PORT}"


def call(path, payload=None, timeout=60.0):
    """-> (status, parsed json or text)."""
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(BASE + path, data=data,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            body = r.read().decode()
            st = r.status
    except urllib.error.HTTPError as e:
        body, st = e.read().decode(errors="replace"), e.code
    try:
        return st, json.loads(body)
    except ValueError:
        return st, body


def stream_generate(payload, timeout):
    """Streaming /generate -> (events [(abs time, completion_tokens)], last chunk)."""
    conn = http.client.HTTPConnection("127.0.0.1", PORT, timeout=timeout)
    conn.request("POST", "/generate", body=json.dumps(dict(payload, stream=True)),
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
    events, last = [], None
    for raw in resp:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            break
        obj = json.loads(data)
        events.append((time.time(), int(obj.get("meta_info", {}).get("completion_tokens", 0))))
        last = obj
    conn.close()
    return events, last


# ------------------------------------------------------------------ server
class Server:
    def __init__(self, name):
        self.name, self.p = name, None
        self.log_path = os.path.join(OUT, f"server_{name}.log")

    def start(self, wait_s):
        log(self.name, "CMD:", " ".join(CMDS[self.name]))
        self.logf = open(self.log_path, "w")
        self.t_start = time.time()
        self.p = subprocess.Popen(CMDS[self.name], start_new_session=True, stdout=self.logf,
                                  stderr=subprocess.STDOUT, env=dict(os.environ))
        deadline = time.time() + wait_s
        while time.time() < deadline:
            if self.p.poll() is not None:
                raise RuntimeError(f"server exited rc={self.p.returncode} after "
                                   f"{time.time() - self.t_start:.0f}s; tail: {self.tail()}")
            try:
                if call("/health", timeout=5)[0] == 200:
                    return time.time() - self.t_start
            except Exception:  # noqa: BLE001
                pass
            time.sleep(1)
        raise RuntimeError(f"no /health within {wait_s:.0f}s; tail: {self.tail()}")

    def tail(self, n=12):
        try:
            with open(self.log_path, errors="replace") as f:
                lines = [l.rstrip() for l in f if "warn" not in l.lower()]
            return " | ".join(lines[-n:])[-2500:]
        except OSError:
            return ""

    def stop(self):
        if self.p is None:
            return
        if self.p.poll() is None:
            try:
                os.killpg(self.p.pid, signal.SIGTERM)
                self.p.wait(timeout=20)
            except Exception:  # noqa: BLE001
                try:
                    os.killpg(self.p.pid, signal.SIGKILL)
                    self.p.wait(timeout=10)
                except Exception:  # noqa: BLE001
                    pass
        else:  # the launcher is gone; its children may not be
            try:
                os.killpg(self.p.pid, signal.SIGKILL)
            except Exception:  # noqa: BLE001
                pass
        self.logf.close()
        log(self.name, "server stopped")
        self.p = None


CURRENT = []


def _on_term(signum, frame):
    for s in CURRENT:
        s.stop()
    save()
    sys.exit(124)


signal.signal(signal.SIGTERM, _on_term)


def wait_gpu_free(limit_s=40):
    t = time.time()
    while time.time() - t < limit_s:
        used = sh("nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits")
        try:
            if int(used.split()[0]) < 3000:
                return
        except (ValueError, IndexError):
            return
        time.sleep(1)


# ------------------------------------------------------------------ measurements
def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * (len(xs) - 1) + 0.5))] if xs else None


def decode_stats(runs, t_send):
    """runs: per request [(t, completion_tokens)]. The steady window is when all requests decode:
    from the last first token to the first finish."""
    firsts = [ev[0][0] for ev in runs]
    finishes = [ev[-1][0] for ev in runs]
    t_a, t_b = max(firsts), min(finishes)
    win_tokens, itl = 0, []
    for ev in runs:
        prev_t, prev_n = None, None
        for t, n in ev:
            if prev_t is not None and n > prev_n:
                if t_a < t <= t_b:
                    win_tokens += n - prev_n
                if prev_t >= t_a and t <= t_b:
                    itl.append((t - prev_t) / (n - prev_n))
            prev_t, prev_n = t, n
    per_req = [(ev[-1][0] - ev[0][0]) / max(ev[-1][1] - ev[0][1], 1) for ev in runs]
    r = {
        "ttft_s": {"min": round(min(firsts) - t_send, 3), "median": round(statistics.median(firsts) - t_send, 3),
                   "max": round(max(firsts) - t_send, 3)},
        "e2e_s_max": round(max(finishes) - t_send, 3),
        "all_decoding_window_s": round(t_b - t_a, 4),
        "all_decoding_window_tokens": win_tokens,
        "decode_tok_s_all_decoding": round(win_tokens / (t_b - t_a), 1) if t_b > t_a and win_tokens else None,
        "itl_ms_median_all_decoding": round(1e3 * statistics.median(itl), 3) if itl else None,
        "itl_ms_p90_all_decoding": round(1e3 * pct(itl, 0.9), 3) if itl else None,
        "itl_samples": len(itl),
        "per_request_decode_ms_per_token_median": round(1e3 * statistics.median(per_req), 3),
        "completion_tokens": [ev[-1][1] for ev in runs],
    }
    return r


def log_throughput(path, running):
    """The server's own 'gen throughput (token/s)' of decode batches with the most running
    requests seen, up to `running` (a request still prefilling keeps the batch below it):
    {"running": n, "tok_s": [...]}."""
    by_n = {}
    pat = re.compile(r"#running-req: (\d+).*?gen throughput \(token/s\): ([\d.]+)")
    try:
        with open(path, errors="replace") as f:
            for line in f:
                m = pat.search(line)
                if m and 2 <= int(m.group(1)) <= running:
                    by_n.setdefault(int(m.group(1)), []).append(float(m.group(2)))
    except OSError:
        pass
    if not by_n:
        return {"running": None, "tok_s": []}
    n = max(by_n)
    # the first line after a prefill averages over the idle gap: drop values far below the rest
    vals = by_n[n]
    top = max(vals)
    return {"running": n, "tok_s": [v for v in vals if v >= 0.2 * top]}


def phase(name, input_len, phase_end):
    run = RESULT["runs"].setdefault(name, {})
    srv = Server(name)
    CURRENT.append(srv)
    try:
        wait_s = max(30.0, min(240.0, phase_end - time.time() - 60))
        run["startup_s"] = round(srv.start(wait_s), 1)
        log(name, f"server up in {run['startup_s']}s")
        st, info = call("/server_info", timeout=30)
        if st == 200 and isinstance(info, dict):
            run["max_total_num_tokens"] = info.get("max_total_num_tokens")
            run["max_running_requests"] = info.get("max_running_requests")
            run["page_size"] = info.get("page_size")
            run["attention_backend"] = info.get("attention_backend")
        save()
        if input_len is None:
            pool = run.get("max_total_num_tokens") or CONC * 32768
            input_len = int(os.environ.get("SMOKE_INPUT_LEN", 0)) or \
                min(32000, int(0.97 * pool / CONC) - NEW)
            RESULT["config"]["input_len"] = input_len
            RESULT["config"]["input_len_rule"] = ("min(32000, 0.97 * twilight max_total_num_tokens / "
                                                  f"{CONC} - {NEW})")
        log(name, f"pool {run.get('max_total_num_tokens')} tokens; requests of {input_len} tokens")
        # warm-up (JIT of the extend-path kernels)
        t = time.time()
        st, r = call("/generate", {"input_ids": list(range(1000, 3000)),
                                   "sampling_params": {"max_new_tokens": 4, "temperature": 0}},
                     timeout=max(10, min(120, phase_end - time.time())))
        run["warmup"] = {"status": st, "s": round(time.time() - t, 2)}
        # the 12 long requests
        rng = random.Random(1234)
        prompts = [[rng.randrange(1000, 120000) for _ in range(input_len)] for _ in range(CONC)]
        sp = {"max_new_tokens": NEW, "temperature": 0, "ignore_eos": True}
        t_send = time.time()
        timeout = max(20.0, phase_end - time.time() - 30)
        with cf.ThreadPoolExecutor(CONC) as ex:
            futs = [ex.submit(stream_generate, {"input_ids": p, "sampling_params": sp}, timeout)
                    for p in prompts]
            outs, fails = [], []
            for fu in futs:
                try:
                    outs.append(fu.result())
                except Exception as e:  # noqa: BLE001
                    fails.append(repr(e)[:300])
        run["long_requests"] = {"ok": len(outs), "failed": fails,
                                "wall_s": round(time.time() - t_send, 2)}
        if fails:
            err(name, f"{len(fails)} long requests failed: {fails[:2]}")
        good = [ev for ev, last in outs if ev]
        if good:
            run["decode"] = decode_stats(good, t_send)
            d = run["decode"]
            log(name, f"decode (all {CONC} decoding): {d['decode_tok_s_all_decoding']} tok/s, "
                f"ITL median {d['itl_ms_median_all_decoding']} ms; TTFT max {d['ttft_s']['max']} s")
            cached = [last.get("meta_info", {}).get("cached_tokens") for ev, last in outs if last]
            run["cached_tokens"] = cached
        save()
        # the small requests
        small = {}
        t = time.time()
        st, r = call("/v1/completions", {"model": "default", "prompt": "The capital of France is",
                                         "max_tokens": 16, "temperature": 0}, timeout=60)
        small["completions"] = {"status": st, "ms": round(1e3 * (time.time() - t)),
                                "text": (r.get("choices") or [{}])[0].get("text") if isinstance(r, dict) else str(r)[:200],
                                "usage": r.get("usage") if isinstance(r, dict) else None}
        t = time.time()
        st, r = call("/v1/chat/completions", {"model": "default", "max_tokens": 16, "temperature": 0,
                                              "messages": [{"role": "user", "content": "Say hello."}]},
                     timeout=60)
        small["chat"] = {"status": st, "ms": round(1e3 * (time.time() - t)),
                         "text": ((r.get("choices") or [{}])[0].get("message") or {}).get("content") if isinstance(r, dict) else str(r)[:200],
                         "usage": r.get("usage") if isinstance(r, dict) else None}
        for label, p in (("per_request_p_0.9", 0.9), ("invalid_p_1.5", 1.5)):
            st, r = call("/generate", {"input_ids": list(range(2000, 4100)),
                                       "sampling_params": {"max_new_tokens": 8, "temperature": 0,
                                                           "custom_params": {"top_p_attn": p}}},
                         timeout=60)
            small[label] = {"status": st, "body": (json.dumps(r) if not isinstance(r, str) else r)[:300]}
        st, _ = call("/health", timeout=10)
        small["health_after"] = st
        run["small_requests"] = small
        for k, v in small.items():
            if isinstance(v, dict):
                log(name, k, v.get("status"), str(v.get("text", v.get("body", "")))[:80])
        if small["completions"]["status"] != 200 or small["chat"]["status"] != 200:
            err(name, "OpenAI endpoint failed: " + json.dumps(
                {k: small[k]["status"] for k in ("completions", "chat")}))
        if name == "twilight" and small["invalid_p_1.5"]["status"] != 400:
            err(name, f"invalid top_p_attn answered {small['invalid_p_1.5']['status']}, not 400")
        try:
            with urllib.request.urlopen(BASE + "/metrics", timeout=20) as m:
                lines = m.read().decode(errors="replace").splitlines()
            run["metrics_twilight"] = [l for l in lines if "twilight" in l and not l.startswith("#")][:60]
        except Exception as e:  # noqa: BLE001
            run["metrics_twilight"] = [f"/metrics failed: {e!r}"[:200]]
        save()
    except Exception as e:  # noqa: BLE001
        err(name, repr(e)[:1500])
    finally:
        srv.stop()
        CURRENT.remove(srv)
        run["server_gen_throughput_at_fullest_batch"] = log_throughput(srv.log_path, CONC)
        with open(srv.log_path, errors="replace") as f:
            text = f.read()
        run["server_log_errors"] = [l.strip()[:300] for l in text.splitlines()
                                    if re.search(r"Traceback|Error|error:|OOM|out of memory", l)][:20]
        run["server_log_twilight"] = [l.strip()[:300] for l in text.splitlines()
                                      if "twilight" in l.lower()][:20]
        save()
        wait_gpu_free()
    return RESULT["config"].get("input_len", input_len)


save()
input_len = int(os.environ["SMOKE_INPUT_LEN"]) if os.environ.get("SMOKE_INPUT_LEN") else None
if input_len:
    RESULT["config"]["input_len"] = input_len
try:
    if ONLY in ("", "twilight"):
        end = T0 + 0.55 * (T_END - T0) if ONLY == "" else T_END - 10
        input_len = phase("twilight", input_len, min(end, T_END - 10))
    if ONLY in ("", "dense"):
        if input_len is None:
            input_len = 27000  # twilight did not report its pool: a length that fits both
            RESULT["config"]["input_len"] = input_len
        phase("dense", input_len, T_END - 10)
finally:
    for s in list(CURRENT):
        s.stop()
    tw = RESULT["runs"].get("twilight", {}).get("decode") or {}
    de = RESULT["runs"].get("dense", {}).get("decode") or {}
    ratio = {}
    if tw.get("decode_tok_s_all_decoding") and de.get("decode_tok_s_all_decoding"):
        ratio["decode_tok_s_twilight_over_dense"] = round(
            tw["decode_tok_s_all_decoding"] / de["decode_tok_s_all_decoding"], 3)
    if tw.get("itl_ms_median_all_decoding") and de.get("itl_ms_median_all_decoding"):
        ratio["itl_dense_over_twilight"] = round(
            de["itl_ms_median_all_decoding"] / tw["itl_ms_median_all_decoding"], 3)
    RESULT["ratios"] = ratio
    RESULT["finished"] = True
    save()
    log("ratios", ratio, "errors", len(RESULT["errors"]))
    log("wrote", JSON_PATH)
PY
RC=${PIPESTATUS[0]}
ts "driver rc=$RC; $(ls "$OUT" | tr '\n' ' ')"
exit "$RC"
