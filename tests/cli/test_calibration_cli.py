"""compare with :gptq / :awq formats: --calib-file / --calib-tokens, settings in --json, one-line errors.

Truth: the calibration options' documented rules (refused without a calibrated format, bounded tokens).
"""

from __future__ import annotations

import json

from helpers import run_cli

FAST = ["--text-set", "evaluation", "--ctx", "64", "--windows", "2"]


def test_compare_records_the_calibration_in_json(capsys):
    code, out, err = run_cli(capsys, "compare", "tiny-llama", "--to", "int4:g64,int4:g64:gptq", *FAST,
                             "--calib-tokens", "256", "--json")
    assert code == 0, err
    rows = {row["name"]: row for row in json.loads(out)["variants"]}
    settings = rows["int4:g64:gptq"]["calibration"]
    assert settings["method"] == "gptq" and settings["tokens"] == 256
    assert settings["source"] == "calibration text"
    assert settings["threads"] >= 1 and settings["median_gain_db"] > 0
    assert rows["int4:g64"]["calibration"] is None


def test_calibration_options_without_a_calibrated_format_are_refused(capsys):
    code, _, err = run_cli(capsys, "compare", "tiny-llama", "--to", "int4:g64", *FAST,
                           "--calib-tokens", "256")
    assert code == 2 and "none is asked for" in err and len(err.strip().splitlines()) == 1


def test_too_many_calibration_tokens_is_one_line(capsys):
    code, _, err = run_cli(capsys, "compare", "tiny-llama", "--to", "int4:g64:awq", *FAST,
                           "--calib-tokens", "100000000")
    assert code == 2 and "fewer than --calib-tokens" in err and "Traceback" not in err


def test_unreadable_calib_file_is_one_line(capsys, tmp_path):
    bad = tmp_path / "calib.txt"
    bad.write_bytes(b"\xff\xfe\x00bad")
    code, _, err = run_cli(capsys, "compare", "tiny-llama", "--to", "int4:g64:gptq", *FAST,
                           "--calib-file", bad)
    assert code == 2 and "cannot read --calib-file" in err
