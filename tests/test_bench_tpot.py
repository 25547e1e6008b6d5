"""benchmarks/bench_tpot.py's bookkeeping on the CPU: cells, the pool check, the per-cell ratios
(the servers and SGLang's client need a GPU)."""

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
