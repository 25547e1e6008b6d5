"""benchmarks/bench_tpot.py's bookkeeping on the CPU: cells, the pool check, the per-cell ratios
(the servers and SGLang's client need a GPU)."""

import sys

import pytest

from benchmarks.bench_tpot import _ratios, fits, parse_cells


def test_parse_cells():
    assert parse_cells(["2048:1,16", "7680:64,"]) == [(2048, 1), (2048, 16), (7680, 64)]


@pytest.mark.parametrize("ctx,conc,out,pool,want", [
    (30720, 12, 256, 12 * (30720 + 256), True), (30720, 12, 256, 12 * (30720 + 256) - 1, False),
    (2048, 128, 256, 10 ** 6, True)])
def test_fits(ctx, conc, out, pool, want):
    assert fits(ctx, conc, out, pool) is want


def test_ratios_pair_the_two_methods_of_a_cell():
    def row(method, ctx, conc, tpot, ttft, ds="random"):
        return dict(method=method, dataset=ds, context=ctx, concurrency=conc,
                    tpot_ms_median=tpot, ttft_ms_median=ttft)

    rows = [row("dense", 2048, 1, 8.0, 40.0), row("twilight", 2048, 1, 8.0, 44.0),
            row("dense", 30720, 12, 20.0, 500.0), row("twilight", 30720, 12, 8.0, 490.0),
            row("dense", 16384, 4, 10.0, 100.0),                      # twilight missing
            dict(method="twilight", dataset="random", context=16384, concurrency=4,
                 error="bench_serving failed"),
            row("dense", 16384, 12, 15.0, 300.0, ds="shared_prefix"),
            row("twilight", 16384, 12, 10.0, 330.0, ds="shared_prefix")]
    got = {(r["dataset"], r["context"], r["concurrency"]): r for r in _ratios(rows)}
    assert set(got) == {("random", 2048, 1), ("random", 30720, 12), ("shared_prefix", 16384, 12)}
    assert got[("random", 30720, 12)]["speedup"] == pytest.approx(2.5)
    assert got[("random", 30720, 12)]["tpot_twilight_over_dense"] == pytest.approx(0.4)
    assert got[("random", 2048, 1)]["ttft_twilight_over_dense"] == pytest.approx(1.1)
    assert got[("shared_prefix", 16384, 12)]["speedup"] == pytest.approx(1.5)


def test_client_args_send_exact_token_prompts_and_flush_after_warmup():
    from benchmarks.bench_tpot import client_args

    a = client_args("random", 7680, 16, 256, 32)
    assert "--tokenize-prompt" in a and "--flush-cache" in a
    assert a[a.index("--random-input-len") + 1] == "7680"
    assert a[a.index("--num-prompts") + 1] == "32" and a[a.index("--max-concurrency") + 1] == "16"
    sp = dict(groups=2, per_group=12, system_len=16384, question_len=128)
    g = client_args("shared_prefix", 16384, 12, 256, 24, sp)
    # SGLang's client refuses token ids for this dataset
    assert "--tokenize-prompt" not in g and "--flush-cache" in g
    assert g[g.index("--gsp-system-prompt-len") + 1] == "16384"


def test_server_tokens_sums_sglang_counters_over_label_sets():
    from benchmarks.bench_tpot import server_tokens

    text = "\n".join([
        "# HELP sglang:prompt_tokens_total Number of prefill tokens processed.",
        "# TYPE sglang:prompt_tokens_total counter",
        'sglang:prompt_tokens_total{model_name="m",tp_rank="0"} 30720.0',
        'sglang:prompt_tokens_total{model_name="m",tp_rank="1"} 10.0',
        'sglang:cached_tokens_total{model_name="m"} 16.0',
        'sglang:generation_tokens_total{model_name="m"} 512.0',
        'sglang:prompt_tokens_histogram_bucket{le="1024"} 3.0',
        'sglang_twilight_kept_rows{tp_rank="0"} 9.0'])
    assert server_tokens(text) == dict(prompt=30730.0, cached=16.0, generation=512.0)
    assert server_tokens("") == dict(prompt=0.0, cached=0.0, generation=0.0)


@pytest.fixture
def fake_client(monkeypatch):
    """SGLang's client module with its cli_main replaced: records sys.argv, then behaves as
    told (writes a result line, raises, or hangs)."""
    from sglang.benchmark import serving

    seen = {}

    def fake_main():
        import argparse
        import json
        import time

        seen["argv"] = list(sys.argv)
        mode = seen.get("mode", "ok")
        if mode == "hang":
            time.sleep(5)
        if mode == "raise":
            raise ValueError("Warmup failed - Please make sure benchmark arguments are right")
        if mode == "argparse":
            argparse.ArgumentParser().parse_args(["--nope"])  # SystemExit(2)
        out = sys.argv[sys.argv.index("--output-file") + 1]
        print("printed by the client")
        with open(out, "a") as f:
            f.write(json.dumps({"median_tpot_ms": 7.5, "completed": 4}) + "\n")

    monkeypatch.setattr(serving, "cli_main", fake_main)
    return seen


def test_run_bench_serving_in_process_passes_argv_and_reads_the_result(fake_client, tmp_path):
    from benchmarks.bench_tpot import run_bench_serving

    saved = list(sys.argv)
    res, cmd = run_bench_serving(30200, "/m", ["--num-prompts", "4"], str(tmp_path / "r.jsonl"),
                                 timeout=30)
    assert res == {"median_tpot_ms": 7.5, "completed": 4}
    argv = fake_client["argv"]
    assert argv[argv.index("--port") + 1] == "30200" and argv[-2:] == ["--num-prompts", "4"]
    assert cmd[1:3] == ["-m", "sglang.bench_serving"] and cmd[3:] == argv[1:]
    assert sys.argv == saved  # restored


@pytest.mark.parametrize("mode,match", [("raise", "Warmup failed"), ("argparse", "SystemExit")])
def test_run_bench_serving_reports_client_failures(fake_client, tmp_path, mode, match):
    from benchmarks.bench_tpot import run_bench_serving

    fake_client["mode"] = mode
    saved = list(sys.argv)
    with pytest.raises(RuntimeError, match=match):
        run_bench_serving(30200, "/m", [], str(tmp_path / "r.jsonl"), timeout=30)
    assert sys.argv == saved


def test_run_bench_serving_times_out(fake_client, tmp_path):
    from benchmarks.bench_tpot import run_bench_serving

    fake_client["mode"] = "hang"
    with pytest.raises(TimeoutError):
        run_bench_serving(30200, "/m", [], str(tmp_path / "r.jsonl"), timeout=0.5)


def test_merge_keeps_the_other_methods_rows_of_the_same_setup(tmp_path):
    import json

    from benchmarks.bench_tpot import prior_rows

    path = tmp_path / "tpot.json"
    base = dict(model="llama8b", output_len=256, card="NVIDIA H100 80GB HBM3", commit="abc1234",
                servers={"dense": {"pool_tokens": 10}, "twilight": {"pool_tokens": 9}},
                rows=[dict(method="dense", context=2048, concurrency=1, tpot_ms_median=6.5),
                      dict(method="twilight", context=2048, concurrency=1, tpot_ms_median=6.6)])
    path.write_text(json.dumps(base))
    rows, meta = prior_rows(path, "llama8b", 256, ["twilight"], "NVIDIA H100 80GB HBM3",
                            "abc1234")
    assert [r["method"] for r in rows] == ["dense"] and set(meta) == {"dense"}
    for field, args in (("model", ("smollm2", 256)), ("output length", ("llama8b", 512))):
        with pytest.raises(ValueError, match=field):
            prior_rows(path, *args, ["twilight"], "NVIDIA H100 80GB HBM3", "abc1234")
    with pytest.raises(ValueError, match="card"):
        prior_rows(path, "llama8b", 256, ["twilight"], "NVIDIA H200", "abc1234")
    with pytest.raises(ValueError, match="commit"):
        prior_rows(path, "llama8b", 256, ["twilight"], "NVIDIA H100 80GB HBM3", "fff0000")
