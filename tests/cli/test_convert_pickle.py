"""``convert --allow-pickle``: .bin / .pt weights read through torch.load(weights_only=True), written as
safetensors; refused without the flag; a pickle that would run code is refused and its code never runs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import run_cli


class _Payload:
    """Unpickling this calls ``open(marker, "w")``: the file appearing means the pickle's code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".dtypelab-" in p.name)


@pytest.fixture
def bin_folder(tmp_path, tiny_llama):
    folder = tmp_path / "llama-bin"
    tiny_llama.model.save_pretrained(folder)  # config.json; the weights then as transformers' old pickle
    (folder / "model.safetensors").unlink()
    torch.save(tiny_llama.model.state_dict(), folder / "pytorch_model.bin")
    assert (folder / "pytorch_model.bin").is_file() and not list(folder.glob("*.safetensors"))
    return folder


def test_a_bin_folder_converts_to_bf16_safetensors_equal_to_torchs_cast(capsys, tmp_path, bin_folder,
                                                                         tiny_llama):
    out = tmp_path / "llama-bf16"
    code, printed, err = run_cli(capsys, "convert", bin_folder, "--to", "bf16", "-o", out, "--allow-pickle",
                                 "--json")
    assert code == 0, err
    written = load_file(out / "model.safetensors")
    state = tiny_llama.model.state_dict()
    expected = {k: v for k, v in state.items() if "rotary_emb" not in k}  # computed buffers are not saved
    assert set(written) == set(expected)
    for name, tensor in expected.items():
        assert written[name].dtype == torch.bfloat16
        assert torch.equal(written[name], tensor.to(torch.bfloat16)), name  # bit for bit torch's cast
    config = json.loads((out / "config.json").read_text())  # copied from the pickle's folder, dtype updated
    assert config.get("torch_dtype", config.get("dtype")) == "bfloat16"
    assert not list(out.glob("*.bin"))  # the pickle is not copied beside its safetensors
    result = json.loads(printed)
    assert result["source"] == str(bin_folder) and result["format"] == "bf16"
    assert _leftovers(tmp_path) == []  # the safetensors copy of the pickle is gone


def test_a_bare_pt_file_converts_to_a_safetensors_file(capsys, tmp_path):
    torch.manual_seed(0)
    weight = torch.randn(4, 8)
    state = {"w": weight, "tied": weight, "ids": torch.arange(3)}  # tied: one storage, two names
    torch.save(state, tmp_path / "w.pt")
    code, _, err = run_cli(capsys, "convert", tmp_path / "w.pt", "--to", "fp16",
                           "-o", tmp_path / "w16.safetensors", "--allow-pickle")
    assert code == 0, err
    written = load_file(tmp_path / "w16.safetensors")
    assert torch.equal(written["w"], weight.half()) and torch.equal(written["tied"], weight.half())
    assert torch.equal(written["ids"], torch.arange(3))  # integers copied as they are
    assert _leftovers(tmp_path) == []


def test_without_allow_pickle_it_is_one_line_naming_the_flag(capsys, tmp_path, bin_folder):
    code, out, err = run_cli(capsys, "convert", bin_folder, "--to", "bf16", "-o", tmp_path / "out")
    assert code == 2 and out == ""
    assert err.strip().splitlines() == [err.strip()] and "--allow-pickle" in err
    assert "torch.load(weights_only=True)" in err
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_a_pickle_that_would_run_code_is_refused_and_its_code_never_runs(capsys, tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"w": torch.ones(2), "payload": _Payload(marker)}, tmp_path / "evil.bin")
    code, out, err = run_cli(capsys, "convert", tmp_path / "evil.bin", "--to", "bf16",
                             "-o", tmp_path / "out.safetensors", "--allow-pickle")
    assert code == 2 and out == "" and "weights_only=True" in err and len(err.strip().splitlines()) == 1
    assert not marker.exists()  # weights_only refused the object before its code could run
    assert not (tmp_path / "out.safetensors").exists() and _leftovers(tmp_path) == []
    torch.load(tmp_path / "evil.bin", weights_only=False)  # the payload is live: a plain load runs it
    assert marker.exists()
