"""Hostile model folders through the CLI (issue 18 items 3-5): paths outside the folder, tracebacks that
must be one line, and inputs that would exhaust time or memory — each exit 2 with one line, quickly."""

from __future__ import annotations

import json
import os
import pickle
import signal
import struct
import time
from pathlib import Path

import pytest
from hostile_helpers import edit_json, nested

from dtypelab.checkpoint import safetensors_file
from helpers import run_cli


def one_line_exit_2(capsys, *argv) -> str:
    code, _, err = run_cli(capsys, *argv)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def alarm():
    """Fail instead of hanging forever (a FIFO opened for reading blocks until a writer comes)."""
    def timed_out(*_):
        raise TimeoutError("blocked: the file was waited on")
    previous = signal.signal(signal.SIGALRM, timed_out)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def shard_with_index(folder: Path, shard_name: object) -> None:
    """Move the weights to a shard and write an index naming ``shard_name`` for every tensor."""
    shard = folder / "model-00001-of-00001.safetensors"
    (folder / "model.safetensors").rename(shard)
    names = json.loads(shard.read_bytes()[8:8 + int.from_bytes(shard.read_bytes()[:8], "little")])
    weight_map = {name: shard_name for name in names if name != "__metadata__"}
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


# --- 3: inside the folder -------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["inspect", "compare"])
@pytest.mark.parametrize("outside", ["../outside.safetensors", "ABSOLUTE"])
def test_index_naming_a_file_outside_the_folder_is_refused(capsys, tmp_path, tiny_folder, command, outside):
    elsewhere = tmp_path / "outside.safetensors"
    elsewhere.write_bytes((tiny_folder / "model.safetensors").read_bytes())
    shard_with_index(tiny_folder, str(elsewhere) if outside == "ABSOLUTE" else outside)
    line = one_line_exit_2(capsys, command, tiny_folder)
    assert "not a plain .safetensors file name" in line


def test_index_outside_is_refused_for_a_weights_folder_without_config(capsys, tmp_path, tiny_folder):
    (tiny_folder / "config.json").unlink()
    shard_with_index(tiny_folder, "../outside.safetensors")
    assert "not a plain" in one_line_exit_2(capsys, "inspect", tiny_folder)


def test_integer_values_in_the_weight_map_are_one_line(capsys, tiny_folder):
    shard_with_index(tiny_folder, 7)
    assert "7" in one_line_exit_2(capsys, "inspect", tiny_folder)


def test_a_symlink_out_of_the_folder_is_not_copied(capsys, tmp_path, tiny_folder):
    secret = tmp_path / "secret.txt"
    secret.write_text("private key")
    (tiny_folder / "notes.txt").symlink_to(secret)
    line = one_line_exit_2(capsys, "convert", tiny_folder, "--to", "bf16", "-o", tmp_path / "out")
    assert "notes.txt" in line and "outside the source folder" in line
    assert not (tmp_path / "out").exists()


def test_a_symlink_inside_the_folder_is_copied(capsys, tmp_path, tiny_folder):
    (tiny_folder / "notes.txt").write_text("hello")
    (tiny_folder / "readme.txt").symlink_to(tiny_folder / "notes.txt")
    code, _, err = run_cli(capsys, "convert", tiny_folder, "--to", "bf16", "-o", tmp_path / "out")
    assert code == 0, err
    assert (tmp_path / "out" / "readme.txt").read_text() == "hello"


@pytest.mark.parametrize("file", ["model.safetensors", "config.json"])
@pytest.mark.parametrize("command", ["inspect", "compare"])
def test_a_file_the_model_resolves_to_outside_the_folder_is_refused(capsys, tmp_path, tiny_folder, file,
                                                                    command):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (tiny_folder / file).rename(outside / file)
    (tiny_folder / file).symlink_to(outside / file)
    line = one_line_exit_2(capsys, command, tiny_folder)
    assert file in line and "outside the source folder" in line


def test_a_linked_shard_is_refused_for_a_weights_folder_too(capsys, tmp_path, tiny_folder):
    (tiny_folder / "config.json").unlink()
    (tiny_folder / "model.safetensors").rename(tmp_path / "other.safetensors")
    (tiny_folder / "model.safetensors").symlink_to(tmp_path / "other.safetensors")
    assert "outside the source folder" in one_line_exit_2(capsys, "inspect", tiny_folder)


def test_hugging_face_cache_links_into_blobs_are_followed(capsys, tmp_path, tiny_source):
    """A cache snapshot is all links into the repository's blobs/: inside the repository, so read."""
    repo = tmp_path / "models--me--tiny"
    snapshot, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for file in tiny_source.iterdir():
        (blobs / file.name).write_bytes(file.read_bytes())
        (snapshot / file.name).symlink_to(Path("../../blobs") / file.name)
    code, _, err = run_cli(capsys, "inspect", snapshot)
    assert code == 0, err


# --- 4: one line, never a traceback ---------------------------------------------------------------------

def test_deeply_nested_header_is_one_line(capsys, tmp_path):
    raw = ('{"a": ' + nested(1100) + "}").encode()
    path = tmp_path / "deep.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    assert "nested too deep" in one_line_exit_2(capsys, "inspect", path)


@pytest.mark.parametrize("file", ["config.json", "tokenizer_config.json", "model.safetensors.index.json",
                                  "tokenizer.json"])
def test_deeply_nested_folder_json_is_one_line(capsys, tiny_folder, file):
    if file == "model.safetensors.index.json":
        shard_with_index(tiny_folder, "model-00001-of-00001.safetensors")
    (tiny_folder / file).write_text('{"x": ' + nested(1100) + "}")
    line = one_line_exit_2(capsys, "inspect", tiny_folder)
    assert ("tokenizer" in line) if file == "tokenizer.json" else ("nested deeper" in line)


def test_non_string_dtype_in_a_header_is_one_line(capsys, tmp_path):
    raw = json.dumps({"a": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}).encode()
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(4))
    assert "unknown dtype" in one_line_exit_2(capsys, "inspect", path)


def test_lone_surrogate_in_a_tensor_name_is_one_line(capsys, tmp_path):
    raw = b'{"a\\ud800": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(4))
    one_line_exit_2(capsys, "inspect", path)
    one_line_exit_2(capsys, "convert", path, "--to", "bf16", "-o", tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


CONFIG_CHANGES = {
    "hidden_size as a string": ({"hidden_size": "64"}, "hidden_size"),
    "hidden_size not divisible": ({"hidden_size": 63}, "does not divide"),
    "zero heads": ({"num_attention_heads": 0}, "num_attention_heads"),
    "a function as architecture": ({"architectures": ["pipeline"]}, "'pipeline'"),
    "architectures not a list": ({"architectures": "LlamaForCausalLM"}, "architectures"),
    "bogus torch_dtype": ({"torch_dtype": "float99"}, "float99"),
    "dtype a number": ({"dtype": 16}, "dtype"),
    "quantization_config a string": ({"quantization_config": "yes"}, "quantization_config"),
    "layers as a float": ({"num_hidden_layers": 1e7}, "num_hidden_layers"),
    "vocab negative": ({"vocab_size": -1}, "vocab_size"),
}


@pytest.mark.parametrize("case", CONFIG_CHANGES)
@pytest.mark.parametrize("command", ["inspect", "compare"])
def test_config_values_of_the_wrong_type_or_range_are_one_line(capsys, tiny_folder, case, command):
    changes, expected = CONFIG_CHANGES[case]
    edit_json(tiny_folder / "config.json", **changes)
    assert expected in one_line_exit_2(capsys, command, tiny_folder)


def test_a_hostile_pickle_with_allow_pickle_is_one_line_and_never_runs(capsys, tmp_path):
    marker = tmp_path / "marker"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(pickle.dumps({"w": Evil()}))
    assert "weights_only" in one_line_exit_2(capsys, "inspect", path, "--allow-pickle")
    assert not marker.exists()


# --- 5: bounded -----------------------------------------------------------------------------------------

def test_a_fifo_named_safetensors_is_refused_before_it_is_read(capsys, tmp_path, alarm):
    folder = tmp_path / "weights"
    folder.mkdir()
    os.mkfifo(folder / "model.safetensors")
    one_line_exit_2(capsys, "inspect", folder)  # not listed as weights at all: "no weights"
    line = one_line_exit_2(capsys, "convert", folder, "--to", "bf16", "-o", tmp_path / "out")
    assert "not a regular file" in line and not (tmp_path / "out").exists()


def test_a_fifo_as_config_is_never_read_or_copied(capsys, tmp_path, tiny_folder, alarm):
    """Not a regular file, so not a config: the folder is weights only, read from headers."""
    (tiny_folder / "config.json").unlink()
    os.mkfifo(tiny_folder / "config.json")
    assert run_cli(capsys, "inspect", tiny_folder)[0] == 0
    assert run_cli(capsys, "convert", tiny_folder, "--to", "bf16", "-o", tmp_path / "out")[0] == 0
    assert not (tmp_path / "out" / "config.json").exists()


def test_a_header_longer_than_the_limit_is_refused_up_front(capsys, tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", 100_000_001) + b"{}")
    assert "100000000-byte limit" in one_line_exit_2(capsys, "inspect", path)


def test_more_tensors_than_the_limit_are_refused_before_parsing(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(safetensors_file, "MAX_TENSORS", 3)
    header = {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(4)}
    raw = json.dumps(header).encode()
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    assert "4 tensors, more than the 3 limit" in one_line_exit_2(capsys, "inspect", path)
    escaped = raw.replace(b'"data_offsets"', b'"data_offset\\u0073"')  # the same JSON, not counted raw
    path.write_bytes(struct.pack("<Q", len(escaped)) + escaped)
    assert "4 tensors, more than the 3 limit" in one_line_exit_2(capsys, "inspect", path)
    header.pop("t3")
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    assert run_cli(capsys, "inspect", path)[0] == 0


@pytest.mark.parametrize("changes", [{"num_hidden_layers": 10_000_000}, {"hidden_size": 1_000_000},
                                     {"vocab_size": 2_000_000_000}])
@pytest.mark.parametrize("command", [("inspect",), ("convert", "--to", "int8", "-o", "OUT")])
def test_absurd_config_sizes_are_refused_before_any_model_is_built(capsys, tmp_path, tiny_folder, changes,
                                                                  command):
    edit_json(tiny_folder / "config.json", **changes)
    argv = [str(tmp_path / "out") if arg == "OUT" else arg for arg in command]
    started = time.perf_counter()
    line = one_line_exit_2(capsys, argv[0], tiny_folder, *argv[1:])
    assert "parameters" in line and time.perf_counter() - started < 10
    assert not (tmp_path / "out").exists()
