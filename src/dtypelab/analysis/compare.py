"""``compare_models``: the same inputs through the reference and every variant, each row measured.

Analysis stage: runs with :mod:`~dtypelab.analysis.run`, measures with :mod:`~dtypelab.analysis.metrics`,
times with :mod:`~dtypelab.analysis.timing`; variants come from :mod:`dtypelab.variants`. Differences are
taken in float32, as the seed notebook does, so its printed numbers are reproduced to the last digit.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ..checkpoint import convert_support, stored_nbytes, stored_numel
from ..errors import InputError
from ..executor import Executor, TaskFailure
from ..models import ModelKind, OutputKind
from ..models import model_kind as kind_of
from ..progress import ProgressCallback, stage
from ..quant import (
    KeepPolicy,
    LayerOutcome,
    MixedPlan,
    computing_in,
    dequantized_once,
    inspect_model,
    int8_matmul,
)
from ..report import Table, TableMixin, format_cell
from ..tree import map_tensors
from ..variants import Variant, as_variants, is_peer_spec, iter_variants, plan_variant
from .defaults import COMPUTES
from .metrics import (
    ErrorSums,
    NextTokenMetrics,
    NextTokenSums,
    OutputMetrics,
    output_metrics,
    pooled_cosines,
    valid_positions,
)
from .run import batch_rows, is_logits_output, named_output, run_model, select_output, split_rows
from .timing import SLOWER_MARGIN, forward_latency_ms, is_clearly_slower, take_turns


@dataclass(frozen=True)
class VariantResult:
    """One variant's size, speed and output metrics against the reference.

    ``embedding_cosine_mean`` / ``_min``: per-sentence cosine of mean-pooled embeddings (hidden-state
    outputs only). ``next_token``: the causal-LM report (causal LMs only). ``stored_bytes``: what a
    checkpoint of the variant holds (:func:`~dtypelab.checkpoint.stored_nbytes`: the bytes ``convert``
    writes); ``bits_per_element``: those bits over the reference's element count (scales included).
    ``layers``: for a quantized format, every candidate layer's outcome (quantized, or dense with its
    reason); ``convert``: why ``convert`` cannot write this format (None when it can, or for a peer).
    ``failure``: why there are no metrics. ``emulated``: dtypelab's quantized formats dequantize weights
    and multiply in float, so their latency is the emulation's cost, never a low-precision kernel's.

    Timing (None unless timed; milliseconds are medians after warm-up): ``latency_ms``, the variant's
    forward, timed in turns with the reference; ``reference_latency_ms``, the reference's forward in those
    same rounds; ``latency_ratio``, ``latency_ms / reference_latency_ms`` (rounded to 3 decimals), so a
    change of load between rows never enters a ratio; ``latency_ratio_low`` / ``_high``, the lower and
    upper quartile of the per-round ratios (the variant's time over the reference run beside it), i.e. how
    noisy the ratio is; ``latency_rounds``, how many rounds were timed.
    """

    name: str
    dtype: str
    stored_bytes: int
    metrics: OutputMetrics | None
    output: torch.Tensor | None = field(repr=False, compare=False)
    embedding_cosine_mean: float | None = None
    embedding_cosine_min: float | None = None
    next_token: NextTokenMetrics | None = None
    bits_per_element: float | None = None
    latency_ms: float | None = None
    latency_ratio: float | None = None
    failure: str | None = None
    emulated: bool = False
    reference_latency_ms: float | None = None
    latency_ratio_low: float | None = None
    latency_ratio_high: float | None = None
    latency_rounds: int | None = None
    layers: list[LayerOutcome] = field(default_factory=list)
    convert: str | None = None
    calibration: dict | None = None  # :gptq / :awq: the calibration's settings and headline figures
    compute: str | None = None  # how it computed when not in the reference's dtype (``--compute``)

    @property
    def slower(self) -> bool:
        """Slower than the reference beyond the measured noise (see :func:`~dtypelab.analysis.timing.
        is_clearly_slower`); never for an emulated format, whose latency is no kernel's."""
        if self.emulated or self.latency_ratio is None or self.latency_ratio_low is None:
            return False
        return is_clearly_slower(self.latency_ratio, self.latency_ratio_low)


COMPACT_COLUMNS = ["variant", "stored_bytes", "sqnr_db", "kl_divergence", "top1_agreement",
                   "embedding_cosine_min", "latency_ratio", "status"]
"""What a terminal shows of the comparison by default (those the result has): size, the headline error
measures (KL and top-1 for logits, the worst sentence's embedding cosine for hidden states, the output
cosine when neither applies), speed when timed, status — within 100 columns; the rest with ``--columns
all`` or ``--json``. Headers are the JSON's field names; ``x fp32`` (stored_bytes over the reference's),
``x per round`` (latency_ratio_low-latency_ratio_high) and ``status`` are derived from fields."""

COMPACT_NEXT_TOKEN_COLUMNS = ["variant", "candidate_perplexity", "ln_ppl_ratio", "kl_mean", "same_top_p"]
"""The next-token report's default columns on a terminal (llama.cpp's headline figures); its headers are
``next_token``'s field names, a cell with ``±`` adds the field's ``_stderr``."""


@dataclass
class ComparisonResult(TableMixin):
    """Reference output plus one :class:`VariantResult` per variant, in the order given.

    ``output_name`` is the output field compared, ``output_shape`` its shape; ``positions`` how many
    token positions (or rows) entered the metrics and ``padding_positions`` how many padding positions
    were left out; ``batches``: how many forwards of the input each model took (a long text's logits
    are measured a batch of windows at a time, :data:`OUTPUT_BATCH_BYTES`). ``reference_output`` (and
    each variant's ``output``) is kept only when asked for (``keep_outputs``).
    ``reference_latency_ms``: when timed, the median of every reference forward timed in turns with the
    variants (each row's ratio divides by the reference's runs beside that variant, its own
    ``reference_latency_ms``); ``reference_runs``: how many runs that was.
    """

    reference_stored_bytes: int
    variants: list[VariantResult]
    logits: bool
    reference_output: torch.Tensor = field(repr=False, default=None)
    output_name: str = "output"
    positions: int = 0
    padding_positions: int = 0
    reference_latency_ms: float | None = None
    reference_runs: int = 0
    output_shape: tuple[int, ...] = ()
    batches: int = 1

    @property
    def has_embeddings(self) -> bool:
        return any(v.embedding_cosine_mean is not None for v in self.variants)

    @property
    def timed(self) -> bool:
        return self.reference_latency_ms is not None

    def to_table(self) -> Table:
        columns = ["variant", "dtype", "stored_bytes", "x fp32", "bits_per_element", "mean_abs_diff",
                   "max_abs_diff", "relative_error", "sqnr_db", "cosine_similarity"]
        columns += ["kl_divergence", "top1_agreement"] if self.logits else []
        columns += ["embedding_cosine_mean", "embedding_cosine_min"] if self.has_embeddings else []
        timing = ["latency_ms", "reference_latency_ms", "latency_ratio", "x per round"]
        columns += timing if self.timed else []
        compact = (COMPACT_COLUMNS + ([] if self.logits or self.has_embeddings else ["cosine_similarity"])
                   + ([] if self.timed else ["bits_per_element"]))  # timed: latency_ratio takes its place
        batched = f", in {self.batches} batches of inputs" if self.batches > 1 else ""
        notes = [f"compared: {self.output_name} {list(self.output_shape)}, {self.positions:,} "
                 f"positions ({self.padding_positions:,} padding positions left out){batched}"]
        notes += [note for v in self.variants for note in _layer_notes(v)]
        notes += [f"{v.name}: convert cannot write it: {v.convert}" for v in self.variants if v.convert]
        notes += [f"{v.name}: {v.calibration['note']}" for v in self.variants if v.calibration]
        if self.timed:
            notes += self._timing_notes()
        return Table("Comparison against the reference", columns + ["status"],
                     [self._row(v) for v in self.variants], notes, default_columns=compact)

    def _row(self, variant: VariantResult) -> list:
        ref_bytes = self.reference_stored_bytes
        ratio = round(variant.stored_bytes / ref_bytes, 3) if ref_bytes and not variant.failure else None
        row = [variant.name, variant.dtype, None if variant.failure else variant.stored_bytes, ratio,
               variant.bits_per_element, *_metric_cells(variant.metrics, self.logits)]
        row += [variant.embedding_cosine_mean, variant.embedding_cosine_min] if self.has_embeddings else []
        row += [variant.latency_ms, variant.reference_latency_ms, variant.latency_ratio,
                _spread(variant)] if self.timed else []
        return row + [self._status(variant)]

    def _status(self, variant: VariantResult) -> str:
        if variant.failure:
            return f"failed: {variant.failure}"
        status = variant.metrics.status + (f"; computed {variant.compute}" if variant.compute else "")
        if variant.latency_ms is None:
            return status
        if variant.emulated:
            return status + "; emulated (dequantize + float matmul): latency is not a kernel's"
        if variant.slower:
            return status + (f"; slower than fp32 here (x{variant.latency_ratio:.2f}, "
                             f"x{variant.latency_ratio_low:.2f} or more in 3 rounds of 4)")
        return status

    def _timing_notes(self) -> list[str]:
        """What the timing columns mean and when a row says "slower", so the numbers explain themselves."""
        margin = f"x{1 + SLOWER_MARGIN:.2f}"
        notes = [f"reference forward: {format_cell(self.reference_latency_ms)} ms, the median of all its "
                 f"{self.reference_runs} timed runs; each variant is timed in turns with it after warm-up: "
                 "latency_ms is the variant's median, reference_latency_ms the reference's median in those "
                 "same rounds, latency_ratio = latency_ms / reference_latency_ms",
                 "x per round: lower-upper quartile of the variant's time over the reference run beside "
                 "it, round by round (order flipped every round); a row says slower only when that lower "
                 f"quartile and latency_ratio both exceed {margin} (slower in three rounds of four, and in "
                 "the median): anything less is within this machine's noise"]
        beside = [v.reference_latency_ms for v in self.variants if v.reference_latency_ms]
        if beside and max(beside) > 1.5 * min(beside):
            notes.append(f"the reference took {format_cell(min(beside))} to {format_cell(max(beside))} ms "
                         "from row to row: the machine's load changed, so compare ratios, not ms")
        if any(v.emulated and v.latency_ms is not None for v in self.variants):
            notes.append("emulated: dtypelab's quantized formats dequantize the weights and multiply in "
                         "float, so their ms is the emulation's cost, not what an int8 / fp8 / fp4 kernel "
                         "would take")
        if any(is_peer_spec(v.name) and v.latency_ms is not None for v in self.variants):
            notes.append("peers (quanto, torchao) run their own package's ops, timed as they are: a packed "
                         "low-precision kernel where the package has one for this device and shape, "
                         "otherwise their own dequantize + matmul")
        return notes

    def to_tables(self) -> list[Table]:
        rows = [_next_token_row(v) for v in self.variants if v.next_token is not None]
        if not rows:
            return [self.to_table()]
        columns = ["variant", "candidate_perplexity", "ln_ppl_ratio", "kl_mean", "kl_median", "kl_p99",
                   "kl_max", "same_top_p", "delta_p_mean", "delta_p_rms", "bits_per_element"]
        first = next(v.next_token for v in self.variants if v.next_token is not None)
        notes = [f"{first.positions:,} next-token positions; reference (float32) perplexity "
                 f"{format_cell(first.reference_perplexity)}; KL(reference ‖ variant) in nats; ± its "
                 "standard error; ln_ppl_ratio = ln(PPL/PPL_ref); delta_p: change in the probability of the "
                 "reference's top token"]
        return [self.to_table(), Table("Next-token report (llama.cpp --kl-divergence)", columns, rows, notes,
                                       default_columns=COMPACT_NEXT_TOKEN_COLUMNS)]


def _layer_notes(variant: VariantResult) -> list[str]:
    """"int8: 14 of 16 layers quantized; dense: lm_head (the output head stays dense, …)" — every
    layer left dense, grouped by reason, so nothing stays float32 silently."""
    if not variant.layers:
        return []
    quantized = sum(layer.quantized for layer in variant.layers)
    by_reason: dict[str, list[str]] = {}
    for layer in variant.layers:
        if not layer.quantized:
            by_reason.setdefault(layer.reason, []).append(layer.name)
    dense = "; ".join(f"{', '.join(names[:4])}" + (f" and {len(names) - 4} more" if len(names) > 4 else "")
                      + f" ({reason})" for reason, names in by_reason.items())
    return [f"{variant.name}: {quantized} of {len(variant.layers)} layers quantized"
            + (f"; dense: {dense}" if dense else "")]


def _metric_cells(m: OutputMetrics | None, logits: bool) -> list:
    if m is None:
        return [None] * (7 if logits else 5)
    row = [m.mean_abs_diff, m.max_abs_diff, m.relative_error, m.sqnr_db, m.cosine_similarity]
    return row + ([m.kl_divergence, m.top1_agreement] if logits else [])


def _spread(variant: VariantResult) -> str | None:
    if variant.latency_ratio_low is None:
        return None
    return f"{variant.latency_ratio_low:.3g}-{variant.latency_ratio_high:.3g}"


def _pm(mean: float, stderr: float) -> str:
    return f"{format_cell(mean)} ± {format_cell(stderr)}"


def _next_token_row(variant: VariantResult) -> list:
    n = variant.next_token
    return [variant.name, n.candidate_perplexity, _pm(n.ln_ppl_ratio, n.ln_ppl_ratio_stderr),
            _pm(n.kl_mean, n.kl_stderr), n.kl_median, n.kl_p99, n.kl_max,
            f"{100 * n.same_top_p:.2f}% ± {100 * n.same_top_p_stderr:.2f}%", n.delta_p_mean, n.delta_p_rms,
            variant.bits_per_element]


def compare_models(reference: nn.Module, variants: Mapping[str, nn.Module | Variant] | Iterable[Variant],
                   inputs: torch.Tensor | Mapping[str, torch.Tensor], *, output_name: str | None = None,
                   output_kind: str = OutputKind.AUTO, next_token: bool | None = None,
                   timing: bool = False, model_kind: ModelKind | None = None,
                   progress: ProgressCallback | None = None, keep_outputs: bool = False,
                   compute: str = "reference") -> ComparisonResult:
    """Run the same inputs through ``reference`` and every variant and measure how far each moved.

    Args:
        reference: the model taken as truth (usually float32).
        variants: :class:`~dtypelab.variants.Variant` values (a failed one becomes a row with its
            reason), or display name -> model (e.g. from :func:`dtypelab.cast_model`). Any iterable of
            variants works, so a generator builds, measures and drops them one at a time.
        inputs: a tensor (first positional argument) or a mapping of keyword arguments; an
            ``attention_mask`` in it masks padding out of every metric.
        output_name: which field of an output object to compare (default: logits / last_hidden_state).
        output_kind: an :class:`~dtypelab.models.OutputKind`: logits, hidden or auto (logits when the
            output has a ``logits`` field).
        next_token: add the causal-LM report (default: when ``reference`` is a transformers causal LM
            and the inputs hold ``input_ids``).
        timing: also measure forward latencies: each variant is timed in turns with the reference
            (:func:`~dtypelab.analysis.timing.take_turns`); each ratio divides by the reference's runs in
            those same rounds, a row says "slower" only beyond the per-round noise, and dtypelab's
            quantized formats are marked emulated. Off by default: it roughly doubles a comparison's time.
        model_kind: the reference's :class:`~dtypelab.models.ModelKind` when the caller knows it (a
            :class:`~dtypelab.models.LoadedModel`'s ``kind``); otherwise it is decided once, here.
        progress: a :data:`~dtypelab.progress.ProgressCallback`, told each variant measured
            (stage ``compare``); returning False cancels.
        keep_outputs: keep the reference's and every variant's whole compared output on the result
            (``reference_output``, ``output``); off by default, since a long text's logits are
            gigabytes per model and the metrics never need them after measuring.
        compute: how the variants compute (:data:`COMPUTE_MODES`): ``"reference"`` (default), in the
            reference's dtype, which isolates the format's own error; ``"bf16"``, activations and dense
            weights in bfloat16 as a bf16 deployment runs (CPU and GPU matmuls ~3x float32's speed);
            ``"int8"``, W8A8 layers (``int8:a8``) through ``torch._int_mm``. Each row says how it ran.

    Returns:
        A :class:`ComparisonResult` whose rows hold each variant's stored bytes and :class:`OutputMetrics`,
        plus pooled-embedding cosines for hidden-state outputs and :class:`NextTokenMetrics` for LMs.
    """
    context = _reference_context(reference, inputs, output_name, output_kind, keep_outputs)
    context.compute = _checked_compute(compute)
    context.next_token = _wants_next_token(next_token, model_kind or kind_of(reference), context)
    context.timer = reference if timing else None
    context.numel = stored_numel(reference)
    listed = as_variants(variants) if isinstance(variants, Mapping | list | tuple) else variants
    bar = stage(progress, "compare", "variants", len(listed) if isinstance(listed, list) else None)
    rows = []
    for variant in listed:
        rows.append(_variant_result(variant, inputs, context))
        bar.advance(detail=variant.name)
        del variant  # not held while the next one is built: peak is the reference plus one variant
    ref_ms, runs = _reference_latency(reference, inputs, context) if timing else (None, 0)
    kept = torch.cat(context.references) if keep_outputs else None
    return ComparisonResult(stored_nbytes(reference), rows, context.logits, kept, context.name,
                            context.positions, context.padding, ref_ms, runs, context.shape,
                            len(context.batches))


@dataclass(frozen=True)
class VariantTask:
    """One row of a comparison on an executor, built in the worker: a ``--to`` item (``spec``), or a
    mixed-precision ``plan`` (its row named ``name``, default ``plan:<budget>``)."""

    spec: str | None = None
    plan: MixedPlan | None = None
    name: str | None = None

    @property
    def label(self) -> str:
        return self.spec or self.name or f"plan:{self.plan.budget or 'file'}"


@dataclass(frozen=True)
class CompareSetup:
    """How each worker of a parallel comparison gets what every row is measured against, once: ``load()``
    (picklable, run in the worker) returns ``(reference, inputs, calibration or None)``; the reference's
    outputs are then computed there, and the variants built as :func:`~dtypelab.variants.iter_variants`
    and :func:`~dtypelab.variants.plan_variant` would build them in this process."""

    load: Callable[[], tuple]
    output_name: str | None = None
    output_kind: str = OutputKind.AUTO
    next_token: bool | None = None
    model_kind: ModelKind | None = None
    keep: KeepPolicy | None = None
    embeddings: bool = False
    head: bool = False
    device: str | None = None
    compute: str = "reference"

    def __call__(self) -> tuple:
        """The worker's state: (this setup, reference, inputs, calibration, context)."""
        reference, inputs, calibration = self.load()
        context = _reference_context(reference, inputs, self.output_name, self.output_kind, False)
        context.compute = _checked_compute(self.compute)
        kind = self.model_kind or kind_of(reference)
        context.next_token = _wants_next_token(self.next_token, kind, context)
        context.numel = stored_numel(reference)
        return self, reference, inputs, calibration, context


def compare_on(executor: Executor, setup: CompareSetup, tasks: Sequence[VariantTask], *,
               progress: ProgressCallback | None = None) -> ComparisonResult:
    """:func:`compare_models` with one task per variant on ``executor`` (:mod:`dtypelab.executor`): each
    worker loads the reference and runs it once (``setup``), then builds, measures and drops its
    variants. The result is the in-process one (forwards are not timed: on shared cores a latency would
    measure the neighbours); a variant whose task failed twice, or whose worker died, is a failed row with
    the reason.

    Raises:
        InputError: no tasks.
    """
    if not tasks:
        raise InputError("nothing to compare: give at least one format or plan")
    bar = stage(progress, "compare", "variants", len(tasks))
    results = executor.run(setup, _variant_task, list(tasks),
                           on_done=lambda index, _: bar.advance(detail=tasks[index].label))
    rows, reference = [], next((r[1] for r in results if not isinstance(r, TaskFailure)), None)
    for task, result in zip(tasks, results, strict=True):
        rows.append(result[0] if not isinstance(result, TaskFailure) else VariantResult(
            task.label, "", 0, None, None, failure=f"failed on {executor.name}: {result.reason}"))
    if reference is None:
        raise InputError(f"every variant failed on {executor.describe()}: {results[0].reason}")
    stored, logits, name, positions, padding, shape, batches = reference
    return ComparisonResult(stored, rows, logits, None, name, positions, padding, None, 0, shape, batches)


def _variant_task(state: tuple, task: VariantTask) -> tuple[VariantResult, tuple]:
    """Build one variant in the worker and measure it; with the reference's facts the result needs."""
    setup, reference, inputs, calibration, context = state
    if task.plan is not None:
        variant = plan_variant(reference, task.plan, task.name, setup.device, calibration)
    else:
        variant = next(iter_variants(reference, [task.spec], setup.keep, setup.embeddings, setup.device,
                                     head=setup.head, calibration=calibration))
    row = _variant_result(variant, inputs, context)
    del variant  # not held while the next task's is built
    facts = (stored_nbytes(reference), context.logits, context.name, context.positions, context.padding,
             context.shape, len(context.batches))
    return row, facts


OUTPUT_BATCH_BYTES = 256 << 20  # compared output per forward: a long text runs a batch of windows at a time


def _reference_context(reference: nn.Module, inputs, output_name: str | None, output_kind: str,
                       keep_outputs: bool) -> _Context:
    """Run the reference and keep what every variant is measured against: its selected output, batch by
    batch. Inputs whose output would pass :data:`OUTPUT_BATCH_BYTES` (30 windows of 512 tokens of a
    49,152-token vocabulary are 3 GB of logits) are split along the batch into runs that stay under it,
    judged from one row's output; every variant then runs the same batches, so no variant's whole
    output is ever held, only the reference's."""
    batches = _batches(reference, inputs, output_name)
    references, raw = [], None
    for batch in batches:
        raw = run_model(reference, batch)
        name, out = named_output(raw, output_name)
        references.append(out)
    shape = (sum(r.shape[0] for r in references), *references[0].shape[1:]) if len(references) > 1 \
        else tuple(references[0].shape)
    context = _Context(name, references, is_logits_output(raw, output_kind), batches, keep_outputs, shape)
    for batch, ref in zip(batches, references, strict=True):
        mask = _mask_and_ids(batch)[0]
        compared = valid_positions(ref, mask)
        positions = compared.shape[0] * compared.shape[1] if compared.dim() >= 3 else compared.shape[0]
        context.positions += positions
        context.padding += ref.shape[0] * ref.shape[1] - positions if compared is not ref else 0
    return context


def _batches(reference: nn.Module, inputs, output_name: str | None) -> list:
    """The inputs as one batch, or split along dimension 0 when the output of all of them would pass
    :data:`OUTPUT_BATCH_BYTES` (one row's output, from a forward of the first row, tells)."""
    rows = batch_rows(inputs)
    if rows is None or rows < 2:
        return [inputs]
    _, probe = named_output(run_model(reference, split_rows(inputs, 1)[0]), output_name)
    if probe.dim() == 0 or probe.shape[0] != 1 or probe.nbytes * rows <= OUTPUT_BATCH_BYTES:
        return [inputs]
    return split_rows(inputs, max(1, OUTPUT_BATCH_BYTES // max(probe.nbytes, 1)))


def _reference_latency(reference: nn.Module, inputs, context: _Context) -> tuple[float, int]:
    """The footer's reference milliseconds: the median of all its runs taken in turns with the variants
    (timed on its own only when no variant ran, so a timed comparison always has its footer)."""
    runs = context.reference_ms
    if not runs:
        return forward_latency_ms(reference, inputs, warmup=1, runs=7), 7
    return statistics.median(runs), len(runs)


@dataclass
class _Context:
    """What every variant is measured against: the reference's output per batch of inputs."""

    name: str
    references: list[torch.Tensor]
    logits: bool
    batches: list
    keep_outputs: bool = False
    shape: tuple[int, ...] = ()
    positions: int = 0
    padding: int = 0
    next_token: bool = False
    timer: nn.Module | None = None  # the reference, when latencies are measured
    numel: int = 0  # the reference's elements, for bits per element
    compute: str = "reference"  # a key of COMPUTE_MODES: how the variants compute
    reference_ms: list[float] = field(default_factory=list)  # every reference run timed, for the footer

    @property
    def input_ids(self) -> torch.Tensor | None:
        return _mask_and_ids(self.batches[0])[1]


def _mask_and_ids(inputs: torch.Tensor | Mapping[str, torch.Tensor]) -> tuple:
    if isinstance(inputs, Mapping):
        return inputs.get("attention_mask"), inputs.get("input_ids")
    return None, (inputs if not inputs.is_floating_point() else None)


def _wants_next_token(requested: bool | None, kind: ModelKind, context: _Context) -> bool:
    if requested is not None:
        return requested
    first = context.references[0]
    return (context.logits and context.input_ids is not None and first.dim() == 3
            and first.shape[1] > 1 and kind == ModelKind.CAUSAL_LM)


def _variant_result(variant: Variant, inputs, context: _Context) -> VariantResult:
    name, model = variant.name, variant.model
    if not variant.ok:
        return VariantResult(name, "", 0, None, None, failure=variant.failure)
    info = inspect_model(model)  # as stored: before a --compute copy
    dtypes = "+".join(s.dtype for s in info.by_dtype)
    stored = stored_nbytes(model)
    try:
        with COMPUTE_MODES[context.compute](model) as (runner, computed):
            with dequantized_once(model, **_dequantize_budget(context)):
                measured = _measure(runner, context)
            speed = _size_and_speed(runner, inputs, stored, context)
    except (RuntimeError, NotImplementedError, TypeError) as exc:  # e.g. a peer's kernel missing here
        reason = f"forward failed: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
        return VariantResult(name, "", 0, None, None, failure=reason)
    kernel = "_int_mm" in (computed or "")  # W8A8 layers on the integer kernel: no emulation to time
    emulated = variant.format is not None and variant.format.is_quantized and not kernel
    writable = convert_support(variant.format) if variant.format is not None else None
    return VariantResult(name, dtypes, stored, **measured, emulated=emulated,
                         layers=variant.layers, convert=writable, calibration=_calibration(variant),
                         compute=computed, **speed)


@contextmanager
def _reference_compute(model: nn.Module) -> Iterator[tuple[nn.Module, str | None]]:
    yield model, None


@contextmanager
def _bf16_compute(model: nn.Module) -> Iterator[tuple[nn.Module, str | None]]:
    with computing_in(model, torch.bfloat16):
        yield _InputsIn(model, torch.bfloat16), "in bfloat16 (activations and dense weights; --compute bf16)"


@contextmanager
def _int8_compute(model: nn.Module) -> Iterator[tuple[nn.Module, str | None]]:
    with int8_matmul(model) as switched:
        yield model, (f"with torch._int_mm in {len(switched)} W8A8 layer(s) (int8 x int8, exact int32 sums; "
                      "--compute int8)" if switched else "as the reference: no W8A8 (int8:a8) layer takes "
                      "--compute int8")


COMPUTE_MODES: dict[str, Callable[[nn.Module], object]] = {
    "reference": _reference_compute, "bf16": _bf16_compute, "int8": _int8_compute}
"""``--compute`` -> a context that yields (the module to run, what the row says of it)."""


def _checked_compute(compute: str) -> str:
    if compute not in COMPUTE_MODES:
        raise InputError(f"unknown compute {compute!r}: use one of {', '.join(COMPUTES)}")
    return compute


class _InputsIn(nn.Module):
    """Runs ``model`` with its floating inputs cast to ``dtype`` and its floating outputs read back in
    float32, so the metrics (and the reference beside it) see the reference's dtype."""

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, *args, **kwargs):
        cast = [map_tensors(a, self._in) for a in args]
        outputs = self.model(*cast, **{k: map_tensors(v, self._in) for k, v in kwargs.items()})
        return map_tensors(outputs, self._out, update_mappings=True)  # a ModelOutput, read back

    def _in(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.dtype) if tensor.is_floating_point() else tensor

    @staticmethod
    def _out(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.float() if tensor.is_floating_point() else tensor


def _dequantize_budget(context: _Context) -> dict:
    """Several batches reuse one dequantized copy of each quantized weight (outputs bit for bit the
    per-call path's; 0.69x the wall of 8 batches of minilm, docs/benchmarks.md); one batch runs each layer
    once, so nothing is cached there (no memory held for nothing). The timed forwards of
    :func:`_size_and_speed` keep the per-call path, the cost a deployment of this emulation has."""
    return {} if len(context.batches) > 1 else {"budget_bytes": 0}


def _calibration(variant: Variant) -> dict | None:
    report = variant.calibration
    return None if report is None else {**report.summary(), "note": report.note()}


def _measure(model: nn.Module, context: _Context) -> dict:
    """The variant run on each batch of the reference's inputs and measured against it: one batch with
    the whole-tensor metrics (the seed notebook's float32 mean, to the last digit), several through
    :class:`~dtypelab.analysis.metrics.ErrorSums` and :class:`NextTokenSums`, which give the same
    numbers while holding one batch's output at a time."""
    sums, next_token, cosines, outputs, metrics = ErrorSums(), NextTokenSums(), [], [], None
    hidden = context.name == "last_hidden_state" and not context.logits
    single = len(context.batches) == 1
    for batch, ref in zip(context.batches, context.references, strict=True):
        out = select_output(run_model(model, batch), context.name)
        mask, ids = _mask_and_ids(batch)
        if single:
            metrics = output_metrics(valid_positions(ref, mask), valid_positions(out, mask), context.logits)
        else:
            sums.add(valid_positions(ref, mask), valid_positions(out, mask), context.logits)
        if hidden:
            cosines.append(pooled_cosines(ref, out, mask))
        if context.next_token:
            next_token.add(ref, out, ids, mask)
        if context.keep_outputs:
            outputs.append(out)
    result = {"metrics": metrics or sums.metrics(), "output": torch.cat(outputs) if outputs else None}
    if cosines:
        joined = torch.cat(cosines)
        result |= {"embedding_cosine_mean": joined.mean().item(), "embedding_cosine_min": joined.min().item()}
    if context.next_token:
        result["next_token"] = next_token.metrics()
    return result


def _size_and_speed(model: nn.Module, inputs, stored_bytes: int, context: _Context) -> dict:
    """Bits per reference element and, when timing, the variant's latency taken in turns with the
    reference: its ratio divides by the reference's runs in these rounds, which are also kept for the
    footer's median over the whole comparison."""
    extra = {"bits_per_element": stored_bytes * 8 / context.numel if context.numel else None}
    if context.timer is not None:
        turns = take_turns(context.timer, model, inputs)
        context.reference_ms.extend(turns.reference_ms)
        ms, ref_ms = statistics.median(turns.candidate_ms), statistics.median(turns.reference_ms)
        low, high = turns.ratio_quartiles
        extra |= {"latency_ms": ms, "reference_latency_ms": ref_ms,
                  "latency_ratio": round(ms / ref_ms, 3) if ref_ms > 0 else None,
                  "latency_ratio_low": round(low, 3), "latency_ratio_high": round(high, 3),
                  "latency_rounds": len(turns.candidate_ms)}
    return extra
