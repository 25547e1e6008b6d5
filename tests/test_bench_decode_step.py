"""benchmarks/bench_decode_step.py on the CPU: the parts that need no GPU."""

import time
import types

import pytest

from benchmarks import bench_decode_step as B


def test_host_profile_of_decode_steps_names_the_host_work():
    """bench_decode_step's host profile: per step, the functions with the most own time and the
    backend's by cumulative time; a slow host function of the step shows up with its calls and
    time per step."""

    class _Ob:  # stands in for sglang.benchmark.one_batch: decode(ids, batch, runner)
        @staticmethod
        def decode(ids, batch, runner):
            _busy()
            return ids + 1, None

    def _busy():
        t = time.perf_counter()
        while time.perf_counter() - t < 0.002:
            pass

    ids, host = B._host_profile(0, None, None, _Ob, 5)
    assert ids == 5
    names = [e["fn"] for e in host["own"]]
    assert any(n.endswith(":_busy") for n in names), names
    busy = next(e for e in host["own"] if e["fn"].endswith(":_busy"))
    assert busy["calls"] == 1 and busy["cum_ms"] >= 2.0
    assert host["total_ms"] >= busy["own_ms"] > 0


def test_shared_cells_prefix_and_merge_keep_them_apart():
    assert B.shared_prefix_len(16384 + 128, 128, 16) == 16384
    assert B.shared_prefix_len(16384 + 100, 128, 16) == 16352  # whole pages only
    with pytest.raises(ValueError, match="shared cell 100"):
        B.shared_prefix_len(100, 128, 16)
    plain = dict(context=16512, batch=12, seq_lens=[16512] * 12)
    shared = dict(plain, shared_prefix=16384, shared_tokens=11 * 16384)
    dense = {"rows": [dict(plain, dense_ms=13.0), dict(shared, dense_ms=10.0)]}
    tw = {"rows": [dict(plain, sparse_ms=11.0, dense_way_ms=13.1),
                   dict(shared, sparse_ms=11.5, dense_way_ms=10.1)]}
    rows = B.merge(dense, tw)
    assert [(r["dense_ms"], r["twilight_sparse_ms"]) for r in rows] == [(13.0, 11.0), (10.0, 11.5)]
    assert "shared_prefix" not in rows[0]
    assert rows[1]["shared_prefix"] == 16384 and rows[1]["shared_tokens"] == 11 * 16384


def test_byte_model_counts_a_shared_prefix_once_where_every_token_is_read():
    kw = dict(weight_bytes=0, num_layers=4, dense_layers=1, num_kv_heads=8, head_dim=128,
              capacity=8192, page_size=16, kept=512)
    lens = [16512] * 12
    kv_tok = 8 * 128 * 2 * 2
    d0, d1 = B.step_bytes("dense", lens, **kw), B.step_bytes("dense", lens, shared=11 * 16384,
                                                             **kw)
    assert d0["attention"] - d1["attention"] == 4 * 11 * 16384 * kv_tok
    t0, t1 = (B.step_bytes("twilight", lens, **kw),
              B.step_bytes("twilight", lens, shared=11 * 16384, **kw))
    pages_bytes = 11 * 16384 // 16 * 8 * (2 * 128 + 4)
    assert t0["attention"] - t1["attention"] == 11 * 16384 * kv_tok + 3 * pages_bytes


def test_fit_from_rows_with_shared_cells_prices_the_prefix(tmp_path):
    """The rows' shared_tokens reach the cost model: a fit over plain and shared cells of known
    step times sends a shared 16k x 12 step dense and a plain one sparse."""
    from sglang_twilight.dispatch import load_profiles

    geo = dict(num_kv_heads=8, group=4, head_dim=128, num_layers=32, num_sparse_layers=30,
               capacity=8192, max_budget=512, page_size=16)
    rows = []
    for ctx in (2048, 8192, 16512, 30848):
        for bs in (1, 4, 12):
            for shared in ((0, (bs - 1) * (ctx - 128)) if bs > 1 else (0,)):
                tokens = ctx * bs
                dense = 8.0 + 0.05 * bs + 1e-5 * tokens + 3e-5 * (tokens - shared)
                sparse = 10.5 + 0.09 * bs + 2e-6 * tokens + 4e-6 * bs * min(ctx, 8192)
                row = dict(context=ctx, batch=bs, seq_lens=[ctx] * bs, dense_ms=dense * 1.01,
                           twilight_sparse_ms=sparse, twilight_dense_way_ms=dense)
                if shared:
                    row.update(shared_prefix=ctx - 128, shared_tokens=shared)
                rows.append(row)
    args = types.SimpleNamespace(dense_way_from="twilight", margin=None,
                                 profiles_out=str(tmp_path / "p.json"))
    tw = {"info": {"card": "GPU X", "geometry": geo}}
    fit = B._fit(args, tw, rows)
    (model,) = load_profiles(args.profiles_out)
    assert model.sees_shared and "not_fitted" not in fit["fit"]
    by = {(r["context"], r["batch"], r.get("shared_prefix", 0)): r for r in rows}
    assert by[(16512, 12, 0)]["model_way"] == "sparse"
    assert by[(16512, 12, 16384)]["model_way"] == "dense"
    # without the shared cells the prefix stays unpriced
    B._fit(args, tw, [r for r in rows if "shared_prefix" not in r])
    (model,) = load_profiles(args.profiles_out)
    assert not model.sees_shared
