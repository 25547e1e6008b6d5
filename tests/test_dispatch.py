"""The per-step dense/sparse choice (sglang_twilight/dispatch.py): step features, the fit of the
two step-time models, the profiles file, picking a profile for a GPU and geometry, and the
policy's answers in every mode."""

from __future__ import annotations

import json
import random

import pytest
import torch

from sglang_twilight.dispatch import (FEATURES, DispatchPolicy, StepCostModel, fit_step_models,
                                      load_profiles, pick_profile, save_profile, step_features)

GEO = dict(num_kv_heads=8, group=4, head_dim=128, num_layers=32, num_sparse_layers=30,
           capacity=8192, max_budget=512, page_size=16)


def test_step_features_from_lengths_tensor_list_and_sum():
    lens = [100, 8192, 20000, 1]
    want = [1.0, 4.0, float(sum(lens)), float(100 + 8192 + 8192 + 1), float(sum(lens))]
    assert step_features(lens, 8192) == want
    assert step_features(torch.tensor(lens, dtype=torch.int32), 8192) == want
    # tokens read by more than one request: distinct counts them once
    shared = want[:4] + [float(sum(lens) - 8000)]
    assert step_features(lens, 8192, shared=8000) == shared
    assert step_features(torch.tensor(lens), 8192, shared=8000) == shared
    # only the batch size and the total: every row taken to hold the mean
    f = step_features(None, 8192, rows=4, tokens=40000)
    assert f == [1.0, 4.0, 40000.0, 4 * 8192.0, 40000.0]
    assert step_features(None, 8192, rows=4, tokens=40000, shared=30000)[4] == 10000.0
    with pytest.raises(ValueError):
        step_features(None, 8192)


def _synthetic_points(dense, sparse, noise=0.0, seed=0, shared_prefix=False):
    """Step times of known models at a grid of (context, batch); with ``shared_prefix`` also
    cells whose requests all share their context but the last 128 tokens."""
    rnd = random.Random(seed)
    pts = []
    for ctx in (1024, 2048, 4096, 8192, 16384, 30720):
        for bs in (1, 2, 4, 8, 12, 16, 32, 64):
            shares = (0, (bs - 1) * (ctx - 128)) if shared_prefix and bs > 1 else (0,)
            for shared in shares:
                f = step_features([ctx] * bs, 8192, shared=shared)
                d = sum(c * x for c, x in zip(dense, f)) * (1 + rnd.uniform(-noise, noise))
                s = sum(c * x for c, x in zip(sparse, f)) * (1 + rnd.uniform(-noise, noise))
                pts.append(dict(features=f, dense_ms=d, sparse_ms=s))
    return pts


DENSE = (8.0, 0.05, 4.0e-5, 0.0, 0.0)  # weights + per-row + KV bytes
SPARSE = (10.5, 0.09, 1.0e-6, 5.0e-6, 0.0)  # a fixed chain, page bounds, candidates
# a token read again by another request of the step costs 1e-5 ms; one read first 4e-5 ms
DENSE_L2 = (8.0, 0.05, 1.0e-5, 0.0, 3.0e-5)
SPARSE_L2 = (10.5, 0.09, 1.0e-6, 4.0e-6, 1.0e-6)


def test_fit_recovers_known_models_and_chooses_the_faster_way():
    m = fit_step_models(_synthetic_points(DENSE, SPARSE), card="GPU X", **GEO)
    for got, want in zip(m.dense, DENSE):
        assert got == pytest.approx(want, rel=1e-6, abs=1e-9)
    for got, want in zip(m.sparse, SPARSE):
        assert got == pytest.approx(want, rel=1e-6, abs=1e-9)
    # exact models: the choice is never worse than the margin lets it be (near ties go dense)
    assert m.fit["dense_max_rel_err"] < 1e-9 and m.fit["max_regret"] <= 1 / (1 - m.margin) + 1e-9
    # short and small: dense; long and large: sparse
    assert not m.prefers_sparse(step_features([2048], 8192))
    assert m.prefers_sparse(step_features([30720] * 12, 8192))


def test_fit_prices_a_shared_prefix_only_when_one_was_measured():
    # no shared-prefix step measured: distinct == tokens everywhere, so its coefficients stay 0
    # (the fit does not split the token cost between two columns it cannot tell apart)
    m = fit_step_models(_synthetic_points(DENSE_L2, SPARSE_L2), card="GPU X", **GEO)
    assert m.dense[4] == 0.0 and m.sparse[4] == 0.0 and not m.sees_shared
    assert "distinct" in m.fit["not_fitted"]
    assert m.dense[2] == pytest.approx(4.0e-5, rel=1e-6)  # the whole token cost, as before
    # with shared-prefix steps the known split comes back
    m = fit_step_models(_synthetic_points(DENSE_L2, SPARSE_L2, shared_prefix=True),
                        card="GPU X", **GEO)
    assert m.sees_shared and "not_fitted" not in m.fit
    for got, want in zip(m.dense + m.sparse, DENSE_L2 + SPARSE_L2):
        assert got == pytest.approx(want, rel=1e-6, abs=1e-9)
    # 12 requests on one 16k prefix: dense reads it mostly from L2 and wins; on 12 distinct
    # 16k contexts sparse wins
    lens = [16384 + 128] * 12
    assert m.prefers_sparse(step_features(lens, 8192))
    assert not m.prefers_sparse(step_features(lens, 8192, shared=11 * 16384))


def test_profile_of_four_features_loads_with_the_shared_prefix_unpriced(tmp_path):
    """A profile written before ``distinct`` existed still loads and predicts as it did."""
    old = dict(StepCostModel(card="GPU A", dense=DENSE, sparse=SPARSE, **GEO).to_dict())
    old.update(features=["one", "rows", "tokens", "cands"], dense=list(DENSE[:4]),
               sparse=list(SPARSE[:4]))
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"profiles": [old]}))
    (m,) = load_profiles(str(path))
    assert m.dense == DENSE and m.sparse == SPARSE and not m.sees_shared
    f = step_features([20000] * 8, 8192, shared=7 * 19000)
    assert m.predict(f) == m.predict(step_features([20000] * 8, 8192))
    for bad in (dict(old, features=["one", "rows", "tokens", "cands", "pages"],
                     dense=[0] * 5, sparse=[0] * 5),
                dict(old, dense=list(DENSE))):  # 5 coefficients for 4 features
        path.write_text(json.dumps({"profiles": [bad]}))
        with pytest.raises(ValueError, match="features"):
            load_profiles(str(path))


def test_fit_keeps_coefficients_non_negative_under_noise():
    m = fit_step_models(_synthetic_points(DENSE, SPARSE, noise=0.03, seed=3), card="GPU X", **GEO)
    assert all(c >= 0 for c in m.dense + m.sparse)
    assert m.fit["dense_mean_rel_err"] < 0.03 and m.fit["sparse_mean_rel_err"] < 0.03
    # a wrong model would be caught: the regret is measured on the points themselves
    assert m.fit["max_regret"] < 1.06


def test_fit_needs_enough_points():
    with pytest.raises(ValueError):
        fit_step_models(_synthetic_points(DENSE, SPARSE)[:3], card="x", **GEO)


def test_margin_keeps_near_ties_dense():
    m = StepCostModel(card="x", dense=(10.0, 0, 0, 0, 0), sparse=(9.8, 0, 0, 0, 0), margin=0.03,
                      **GEO)
    assert not m.prefers_sparse([1, 1, 1, 1, 1])  # 2% faster is within the margin
    m2 = StepCostModel(card="x", dense=(10.0, 0, 0, 0, 0), sparse=(9.6, 0, 0, 0, 0),
                       margin=0.03, **GEO)
    assert m2.prefers_sparse([1, 1, 1, 1, 1])


def test_profiles_file_round_trip_and_replacement(tmp_path):
    path = str(tmp_path / "profiles.json")
    a = StepCostModel(card="GPU A", dense=DENSE, sparse=SPARSE, fit={"points": 9}, **GEO)
    b = StepCostModel(card="GPU A", dense=DENSE, sparse=SPARSE,
                      **dict(GEO, num_kv_heads=3, group=3, head_dim=64))
    save_profile(a, path)
    save_profile(b, path)
    a2 = StepCostModel(card="GPU A", dense=DENSE, sparse=(1, 0, 0, 0, 0), **GEO)
    save_profile(a2, path)  # same card and geometry: replaces a
    got = load_profiles(path)
    assert len(got) == 2
    assert {m.num_kv_heads: m.sparse for m in got}[8] == (1.0, 0.0, 0.0, 0.0, 0.0)
    data = json.load(open(path))
    assert data["profiles"][0]["features"] == list(FEATURES)
    assert load_profiles(str(tmp_path / "missing.json")) == []


def test_pick_profile_exact_closest_and_unknown_gpu():
    exact = StepCostModel(card="GPU A", dense=DENSE, sparse=SPARSE, **GEO)
    small = StepCostModel(card="GPU A", dense=DENSE, sparse=SPARSE,
                          **dict(GEO, num_kv_heads=3, group=3, head_dim=64, num_layers=30,
                                 num_sparse_layers=28, max_budget=0))
    other = StepCostModel(card="GPU B", dense=DENSE, sparse=SPARSE, **GEO)
    m, why = pick_profile([small, exact, other], "GPU A", GEO)
    assert m is exact and "measured" in why
    # another budget or layer count: the closest profile of the same attention shape
    m, why = pick_profile([small, exact], "GPU A", dict(GEO, num_layers=28, max_budget=0))
    assert m is exact and "closest" in why
    # another attention shape (bytes per token, kernel shapes): none, whatever is measured
    m, why = pick_profile([small, exact], "GPU A", dict(GEO, num_kv_heads=4, head_dim=64))
    assert m is None and "4 KV heads" in why
    m, why = pick_profile([exact, other], "GPU C", GEO)
    assert m is None and "GPU C" in why and "bench_decode_step.py --fit" in why


def test_policy_modes():
    model = StepCostModel(card="x", dense=(0, 0, 1e-3, 0, 0), sparse=(5.0, 0, 0, 0, 0),
                          margin=0.0, **GEO)
    auto = DispatchPolicy("auto", model, 8192)
    assert auto.both_ways and not auto.wants_shared
    assert auto.sparse_step(torch.tensor([6000])) is True      # 6 ms dense > 5 ms sparse
    assert auto.sparse_step(torch.tensor([4000])) is False
    assert auto.sparse_step(None, rows=2, tokens=12000) is True
    assert auto.sparse_step(None) is True  # nothing known: the sparse path
    assert "shared prefixes not measured" in auto.describe()
    # a model that prices a shared prefix: 3000 of 6000 tokens read twice make dense cheaper
    shared = DispatchPolicy("auto", StepCostModel(
        card="x", dense=(0, 0, 0.5e-3, 0, 0.5e-3), sparse=(5.0, 0, 0, 0, 0), margin=0.0,
        **GEO), 8192)
    assert shared.wants_shared and "prices shared prefixes" in shared.describe()
    assert shared.sparse_step(torch.tensor([3000, 3000])) is True     # 6 ms
    assert shared.sparse_step(torch.tensor([3000, 3000]), shared=3000) is False  # 4.5 ms
    auto.force = False
    assert auto.sparse_step(torch.tensor([60000])) is False
    for mode, want in (("sparse", True), ("dense", False)):
        p = DispatchPolicy(mode, shared.model, 8192)
        assert not p.both_ways and not p.wants_shared
        assert p.sparse_step(torch.tensor([10])) is want
        assert p.sparse_step(torch.tensor([100000])) is want
        assert "forced" in p.describe()
    # no cost model for this GPU and shape: every step dense (never slower than dense), both
    # ways still captured, and a benchmark's forced way still wins
    none = DispatchPolicy("auto", None, 8192, reason="no profile")
    assert none.both_ways
    for lens in ([100, 1024], [100, 1000], [200000] * 64):
        assert none.sparse_step(torch.tensor(lens)) is False
    assert none.sparse_step(None) is False
    assert none.sparse_step(None, rows=64, tokens=10**7) is False
    none.force = True
    assert none.sparse_step(torch.tensor([100])) is True
    assert "without a cost model, every decode step dense" in none.describe()
    with pytest.raises(ValueError):
        DispatchPolicy("fast", None, 8192)


def test_shipped_profiles_parse():
    """Whatever profiles ship with the package load, with every feature's coefficient."""
    for m in load_profiles():
        assert len(m.dense) == len(FEATURES) == len(m.sparse)
        assert m.card and m.capacity > 0 and 0 <= m.margin < 0.5
