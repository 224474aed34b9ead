"""The text sets: real prose from pydoc_data.topics, split by topic, cut into --ctx windows."""

import dataclasses
import json
from pydoc_data.topics import topics

import pytest
import torch

from dtypelab.errors import InputError
from dtypelab.models import (
    BUILTIN_MODELS,
    TEXT_SETS,
    byte_tokenizer,
    calibration_text,
    evaluation_text,
    load,
    model_inputs,
    text_set,
    token_windows,
)
from dtypelab.models.texts import (
    EVALUATION_EVERY,
    EVALUATION_OFFSET,
    SHARED_BOILERPLATE,
    clean,
    split_topics,
)
from helpers import run_cli

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def byte_tok():
    return byte_tokenizer()


def n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def test_sizes_with_the_byte_tokenizer(byte_tok):
    evaluation, calibration = n_tokens(byte_tok, evaluation_text()), n_tokens(byte_tok, calibration_text())
    assert evaluation >= 8_000 and calibration >= 16_000
    assert evaluation == len(evaluation_text().encode("utf-8"))  # one token per byte, no BOS
    assert calibration > 4 * evaluation  # calibration is the bulk; evaluation ~1/8 of the topics


def test_sizes_with_a_wordpiece_tokenizer(minilm):
    tokenizer = minilm.tokenizer
    assert n_tokens(tokenizer, evaluation_text()) >= 8_000
    assert n_tokens(tokenizer, calibration_text()) >= 16_000


def test_the_split_shares_no_topic_and_no_text():
    calibration, evaluation = split_topics()
    assert not set(calibration) & set(evaluation) and len(evaluation) >= 5
    kept = sorted(calibration + evaluation)
    assert evaluation == kept[EVALUATION_OFFSET::EVALUATION_EVERY]
    cleaned = {name: clean(text) for name, text in topics.items()}
    for name in set(topics) - set(kept):  # every dropped topic is a repeat of a kept one
        assert any(cleaned[name] in cleaned[other] for other in kept if other != name)
    held_out, fitted = evaluation_text(), calibration_text()
    for name in topics:  # no topic's text is in both parts: sections repeated as topics included
        assert not (cleaned[name] in held_out and cleaned[name] in fitted), name
    shared = set(held_out.split("\n\n")) & set(fitted.split("\n\n"))
    assert all(len(paragraph) < SHARED_BOILERPLATE for paragraph in shared), shared  # "See also:" only
    assert "compound" in calibration and "if" not in kept  # 'if' is a section of 'compound'


def test_the_texts_are_deterministic_and_named():
    assert evaluation_text() == evaluation_text() == text_set("evaluation")
    assert calibration_text() == text_set("calibration")
    assert list(TEXT_SETS) == ["evaluation", "calibration"]
    with pytest.raises(InputError, match="unknown text set 'train'"):
        text_set("train")


def test_clean_is_light():
    raw = 'The "if" statement\n******************\n\n\n\nIt selects\ta suite:   \n\n   if x:\n       pass\n'
    assert clean(raw) == 'The "if" statement\n\nIt selects      a suite:\n\n   if x:\n       pass'
    text = evaluation_text()
    assert "\n\n\n" not in text and "******" not in text and "   " in text  # indentation kept


def test_windows_by_hand(byte_tok):
    text = "abcdefghij"  # 10 bytes: 10 tokens
    ids = byte_tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 10
    windows = token_windows(byte_tok, text, ctx=4)  # non-overlapping; the partial 'ij' is dropped
    assert windows["input_ids"].tolist() == [ids[0:4], ids[4:8]]
    assert windows["attention_mask"].tolist() == [[1] * 4] * 2
    assert windows["input_ids"].dtype == windows["attention_mask"].dtype == torch.long
    strided = token_windows(byte_tok, text, ctx=4, stride=3)  # starts 0, 3, 6
    assert strided["input_ids"].tolist() == [ids[0:4], ids[3:7], ids[6:10]]
    assert token_windows(byte_tok, text, ctx=10)["input_ids"].tolist() == [ids]
    assert token_windows(byte_tok, text, ctx=2, stride=5)["input_ids"].tolist() == [ids[0:2], ids[5:7]]


@pytest.mark.parametrize(("ctx", "stride", "max_length", "message"), [
    (1, None, None, "--ctx 1 is too short"),
    (4, 0, None, "--stride 0 must be at least 1"),
    (11, None, None, "the text is 10 tokens, shorter than one window of --ctx 11"),
    (8, None, 6, r"--ctx 8 is longer than the model accepts \(6 tokens\)"),
])
def test_window_errors_are_one_line(byte_tok, ctx, stride, max_length, message):
    with pytest.raises(InputError, match=message) as info:
        token_windows(byte_tok, "abcdefghij", ctx, stride, max_length=max_length)
    assert "\n" not in str(info.value)


def test_model_inputs_from_a_text_set(tiny_llama):
    batch = model_inputs(tiny_llama, text_set="evaluation", ctx=128)
    n_bytes = len(evaluation_text().encode("utf-8"))
    assert set(batch) == {"input_ids", "attention_mask"}
    assert batch["input_ids"].shape == (n_bytes // 128, 128) and bool(batch["attention_mask"].all())
    overlapping = model_inputs(tiny_llama, text_set="calibration", ctx=256, stride=128)
    n_cal = len(calibration_text().encode("utf-8"))
    assert overlapping["input_ids"].shape == ((n_cal - 256) // 128 + 1, 256)
    assert torch.equal(overlapping["input_ids"][1, :128], overlapping["input_ids"][0, 128:])
    assert model_inputs(tiny_llama, text_set="evaluation")["input_ids"].shape[1] == 512  # default ctx
    first = model_inputs(tiny_llama, text_set="evaluation", ctx=128, windows=3)["input_ids"]
    assert torch.equal(first, batch["input_ids"][:3])  # the first windows, not a sample


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"ctx": 64}, "--ctx, --stride and --windows need --text-set"),
    ({"texts": ["hi there"], "stride": 8}, "--ctx, --stride and --windows need --text-set"),
    ({"text_set": "evaluation", "texts": ["hi"]}, r"several inputs given \(--text, --text-set\)"),
    ({"text_set": "evaluation", "ctx": 513}, r"longer than the model accepts \(512 tokens\)"),
    ({"text_set": "held-out"}, "unknown text set 'held-out'"),
    ({"windows": 2}, "--ctx, --stride and --windows need --text-set"),
    ({"text_set": "evaluation", "windows": 0}, "--windows 0 selects nothing"),
    ({"text_set": "evaluation", "windows": 10**6}, r"--windows 1000000: the text holds only \d+ windows"),
])
def test_model_inputs_errors(tiny_llama, kwargs, message):
    with pytest.raises(InputError, match=message) as info:
        model_inputs(tiny_llama, **kwargs)
    assert "\n" not in str(info.value)


def test_a_text_set_needs_a_tokenizer():
    with pytest.raises(InputError, match="'dummy' has no tokenizer, so it cannot read --text-set"):
        model_inputs(load("dummy"), text_set="evaluation")


def test_a_builtin_default_text_set(tiny_llama, monkeypatch):
    existing = ("dummy", "minilm", "tiny-llama", "tiny-gpt2")
    assert all(BUILTIN_MODELS[name].text_set is None for name in existing)
    assert model_inputs(tiny_llama)["input_ids"].shape[0] == 64  # today's default: the bundled sentences
    monkeypatch.setitem(BUILTIN_MODELS, "tiny-llama",
                        dataclasses.replace(BUILTIN_MODELS["tiny-llama"], text_set="evaluation"))
    n_bytes = len(evaluation_text().encode("utf-8"))
    assert model_inputs(tiny_llama)["input_ids"].shape == (n_bytes // 512, 512)
    assert model_inputs(tiny_llama, ctx=64)["input_ids"].shape == (n_bytes // 64, 64)
    assert model_inputs(tiny_llama, texts=["Hello there!"])["input_ids"].shape[0] == 1  # a given input wins
    with pytest.raises(InputError, match="need --text-set"):  # ... and takes no --ctx
        model_inputs(tiny_llama, texts=["Hello there!"], ctx=64)


def test_compare_on_the_evaluation_text(capsys):
    code, out, _ = run_cli(capsys, "compare", "tiny-llama", "--to", "bf16", "--text-set", "evaluation",
                           "--ctx", "128", "--json")
    assert code == 0
    windows = len(evaluation_text().encode("utf-8")) // 128
    result = json.loads(out)
    assert result["positions"] == windows * 128 and result["padding_positions"] == 0
    assert result["variants"][0]["next_token"]["positions"] == windows * 127  # all but each window's first


@pytest.mark.parametrize("argv", [["compare", "tiny-llama", "--ctx", "128"],
                                  ["headroom", "tiny-llama", "--stride", "64"]])
def test_ctx_without_a_text_set_is_refused(capsys, argv):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and out == ""
    assert err.strip() == ("error: --ctx, --stride and --windows need --text-set: "
                           "add --text-set evaluation or calibration")
