"""Checkpoint inspection and conversion, checked against safetensors' own reader and torch's casts."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dtypelab.checkpoint import (
    convert_checkpoint,
    inspect_checkpoint,
    parse_size,
    read_header,
    remove_leftovers,
)
from dtypelab.checkpoint.safetensors_file import encode_header
from dtypelab.errors import CheckpointError, DamageError, InputError
from helpers import corrupt_tensor_writes

SRC_DIR = str(Path(__file__).resolve().parents[2] / "src")


def tensors() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {"embed.weight": torch.randn(64, 32), "layers.0.norm.weight": torch.rand(32) + 0.5,
            "layers.0.proj.weight": torch.randn(32, 32), "layers.0.proj.bias": torch.randn(32).double(),
            "position_ids": torch.arange(64), "mask": torch.rand(8) > 0.5,
            "half.weight": torch.randn(4, 4).half(),
            "codes": torch.randint(-128, 127, (16,), dtype=torch.int8),
            "empty": torch.zeros(0, 4), "scale": torch.tensor(0.125, dtype=torch.float64)}


def expected_cast(source: dict[str, torch.Tensor], dtype: torch.dtype, keep=()) -> dict[str, torch.Tensor]:
    """Independent truth: torch's own cast of floating tensors, everything else untouched."""
    return {k: v.to(dtype) if v.is_floating_point() and k not in keep else v for k, v in source.items()}


def assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        assert actual[name].shape == tensor.shape, name
        assert torch.equal(actual[name].reshape(-1).view(torch.uint8),  # bit for bit, NaNs included
                           tensor.reshape(-1).view(torch.uint8)), name


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def hf_folder(root: Path, source: dict[str, torch.Tensor], shards: int = 2) -> Path:
    """A Hugging Face style folder: shards, index, config, tokenizer, a sub-folder."""
    root.mkdir()
    names = list(source)
    weight_map, total = {}, 0
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: source[n] for n in names[i::shards]}
        save_file(part, root / file, metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
        total += sum(t.numel() * t.element_size() for t in part.values())
    index = {"metadata": {"total_size": total, "note": "kept"}, "weight_map": weight_map}
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    (root / "config.json").write_text(json.dumps({"model_type": "x", "torch_dtype": "float32",
                                                  "dtype": "float32", "hidden": 32}))
    (root / "tokenizer.json").write_text('{"vocab": {}}')
    (root / "extra").mkdir()
    (root / "extra" / "notes.txt").write_text("hello")
    (root / "original").mkdir()  # Meta's layout: the consolidated weights again, as a pickle
    (root / "original" / "consolidated.00.pth").write_bytes(b"not copied")
    return root


def load_folder(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


# --------------------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("fmt,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16),
                                       ("fp32", torch.float32)])
def test_single_file_round_trip(tmp_path, fmt, dtype):
    source = tensors()
    save_file(source, tmp_path / "in.safetensors", metadata={"format": "pt", "origin": "test"})
    before = digest(tmp_path)
    result = convert_checkpoint(tmp_path / "in.safetensors", tmp_path / "out.safetensors", fmt,
                                keep=["*norm*"], verify=True)
    assert digest(tmp_path)["in.safetensors"] == before["in.safetensors"]  # source untouched
    expected = expected_cast(source, dtype, {"layers.0.norm.weight"})
    assert_same(load_file(tmp_path / "out.safetensors"), expected)
    assert read_header(tmp_path / "out.safetensors").metadata == {"format": "pt", "origin": "test"}
    actions = {t.name: t.action for t in result.tensors}
    assert actions["layers.0.norm.weight"] == "kept" and actions["position_ids"] == "copied"
    assert result.verified and result.shards == ["out.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors", "out.safetensors"]


def test_sharded_folder_resharded_with_correct_index(tmp_path):
    source = tensors()
    src = hf_folder(tmp_path / "src", source)
    save_file({"embed.weight": source["embed.weight"]}, src / "consolidated.safetensors")  # not indexed
    (src / "pytorch_model.bin").write_bytes(b"pickled fp32 weights")
    before = digest(src)
    result = convert_checkpoint(src, tmp_path / "dst", "bf16", max_shard_size="3KB", verify=True)
    dst = tmp_path / "dst"
    assert digest(src) == before
    assert_same(load_folder(dst), expected_cast(source, torch.bfloat16))
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert index["metadata"]["note"] == "kept"
    assert set(index["weight_map"]) == set(source)
    sizes = {}
    for name, file in index["weight_map"].items():
        assert name in load_file(dst / file)
        sizes[name] = load_file(dst / file)[name].numel() * load_file(dst / file)[name].element_size()
    assert index["metadata"]["total_size"] == sum(sizes.values())
    shard_files = sorted(p.name for p in dst.glob("*.safetensors"))
    assert len(shard_files) == len(result.shards) > 2
    assert shard_files[0] == f"model-00001-of-{len(shard_files):05d}.safetensors"
    for file in shard_files:  # every shard within the limit unless one tensor alone is larger
        header = read_header(dst / file)
        data = sum(e.nbytes for e in header.tensors)
        assert data <= 3000 or len(header.tensors) == 1
    config = json.loads((dst / "config.json").read_text())
    assert config["torch_dtype"] == config["dtype"] == "bfloat16" and config["hidden"] == 32
    assert (dst / "tokenizer.json").read_text() == '{"vocab": {}}'
    assert (dst / "extra" / "notes.txt").read_text() == "hello"
    assert result.config_updated
    assert set(result.copied_files) == {"config.json", "tokenizer.json", "extra/notes.txt"}
    assert result.skipped_files == ["consolidated.safetensors", "original/consolidated.00.pth",
                                    "pytorch_model.bin"]  # the weights again, in the source precision
    assert not (dst / "original").exists()
    assert not (dst / "pytorch_model.bin").exists() and not (dst / "consolidated.safetensors").exists()
    assert "not copied" in result.to_text()


def test_folder_keeps_its_shards_without_max_shard_size(tmp_path):
    src = hf_folder(tmp_path / "src", tensors(), shards=3)
    convert_checkpoint(src, tmp_path / "dst", "fp16")
    assert sorted(p.name for p in (tmp_path / "dst").glob("*.safetensors")) == \
        sorted(p.name for p in src.glob("*.safetensors"))
    for file in src.glob("*.safetensors"):
        assert load_file(tmp_path / "dst" / file.name).keys() == load_file(file).keys()


def test_tied_tensors_stay_shared(tmp_path):
    weight = torch.randn(8, 4)
    header = encode_header([("embed", "F32", (8, 4), 0, 128), ("lm_head", "F32", (8, 4), 0, 128),
                            ("bias", "F32", (4,), 128, 144)], {})
    bias = torch.randn(4)
    (tmp_path / "tied.safetensors").write_bytes(header + weight.numpy().tobytes() + bias.numpy().tobytes())
    result = convert_checkpoint(tmp_path / "tied.safetensors", tmp_path / "out.safetensors", "bf16",
                                verify=True)
    # safetensors allows one name per byte range (its reader refuses the source above): the tied
    # tensor is stored once, under its first name, and the alias is kept as metadata
    out = read_header(tmp_path / "out.safetensors")
    assert [e.name for e in out.tensors] == ["embed", "bias"]
    assert json.loads(out.metadata["tied_aliases"]) == {"lm_head": "embed"}
    assert out.file_bytes == out.data_start + 64 + 8  # stored once: 32 bf16 + 4 bf16
    loaded = load_file(tmp_path / "out.safetensors")  # the reference reader accepts the output
    assert torch.equal(loaded["embed"], weight.to(torch.bfloat16))
    assert [t.aliases for t in result.tensors if t.name == "embed"] == [("lm_head",)]
    assert "tied: lm_head = embed" in result.to_text()


def test_hostile_tensor_names_never_become_paths(tmp_path):
    source = {"../../escape": torch.randn(3), "/abs/path": torch.randn(2), "a\\b": torch.randn(1)}
    src = hf_folder(tmp_path / "src", source, shards=1)
    (tmp_path / "work").mkdir()
    convert_checkpoint(src, tmp_path / "work" / "dst", "bf16", max_shard_size="8B")
    assert [p.name for p in (tmp_path / "work").iterdir()] == ["dst"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src", "work"]
    assert load_folder(tmp_path / "work" / "dst").keys() == source.keys()


def test_progress_reaches_the_total(tmp_path):
    save_file(tensors(), tmp_path / "in.safetensors")
    seen = []
    result = convert_checkpoint(tmp_path / "in.safetensors", tmp_path / "out", "bf16",
                                progress=lambda event: seen.append((event.done, event.total)))
    assert seen[0] == (0, result.bytes_read) and seen[-1] == (result.bytes_read, result.bytes_read)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


# ---------------------------------------------------------------------------------------- damage

def test_damage_report_on_tensors_built_to_overflow_and_underflow(tmp_path):
    # fp16: max 65504 (65520 and above -> inf), smallest subnormal 5.96e-8 (below 2.98e-8 -> 0),
    # smallest normal 6.10e-5 (below -> subnormal).
    source = {"big": torch.tensor([1e5, -7e4, -1e9, 65504.0, 1.0]),
              "tiny": torch.tensor([1e-9, 2e-8, 1e-6, 0.0]),
              "fine": torch.tensor([0.5, -2.0]), "ids": torch.arange(3)}
    save_file(source, tmp_path / "in.safetensors")
    result = convert_checkpoint(tmp_path / "in.safetensors", tmp_path / "out.safetensors", "fp16")
    damage = {t.name: t for t in result.tensors}
    assert (damage["big"].overflowed, damage["big"].flushed_to_zero) == (3, 0)
    assert (damage["tiny"].flushed_to_zero, damage["tiny"].subnormal) == (2, 1)
    assert damage["tiny"].max_rel_error == 1.0
    assert damage["fine"].lost_values == 0 and damage["fine"].max_rel_error == 0.0  # exact in fp16
    assert (result.total.overflowed, result.total.flushed_to_zero, result.total.subnormal) == (3, 2, 1)
    assert [t.name for t in result.worst(2)] == ["big", "tiny"]
    report = json.loads(result.to_json())
    assert report["total"]["overflowed"] == 3 and len(report["tensors"]) == 4


def test_fp8_output_saturates_and_reads_back_with_safetensors(tmp_path):
    from test_streaming import fp8_e4m3
    fmt = fp8_e4m3()
    source = {"w": torch.tensor([1000.0, -3.0, 0.01, 1e-4]), "ids": torch.arange(3)}
    save_file(source, tmp_path / "in.safetensors")
    result = convert_checkpoint(tmp_path / "in.safetensors", tmp_path / "out.safetensors", fmt, verify=True)
    out = load_file(tmp_path / "out.safetensors")
    expected = source["w"].clamp(-448, 448).to(torch.float8_e4m3fn)
    assert torch.equal(out["w"].view(torch.uint8), expected.view(torch.uint8))
    assert torch.equal(out["ids"], source["ids"])
    assert (result.total.overflowed, result.total.flushed_to_zero) == (1, 1)


def test_strict_refuses_lost_values_and_writes_nothing(tmp_path):
    save_file({"ok": torch.ones(3), "big": torch.tensor([1e6])}, tmp_path / "in.safetensors")
    with pytest.raises(DamageError, match="'big'.*1 values overflow") as caught:
        convert_checkpoint(tmp_path / "in.safetensors", tmp_path / "out", "fp16", strict=True)
    assert caught.value.exit_code == 3
    assert [p.name for p in tmp_path.iterdir()] == ["in.safetensors"]
    convert_checkpoint(tmp_path / "in.safetensors", tmp_path / "out", "bf16", strict=True)  # bf16 holds 1e6


def test_strict_accepts_a_negligible_flush_and_reports_it(tmp_path):
    # the user's case: one value in 262,144 of an N(0, 0.02) embedding flushes in fp16, ~5e-8 of its RMS
    from test_streaming import embedding_with_one_tiny_value
    embed = embedding_with_one_tiny_value()
    save_file({"embed.weight": embed}, tmp_path / "in.safetensors")
    result = convert_checkpoint(tmp_path / "in.safetensors", tmp_path / "out", "fp16", strict=True)
    assert torch.equal(load_file(tmp_path / "out" / "in.safetensors")["embed.weight"], embed.half())
    (damage,) = result.tensors
    assert (damage.flushed_to_zero, damage.negligible_flushes, damage.significant_flushes) == (1, 1, 0)
    report = json.loads(result.to_json())
    row = report["tensors"][0]
    assert (row["flushed_to_zero"], row["negligible_flushes"], row["significant_flushes"]) == (1, 1, 0)
    assert row["max_flushed_rel_rms"] == pytest.approx(torch.tensor(1e-9).item() / row["rms"])
    assert row["max_flushed_rel_rms"] < 2.0 ** -10
    assert (report["total"]["negligible_flushes"], report["total"]["significant_flushes"]) == (1, 0)
    assert report["refused"] is False and report["reason"] is None
    assert report["limits"] == {"max_flushed": 0, "flushed_fraction": None, "max_overflowed": 0}
    assert "1 negligible flush(es) in 1 tensor(s)" in result.to_text()


def test_strict_refusal_names_only_the_damaged_tensor_and_still_counts_every_tensor(tmp_path, monkeypatch):
    from test_streaming import embedding_with_one_tiny_value

    import dtypelab.checkpoint.writer as writer

    written = []
    real_write_all = writer.write_all
    monkeypatch.setattr(writer, "write_all", lambda fd, data, path: written.append(len(data))
                        or real_write_all(fd, data, path))
    # "a_big" is streamed first: after it, nothing more is written, but "embed" is still counted
    save_file({"a_big": torch.tensor([1e6, 1.0]), "embed": embedding_with_one_tiny_value()},
              tmp_path / "in.safetensors")
    with pytest.raises(DamageError) as caught:
        convert_checkpoint(tmp_path / "in.safetensors", tmp_path / "out", "fp16", strict=True)
    message = str(caught.value)
    assert caught.value.exit_code == 3
    assert message.startswith("tensor 'a_big': 1 values overflow in fp16; nothing was written (--strict)")
    assert "--keep 'a_big'" in message and "--max-overflowed 1" in message and "embed" not in message
    assert [p.name for p in tmp_path.iterdir()] == ["in.safetensors"]
    result = caught.value.result
    assert result.refused and result.refused_tensors == ["a_big"] and result.reason == message
    assert [(t.name, t.overflowed, t.flushed_to_zero, t.negligible_flushes) for t in result.tensors] == \
        [("a_big", 1, 0, 0), ("embed", 0, 1, 1)]
    assert result.bytes_written == 0 and not result.verified and result.copied_files == []
    header = len(written) and written[0]
    assert written == [header, 2 * 2]  # the header, a_big's two fp16 values, and not embed's 512 KiB
    assert json.loads(result.to_json())["refused"] is True


def test_max_overflowed_lets_that_many_overflows_through(tmp_path):
    save_file({"big": torch.tensor([1e6, 1.0])}, tmp_path / "one.safetensors")
    result = convert_checkpoint(tmp_path / "one.safetensors", tmp_path / "one", "fp16", strict=True,
                                max_overflowed=1)
    assert result.total.overflowed == 1 and result.limits.max_overflowed == 1
    assert load_file(tmp_path / "one" / "one.safetensors")["big"].tolist() == [math.inf, 1.0]
    save_file({"big": torch.tensor([1e6, -1e6, 1.0])}, tmp_path / "two.safetensors")
    with pytest.raises(DamageError, match=r"'big': 2 values overflow.*--max-overflowed 2, or drop"):
        convert_checkpoint(tmp_path / "two.safetensors", tmp_path / "two", "fp16", strict=True,
                           max_overflowed="1")
    assert not (tmp_path / "two").exists()


def significant_flushes_tensor() -> torch.Tensor:
    """1,022 values 2^-17 (fp16 subnormals) and two 2^-26, which fp16 flushes: 2^-26 is 2^-9 / 0.999 of
    the RMS (2^-17 * sqrt(1022/1024 + tiny)), above 2^-10, so both flushes are significant."""
    return torch.tensor([2.0 ** -17] * 1022 + [2.0 ** -26] * 2)


@pytest.mark.parametrize(("limit", "passes"), [(0, False), (1, False), (2, True), ("2", True),
                                               (2 / 1024, True), ("0.001953125", True), (1e-3, False)])
def test_max_flushed_counts_significant_flushes_per_tensor(tmp_path, limit, passes):
    save_file({"small": significant_flushes_tensor(), "ones": torch.ones(8)}, tmp_path / "in.safetensors")
    convert = lambda: convert_checkpoint(tmp_path / "in.safetensors", tmp_path / "out", "fp16",  # noqa: E731
                                         strict=True, max_flushed=limit)
    if passes:
        damage = {t.name: t for t in convert().tensors}
        assert (damage["small"].flushed_to_zero, damage["small"].significant_flushes) == (2, 2)
        return
    with pytest.raises(DamageError, match=r"^tensor 'small': 2 values flush to zero \(the largest 0.002 of "
                                          r"its RMS, above the negligible 2\^-10\) in fp16;.*--keep 'small'.*"
                                          r"--max-flushed 2, or drop --strict$"):
        convert()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("options", "message"), [
    ({"max_flushed": 1}, "--max-flushed needs --strict"),
    ({"max_overflowed": "0"}, "--max-overflowed needs --strict"),
    ({"max_flushed": 1, "max_overflowed": 1}, "--max-flushed and --max-overflowed need --strict"),
    ({"strict": True, "max_flushed": "abc"}, "--max-flushed takes a count (3) or a fraction"),
    ({"strict": True, "max_flushed": -1}, "not -1: give 0 or more"),
    ({"strict": True, "max_flushed": 1.5}, "a fraction lies in [0, 1]"),
    ({"strict": True, "max_flushed": "nan"}, "not 'nan'"),
    ({"strict": True, "max_overflowed": "1e-6"}, "--max-overflowed takes a count (3), not '1e-6'"),
    ({"strict": True, "max_overflowed": True}, "--max-overflowed takes a count (3), not True"),
])
def test_damage_limits_are_checked_before_anything_is_read(tmp_path, options, message):
    save_file({"big": torch.tensor([1e6])}, tmp_path / "in.safetensors")
    with pytest.raises(InputError, match=re.escape(message)):
        convert_checkpoint(tmp_path / "in.safetensors", tmp_path / "out", "fp16", **options)
    assert [p.name for p in tmp_path.iterdir()] == ["in.safetensors"]


def test_refusal_of_a_quantized_output_advises_dense_bf16_for_dense_tensors(tmp_path):
    from dtypelab.models import tiny_llama

    folder = tmp_path / "llama"
    tiny_llama().save_pretrained(folder)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.embed_tokens.weight"][5, 3] = 1e6  # overflows fp16, the --dense format
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(DamageError) as caught:
        convert_checkpoint(folder, tmp_path / "out", "int8", dense="fp16", strict=True)
    assert str(caught.value).startswith("tensor 'model.embed_tokens.weight': 1 values overflow in fp16; "
                                        "nothing was written (--strict): cast what stays dense to bf16 "
                                        "(float32's range) with --dense bf16, keep it as stored with --keep ")
    assert caught.value.result.refused_tensors == ["model.embed_tokens.weight"]
    assert not (tmp_path / "out").exists()
    result = convert_checkpoint(folder, tmp_path / "out", "int8", dense="bf16", strict=True)  # the fix works
    assert result.total.overflowed == 0


# -------------------------------------------------------------------------------- nothing lost

def test_existing_destination_refused_without_force(tmp_path):
    save_file(tensors(), tmp_path / "in.safetensors")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("precious")
    with pytest.raises(CheckpointError, match="already exists.*--force"):
        convert_checkpoint(tmp_path / "in.safetensors", tmp_path / "out", "bf16")
    assert (tmp_path / "out" / "mine.txt").read_text() == "precious"
    with pytest.raises(CheckpointError, match="--force replaces only a checkpoint"):  # not a model folder
        convert_checkpoint(tmp_path / "in.safetensors", tmp_path / "out", "bf16", force=True)
    assert (tmp_path / "out" / "mine.txt").read_text() == "precious"
    convert_checkpoint(tmp_path / "in.safetensors", tmp_path / "old", "fp16")
    convert_checkpoint(tmp_path / "in.safetensors", tmp_path / "old", "bf16", force=True)  # a checkpoint
    assert [p.name for p in (tmp_path / "old").iterdir()] == ["in.safetensors"]
    assert load_file(tmp_path / "old" / "in.safetensors")["embed.weight"].dtype == torch.bfloat16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors", "old", "out"]


def test_too_little_free_space_refused_before_writing(tmp_path, monkeypatch):
    import dtypelab.checkpoint.convert as checkpoint
    save_file(tensors(), tmp_path / "in.safetensors")
    real = shutil.disk_usage
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: real(path)._replace(free=100))
    with pytest.raises(CheckpointError, match="bytes needed but only 100 free"):
        convert_checkpoint(tmp_path / "in.safetensors", tmp_path / "out", "bf16")
    assert [p.name for p in tmp_path.iterdir()] == ["in.safetensors"]


def test_destination_inside_source_refused(tmp_path):
    src = hf_folder(tmp_path / "src", tensors())
    with pytest.raises(InputError, match="outside"):
        convert_checkpoint(src, src / "bf16", "bf16")
    with pytest.raises(InputError, match="outside"):
        convert_checkpoint(src, tmp_path, "bf16", force=True)
    assert not (src / "bf16").exists()


def test_verify_catches_bytes_that_differ(tmp_path, monkeypatch):
    save_file(tensors(), tmp_path / "in.safetensors")
    corrupt_tensor_writes(monkeypatch)
    with pytest.raises(CheckpointError, match="verification failed") as caught:
        convert_checkpoint(tmp_path / "in.safetensors", tmp_path / "out", "bf16", verify=True)
    assert str(caught.value).startswith(str(tmp_path / "out" / "in.safetensors"))  # not the staging path
    assert [p.name for p in tmp_path.iterdir()] == ["in.safetensors"]


def test_leftovers_of_dead_runs_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    dead_pid = int(dead.stdout)
    leftover = tmp_path / f".out.dtypelab-tmp-{dead_pid}-0a1b2c3d"
    live = tmp_path / f".out.dtypelab-tmp-{os.getpid()}-0a1b2c3d"
    for folder in (leftover, live):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"partial")
    assert remove_leftovers(tmp_path / "out") == [leftover]
    assert not leftover.exists() and live.exists()  # a running conversion's folder is not touched


KILL_SCRIPT = """
import sys, time
sys.path.insert(0, {src!r})
from pathlib import Path
from dtypelab.checkpoint import convert_checkpoint

def progress(event):
    if event.done > event.total // 2:
        Path({marker!r}).write_text("half")
        time.sleep(60)

convert_checkpoint({source!r}, {dst!r}, "bf16", progress=progress)
"""


@pytest.mark.slow
def test_killed_conversion_leaves_no_destination_and_next_run_cleans_up(tmp_path):
    save_file({f"w{i}": torch.randn(256, 1024) for i in range(8)}, tmp_path / "in.safetensors")
    marker, dst = tmp_path / "half", tmp_path / "out"
    script = KILL_SCRIPT.format(src=SRC_DIR, marker=str(marker), source=str(tmp_path / "in.safetensors"),
                                dst=str(dst))
    child = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 120
    while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), "the conversion never got half way"
    child.send_signal(signal.SIGKILL)
    child.wait()
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".out.dtypelab-tmp-")]
    assert not dst.exists() and len(leftovers) == 1  # half-written, but only in the temporary folder
    convert_checkpoint(tmp_path / "in.safetensors", dst, "bf16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["half", "in.safetensors", "out"]


DISK_FULL_SCRIPT = """
import resource, signal, sys
sys.path.insert(0, {src!r})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
from dtypelab.checkpoint import convert_checkpoint
from dtypelab.errors import DtypelabError
try:
    convert_checkpoint({source!r}, {dst!r}, "bf16")
except DtypelabError as exc:
    print(exc)
    sys.exit(2)
"""


def test_disk_full_is_a_clear_error_with_nothing_left(tmp_path):
    save_file({"w": torch.randn(256, 1024)}, tmp_path / "in.safetensors")  # 1 MB in, 512 KB out
    script = DISK_FULL_SCRIPT.format(src=SRC_DIR, source=str(tmp_path / "in.safetensors"),
                                     dst=str(tmp_path / "out"))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert "no space left" in done.stdout and "\n" not in done.stdout.strip()
    assert [p.name for p in tmp_path.iterdir()] == ["in.safetensors"]


# ----------------------------------------------------------------------------------- bad input

def test_index_naming_a_missing_shard(tmp_path):
    src = hf_folder(tmp_path / "src", tensors())
    (src / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing shard 'model-00002-of-00002.safetensors'"):
        convert_checkpoint(src, tmp_path / "dst", "bf16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.mark.parametrize("shard", ["../model.safetensors", "/etc/model.safetensors", "sub\\x.safetensors",
                                   "model\x00.safetensors", "config.json"])
def test_index_with_hostile_shard_names(tmp_path, shard):
    src = hf_folder(tmp_path / "src", tensors(), shards=1)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"]["embed.weight"] = shard
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="not a plain .safetensors file name"):
        convert_checkpoint(src, tmp_path / "dst", "bf16")


def test_index_that_disagrees_with_its_shards(tmp_path):
    src = hf_folder(tmp_path / "src", tensors())
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"]["embed.weight"] = "model-00002-of-00002.safetensors"
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="'embed.weight'.*stale"):
        inspect_checkpoint(src)


def test_damaged_shard_names_file_and_tensor_and_writes_nothing(tmp_path):
    src = hf_folder(tmp_path / "src", tensors(), shards=1)
    shard = src / "model-00001-of-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])  # truncated: the last tensor runs past the end
    with pytest.raises(CheckpointError, match=f"{shard}: tensor '.*': data ends at byte"):
        convert_checkpoint(src, tmp_path / "dst", "bf16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_usage_errors(tmp_path):
    save_file(tensors(), tmp_path / "in.safetensors")
    with pytest.raises(InputError, match="matches no tensor"):
        convert_checkpoint(tmp_path / "in.safetensors", tmp_path / "o", "bf16", keep=["nope*"])
    with pytest.raises(InputError, match="need a folder"):
        convert_checkpoint(tmp_path / "in.safetensors", tmp_path / "o.safetensors", "bf16",
                           max_shard_size=100)
    with pytest.raises(CheckpointError, match="no such file"):
        convert_checkpoint(tmp_path / "missing", tmp_path / "o", "bf16")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no .safetensors file"):
        inspect_checkpoint(tmp_path / "empty")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "in.safetensors"]


@pytest.mark.parametrize("text,expected", [("5GB", 5 * 10**9), ("500MiB", 500 * 2**20), ("1024", 1024),
                                           ("1.5kb", 1500), (77, 77), (None, None)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "5XB", "-1GB", "GB", "0"])
def test_parse_size_rejects(text):
    with pytest.raises(InputError, match="cannot read size"):
        parse_size(text)


# ------------------------------------------------------------------------------------------ inspect

def test_inspect_counts_from_headers(tmp_path):
    source = tensors()
    src = hf_folder(tmp_path / "src", source)
    info = inspect_checkpoint(src)
    assert [s.file for s in info.shards] == ["model-00001-of-00002.safetensors",
                                             "model-00002-of-00002.safetensors"]
    assert {r.name for r in info.tensors} == set(source)
    by_dtype: dict[str, int] = {}
    for t in source.values():
        key = str(t.dtype).removeprefix("torch.")
        by_dtype[key] = by_dtype.get(key, 0) + t.numel() * t.element_size()
    assert info.bytes_by_dtype == by_dtype
    assert info.stored_bytes == sum(by_dtype.values())
    assert info.largest[0].name == "embed.weight" and info.largest[0].nbytes == 64 * 32 * 4
    assert info.metadata == {"format": "pt"}
    assert "total:" in info.to_text() and json.loads(info.to_json())["stored_bytes"] == info.stored_bytes


def test_inspect_reads_headers_only(tmp_path):
    # a 64 GiB checkpoint as a sparse file: reading its data would take minutes and all memory
    header = encode_header([(f"w{i}", "F32", (2**17, 2**14), i * 2**33, (i + 1) * 2**33) for i in range(8)],
                           {})
    path = tmp_path / "huge.safetensors"
    with open(path, "wb") as handle:
        handle.write(header)
        handle.truncate(len(header) + 8 * 2**33)
    tracemalloc.start()
    info = inspect_checkpoint(path)
    peak_bytes = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert info.stored_bytes == 2**36
    assert peak_bytes < 2**20  # the header and its parse, not a single tensor's 8 GiB


# ------------------------------------------------------------------------------------ peak memory

PEAK_SCRIPT = """
import sys
sys.path.insert(0, {src!r})
from dtypelab.checkpoint import convert_checkpoint

def kib(key):  # VmHWM starts afresh at exec; ru_maxrss would inherit pytest's high-water mark
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key))

# a tiny conversion first: every library and code page the conversion touches is then resident
convert_checkpoint({tiny!r}, {tiny_dst!r}, "bf16", verify=True)
before = kib("VmRSS")
convert_checkpoint({source!r}, {dst!r}, "bf16", verify=True)
print(before, kib("VmHWM"))
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS/VmHWM from Linux /proc")
def test_peak_memory_stays_within_fixed_budget_plus_largest_tensor(tmp_path):
    largest = 8 * 2**20
    src = tmp_path / "src"
    src.mkdir()
    for shard in range(2):  # 2 x 128 MiB of fp32, tensors of 8 MiB at most
        save_file({f"s{shard}.w{i}": torch.randn(2048, 1024) for i in range(16)},
                  src / f"model-{shard + 1:05d}-of-00002.safetensors")
    checkpoint = sum(p.stat().st_size for p in src.iterdir())
    save_file({"w": torch.randn(64, 64), "ids": torch.arange(3)}, tmp_path / "tiny.safetensors")
    script = PEAK_SCRIPT.format(src=SRC_DIR, source=str(src), dst=str(tmp_path / "dst"),
                                tiny=str(tmp_path / "tiny.safetensors"), tiny_dst=str(tmp_path / "tiny"))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    before_kib, peak_kib = map(int, done.stdout.split())
    grown = (peak_kib - before_kib) * 1024
    # fixed budget: reused buffers (8 MiB read, 2 MiB out, 3 x 4 MiB scratch, 1 MiB mask, 8 MiB verify)
    # = 31 MiB, plus ~30 MiB measured here for the allocator and interpreter (varies run to run)
    budget = 64 * 2**20
    assert 0 < grown <= budget + largest, f"peak grew {grown / 2**20:.0f} MiB"
    assert budget + largest < checkpoint / 3  # so holding the checkpoint (or a shard) would fail here


# ------------------------------------------------------------------------------------- transformers

def test_converted_folder_loads_with_transformers_like_an_in_memory_cast(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(tmp_path / "fp32", max_shard_size="20KB")  # several shards and an index
    assert len(list((tmp_path / "fp32").glob("*.safetensors"))) > 2
    result = convert_checkpoint(tmp_path / "fp32", tmp_path / "bf16", "bf16", verify=True)
    assert result.total.lost_values == 0
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16").eval()
    assert loaded.dtype == torch.bfloat16  # from the rewritten config dtype
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()  # still tied
    ids = torch.tensor([[1, 5, 9, 3, 77]])
    with torch.no_grad():
        expected = model.to(torch.bfloat16)(ids).logits
        actual = loaded(ids).logits
    assert torch.equal(actual, expected)  # same weights bit for bit, so the very same logits


def test_keep_takes_module_names_and_globs_as_compare_does(tmp_path):
    """A headroom keep list (module names) works in convert: every tensor of the module is kept."""
    save_file({"blocks.1.norm_out.weight": torch.ones(4), "blocks.1.norm_out.bias": torch.zeros(4),
               "blocks.1.wo.weight": torch.randn(4, 4), "blocks.10.wo.weight": torch.randn(4, 4)},
              tmp_path / "in.safetensors")
    result = convert_checkpoint(tmp_path / "in.safetensors", tmp_path / "out.safetensors", "fp16",
                                keep=("blocks.1.norm_out", "*.1.wo"))
    actions = {t.name: t.action for t in result.tensors}
    assert actions == {"blocks.1.norm_out.weight": "kept", "blocks.1.norm_out.bias": "kept",
                       "blocks.1.wo.weight": "kept", "blocks.10.wo.weight": "cast"}  # not a prefix of "10"


def test_a_gguf_source_is_one_clear_line_not_a_header_error(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(InputError, match="is a GGUF file: convert reads safetensors"):
        convert_checkpoint(tmp_path / "m.gguf", tmp_path / "out", "bf16")
