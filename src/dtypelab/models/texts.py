"""Real English prose for perplexity, KL and calibration, in a calibration part and a held-out part.

Models stage, beside :mod:`dtypelab.models.inputs` (which turns a text set into a model's inputs).

Source and licence: the text is the documentation Python's own standard library ships in
:mod:`pydoc_data.topics` (the reference-manual topics ``help()`` shows: statements, expressions, data
model, ...), read at run time from the running interpreter, so nothing is copied into dtypelab. It is ©
Python Software Foundation, under the PSF licence (the licence of CPython and its documentation). What is
in it: written technical English in reStructuredText-like plain text: headings, paragraphs, grammar rules
(``if_stmt ::= ...``) and indented code examples — genuinely written text, not random or templated
tokens, but more code-flavoured than ordinary prose (perplexities are not comparable with published
WikiText figures). About 65k words in CPython 3.11 (52k once repeats are dropped); the topics differ a
little between Python versions, so the exact texts (and token counts) are those of the interpreter
dtypelab runs on.

The split is by topic, and no text is in both parts. Many topics repeat each other: a section
(``if``, ``customization``) is also a topic of its own inside a larger one (``compound``,
``specialnames``), so a topic whose cleaned text is contained in another's is dropped (22 of the 79 on
CPython 3.11) and only the containing one kept. Of the remaining topics, sorted by name, every
:data:`EVALUATION_EVERY`-th from :data:`EVALUATION_OFFSET` (positions 3, 9, 15, ...) is held out for
evaluation, the others are for calibration; and a paragraph of the evaluation topics that also occurs in
the calibration part (a shared ``Changed in version ...`` note) is left out of the evaluation text, unless
it is boilerplate shorter than :data:`SHARED_BOILERPLATE` characters (``See also:``, ``Note:``). On
CPython 3.11 the evaluation part is ~8.5k words, 60k bytes: 60k tokens with dtypelab's byte-level
tokenizer, 16k with MiniLM's WordPiece, 15k with SmolLM2's BPE; calibration ~44k words, 311k bytes: 84k
WordPiece tokens, 75k SmolLM2 tokens.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from ..errors import InputError
from ..lazy import lazy_module

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_module("torch")  # the text sets' names and DEFAULT_CTX serve --help without torch

EVALUATION_EVERY = 6  # one topic in 6 (sorted by name, repeats dropped) is held out for evaluation ...
EVALUATION_OFFSET = 3  # ... starting at the fourth: ~1/6 of the words, ~16k WordPiece tokens
SHARED_BOILERPLATE = 40  # characters; shorter shared paragraphs ("See also:", "Note:") stay in evaluation

DEFAULT_CTX = 512  # tokens per window, llama.cpp perplexity's default

_UNDERLINE = re.compile(r"([*=\-~^#])\1{2,}")  # a heading's underline: "******", "======", "------"


def _topics() -> dict[str, str]:
    """topic name -> documentation text, from the running interpreter's standard library."""
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # some distributions strip pydoc_data
        raise InputError("this Python has no pydoc_data.topics (its documentation text), which the text "
                         "sets are read from: use a full Python install, or give --text-file") from exc
    return topics


def split_topics() -> tuple[list[str], list[str]]:
    """The topic names of (calibration, evaluation), each sorted; disjoint, and without the topics whose
    text is contained in another topic's (a section repeated as a topic of its own)."""
    topics = {name: clean(text) for name, text in _topics().items()}
    names = sorted(topics)
    def repeated(n: str) -> bool:  # contained in another topic; of two identical ones the first name stays
        return any(m != n and topics[n] in topics[m] and (topics[n] != topics[m] or m < n) for m in names)

    kept = [n for n in names if not repeated(n)]
    evaluation = kept[EVALUATION_OFFSET::EVALUATION_EVERY]
    return [n for n in kept if n not in evaluation], evaluation


def clean(text: str) -> str:
    """Light clean-up of one topic: tabs expanded, trailing spaces dropped, heading underlines removed,
    runs of blank lines collapsed to one. Indentation (code examples, grammar) is kept."""
    lines = [line.rstrip() for line in text.expandtabs(8).splitlines()]
    lines = [line for line in lines if not _UNDERLINE.fullmatch(line.strip())]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _paragraphs(names: list[str]) -> list[str]:
    topics = _topics()
    return [paragraph for name in names for paragraph in clean(topics[name]).split("\n\n")]


def calibration_text() -> str:
    """The calibration part: every topic not held out, cleaned, paragraphs joined by a blank line (~311k
    characters on CPython 3.11). For calibrating quantizers; never measure on it."""
    return "\n\n".join(_paragraphs(split_topics()[0]))


def evaluation_text() -> str:
    """The held-out evaluation part (~60k characters on CPython 3.11), without any paragraph of
    :data:`SHARED_BOILERPLATE` characters or more that calibration also holds: perplexity, KL and the
    other next-token metrics are measured on it."""
    calibration, evaluation = split_topics()
    seen = set(_paragraphs(calibration))
    return "\n\n".join(p for p in _paragraphs(evaluation) if len(p) < SHARED_BOILERPLATE or p not in seen)


TEXT_SETS = {"evaluation": evaluation_text, "calibration": calibration_text}


def text_set(name: str) -> str:
    """The text of the set ``name`` (``evaluation`` or ``calibration``)."""
    if name not in TEXT_SETS:
        raise InputError(f"unknown text set {name!r}: choose one of {', '.join(TEXT_SETS)}")
    return TEXT_SETS[name]()


def token_windows(tokenizer: object, text: str, ctx: int = DEFAULT_CTX, stride: int | None = None, *,
                  max_length: int | None = None, windows: int | None = None) -> dict[str, torch.Tensor]:
    """Cut ``text`` into windows of ``ctx`` tokens, as llama.cpp's perplexity does.

    The whole text is tokenised once, without special tokens (no BOS per window: every window is plain
    text). Window i holds tokens ``[i*stride, i*stride + ctx)``; the last partial window is dropped, so
    every window is full and ``attention_mask`` is all ones. With dtypelab's next-token metrics every
    position after the first of a window is counted: ``windows * (ctx - 1)`` predictions. (llama.cpp
    scores only the second half of each window, so that every prediction has at least ctx/2 tokens of
    context; here the early positions count too.) A ``stride`` below ``ctx`` overlaps windows and counts
    the overlapping tokens again in each window.

    Args:
        tokenizer: a transformers tokenizer.
        text: the text to cut.
        ctx: tokens per window (at least 2: one prediction).
        stride: tokens between window starts (default ``ctx``: non-overlapping windows).
        max_length: the model's longest input in tokens; a larger ``ctx`` is refused.
        windows: keep only the first this many windows (default: all); more than the text holds is
            refused, so a figure never silently rests on fewer windows than asked for.

    Returns:
        ``input_ids`` and ``attention_mask``, both ``(windows, ctx)`` int64.
    """
    stride = ctx if stride is None else stride
    if ctx < 2:
        raise InputError(f"--ctx {ctx} is too short: a window needs at least 2 tokens (one to predict from)")
    if stride < 1:
        raise InputError(f"--stride {stride} must be at least 1 token")
    if windows is not None and windows < 1:
        raise InputError(f"--windows {windows} selects nothing: give at least 1, or leave it out for all")
    if max_length is not None and ctx > max_length:
        raise InputError(f"--ctx {ctx} is longer than the model accepts ({max_length} tokens): "
                         f"use --ctx {max_length} or less")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    if len(ids) < ctx:
        raise InputError(f"the text is {len(ids)} tokens, shorter than one window of --ctx {ctx}: "
                         "use a smaller --ctx or a longer text")
    tokens = torch.tensor(ids, dtype=torch.long)
    cut = tokens.unfold(0, ctx, stride)  # (windows, ctx): starts 0, stride, 2*stride ...
    if windows is not None and windows > len(cut):
        raise InputError(f"--windows {windows}: the text holds only {len(cut)} windows of --ctx {ctx} "
                         f"(stride {stride}): use --windows {len(cut)} or less, or a smaller --ctx")
    cut = cut[:windows].contiguous()
    return {"input_ids": cut, "attention_mask": torch.ones_like(cut)}
