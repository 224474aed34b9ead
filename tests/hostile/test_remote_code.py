"""A model folder's own Python code never runs (issue 18 item 1): auto_map and unknown model types are
refused up front, with nothing printed or prompted, whatever stdin holds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hostile_helpers import edit_json

from helpers import run_cli

EVIL = "from pathlib import Path\nPath({marker!r}).write_text('ran')\n"


def plant_code(folder: Path, marker: Path, file: str) -> None:
    """Put .py files that create ``marker`` when imported, and point ``file``'s auto_map at them."""
    for name in ("configuration_evil.py", "modeling_evil.py", "tokenization_evil.py"):
        (folder / name).write_text(EVIL.format(marker=str(marker)))
    if file == "tokenizer_config.json":
        auto_map = {"AutoTokenizer": ["tokenization_evil.Evil", None]}
        (folder / file).write_text(json.dumps({"tokenizer_class": "EvilTokenizer", "auto_map": auto_map}))
    else:
        edit_json(folder / file, auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                                           "AutoModelForCausalLM": "modeling_evil.EvilModel"})


def dtypelab_command(*argv: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from dtypelab.cli import main; sys.exit(main(sys.argv[1:]))",
            *argv]


@pytest.mark.parametrize("file", ["config.json", "tokenizer_config.json"])
@pytest.mark.parametrize("command", ["inspect", "compare"])
def test_yes_on_stdin_never_runs_the_folders_code(tmp_path, tiny_folder, file, command):
    marker = tmp_path / "marker"
    plant_code(tiny_folder, marker, file)
    done = subprocess.run(dtypelab_command(command, str(tiny_folder)), input="y\ny\n", capture_output=True,
                          text=True, timeout=300)
    assert not marker.exists()
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""  # no prompt, no "[y/N]"
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "auto_map" in lines[0] and "package.module:factory" in lines[0], lines
    assert file in lines[0]


def test_stdin_from_dev_null_prints_no_prompt(tmp_path, tiny_folder):
    marker = tmp_path / "marker"
    plant_code(tiny_folder, marker, "config.json")
    done = subprocess.run(dtypelab_command("inspect", str(tiny_folder)), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=300)
    assert not marker.exists() and done.returncode == 2
    assert "custom code" not in done.stdout + done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_stdin_a_terminal_neither_waits_nor_prompts(tmp_path, tiny_folder):
    """On a terminal transformers' "[y/N]" would wait for an answer: the refusal comes first."""
    marker = tmp_path / "marker"
    plant_code(tiny_folder, marker, "tokenizer_config.json")
    controller, terminal = os.openpty()
    try:
        done = subprocess.run(dtypelab_command("inspect", str(tiny_folder)), stdin=terminal,
                              capture_output=True, text=True, timeout=300)
    finally:
        os.close(terminal)
        os.close(controller)
    assert not marker.exists() and done.returncode == 2
    assert done.stdout == "" and "[y/N]" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_convert_to_a_quantized_format_refuses_it_too(capsys, tmp_path, tiny_folder):
    marker = tmp_path / "marker"
    plant_code(tiny_folder, marker, "config.json")
    edit_json(tiny_folder / "config.json", model_type="evil-arch")  # not in the header rules: built on meta
    code, out, err = run_cli(capsys, "convert", tiny_folder, "--to", "int8", "-o", tmp_path / "out")
    assert code == 2 and not marker.exists() and not (tmp_path / "out").exists()
    assert len(err.strip().splitlines()) == 1 and "own Python code" in err


def test_unknown_model_type_is_refused_as_remote_code(capsys, tiny_folder):
    edit_json(tiny_folder / "config.json", model_type="totally-new-arch")
    code, _, err = run_cli(capsys, "inspect", tiny_folder)
    assert code == 2 and "'totally-new-arch'" in err and "package.module:factory" in err
    assert len(err.strip().splitlines()) == 1


def test_every_transformers_call_passes_trust_remote_code_false():
    """A grep, as the brief asks: every from_pretrained in the stages that load folders says it."""
    root = Path(__file__).parents[2] / "src" / "dtypelab"
    checked = 0
    for path in [*(root / "models").glob("*.py"), *(root / "checkpoint").glob("*.py")]:
        source = path.read_text()
        for start in _calls(source, ".from_pretrained("):
            call = source[start:source.index(")\n", start)]
            assert "trust_remote_code=False" in call, f"{path.name}: {call[:80]}"
            checked += 1
    assert checked >= 5  # AutoConfig twice, the model, the tokenizer, the GGUF model and tokenizer


def _calls(source: str, needle: str) -> list[int]:
    found, at = [], source.find(needle)
    while at != -1:
        found.append(at)
        at = source.find(needle, at + 1)
    return found
