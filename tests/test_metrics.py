"""Kept-token statistics (sglang_twilight.metrics): device-side record, host-side windowed
mean / p50 / p99, debug log, Prometheus gauge (plain and multiprocess, as SGLang serves it)."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from sglang_twilight.metrics import (GAUGE_NAME, ROWS_GAUGE_NAME, SUM_GAUGE_NAME, KeptStats,
                                     PrefillRowCounter, bin_edges, stats_from_histogram)


def nearest_rank(values, q):
    v = sorted(values)
    return v[max(1, math.ceil(q * len(v))) - 1]


def run_steps(stats, steps, layers, *, lo, hi, seed, bs_list=None, rows=None):
    """Feed `steps` decode steps of random kept counts; return per step the counted values
    per layer and the reports."""
    g = torch.Generator().manual_seed(seed)
    H = stats.num_kv_heads
    fed, reports = [], []
    for t in range(steps):
        bs = bs_list[t % len(bs_list)] if bs_list else stats.max_rows
        step_vals = {}
        for lid in layers:
            buf = torch.randint(lo, hi, (rows or stats.max_rows, H), generator=g, dtype=torch.int32)
            stats.record(lid, buf, bs)
            step_vals[lid] = buf[:bs].reshape(-1).tolist()
        fed.append(step_vals)
        rep = stats.on_step()
        reports.append(rep if rep is None else dict(rep, steps=stats.last_steps))
    return fed, reports


def expected(fed, lid, upto, window):
    vals = [v for step in fed[max(0, upto - window):upto] for v in step[lid]]
    return sum(vals) / len(vals), nearest_rank(vals, 0.5), nearest_rank(vals, 0.99)


def test_bin_edges():
    e = bin_edges()
    assert e[:128] == list(range(128))
    assert all(b > a for a, b in zip(e, e[1:]))
    assert e[-1] <= 1 << 21 and e[-1] * 1.03 > 1 << 21
    assert max((b - a) / a for a, b in zip(e[128:], e[129:])) < 0.03


def test_exact_stats_over_window():
    layers = [2, 3, 7]
    st = KeptStats(layers, max_rows=6, num_kv_heads=3, device="cpu", window=8, interval=4, metrics=False)
    assert st.on_step() is None  # first call: start (discards warm-up records)
    fed, reports = run_steps(st, 20, layers, lo=1, hi=128, seed=0, bs_list=[6, 3, 5, 1], rows=6)
    for t, rep in enumerate(reports, start=1):
        if t % 4:
            assert rep is None
            continue
        assert rep.pop("steps") == min(t, 8)
        assert set(rep) == set(layers)
        for lid in layers:
            mean, p50, p99 = expected(fed, lid, t, 8)
            assert rep[lid]["mean"] == pytest.approx(mean, rel=1e-12)
            assert rep[lid]["p50"] == p50 and rep[lid]["p99"] == p99, (t, lid)


def test_large_counts_within_one_bin():
    layers = [5]
    st = KeptStats(layers, max_rows=32, num_kv_heads=8, device="cpu", window=16, interval=16, metrics=False)
    st.on_step()
    fed, reports = run_steps(st, 16, layers, lo=200, hi=300_000, seed=1)
    rep = reports[-1][5]
    mean, p50, p99 = expected(fed, 5, 16, 16)
    assert rep["mean"] == pytest.approx(mean, rel=1e-12)  # the sum is exact
    assert rep["p50"] == pytest.approx(p50, rel=0.03)
    assert rep["p99"] == pytest.approx(p99, rel=0.03)
    assert rep["count"] == 16 * 32 * 8


def test_warmup_records_are_discarded_and_rows_past_bs_ignored():
    st = KeptStats([4], max_rows=4, num_kv_heads=2, device="cpu", window=4, interval=2, metrics=False)
    st.record(4, torch.full((4, 2), 999), 4)  # e.g. graph capture warm-up: dropped
    st.on_step()
    buf = torch.tensor([[10, 20], [30, 40], [5000, 5000], [5000, 5000]])
    st.record(4, buf, 2)
    assert st.on_step() is None
    st.record(4, buf, 2)
    rep = st.on_step()
    assert rep[4]["mean"] == 25 and rep[4]["p50"] == 20 and rep[4]["p99"] == 40
    assert rep[4]["count"] == 8


def test_num_valid_rows_masks_graph_padding_and_flat_input():
    st = KeptStats([0, 1], max_rows=8, num_kv_heads=2, device="cpu", window=1, interval=1, metrics=False)
    st.on_step()
    kept = torch.tensor([[3, 4], [5, 6], [1, 1], [1, 1]], dtype=torch.int32)  # rows 2, 3: padding
    st.record(0, kept, 4, num_valid_rows=torch.tensor([2], dtype=torch.int32))
    st.record(1, kept.reshape(-1), 4, num_valid_rows=torch.tensor(4))
    rep = st.on_step()
    assert rep[0]["count"] == 4 and rep[0]["mean"] == 4.5 and rep[0]["p99"] == 6
    assert rep[1]["count"] == 8 and rep[1]["mean"] == pytest.approx(22 / 8)


def test_layers_without_records_are_left_out():
    st = KeptStats([2, 3], max_rows=2, num_kv_heads=1, device="cpu", window=2, interval=1, metrics=False)
    st.on_step()
    st.record(3, torch.tensor([[7], [9]]), 2)
    assert set(st.on_step()) == {3}


def test_record_is_pure_tensor_ops(monkeypatch):
    """No host sync in record(): every Tensor -> Python conversion raises while it runs."""
    st = KeptStats([1], max_rows=4, num_kv_heads=2, device="cpu", metrics=False)
    st.on_step()
    kept = torch.randint(1, 500, (4, 2))
    valid = torch.tensor([3])

    def boom(*a, **k):
        raise AssertionError("host sync in record()")

    for name in ("item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, boom)
    st.record(1, kept, 4)
    st.record(1, kept, 3, num_valid_rows=valid)
    monkeypatch.undo()
    assert int(st.acc[0, 1:].sum()) == 8 + 6


def test_stats_from_histogram_matches_definition():
    edges = bin_edges()
    g = torch.Generator().manual_seed(3)
    for n in (1, 2, 3, 99, 100, 101, 1000):
        vals = torch.randint(0, 128, (n,), generator=g)
        hist = torch.bincount(vals, minlength=len(edges)).unsqueeze(0)
        (s,) = stats_from_histogram(hist, vals.sum().reshape(1), edges)
        assert s["p50"] == nearest_rank(vals.tolist(), 0.5)
        assert s["p99"] == nearest_rank(vals.tolist(), 0.99)
    assert stats_from_histogram(torch.zeros(1, len(edges), dtype=torch.int64), torch.zeros(1), edges) == [None]


def test_debug_log(caplog):
    st = KeptStats([2], max_rows=2, num_kv_heads=1, device="cpu", window=2, interval=1, metrics=False)
    st.on_step()
    st.record(2, torch.tensor([[100], [50]]), 2)
    with caplog.at_level(logging.DEBUG, logger="sglang_twilight"):
        st.on_step()
    msgs = [r.getMessage() for r in caplog.records if r.name == "sglang_twilight"]
    assert any("L2 mean 75.0 p50 50 p99 100" in m for m in msgs), msgs


def test_prometheus_gauge_when_enabled():
    from prometheus_client import CollectorRegistry

    reg = CollectorRegistry()
    st = KeptStats([2, 9], max_rows=2, num_kv_heads=2, device="cpu", window=4, interval=1,
                   metrics=True, registry=reg, tp_rank=1)
    st.on_step()
    st.record(2, torch.tensor([[10, 20], [30, 40]]), 2)
    st.record(9, torch.tensor([[1, 1], [1, 3]]), 2)
    rep = st.on_step()
    for lid in (2, 9):
        for stat in ("mean", "p50", "p99"):
            v = reg.get_sample_value(GAUGE_NAME, {"tp_rank": "1", "layer": str(lid), "stat": stat})
            assert v == pytest.approx(rep[lid][stat]), (lid, stat)
    assert reg.get_sample_value(GAUGE_NAME, {"tp_rank": "1", "layer": "2", "stat": "mean"}) == 25
    # a later snapshot updates the same series (the children are looked up once, then reused)
    st.record(2, torch.tensor([[50, 60], [70, 80]]), 2)
    st.record(9, torch.tensor([[2, 2], [2, 2]]), 2)
    st.count_step(True)
    rep = st.on_step()
    assert rep[2]["mean"] == pytest.approx((10 + 20 + 30 + 40 + 50 + 60 + 70 + 80) / 8)
    assert reg.get_sample_value(GAUGE_NAME, {"tp_rank": "1", "layer": "2", "stat": "mean"}) == \
        pytest.approx(rep[2]["mean"])
    assert reg.get_sample_value(SUM_GAUGE_NAME, {"tp_rank": "1", "layer": "2", "kv_head": "1"}) \
        == 20 + 40 + 60 + 80
    assert reg.get_sample_value(SUM_GAUGE_NAME, {"tp_rank": "1", "layer": "9", "kv_head": "0"}) \
        == 1 + 1 + 2 + 2
    assert reg.get_sample_value("sglang_twilight_kept_rows", {"tp_rank": "1"}) == 4
    assert reg.get_sample_value("sglang_twilight_decode_steps",
                                {"tp_rank": "1", "path": "sparse"}) == 1

    off = CollectorRegistry()
    st2 = KeptStats([2], max_rows=1, num_kv_heads=1, device="cpu", interval=1, metrics=False, registry=off)
    st2.on_step()
    st2.record(2, torch.tensor([[5]]), 1)
    st2.on_step()
    assert off.get_sample_value(GAUGE_NAME, {"tp_rank": "0", "layer": "2", "stat": "mean"}) is None


def test_dense_steps_take_no_snapshot(monkeypatch):
    """Steps that all went dense leave the counters as they were: no copy, no report, only the
    step counts published; the first sparse step after them brings the snapshots back."""
    from prometheus_client import CollectorRegistry

    reg = CollectorRegistry()
    st = KeptStats([2], max_rows=2, num_kv_heads=1, device="cpu", window=64, interval=2,
                   metrics=True, registry=reg)
    consumed = []
    real = st._consume
    monkeypatch.setattr(st, "_consume",
                        lambda step, snap: consumed.append(step) or real(step, snap))
    st.on_step()
    for _ in range(2):  # two sparse steps: one snapshot
        st.record(2, torch.tensor([[7], [9]]), 2)
        st.count_step(True)
        st.on_step()
    assert consumed == [2] and st.last[2]["mean"] == 8
    for _ in range(6):  # six dense steps: three intervals, no snapshot
        st.count_step(False)
        assert st.on_step() is None
    assert consumed == [2] and st.last[2]["mean"] == 8
    steps = {p: reg.get_sample_value("sglang_twilight_decode_steps", {"tp_rank": "0", "path": p})
             for p in ("sparse", "dense")}
    assert steps == {"sparse": 2, "dense": 6}  # published at the last interval
    st.record(2, torch.tensor([[1], [3]]), 2)  # one sparse step among dense ones: a snapshot
    st.count_step(True)
    st.on_step()
    st.count_step(False)
    assert st.on_step() is not None and consumed == [2, 10]
    assert st.last[2]["mean"] == (7 + 9 + 7 + 9 + 1 + 3) / 6


def test_prometheus_multiprocess_like_sglang_metrics_endpoint(tmp_path):
    """SGLang's --enable-metrics: PROMETHEUS_MULTIPROC_DIR set before the scheduler imports
    prometheus_client; /metrics reads every process's files with MultiProcessCollector."""
    code = textwrap.dedent(
        """
        import json, torch
        from sglang_twilight.metrics import KeptStats, GAUGE_NAME, metrics_enabled
        st = KeptStats([3], max_rows=2, num_kv_heads=1, device="cpu", interval=1)  # auto-detect
        st.on_step()
        st.record(3, torch.tensor([[40], [60]]), 2)
        st.on_step()
        from prometheus_client import CollectorRegistry, generate_latest, multiprocess
        reg = CollectorRegistry()
        multiprocess.MultiProcessCollector(reg)
        text = generate_latest(reg).decode()
        print(json.dumps({"enabled": metrics_enabled(), "text": text}))
        """
    )
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(tmp_path))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["enabled"] is True
    assert f'{GAUGE_NAME}{{layer="3",stat="mean",tp_rank="0"}} 50.0' in out["text"], out["text"]
    assert f'{GAUGE_NAME}{{layer="3",stat="p99",tp_rank="0"}} 60.0' in out["text"]


@pytest.mark.gpu
def test_record_inside_cuda_graph():
    """record() captured in a CUDA graph and replayed on fresh counts; on_step reads the
    device stats without a wait (the report comes one call after its copy completed)."""
    dev = torch.device("cuda")
    st = KeptStats([2, 3], max_rows=8, num_kv_heads=4, device=dev, window=1000, interval=4, metrics=False)
    kept = torch.zeros(8, 4, dtype=torch.int32, device=dev)
    valid = torch.zeros(1, dtype=torch.int32, device=dev)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up, as SGLang's capture does (discarded by on_step)
        st.record(2, kept, 8, valid)
        st.record(3, kept, 8, valid)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        st.record(2, kept, 8, valid)
        st.record(3, kept, 8, valid)
    st.on_step()
    g = torch.Generator().manual_seed(5)
    fed = []
    report = None
    for t in range(1, 9):
        nv = 1 + t % 8
        vals = torch.randint(1, 128, (8, 4), generator=g, dtype=torch.int32)
        kept.copy_(vals)
        valid.fill_(nv)
        graph.replay()
        fed.extend(vals[:nv].reshape(-1).tolist())
        torch.cuda.synchronize()
        report = st.on_step() or report
    torch.cuda.synchronize()
    report = st.on_step() or report  # step 9 consumes the copy of step 8
    assert report is not None
    assert report[2]["count"] == len(fed) and report[3]["count"] == len(fed)
    assert report[2]["mean"] == pytest.approx(sum(fed) / len(fed))
    assert report[2]["p50"] == nearest_rank(fed, 0.5) and report[2]["p99"] == nearest_rank(fed, 0.99)


def test_prefill_row_counter_gauge():
    from prometheus_client import CollectorRegistry

    reg = CollectorRegistry()
    c = PrefillRowCounter(metrics=True, registry=reg, tp_rank=1)
    c.add(4096)
    c.add(300)
    assert c.total == 4396
    assert reg.get_sample_value(ROWS_GAUGE_NAME, {"tp_rank": "1"}) == 4396
    off = PrefillRowCounter(metrics=False)
    off.add(5)
    assert off.total == 5 and off._gauge is None
