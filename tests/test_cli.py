import json

import pytest

from dtypelab.cli import main


def run(capsys, *argv):
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
        raise SystemExit(0)
    out, err = capsys.readouterr()
    return exit_info.value.code or 0, out, err


def test_demo_prints_the_notebook_numbers(capsys):
    code, out, _ = run(capsys, "demo")
    assert code == 0
    assert "Mean diff: 0.0009978810558095574 | Max diff: 0.0016907453536987305" in out
    for printed in ["[-0.6872,  0.7132]", "[-0.6870,  0.7134]", "[-0.6875,  0.7148]"]:
        assert printed in out
    assert "token_embedding.weight is loaded in torch.bfloat16" in out


def test_compare_json(capsys):
    code, out, _ = run(capsys, "compare", "dummy", "--to", "fp16,bf16", "--input", "[[1,0,1]]", "--json")
    assert code == 0
    data = json.loads(out)
    bf16 = data["variants"][1]
    assert bf16["name"] == "bf16" and bf16["footprint_bytes"] == 60
    assert bf16["metrics"]["mean_abs_diff"] == 0.0009978810558095574


def test_inspect_json(capsys):
    code, out, _ = run(capsys, "inspect", "dummy", "--json")
    assert code == 0 and json.loads(out)["footprint_bytes"] == 120


def test_cast_with_keep(capsys):
    code, out, _ = run(capsys, "cast", "dummy", "--to", "half", "--keep", "LayerNorm")
    assert code == 0 and "float16: 7 tensors" in out and "float32: 4 tensors" in out


@pytest.mark.parametrize(("argv", "message"), [
    (["compare", "dummy", "--to", "fp17"], "unknown dtype or format 'fp17': use one of fp32, fp16, bf16"),
    (["compare", "dummy", "--input", "[[1,0,"], "malformed --input"),
    (["compare", "dummy", "--input", "[[1,0],[1]]"], "equal-length lists"),
    (["compare", "dummy", "--input", "[[1,5]]"], "outside the vocabulary"),
    (["inspect", "nope"], "unknown model 'nope'"),
    (["compare", "dummy", "--device", "cuda:7"], "device"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_debug_shows_the_traceback():
    from dtypelab.errors import UnknownFormatError

    with pytest.raises(UnknownFormatError):
        main(["--debug", "compare", "dummy", "--to", "fp17"])
