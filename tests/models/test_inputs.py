"""Inputs: token ids, text through the model's own tokenizer (padding masked), tensor files, and the
bundled default sentences."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from dtypelab.errors import InputError
from dtypelab.models import (
    LoadedModel,
    byte_tokenizer,
    default_texts,
    load,
    load_tensor_file,
    model_inputs,
    parse_token_ids,
    to_device,
    tokenize,
)

pytest.importorskip("transformers")


def test_default_texts_are_64_distinct_sentences():
    texts = default_texts()
    assert len(texts) == 64 and len(set(texts)) == 64
    assert all(t[0].isupper() and t[-1] in ".?!" for t in texts)


def test_byte_tokenizer_round_trips_any_text():
    tokenizer = byte_tokenizer()
    text = "Café €3.50 — naïve 東京?"
    ids = tokenizer(text)["input_ids"]
    assert len(tokenizer) == 259 and ids[0] == tokenizer.bos_token_id == 1
    assert len(ids) == 1 + len(text.encode("utf-8"))  # one id per UTF-8 byte after <s>
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_tokenize_pads_and_masks(short_texts, minilm):
    batch = tokenize(minilm.tokenizer, short_texts, minilm.max_length)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == mask.shape and ids.shape[0] == 3
    for row, text in enumerate(short_texts):
        alone = minilm.tokenizer(text)["input_ids"]  # tokenised on its own: no padding
        assert int(mask[row].sum()) == len(alone)
        assert ids[row, : len(alone)].tolist() == alone
        assert (ids[row, len(alone):] == minilm.tokenizer.pad_token_id).all()


def test_long_text_is_truncated_to_the_model_context(tiny_llama):
    batch = tokenize(tiny_llama.tokenizer, ["x" * 2000], tiny_llama.max_length)
    assert batch["input_ids"].shape == (1, 512)


def test_default_inputs(tiny_llama, dummy):
    batch = model_inputs(tiny_llama)
    assert batch["input_ids"].shape[0] == 64 and set(batch) == {"input_ids", "attention_mask"}
    assert torch.equal(model_inputs(load("dummy")), torch.tensor([[1, 0, 1]]))


def test_token_ids_for_a_transformers_model_get_a_full_mask(tiny_llama):
    batch = model_inputs(tiny_llama, input_ids="[[1, 40, 41]]")
    assert torch.equal(batch["attention_mask"], torch.ones(1, 3, dtype=torch.long))


def test_one_input_source_only(tiny_llama):
    with pytest.raises(InputError, match="several inputs given"):
        model_inputs(tiny_llama, texts=["a"], input_ids="[[1, 2]]")


def test_text_for_a_model_without_tokenizer():
    with pytest.raises(InputError, match="has no tokenizer"):
        model_inputs(load("dummy"), texts=["hello"])


def test_ids_outside_the_vocabulary(tiny_llama):
    with pytest.raises(InputError, match="from 0 to 258"):
        model_inputs(tiny_llama, input_ids="[[1, 259]]")


def test_text_file(tmp_path, tiny_llama):
    path = tmp_path / "texts.txt"
    path.write_text("First line.\n\nSecond one here.\n", encoding="utf-8")
    assert model_inputs(tiny_llama, text_file=path)["input_ids"].shape[0] == 2
    path.write_text("\n \n")
    with pytest.raises(InputError, match="holds no text"):
        model_inputs(tiny_llama, text_file=path)


def test_tensor_files(tmp_path, tiny_llama):
    ids = parse_token_ids("[[1, 40, 41, 0]]")
    np.save(tmp_path / "ids.npy", ids.numpy().astype(np.int32))
    loaded = load_tensor_file(tmp_path / "ids.npy")
    assert loaded.dtype == torch.long and torch.equal(loaded, ids)
    mask = torch.tensor([[1, 1, 1, 0]])
    save_file({"input_ids": ids, "attention_mask": mask}, tmp_path / "batch.safetensors")
    batch = model_inputs(tiny_llama, tensor_file=tmp_path / "batch.safetensors")
    assert torch.equal(batch["attention_mask"], mask) and torch.equal(batch["input_ids"], ids)


@pytest.mark.parametrize(("name", "content", "match"), [
    ("ids.txt", b"1 2 3", "use a .safetensors or .npy file"),
    ("ids.npy", b"not numpy", "cannot read"),
    ("ids.safetensors", b"\x02\x00", "corrupt or truncated"),
])
def test_bad_tensor_files(tmp_path, name, content, match):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(InputError, match=match):
        load_tensor_file(tmp_path / name)
    with pytest.raises(InputError, match="no such input file"):
        load_tensor_file(tmp_path / "missing.npy")


def test_a_tokenizer_without_pad_token_pads_with_eos_and_is_left_as_it_was():
    """GPT-2's tokenizer has no pad token; padding with EOS is masked out, so any id would do."""
    tokenizer = byte_tokenizer()
    tokenizer.pad_token = None
    batch = tokenize(tokenizer, ["ab", "abcd"])
    alone = tokenizer("ab")["input_ids"]  # <s> a b, no padding
    assert batch["input_ids"][0].tolist() == alone + [tokenizer.eos_token_id] * 2
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert tokenizer.pad_token is None


def test_a_tokenizer_without_pad_or_eos_token_is_refused():
    tokenizer = byte_tokenizer()
    tokenizer.pad_token, tokenizer.eos_token = None, None
    with pytest.raises(InputError, match="neither a padding nor an end-of-sequence token"):
        tokenize(tokenizer, ["ab", "abcd"])


@pytest.mark.parametrize(("text", "match"), [
    ("[[99999999999999999999]]", "out of range"), ("[[1, 0], [1]]", "equal-length"), ("[]", "non-empty"),
    ("[[1.5]]", "of integers"), ("[[true]]", "of integers"), ("[[1, 0", "malformed"),
])
def test_bad_token_ids(text, match):
    with pytest.raises(InputError, match=match):
        parse_token_ids(text)


def test_flat_ids_are_one_sequence():
    assert parse_token_ids("[1, 0, 1]").tolist() == [[1, 0, 1]]


def test_npy_of_strings_is_refused(tmp_path):
    np.save(tmp_path / "words.npy", np.array(["a", "b"]))
    with pytest.raises(InputError, match="numeric .npy"):
        load_tensor_file(tmp_path / "words.npy")


def test_one_dimensional_ids_from_a_file_are_a_batch_of_one(tmp_path, tiny_llama):
    np.save(tmp_path / "ids.npy", np.array([1, 40, 41]))
    batch = model_inputs(tiny_llama, tensor_file=tmp_path / "ids.npy")
    assert batch["input_ids"].tolist() == [[1, 40, 41]] and batch["attention_mask"].tolist() == [[1, 1, 1]]


def test_inputs_are_built_on_the_models_device(monkeypatch, tiny_llama):
    """Built where the model lives (a GPU with --device cuda); "meta" stands in for another device."""
    monkeypatch.setattr(LoadedModel, "device", property(lambda self: torch.device("meta")))
    batch = model_inputs(tiny_llama, texts=["Hello."])
    assert {t.device.type for t in batch.values()} == {"meta"}
    assert model_inputs(load("dummy")).device.type == "meta"


def test_one_string_is_one_text_not_its_letters(tiny_llama):
    assert tokenize(tiny_llama.tokenizer, "Hello there.")["input_ids"].shape[0] == 1
    assert model_inputs(tiny_llama, texts="Hello there.")["input_ids"].shape[0] == 1


def test_float64_arrays_are_read_as_float32_and_run(tmp_path):
    embeds = np.random.default_rng(0).standard_normal((1, 3, 2))  # float64, as numpy makes them
    np.save(tmp_path / "embeds.npy", embeds)
    loaded = load_tensor_file(tmp_path / "embeds.npy")
    assert loaded.dtype == torch.float32 and torch.equal(loaded, torch.from_numpy(embeds).float())
    dummy = load("dummy").model
    assert dummy.head(loaded).shape == (1, 3, 2)  # runs in the float32 reference


@pytest.mark.parametrize("device", ["no-such-device", "cuda:99"])
def test_moving_inputs_to_a_device_torch_cannot_use_is_one_line(device):
    with pytest.raises(InputError, match=f"cannot put the inputs on device '{device}'"):
        to_device({"input_ids": torch.tensor([[1, 0, 1]])}, device)
