"""The house rules of docs/architecture.md, read from the source with ``ast`` so they cannot rot.

* imports flow one way: a stage imports only stages below it (``LAYERS``), never one above;
* no dtypelab import hides inside a function (lazy imports are for heavy third-party packages only);
* no import circle between modules;
* the CLI imports only public names (a subpackage's ``__all__``);
* every module says in its docstring what its room is for.

Each rule is checked on the real tree and, so the checks are known to bite, on a copy with a planted
violation.
"""

from __future__ import annotations

import ast
import importlib
import shutil
from pathlib import Path

import pytest

import dtypelab

SRC = Path(dtypelab.__file__).resolve().parent

LAYERS: list[set[str]] = [
    {"errors", "enums", "naming", "quiet", "lazy", "settings"},  # base: nothing of dtypelab (but each other)
    {"progress", "tree", "executor"},  # base, on top of errors / naming
    {"report"},
    {"formats"},
    {"quant"},
    {"checkpoint"},
    {"models"},
    {"variants"},
    {"analysis"},
    {"cli"},
]
"""The stages from the bottom up; a module may import its own stage and the ones below."""

RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def room(module: str) -> str:
    """``dtypelab.quant.cast`` -> ``quant``; the package root is ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute name a (possibly relative) ``from X import`` names."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def imports(root: Path) -> list[tuple[str, str, list[str], bool, int]]:
    """Every import of a dtypelab module: (importer, imported, names, inside a function, line)."""
    found = []
    for path in sorted(root.rglob("*.py")):
        module, tree = module_name(path, root), ast.parse(path.read_text(encoding="utf-8"))
        in_function = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)
                       for n in ast.walk(f)}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                target = resolve(module, path.name == "__init__.py", node)
                targets = [(target, [a.name for a in node.names])]
                if target == "dtypelab" and module != "dtypelab":  # from .. import models: the stages
                    targets = [(f"dtypelab.{a.name}", []) for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [(alias.name, []) for alias in node.names]  # import os, dtypelab.x: every name
            else:
                continue
            for target, names in targets:
                if target == "dtypelab" or target.startswith("dtypelab."):
                    found.append((module, target, names, id(node) in in_function, node.lineno))
    return found


LOADED_WHEN_USED = {  # (importer, module): why it is imported inside a function (not to dodge a circle)
    ("dtypelab.quant.mse_kernel", "dtypelab.quant._mse_numba"):
        "it imports numba (the optional fast extra, ~0.3 s): loaded only when the compiled :mse search runs",
}


def layering_problems(root: Path) -> list[str]:
    problems = []
    for importer, target, names, in_function, line in imports(root):
        where = f"{importer}:{line}"
        loaded_when_used = all((importer, f"{target}.{n}") in LOADED_WHEN_USED for n in names) and names
        if in_function and not loaded_when_used:
            problems.append(f"{where} imports {target} inside a function (to dodge a circle?)")
        source, dest = room(importer), room(target)
        if source == "":  # the package root re-exports the public API from every stage
            continue
        if dest == "":
            problems.append(f"{where} imports the package root {target}: import the stage instead")
        elif RANK[dest] > RANK[source]:
            problems.append(f"{where} imports {target}: stage {dest!r} is above {source!r}")
    return problems


def cycle(root: Path) -> list[str] | None:
    """One import circle between modules (module-level imports), or None."""
    modules = {module_name(p, root): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for importer, target, names, in_function, _ in imports(root):
        if in_function or importer == "dtypelab":
            continue
        heads = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules] or [target]
        graph[importer].update(h for h in heads if h in modules and h != importer)
    for package in modules:  # a package's __init__ depends on what it imports, and so on down
        graph.setdefault(package, set())
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_imports_flow_one_way_and_none_hide_in_functions():
    assert layering_problems(SRC) == []


def test_every_room_is_a_known_stage():
    rooms = {p.stem if p.is_file() else p.name for p in SRC.iterdir()
             if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").is_file()}
    assert rooms == set(RANK)


def test_no_import_circle():
    assert cycle(SRC) is None


def plant(tmp_path: Path, relative: str, line: str) -> Path:
    copy = tmp_path / "dtypelab"
    shutil.copytree(SRC, copy, ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / relative
    target.write_text(target.read_text(encoding="utf-8") + "\n" + line + "\n", encoding="utf-8")
    return copy


def test_a_planted_upward_import_is_caught(tmp_path):
    copy = plant(tmp_path, "formats/registry.py", "from ..analysis import compare_models")
    problems = layering_problems(copy)
    assert len(problems) == 1 and "stage 'analysis' is above 'formats'" in problems[0]


def test_a_planted_function_level_import_is_caught(tmp_path):
    late = "def late():\n    from ..errors import InputError\n    return InputError"
    copy = plant(tmp_path, "quant/cast.py", late)
    assert any("inside a function" in p and "dtypelab.quant.cast" in p for p in layering_problems(copy))


def test_a_planted_circle_is_caught(tmp_path):
    copy = plant(tmp_path, "formats/codecs.py", "from .spec import GRAMMAR")
    found = cycle(copy)
    assert found is not None and "dtypelab.formats.codecs" in found and "dtypelab.formats.spec" in found


def test_the_cli_imports_only_public_names():
    for importer, target, names, _, line in imports(SRC):
        if room(importer) != "cli" or room(target) == "cli":
            continue
        module = importlib.import_module(target)
        public = getattr(module, "__all__", None)
        assert public is not None or not hasattr(module, "__path__"), f"{target} has no __all__"
        for name in names:
            allowed = name in public if public is not None else not name.startswith("_")
            assert allowed, f"{importer}:{line} imports {target}.{name}, which is not public"
        assert target.count(".") == 1, f"{importer}:{line} imports a submodule {target}: use the stage's API"


def stage_attributes(path: Path) -> list[tuple[str, str, int]]:
    """``(stage, name, line)`` for every ``stage.name`` a module uses after ``from .. import stage``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    stages = {alias.asname or alias.name for node in tree.body if isinstance(node, ast.ImportFrom)
              and node.level == 2 and node.module is None for alias in node.names}
    return [(node.value.id, node.attr, node.lineno) for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
            and node.value.id in stages]


def test_the_cli_uses_only_public_names_of_the_stages_it_imports():
    used = [(path.name, *found) for path in sorted((SRC / "cli").glob("*.py"))
            for found in stage_attributes(path)]
    assert used, "the CLI reaches the library through its stages (from .. import models)"
    public = {stage: set(importlib.import_module(f"dtypelab.{stage}").__all__) for _, stage, _, _ in used}
    private = [f"cli/{file}:{line} uses {stage}.{name}" for file, stage, name, line in used
               if name not in public[stage]]
    assert private == []


@pytest.mark.parametrize("package", sorted(n for n in RANK if (SRC / n / "__init__.py").is_file()))
def test_each_stage_draws_its_public_names(package):
    module = importlib.import_module(f"dtypelab.{package}")
    assert module.__all__ and not [name for name in module.__all__ if name.startswith("_")]
    assert [name for name in module.__all__ if not hasattr(module, name)] == []


def test_the_public_api_holds_the_user_verbs_and_every_name_it_had():
    verbs = {"load", "model_inputs", "cast_model", "quantize_model", "get_format", "compare_models",
             "compare_layers", "predict_headroom", "inspect_model", "inspect_checkpoint",
             "convert_checkpoint",
             "build_variants", "Variant", "ProgressEvent", "round_trip"}
    before = {"DtypelabError", "DummyModel", "HeadroomReport", "KeepPolicy", "LayerComparison", "LoadedModel",
              "NextTokenMetrics", "NumberFormat", "OutputMetrics", "all_formats", "build_model", "cast_model",
              "compare_layers", "compare_models", "convert_checkpoint", "default_texts", "get_format",
              "inspect", "inspect_checkpoint", "inspect_model", "load", "model_inputs", "next_token_metrics",
              "noise_floor_db", "output_metrics", "param_dtype_lines", "parse_token_ids", "predict_headroom",
              "print_param_dtype", "read_header", "tokenize", "variant_verdict", "weight_stats",
              "QuantizeResult", "apply_format", "format_table", "quantize_model"}  # the 0.1.0 __all__
    assert verbs | before <= set(dtypelab.__all__)
    assert all(hasattr(dtypelab, name) for name in dtypelab.__all__)


def test_every_module_says_what_its_room_is_for():
    undocumented = [str(p.relative_to(SRC)) for p in SRC.rglob("*.py")
                    if not ast.get_docstring(ast.parse(p.read_text(encoding="utf-8")))]
    assert undocumented == []
