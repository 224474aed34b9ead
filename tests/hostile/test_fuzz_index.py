"""Fuzzing shard indexes (issue 18 item 7): a ``*.safetensors.index.json`` whose ``weight_map`` and
``metadata`` are generated JSON — shard names climbing out of the folder, absolute, with separators or
control bytes, of the wrong type, naming missing shards or links out of the folder — must give a
checkpoint whose every shard is inside the folder and agrees with the index, or one line of
CheckpointError; never another exception."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from hostile_helpers import fuzz, nested
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save_file

from dtypelab.checkpoint import open_checkpoint, read_index
from dtypelab.errors import CheckpointError

INDEX = "model.safetensors.index.json"
SHARDS = {"model-00001-of-00002.safetensors": ["a", "b"], "model-00002-of-00002.safetensors": ["c"]}


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    """Two real shards, a file beside the folder and a link out of it, no index yet."""
    root = tmp_path_factory.mktemp("index")
    folder = root / "model"
    folder.mkdir()
    for shard, names in SHARDS.items():
        save_file({name: torch.ones(2) for name in names}, folder / shard)
    save_file({"a": torch.ones(2)}, root / "outside.safetensors")
    os.symlink(root / "outside.safetensors", folder / "link.safetensors")
    return folder


SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5)
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=8)
FIRST = next(iter(SHARDS))
SHARD_NAMES = st.one_of(
    st.sampled_from([*SHARDS, "link.safetensors", "../outside.safetensors", "OUTSIDE", "./" + FIRST,
                     "sub/x.safetensors", "a\\b.safetensors", ".safetensors", "..", ".", "", "model.bin",
                     "missing.safetensors", FIRST + "\0", "x\n.safetensors", " .safetensors",
                     "..safetensors"]),
    JSON)
TENSOR_NAMES = st.one_of(st.sampled_from(["a", "b", "c", "d", "", "\ud800"]), st.text(max_size=4))


@st.composite
def indexes(draw, folder: Path) -> object:
    """Mostly an index of the two shards with a few entries changed, sometimes any JSON at all."""
    if draw(st.integers(0, 9)) == 0:
        return draw(JSON)
    weight_map = {name: shard for shard, names in SHARDS.items() for name in names}
    for _ in range(draw(st.integers(0, 3))):
        change = draw(st.sampled_from(["value", "add", "drop"]))
        name = draw(st.sampled_from(list(weight_map) or ["a"]))
        if change == "drop":
            weight_map.pop(name, None)
        else:
            shard = draw(SHARD_NAMES)
            shard = str(folder.parent / "outside.safetensors") if shard == "OUTSIDE" else shard
            weight_map[name if change == "value" else draw(TENSOR_NAMES)] = shard
    metadata = draw(st.one_of(st.just({"total_size": 24}), JSON))
    index = {"metadata": metadata, "weight_map": weight_map}
    if draw(st.integers(0, 5)) == 0:
        index = draw(st.sampled_from([{"weight_map": weight_map}, {"metadata": metadata}, [index],
                                      {**index, "weight_map": list(weight_map.items())}]))
    return index


def check_index(folder: Path, index_text: str) -> None:
    """The property: a consistent checkpoint inside the folder, or one line of CheckpointError."""
    (folder / INDEX).write_text(index_text)
    try:
        source = open_checkpoint(folder)
    except CheckpointError as exc:
        assert len(str(exc).splitlines()) == 1, str(exc)
        return
    root = folder.resolve()
    assert all(shard.path.resolve().parent == root for shard in source.shards)
    weight_map, _ = read_index(folder / INDEX)
    held = {entry.name: shard.path.name for shard in source.shards for entry in shard.tensors}
    assert held == weight_map


@fuzz(examples=400)
@given(data=st.data())
def test_an_index_gives_a_checkpoint_inside_the_folder_or_one_line(tmp_path, sharded, data):
    folder = tmp_path / "root" / "model"
    if not folder.exists():  # one copy for all examples: each writes only the index
        shutil.copytree(sharded.parent, tmp_path / "root", symlinks=True)
    index = data.draw(indexes(folder))
    check_index(folder, json.dumps(index))


@pytest.mark.parametrize("text", [
    nested(2000), '{"weight_map": ' + nested(100) + "}", '{"weight_map": {"a": 1e999}}', "\ufeff{}", "",
    '{"weight_map": {"a": "x.safetensors", "a": "y.safetensors"}}', b"\xff\xfe".decode("latin-1"),
    '{"weight_map": {"\\ud800": "model-00002-of-00002.safetensors"}}',
])
def test_malformed_index_text_is_one_line(tmp_path, sharded, text):
    folder = Path(shutil.copytree(sharded, tmp_path / "model", symlinks=True))
    check_index(folder, text)
