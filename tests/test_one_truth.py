"""One definition of "the model in format X": what `compare` measures is what `convert` writes and what
loading that checkpoint runs — the same bytes, the same outputs — for every built-in and every format
`convert` can write."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import dtypelab
from dtypelab.analysis import compare_models
from dtypelab.checkpoint import convert_checkpoint, read_header, stored_nbytes
from dtypelab.models import DummyModel
from dtypelab.variants import Variant, build_variants

CAST_FORMATS = ["fp16", "bf16"]
QUANTIZED_FORMATS = ["int8", "int4:g32", "int4:g32:asym", "fp8_e4m3", "int8:a8", "mxfp4", "mxfp8", "nvfp4"]


def written_bytes(folder) -> int:
    """Tensor data bytes of every safetensors file ``convert`` wrote (headers excluded)."""
    return sum(e.nbytes for f in sorted(folder.glob("*.safetensors")) for e in read_header(f).tensors)


def same_numbers(a, b) -> bool:
    return all((x == y) or (x != x and y != y) for x, y in zip(a, b, strict=True))


def unloaded_bytes(reference, folder) -> int:
    """Bytes of source tensors the model does not load (minilm's file carries a legacy ``position_ids``
    that transformers 5 recomputes): ``convert`` copies them as they are, ``compare`` has no such tensor."""
    state = reference.state_dict()
    return sum(e.nbytes for f in sorted(folder.glob("*.safetensors")) for e in read_header(f).tensors
               if e.name not in state)


def check(reference, folder, spec, inputs, tmp_path):
    out = tmp_path / spec.replace(":", "_")
    convert_checkpoint(folder, out, spec)
    converted = dtypelab.load(str(out)).model
    ours = build_variants(reference, spec)[dtypelab.get_format(spec).name]
    assert ours.ok, ours.failure
    loaded_variant = Variant("converted", "converted", ours.format, converted)
    result = compare_models(reference, [ours, loaded_variant], inputs, keep_outputs=True)
    measured, loaded = result.variants
    assert measured.stored_bytes == written_bytes(out) - unloaded_bytes(reference, folder)
    assert measured.stored_bytes == stored_nbytes(converted) == loaded.stored_bytes
    m, c = measured.metrics, loaded.metrics
    assert same_numbers([m.mean_abs_diff, m.max_abs_diff, m.sqnr_db, m.cosine_similarity],
                        [c.mean_abs_diff, c.max_abs_diff, c.sqnr_db, c.cosine_similarity])
    assert torch.equal(measured.output, loaded.output)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each built-in LM saved with save_pretrained (safetensors), in float32."""
    folders = {}
    for name in ("tiny-llama", "tiny-gpt2"):
        loaded = dtypelab.load(name)
        folder = tmp_path_factory.mktemp(name)
        loaded.model.save_pretrained(folder)
        loaded.tokenizer.save_pretrained(folder)
        folders[name] = (loaded.model, folder, dtypelab.model_inputs(loaded))
    return folders


@pytest.mark.parametrize("spec", CAST_FORMATS + QUANTIZED_FORMATS)
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_compare_measures_what_convert_writes(saved, name, spec, tmp_path):
    model, folder, inputs = saved[name]
    check(model, folder, spec, inputs, tmp_path)


@pytest.mark.parametrize("spec", CAST_FORMATS)
def test_the_seed_model_as_a_bare_checkpoint(spec, tmp_path):
    model = DummyModel()
    save_file(model.state_dict(), tmp_path / "dummy.safetensors")
    convert_checkpoint(tmp_path / "dummy.safetensors", tmp_path / "out.safetensors", spec)
    cast = dtypelab.cast_model(model, spec)
    assert stored_nbytes(cast) == written_bytes(tmp_path) - stored_nbytes(model)  # in + out files
    from safetensors.torch import load_file

    written = load_file(tmp_path / "out.safetensors")
    assert all(torch.equal(written[k], v) for k, v in cast.state_dict().items())


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["bf16", "int8", "int4:g128"])
def test_minilm_compare_measures_what_convert_writes(spec, tmp_path):
    minilm = dtypelab.load("minilm")
    folder = dtypelab.models.minilm_path()
    check(minilm.model, __import__("pathlib").Path(folder), spec, dtypelab.model_inputs(minilm), tmp_path)
