"""The JSON contract: every ``--json`` document names its schema and dtypelab's version, is strict JSON
(non-finite numbers are ``null`` with a ``<field>_status`` sibling), and validates against the schema
shipped in the package, which is derived from the result dataclass and must match it.

When a result's fields change, regenerate the shipped schemas:
``DTYPELAB_WRITE_SCHEMAS=1 .venv/bin/python -m pytest -q tests/test_json_contract.py -k shipped``.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import pkgutil
from pathlib import Path

import jsonschema
import pytest
import torch
from safetensors.torch import save_file

import dtypelab
from dtypelab.report import COMPOSITE_KINDS, JSON_KINDS, TableMixin, json_schema, load_schema, to_jsonable
from helpers import run_cli

SCHEMAS = Path(dtypelab.__file__).parent / "report" / "schemas"


def result_classes() -> dict[str, type]:
    """Every TableMixin result of the package, by class name (imported module by module)."""
    for module in pkgutil.walk_packages(dtypelab.__path__, "dtypelab."):
        if ".cli" not in module.name:
            importlib.import_module(module.name)
    found, todo = {}, list(TableMixin.__subclasses__())
    while todo:
        cls = todo.pop()
        found[cls.__name__] = cls
        todo += cls.__subclasses__()
    return {name: cls for name, cls in found.items() if cls.__module__.startswith("dtypelab.")}


def every_kind() -> list[str]:
    return sorted([kind for kind, _ in JSON_KINDS.values()] + list(COMPOSITE_KINDS))


def strict_loads(text: str) -> dict:
    def refuse(constant: str):
        raise ValueError(f"bare {constant} in the JSON")

    return json.loads(text, parse_constant=refuse)


def validate(text: str) -> dict:
    document = strict_loads(text)
    schema = load_schema(document["schema"].split("/")[1])
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(document, schema, cls=jsonschema.Draft202012Validator)  # its "schema" const too
    assert document["dtypelab_version"] == dtypelab.__version__
    return document


def test_every_result_class_is_registered():
    assert sorted(result_classes()) == sorted(JSON_KINDS), "add the result to report.table.JSON_KINDS"


@pytest.mark.parametrize("kind", every_kind())
def test_the_shipped_schema_is_the_one_derived_from_the_dataclass(kind):
    derived = json_schema(kind, result_classes())
    path = SCHEMAS / f"{kind}.json"
    if os.environ.get("DTYPELAB_WRITE_SCHEMAS"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(derived, indent=1) + "\n", encoding="utf-8")
    assert path.is_file() and load_schema(kind) == derived, (
        f"{path.name} is stale: regenerate with DTYPELAB_WRITE_SCHEMAS=1 pytest tests/test_json_contract.py")


# --- every command's --json ------------------------------------------------------------------------------

@pytest.fixture
def weights(tmp_path) -> Path:
    path = tmp_path / "w.safetensors"
    save_file({"w": torch.randn(16, 8), "big": torch.tensor([1e6, 1.0])}, path)
    return path


@pytest.fixture
def gguf_file(tmp_path) -> Path:
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "m.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("w", torch.randn(4, 8).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


COMMANDS = {
    "formats": ["formats"],
    "inspect-model": ["inspect", "dummy"],
    "inspect-checkpoint": ["inspect", "{weights}"],
    "inspect-gguf": ["inspect", "{gguf}"],
    "cast": ["cast", "dummy", "--to", "bf16"],
    "compare": ["compare", "tiny-llama", "--to", "fp32,bf16,int8,int4:g129", "--text", "A short sentence."],
    "compare-layers": ["compare", "dummy", "--to", "bf16,int8", "--layers"],
    "headroom": ["headroom", "dummy", "--to", "fp16,bf16"],
    "headroom-weights": ["headroom", "dummy", "--to", "fp16,int8", "--weights"],
    "convert": ["convert", "{weights}", "--to", "fp16", "-o", "{tmp}/out.safetensors"],
    "clean": ["clean", "{tmp}"],
    "sensitivity": ["sensitivity", "tiny-llama", "--to", "int8", "--windows", "1", "--ctx", "64"],
    "plan": ["plan", "tiny-llama", "--budget", "5bpw", "--formats", "int4:g64,int8", "--windows", "1",
             "--ctx", "64"],
}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_json_validates_against_its_schema(capsys, request, tmp_path, name):
    paths = {"tmp": tmp_path, "weights": request.getfixturevalue("weights") if "{weights}" in
             COMMANDS[name] else "", "gguf": request.getfixturevalue("gguf_file") if name == "inspect-gguf"
             else ""}
    code, out, err = run_cli(capsys, *[arg.format(**paths) for arg in COMMANDS[name]], "--json")
    assert code in (0, 4), err  # 4: compare's int4:g129 fails on rows of 256, as a row
    validate(out)


NOT_FIELDS = {
    "variant": "the key column: each variant's name",
    "layer": "the key column: each layer's name (beside its variant's)",
    "parameter": "the key column: each weight's name",
    "x fp32": "derived: stored_bytes over the reference's",
    "x per round": "derived: latency_ratio_low-latency_ratio_high",
    "status": "derived: the metrics' status (NaN / inf counts) or the failure",
    "headroom_bits": "derived: log2 of the format's max over absmax",
    "verdict": "headroom's is derived from its counts (layers' is a field)",
    "key": "gguf metadata: a dict's keys, rendered as rows",
    "type": "gguf metadata: value_types' values",
    "value": "gguf metadata: the dict's values",
}
"""Table headers that are not a field of the JSON document, and why; every other header is one."""

HEADER_COMMANDS = ["formats", "inspect-model", "inspect-checkpoint", "inspect-gguf", "compare",
                   "compare-timed", "compare-layers", "headroom", "headroom-weights", "convert"]


def json_names(value, prefix: str = "") -> set[str]:
    """Every key of a JSON document, alone and with its parent's (``weights.absmax``), at any depth."""
    if isinstance(value, list):
        return {n for item in value for n in json_names(item, prefix)}
    if not isinstance(value, dict):
        return set()
    names = set()
    for key, item in value.items():
        names |= {key, f"{prefix}.{key}" if prefix else key} | json_names(item, key)
    return names


@pytest.mark.parametrize("name", HEADER_COMMANDS)
def test_table_headers_are_the_json_field_names(capsys, request, tmp_path, monkeypatch, name):
    shown = []
    monkeypatch.setattr("dtypelab.cli.common.render_text", lambda result, columns: shown.append(result) or "")
    argv = COMMANDS.get(name, ["compare", "dummy", "--to", "bf16", "--time"])
    paths = {"tmp": tmp_path, "weights": request.getfixturevalue("weights") if "{weights}" in argv else "",
             "gguf": request.getfixturevalue("gguf_file") if name == "inspect-gguf" else ""}
    code, _, err = run_cli(capsys, *[arg.format(**paths) for arg in argv])
    assert code in (0, 4), err
    parts = getattr(shown[0], "parts", [shown[0]])  # headroom --weights: both results
    names = set().union(*(json_names(json.loads(part.to_json())) for part in parts))
    headers = {c for part in parts for table in part.to_tables() for c in table.columns}
    assert headers - names - set(NOT_FIELDS) == set()
    assert len(headers) > 3  # the tables were seen


def test_the_convert_report_file_validates_too(capsys, tmp_path, weights):
    code, _, err = run_cli(capsys, "convert", weights, "--to", "fp16", "-o", tmp_path / "o.safetensors",
                           "--report", tmp_path / "r.json")
    assert code == 0, err
    report = validate((tmp_path / "r.json").read_text())
    assert report["schema"] == "dtypelab/conversion/1" and report["total"]["overflowed"] == 1


def test_an_identical_variant_has_sqnr_null_with_its_status(capsys):
    code, out, _ = run_cli(capsys, "compare", "dummy", "--to", "fp32", "--json")
    assert code == 0
    metrics = validate(out)["variants"][0]["metrics"]
    assert metrics["sqnr_db"] is None and metrics["sqnr_db_status"] == "inf"


# --- the convention, and a schema that bites ---------------------------------------------------------------

@dataclasses.dataclass
class Sample:
    sqnr_db: float
    ratio: float | None
    values: list[float]
    name: str = "x"


def test_non_finite_values_become_null_with_a_status_sibling():
    out = to_jsonable(Sample(math.inf, math.nan, [1.0, -math.inf]))
    assert out == {"sqnr_db": None, "sqnr_db_status": "inf", "ratio": None, "ratio_status": "nan",
                   "values": [1.0, None], "values_status": [None, "-inf"], "name": "x"}
    assert to_jsonable(Sample(1.5, None, [2.0])) == {"sqnr_db": 1.5, "ratio": None, "values": [2.0],
                                                      "name": "x"}
    assert to_jsonable({"n": torch.tensor(3.5), "k": torch.tensor(2)}) == {"n": 3.5, "k": 2}


def test_the_schema_refuses_a_string_in_a_number_field(capsys):
    code, out, _ = run_cli(capsys, "compare", "dummy", "--to", "bf16", "--json")
    document = strict_loads(out)
    document["variants"][0]["metrics"]["sqnr_db"] = "inf"  # what the old JSON wrote
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(document, load_schema("comparison"), cls=jsonschema.Draft202012Validator)
    del document["schema"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(document, load_schema("comparison"), cls=jsonschema.Draft202012Validator)
