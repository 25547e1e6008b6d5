"""kernels/launch.py: the one table of launch shapes, and its override."""

import pytest

from sglang_twilight.kernels import attend, estimate, launch, topp


def test_override_merges_and_restores():
    before = launch.get("topp")
    with launch.override(topp=dict(CHUNK=64), estimate_wide_rows=7):
        assert launch.get("topp") == dict(before, CHUNK=64)
        assert launch.get("estimate_wide_rows") == 7
        with launch.override(topp=dict(RAISE=0)):  # nested: on top of the outer change
            assert launch.get("topp") == dict(before, CHUNK=64, RAISE=0)
        assert launch.get("topp") == dict(before, CHUNK=64)
    assert launch.get("topp") == before and launch.get("estimate_wide_rows") == 256


def test_override_restores_after_an_error():
    with pytest.raises(RuntimeError):
        with launch.override(attend=dict(waves=1)):
            raise RuntimeError
    assert launch.get("attend")["waves"] == 32


def test_unknown_names_are_refused():
    with pytest.raises(KeyError, match="no launch shape named 'topq'"):
        with launch.override(topq=dict(CHUNK=64)):
            pass
    with pytest.raises(KeyError, match="'CHUNKS'"):
        with launch.override(topp=dict(CHUNKS=64)):
            pass
    with pytest.raises(TypeError, match="'topp' is a dict"):
        with launch.override(topp=64):
            pass
    with launch.override(union_warps={4096: 2}):  # per-size tables take new sizes
        assert launch.row_warps(4096) == 2 and launch.row_warps(8192) == 16
    assert launch.row_warps(4096) == 8


def test_get_returns_a_copy():
    launch.get("union_warps")[8192] = 1
    launch.get("maxnreg")["topp"] = 1
    assert launch.get("union_warps")[8192] == 16 and launch.maxnreg("topp") == {}


def test_launchers_read_the_table():
    """The kernels' launch helpers follow an override (what the sweeps and tests rely on)."""
    assert estimate.estimate_span(8) == 512 and estimate.estimate_span(256) == 256
    with launch.override(estimate=dict(BLOCK_N=16, ITERS=2), estimate_wide_rows=1 << 30):
        assert estimate.estimate_span(256) == 32
        assert estimate.score_parts_width(8192) == 8192 // 32
    assert topp._topp_launch(8192, 256)["num_warps"] == 8
    assert topp._topp_launch(8192, 512)["num_warps"] == 4  # the wide shape from 512 q heads
    with launch.override(topp_wide_heads=1 << 30, topp=dict(num_warps=16)):
        assert topp._topp_launch(8192, 512)["num_warps"] == 16
    with launch.override(maxnreg=dict(topp=96)):
        assert topp._topp_launch(8192, 512)["maxnreg"] == 96
    assert attend.attend_splits(64, 132) == 16
    with launch.override(attend=dict(waves=1)):
        assert attend.attend_splits(64, 132) == 4


def test_rows_name_every_entry_with_a_reason():
    rows = launch.rows()
    assert {r["name"] for r in rows} >= {"page_scores", "select", "estimate", "estimate_wide",
                                         "topp", "topp_wide", "union_warps", "attend", "store"}
    assert all(r["why"] and r["value"] == r["default"] for r in rows)
