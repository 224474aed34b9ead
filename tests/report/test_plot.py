"""The SQNR-by-layer chart: PNG and SVG files that hold what the result says, written whole or not at all."""

import pytest

pytest.importorskip("matplotlib")

import torch  # noqa: E402

from dtypelab import DummyModel, cast_model  # noqa: E402
from dtypelab.analysis import compare_layers  # noqa: E402
from dtypelab.errors import InputError  # noqa: E402
from dtypelab.report import plot_layers  # noqa: E402
from layer_models import OverflowModel, overflow_input  # noqa: E402


@pytest.fixture(scope="module")
def dummy_result():
    model = DummyModel()
    variants = {"fp16": cast_model(model, "fp16"), "bf16": cast_model(model, "bf16")}
    return compare_layers(model, variants, torch.tensor([[1, 0, 1]]))


def test_png_is_a_png(tmp_path, dummy_result):
    path = plot_layers(dummy_result, tmp_path / "layers.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert [p.name for p in tmp_path.iterdir()] == ["layers.png"]  # no partial file left behind


def test_svg_names_every_layer_and_variant(tmp_path, dummy_result):
    text = plot_layers(dummy_result, tmp_path / "layers.svg").read_text()
    assert text.lstrip().startswith("<?xml") and "<svg" in text
    for label in ["token_embedding", "layernorm_2", "head", "fp16", "bf16", "threshold 20 dB"]:
        assert label in text
    assert "inf / NaN" not in text  # nothing overflowed


def test_overflow_is_marked(tmp_path):
    model = OverflowModel()
    result = compare_layers(model, {"fp16": cast_model(model, "fp16")}, overflow_input())
    text = plot_layers(result, tmp_path / "overflow.svg").read_text()
    assert "inf / NaN in output" in text and "blocks.1.wo" in text


def test_bad_suffix_is_refused_and_nothing_written(tmp_path, dummy_result):
    with pytest.raises(InputError, match=r"\.png or \.svg"):
        plot_layers(dummy_result, tmp_path / "layers.pdf")
    assert list(tmp_path.iterdir()) == []


def test_many_layers_are_labelled_sparsely(tmp_path):
    from dtypelab.analysis import LayerComparison, LayerRow, OutputMetrics, VariantLayers

    metrics = OutputMetrics(0.0, 0.0, 0.0, 50.0, 1.0)
    rows = [LayerRow(f"layer_{i:03d}", "Linear", (1,), 1.0, metrics, 0.0, 0.0) for i in range(200)]
    result = LayerComparison("propagated", 20.0, False,
                             [VariantLayers("fp16", rows, metrics, None, 60.0, "within format noise")])
    text = plot_layers(result, tmp_path / "many.svg").read_text()
    labelled = [i for i in range(200) if f"layer_{i:03d}" in text]
    assert labelled == list(range(0, 200, 3))  # ceil(200 / 72) = 3: every third layer
    assert "one label every 3 layers" in text


def test_layers_below_zero_db_stay_on_the_chart():
    """A layer whose error outweighs its signal has a negative SQNR; the y axis used to start at 0 dB."""
    import matplotlib.pyplot as plt

    from dtypelab.analysis import LayerComparison, LayerRow, OutputMetrics, VariantLayers
    from dtypelab.report.plot import _draw

    rows = [LayerRow(name, "Linear", (1,), 1.0, OutputMetrics(0.0, 0.0, 0.0, sqnr, 1.0), 0.0, 0.0)
            for name, sqnr in [("a", 40.0), ("b", -12.0)]]
    result = LayerComparison("propagated", 20.0, False,
                             [VariantLayers("int4", rows, rows[1].metrics, "b", None, "unknown")])
    figure = _draw(plt, result)
    bottom, top = figure.axes[0].get_ylim()
    plt.close(figure)
    assert bottom <= -12.0 < 40.0 <= top
