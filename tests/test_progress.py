"""The progress seam: long calls report events through one callback and stop when it says so."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import dtypelab
from dtypelab.errors import Cancelled
from dtypelab.progress import Progress, ProgressEvent, stage


def recorder(stop_after: int | None = None):
    events: list[ProgressEvent] = []

    def callback(event: ProgressEvent) -> bool | None:
        events.append(event)
        return False if stop_after is not None and len(events) > stop_after else None
    return events, callback


def test_stage_opens_at_zero_and_counts_up_to_its_total():
    events, callback = recorder()
    bar = stage(callback, "demo", "steps", 3)
    for _ in range(3):
        bar.advance(detail="x")
    assert [(e.done, e.total) for e in events] == [(0, 3), (1, 3), (2, 3), (3, 3)]
    assert events[-1].finished and not events[0].finished and events[1].detail == "x"


def test_no_callback_costs_nothing_and_never_cancels():
    bar = Progress(None, "demo", "steps", 2)
    bar.advance()
    bar.advance()
    assert bar.done == 2


def test_returning_false_cancels_with_a_dtypelab_error():
    _, callback = recorder(stop_after=1)
    bar = stage(callback, "demo", "steps", 5)
    with pytest.raises(Cancelled, match="demo cancelled") as caught:
        bar.advance()
    assert caught.value.exit_code == 130


def test_compare_and_variants_report_each_variant(dummy, seed_input):
    events, callback = recorder()
    variants = dtypelab.build_variants(dummy, "fp16,bf16,int8", progress=callback)
    dtypelab.compare_models(dummy, variants, seed_input, progress=callback)
    built = [e for e in events if e.stage == "variants"]
    compared = [e for e in events if e.stage == "compare"]
    assert [e.detail for e in built[1:]] == ["fp16", "bf16", "int8"] and built[-1].finished
    assert [(e.done, e.total) for e in compared] == [(0, 3), (1, 3), (2, 3), (3, 3)]


def test_layers_reports_each_variant_and_can_be_cancelled(dummy, seed_input):
    events, callback = recorder()
    variants = dtypelab.build_variants(dummy, "fp16,bf16")
    dtypelab.compare_layers(dummy, variants, seed_input, progress=callback, noise_floor=False)
    assert [e.detail for e in events if e.stage == "layers"] == ["", "fp16", "bf16"]
    _, stop = recorder(stop_after=1)
    with pytest.raises(Cancelled):
        dtypelab.compare_layers(dummy, variants, seed_input, progress=stop, noise_floor=False)


def test_a_cancelled_conversion_leaves_no_destination(tmp_path):
    save_file({f"w{i}": torch.randn(64, 64) for i in range(4)}, tmp_path / "in.safetensors")
    _, stop = recorder(stop_after=2)
    with pytest.raises(Cancelled):
        dtypelab.convert_checkpoint(tmp_path / "in.safetensors", tmp_path / "out.safetensors", "bf16",
                                    progress=stop)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors"]


def test_loading_and_headroom_report_progress(dummy, seed_input):
    events, callback = recorder()
    dtypelab.load("dummy", progress=callback)
    dtypelab.predict_headroom(dummy, seed_input, ["fp16"], progress=callback)
    assert [(e.stage, e.done, e.total) for e in events if e.stage == "load"] == \
        [("load", 0, 2), ("load", 1, 2), ("load", 2, 2)]
    counted = [e.detail for e in events if e.stage == "headroom"][1:]
    assert counted[-1] == "" and "linear_1" in counted  # every module call, the model itself last
