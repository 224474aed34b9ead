"""Which layers can take a format: the damage of putting *only that layer group* in it, ranked.

Analysis stage. Two ways to measure, in the same units so they can be checked against each other:

* ``exact``: the truth. One forward per (group, format) with only that group quantized, measured
  against the reference: mean KL of the output distributions for logits outputs (nats, over every
  real position), relative noise power Σ(Δout)² / Σ out² for hidden-state outputs.
* ``fisher`` (default): a second-order prediction from one forward and one backward pass. At the
  reference, KL and output MSE have zero gradient, so their leading term is quadratic in a layer's
  output change δ: KL ≈ ½ δᵀ F δ with F the Fisher information of the model's own predictions, and
  ‖Δout‖² ≈ δᵀ JᵀJ δ. Their diagonals are estimated by one backward pass: of Σ log p(y) with y
  *sampled from the model* (E[g gᵀ] = F), or of Σ r·out with r ~ N(0, 1) (E[g gᵀ] = JᵀJ). δ is
  the layer's own output change on its reference input (the quantized layer run on the input the
  reference layer saw), so each format costs one pass of the quantized layers, not of the model.
  ModelOpt's ``auto_quantize`` scores layers the same way (Σ grad² · Δout²) with the task loss's
  gradient; the sampled-label Fisher is what makes the score a prediction of KL, in nats.

Layers that must share a format are one group: q/k/v and gate/up, which vLLM fuses into one matrix
(:data:`FUSED_LAYERS`); a group's damage is the sum of its layers' (the prediction is additive) and
its bytes are what ``convert`` stores for its weights.

A calibrated format (``int4:g64:gptq``, ``:awq``) is scored with the codes a whole-model calibration in
that format chooses for each layer (one calibration run per such format, on the ``calibration``
batches); an AWQ layer whose scales would be folded into a norm is scored as ``Q(W·s)`` applied to
``x / s``, which is what the folded model computes.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from copy import deepcopy
from dataclasses import dataclass, field

import torch
from torch import nn

from ..checkpoint import stored_nbytes, weight_stored_nbytes
from ..errors import InputError
from ..executor import Executor, InProcess, TaskFailure
from ..formats import NumberFormat, get_format
from ..progress import ProgressCallback, stage
from ..quant import DENSE, QuantizedLinear, calibrate_layers, dequantized_once, linear_candidates
from ..report import Table, TableMixin, format_cell
from ..tree import set_submodule
from .defaults import SENSITIVITY_METHODS
from .metrics import kl_divergence, valid_positions
from .run import batch_rows as rows_of
from .run import is_logits_output, named_output, run_model, select_output, split_rows

FUSED_LAYERS: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"),  # Llama, Mistral, Qwen2 …: vLLM's QKVParallelLinear
    "gate_up": ("gate_proj", "up_proj"),  # vLLM's MergedColumnParallelLinear
    "query_key_value": ("query", "key", "value"),  # BERT
    "w1_w3": ("w1", "w3"),  # Mixtral's experts
}
"""Leaf names a serving stack fuses into one matrix, so they carry one scheme: label -> members."""

KL_NATS, RELATIVE_NOISE = "kl_nats", "relative_noise_power"


@dataclass(frozen=True)
class LayerGroup:
    """Layers that take one format together, in execution (registration) order.

    ``weight_numel``: elements of their weights; ``block``: the first integer in the name (the
    transformer block, for first/last-layer rules), -1 when there is none."""

    name: str
    layers: tuple[str, ...]
    weight_numel: int
    block: int


@dataclass(frozen=True)
class GroupScore:
    """One (group, choice): the bytes its weights are stored in and the damage, predicted and/or
    measured (None when not computed); ``problem`` says why the format cannot hold the group (a group
    size that does not divide, a layout convert lacks) — then there are no numbers."""

    group: str
    fmt: str
    stored_bytes: int
    predicted: float | None = None
    exact: float | None = None
    problem: str = ""
    layer_predicted: tuple[float, ...] = ()  # per layer of the group, in its order (fisher only)


@dataclass
class SensitivityResult(TableMixin):
    """Every candidate layer group's damage and bytes in every format, and what it cost.

    ``metric``: ``kl_nats`` (mean KL per position) or ``relative_noise_power`` (Σ noise² / Σ signal²,
    = 10^(−SQNR/10)). ``dense_bytes``: each group's bytes left as it is. ``fixed_bytes``: every other
    tensor of the checkpoint (embeddings, norms, biases, the head), which no choice changes.
    ``forward_equivalents``: wall time of each method over one reference forward on the same inputs
    (measured, this run). ``spearman``: per format, the rank correlation of the fisher prediction with
    the exact damage (both computed). ``dense``: layers no format may take, with the reason.
    """

    metric: str
    formats: list[str]
    groups: list[LayerGroup]
    scores: list[GroupScore]
    dense_bytes: dict[str, int]
    fixed_bytes: int
    positions: int
    methods: list[str]
    forward_equivalents: dict[str, float] = field(default_factory=dict)
    spearman: dict[str, float] = field(default_factory=dict)
    dense: dict[str, str] = field(default_factory=dict)
    layer_bytes: dict[tuple[str, str], int] = field(default_factory=dict, repr=False)  # (layer, fmt|dense)

    def __post_init__(self) -> None:
        self._index = {(s.group, s.fmt): s for s in self.scores}

    def score(self, group: str, fmt: str) -> GroupScore:
        return self._index[(group, fmt)]

    def damage(self, score: GroupScore) -> float | None:
        """The damage a plan is chosen on: exact when measured, else predicted."""
        return score.exact if score.exact is not None else score.predicted

    def to_table(self) -> Table:
        first = self.formats[0]
        ranked = sorted(self.groups, key=lambda g: -_sort_key(self.damage(self.score(g.name, first))))
        columns = ["rank", "group", "layers", "weights"]
        for fmt in self.formats:
            columns += [f"{fmt} bytes"] + [f"{fmt} {m}" for m in self.methods]
        rows = []
        for rank, group in enumerate(ranked, 1):
            row = [rank, group.name, len(group.layers), group.weight_numel]
            for fmt in self.formats:
                s = self.score(group.name, fmt)
                row += [None if s.problem else s.stored_bytes] + [
                    s.problem or (s.predicted if m == "fisher" else s.exact) for m in self.methods]
            rows.append(row)
        unit = "mean KL per position, nats" if self.metric == KL_NATS else \
            "relative output noise power Σ(Δout)²/Σ out² (= 10^(-SQNR/10))"
        notes = [f"damage of quantizing only that group, {unit}, over {self.positions:,} positions; "
                 f"ranked by {first}",
                 f"fixed (dense) bytes of the rest of the checkpoint: {self.fixed_bytes:,}"]
        notes += [f"cost of {m}: {format_cell(v)} reference forwards (wall time, this run)"
                  for m, v in self.forward_equivalents.items()]
        notes += [f"Spearman rank correlation fisher vs exact, {f}: {format_cell(v)}"
                  for f, v in self.spearman.items()]
        notes += [f"{name}: dense ({reason})" for name, reason in self.dense.items()]
        return Table("Sensitivity: damage of each layer group alone", columns, rows, notes)


def _sort_key(value: float | None) -> float:
    return -math.inf if value is None or math.isnan(value) else value


def sensitivity(reference: nn.Module, formats: str | Sequence[str | NumberFormat],
                inputs: torch.Tensor | Mapping[str, torch.Tensor], *, method: str = "fisher",
                exact: bool = False, output_name: str | None = None, output_kind: str = "auto",
                exclude: Sequence[str] = (), head: bool = False, batch_rows: int = 1, seed: int = 0,
                calibration: Sequence | None = None, executor: Executor | None = None,
                worker_setup: Callable[[], tuple] | None = None,
                progress: ProgressCallback | None = None) -> SensitivityResult:
    """Rank every quantizable layer group of ``reference`` by the damage each format does to it alone.

    Args:
        reference: the float model (not modified).
        formats: quantized formats to score (``"int4:g64,int8"`` or a list).
        inputs: what the damage is measured on (the calibration text for a plan); split into runs of
            ``batch_rows`` rows (windows) so memory stays one run's activations and gradients.
        method: ``"fisher"`` (the prediction) or ``"exact"`` (only the truth).
        exact: also measure the truth beside the prediction, and their Spearman correlation.
        exclude: globs of layers to leave out (kept dense); ``head``: let the output head be ranked.
        seed: the seed of the sampled labels / random probes (the prediction is reproducible).
        calibration: the batches ``:gptq`` / ``:awq`` formats calibrate on (required for them; use the
            ones ``convert`` will calibrate on, so the scored codes are the written ones).
        executor, worker_setup: run the exact sweep's (group, format) measurements as independent tasks
            (:mod:`dtypelab.executor`: local processes, Ray); ``worker_setup()`` — picklable, run once per
            worker — returns ``(reference, inputs, calibration)`` as this call has them. A task that fails
            twice is that score's ``problem``, with its reason.

    Returns:
        A :class:`SensitivityResult`.
    """
    if method not in SENSITIVITY_METHODS:
        raise InputError(f"unknown sensitivity method {method!r}: choose "
                         f"{' or '.join(SENSITIVITY_METHODS)}")
    methods = ["fisher", "exact"] if method == "fisher" and exact else [method]
    parallel = executor is not None and not isinstance(executor, InProcess) and "exact" in methods
    if parallel and worker_setup is None:
        raise InputError("a parallel exact sweep needs worker_setup: how each worker loads the model and "
                         "its inputs (the CLI passes one for --workers / --ray)")
    sweep = SweepSetup(worker_setup, formats, output_name, output_kind, tuple(exclude), head, batch_rows,
                       seed)
    context, candidates = sweep.context(reference, inputs, calibration, progress)
    fmts, groups = context.fmts, context.groups
    predicted = context.fisher() if "fisher" in methods else {}
    measured = ({} if "exact" not in methods else
                context.exact_parallel(executor, sweep) if parallel else context.exact())
    scores = context.scores(predicted, measured)
    spearman = {}
    for fmt in fmts if predicted and measured else []:
        keys = [(g.name, fmt.name) for g in groups if (g.name, fmt.name) in measured]
        spearman[fmt.name] = spearman_rho([predicted[k][0] for k in keys], [measured[k] for k in keys])
    return SensitivityResult(context.metric, [f.name for f in fmts], groups, scores, context.dense_bytes(),
                             context.fixed_bytes(), context.positions, methods, context.cost, spearman,
                             {name: reason for name, reason in candidates.items() if reason},
                             context.layer_bytes())


@dataclass(frozen=True)
class SweepSetup:
    """What builds a sensitivity sweep's context, here and (picklable) in each worker of a parallel
    sweep: ``load()`` gives ``(reference, inputs, calibration)``; the rest are :func:`sensitivity`'s
    arguments."""

    load: Callable[[], tuple] | None
    formats: str | Sequence[str | NumberFormat]
    output_name: str | None
    output_kind: str
    exclude: tuple[str, ...]
    head: bool
    batch_rows: int
    seed: int

    def __call__(self) -> _Context:
        """A worker's state: the model loaded once, its context (inputs in runs, twins) built once."""
        reference, inputs, calibration = self.load()
        return self.context(reference, inputs, calibration, None)[0]

    def context(self, reference: nn.Module, inputs, calibration: Sequence | None,
                progress: ProgressCallback | None) -> tuple[_Context, dict[str, str]]:
        """(the sweep's context, every Linear candidate -> why it stays dense or "")."""
        fmts = _parse_formats(self.formats)
        calibrated = [f.name for f in fmts if f.calibration]
        if calibrated and not calibration:
            raise InputError(f"{', '.join(calibrated)} choose codes from calibration inputs: pass "
                             "calibration= (batches of model inputs); the CLI reads the bundled calibration "
                             "text or --calib-file")
        candidates = linear_candidates(reference, list(self.exclude), self.head)
        names = [name for name, reason in candidates.items() if not reason]
        if not names:
            raise InputError("no layer to rank: every Linear layer is excluded, tied or the head "
                             "(--head ranks the head)")
        groups = layer_groups(reference, names)
        rows = self.batch_rows
        batches = split_rows(inputs, rows) if (rows_of(inputs) or 1) > rows else [inputs]
        return _Context(reference, batches, self.output_name, self.output_kind, groups, fmts, self.seed,
                        progress, calibration), candidates


def _exact_task(context: _Context, key: tuple[str, str]) -> float:
    """One (group, format) of a parallel exact sweep, in a worker: its damage summed over every run."""
    return context.exact_total(*key)


def _parse_formats(formats: str | Sequence[str | NumberFormat]) -> list[NumberFormat]:
    items = [f.strip() for f in formats.split(",") if f.strip()] if isinstance(formats, str) \
        else list(formats)
    fmts = [get_format(f) for f in items]
    for fmt in fmts:
        if not fmt.is_quantized:
            raise InputError(f"{fmt.name} is a plain dtype: sensitivity ranks quantized formats (int8, "
                             "int4:g64, fp8_e4m3 …); a plan leaves layers dense on its own")
    if not fmts:
        raise InputError("no format given: pass --to, e.g. --to int4:g64,int8")
    return fmts


def layer_groups(model: nn.Module, names: Sequence[str]) -> list[LayerGroup]:
    """``names`` grouped by :data:`FUSED_LAYERS` (members under one parent), others alone, in order."""
    member_of = {leaf: label for label, leaves in FUSED_LAYERS.items() for leaf in leaves}
    grouped: dict[str, list[str]] = {}
    for name in names:
        parent, _, leaf = name.rpartition(".")
        label = member_of.get(leaf)
        siblings = [n for n in names if n.rpartition(".")[0] == parent and member_of.get(n.rpartition(".")[2])
                    == label] if label else []
        key = f"{parent}.{label}" if label and len(siblings) > 1 else name
        grouped.setdefault(key, []).append(name)
    return [LayerGroup(key, tuple(layers), sum(model.get_submodule(n).weight.numel() for n in layers),
                       _block(key)) for key, layers in grouped.items()]


def _block(name: str) -> int:
    match = re.search(r"(?:^|\.)(\d+)(?:\.|$)", name)
    return int(match.group(1)) if match else -1


def spearman_rho(predicted: Sequence[float], truth: Sequence[float]) -> float:
    """Spearman's rank correlation (Pearson's r of the ranks, ties given their average rank); NaN for
    fewer than two values or a constant side."""
    if len(predicted) != len(truth):
        raise InputError("spearman_rho needs two sequences of the same length")
    if len(predicted) < 2:
        return math.nan
    a, b = _ranks(predicted), _ranks(truth)
    a, b = a - a.mean(), b - b.mean()
    denom = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum()) / denom if denom else math.nan


def _ranks(values: Sequence[float]) -> torch.Tensor:
    x = torch.tensor([float(v) for v in values], dtype=torch.float64)
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(len(x), dtype=torch.float64)
    for value in torch.unique(x):  # ties: their average rank
        tied = x == value
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


class _Context:
    """The reference, its inputs in runs, the quantized twin of every (layer, format), and the cost."""

    def __init__(self, reference: nn.Module, batches: list, output_name: str | None, output_kind: str,
                 groups: list[LayerGroup], fmts: list[NumberFormat], seed: int,
                 progress: ProgressCallback | None, calibration: Sequence | None = None):
        self.reference, self.batches, self.output_name = reference, batches, output_name
        self.groups, self.fmts, self.seed, self.progress = groups, fmts, seed, progress
        self.layers = [name for g in groups for name in g.layers]
        raw = run_model(reference, batches[0])  # warm-up, and what the output is
        start = time.perf_counter()
        run_model(reference, batches[0])
        self.forward_s = time.perf_counter() - start  # one reference forward on one run of inputs
        self.output_name = named_output(raw, output_name)[0]
        self.logits = is_logits_output(raw, output_kind)
        self.metric = KL_NATS if self.logits else RELATIVE_NOISE
        self.problems = {(g.name, f.name): self._problem(g, f) for g in groups for f in fmts}
        self.twins: dict[tuple[str, str], nn.Module] = {}
        for f in fmts:
            fitting = [g for g in groups if not self.problems[(g.name, f.name)]]
            if f.calibration:
                self._calibrated_twins(f, fitting, calibration)
            else:
                self.twins |= {(n, f.name): QuantizedLinear(reference.get_submodule(n), f)
                               for g in fitting for n in g.layers}
        self.positions, self.cost = 0, {}

    def _calibrated_twins(self, fmt: NumberFormat, groups: list[LayerGroup], calibration: Sequence) -> None:
        """Twins in ``fmt`` from one calibration of every layer of ``groups`` (on a copy); a layer the
        calibration leaves dense makes its group's problem."""
        copy = deepcopy(self.reference)
        names = [n for g in groups for n in g.layers]
        dense, report = calibrate_layers(copy, fmt, names, calibration, self.progress)
        for group in groups:
            reason = next((f"{n}: {dense[n]}" for n in group.layers if n in dense), "")
            if reason:
                self.problems[(group.name, fmt.name)] = reason
                continue
            for name in group.layers:
                twin = copy.get_submodule(name)
                scales = report.scales.get(name)
                self.twins[(name, fmt.name)] = twin if scales is None else InputScaled(twin, scales)

    def _problem(self, group: LayerGroup, fmt: NumberFormat) -> str:
        for name in group.layers:
            module = self.reference.get_submodule(name)
            inputs = module.weight.shape[0] if type(module).__name__ == "Conv1D" else module.weight.shape[1]
            problem = fmt.group_problem(inputs)
            if problem:
                return f"{name}: {problem}"
        return ""

    def dense_bytes(self) -> dict[str, int]:
        return {g.name: sum(weight_stored_nbytes(self.reference.get_submodule(n)) for n in g.layers)
                for g in self.groups}

    def layer_bytes(self) -> dict[tuple[str, str], int]:
        """(layer, format or "dense") -> the bytes its weight is stored in."""
        sizes = {(name, DENSE): weight_stored_nbytes(self.reference.get_submodule(name))
                 for name in self.layers}
        return sizes | {key: weight_stored_nbytes(getattr(twin, "inner", twin))
                        for key, twin in self.twins.items()}

    def fixed_bytes(self) -> int:
        return stored_nbytes(self.reference) - sum(self.dense_bytes().values())

    def scores(self, predicted: dict, measured: dict) -> list[GroupScore]:
        sizes, out = self.layer_bytes(), []
        for g in self.groups:
            for f in self.fmts:
                key = (g.name, f.name)
                if self.problems[key]:
                    out.append(GroupScore(g.name, f.name, 0, problem=self.problems[key]))
                    continue
                nbytes = sum(sizes[(n, f.name)] for n in g.layers)
                total, per_layer = predicted.get(key, (None, ()))
                out.append(GroupScore(g.name, f.name, nbytes, total, measured.get(key), "", per_layer))
        return out

    # ---- the prediction: one forward + one backward per run ----------------------------------------

    def fisher(self) -> dict[tuple[str, str], tuple[float, tuple[float, ...]]]:
        start = time.perf_counter()
        sums = {key: 0.0 for key in self.twins}
        bar = stage(self.progress, "sensitivity", "runs", len(self.batches))
        generator = torch.Generator().manual_seed(self.seed)
        denominator = 0.0
        for batch in self.batches:
            denominator += self._fisher_run(batch, sums, generator)
            bar.advance(detail="fisher")
        self.cost["fisher"] = (time.perf_counter() - start) / max(self.forward_s * len(self.batches), 1e-9)
        scale = 0.5 / max(denominator, 1) if self.logits else 1.0 / denominator if denominator else math.nan
        result = {}
        for g in self.groups:
            for f in self.fmts:
                if not self.problems[(g.name, f.name)]:
                    per_layer = tuple(sums[(n, f.name)] * scale for n in g.layers)
                    result[(g.name, f.name)] = (sum(per_layer), per_layer)
        return result

    def _fisher_run(self, batch, sums: dict, generator: torch.Generator) -> float:
        """Accumulate Σ g² δ² per (layer, format) over one run; return the run's denominator (positions
        for KL, Σ out² for noise power)."""
        captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        grads: dict[str, torch.Tensor] = {}
        with _capturing(self.reference, self.layers, captured, grads), torch.enable_grad():
            out = select_output(self.reference(**_kwargs(batch)) if isinstance(batch, Mapping)
                                else self.reference(batch), self.output_name)
            mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
            loss, denominator = self._probe(out, mask, generator)
            loss.backward()
        self.positions += int(valid_positions(out.detach(), mask).reshape(-1, out.shape[-1]).shape[0]) \
            if out.dim() >= 2 else 1
        with torch.no_grad():
            for name in self.layers:
                x, y = captured[name]
                g2 = grads[name].double().pow(2) if name in grads else None
                for f in self.fmts:
                    key = (name, f.name)
                    if key in self.twins and g2 is not None:
                        delta = self.twins[key](x).double() - y.double()
                        sums[key] += float((g2 * delta.pow(2)).sum())
        return denominator

    def _probe(self, out: torch.Tensor, mask: torch.Tensor | None,
               generator: torch.Generator) -> tuple[torch.Tensor, float]:
        """The scalar whose gradient estimates the metric's curvature: Σ log p(y), y ~ the model's own
        softmax (logits), or Σ r·out with r ~ N(0, 1) (hidden states); padding positions get no weight."""
        weights = torch.ones(out.shape[:-1], dtype=out.dtype) if mask is None or out.dim() < 3 or \
            tuple(out.shape[:2]) != tuple(mask.shape) else mask.to(out.dtype)
        if self.logits:
            logp = torch.log_softmax(out.float(), dim=-1)
            flat = logp.detach().exp().reshape(-1, out.shape[-1])
            labels = torch.multinomial(flat, 1, generator=generator).reshape(out.shape[:-1])
            picked = logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
            return (picked * weights).sum(), float(weights.sum())
        probe = torch.randn(out.shape, generator=generator, dtype=out.dtype) * weights.unsqueeze(-1)
        signal = float((out.detach().double().pow(2) * weights.unsqueeze(-1).double()).sum())
        return (probe * out).sum(), signal

    # ---- the truth: one forward per (group, format) ------------------------------------------------

    def exact(self) -> dict[tuple[str, str], float]:
        start = time.perf_counter()
        keys = [(g, f) for g in self.groups for f in self.fmts if not self.problems[(g.name, f.name)]]
        totals = {(g.name, f.name): 0.0 for g, f in keys}
        bar = stage(self.progress, "sensitivity", "forwards", len(keys) * len(self.batches))
        denominator = 0.0
        with dequantized_once(nn.ModuleList(self.twins.values())):  # each twin dequantized once, not per run
            denominator = self._exact_runs(keys, totals, bar)
        self.cost["exact"] = (time.perf_counter() - start) / max(self.forward_s * len(self.batches), 1e-9)
        return {key: value / denominator if denominator else math.nan for key, value in totals.items()}

    def _exact_runs(self, keys: list, totals: dict, bar) -> float:
        """Every run of the exact sweep: the reference, then each (group, format) swapped in; returns the
        denominator (positions for KL, reference power for noise)."""
        denominator = 0.0
        for batch in self.batches:
            ref, mask = self._reference_run(batch)
            denominator += self._denominator(ref)
            for group, fmt in keys:
                with _swapped(self.reference, {n: self.twins[(n, fmt.name)] for n in group.layers}):
                    out = select_output(run_model(self.reference, batch), self.output_name)
                cand = valid_positions(out, mask)
                totals[(group.name, fmt.name)] += self._exact_sum(ref, cand)
                bar.advance(detail=f"{group.name} {fmt.name}")
        return denominator

    def _reference_run(self, batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the reference's output at the run's real positions, the run's attention mask)."""
        mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
        return valid_positions(select_output(run_model(self.reference, batch), self.output_name), mask), mask

    def _denominator(self, ref: torch.Tensor) -> float:
        """One run's share of the exact damage's denominator (positions for KL, reference power for
        noise); counts its positions unless the prediction already did."""
        rows = ref.reshape(-1, ref.shape[-1]).shape[0]
        self.positions = self.positions if "fisher" in self.cost else self.positions + rows
        return rows if self.logits else float(ref.double().pow(2).sum())

    def exact_total(self, group_name: str, fmt_name: str) -> float:
        """One (group, format)'s exact damage summed over every run, before the denominator (what a
        worker of a parallel sweep computes: the same sums, in the same order, as :meth:`exact`)."""
        group = next(g for g in self.groups if g.name == group_name)
        twins = {n: self.twins[(n, fmt_name)] for n in group.layers}
        with dequantized_once(nn.ModuleList(twins.values())):
            return sum(self._exact_run(batch, twins) for batch in self.batches)

    def _exact_run(self, batch, twins: dict[str, nn.Module]) -> float:
        """One run's exact damage sum with ``twins`` swapped in."""
        ref, mask = self._reference_run(batch)
        with _swapped(self.reference, twins):
            out = select_output(run_model(self.reference, batch), self.output_name)
        return self._exact_sum(ref, valid_positions(out, mask))

    def exact_parallel(self, executor: Executor, setup: SweepSetup) -> dict[tuple[str, str], float]:
        """:meth:`exact` with the (group, format) measurements as tasks of ``executor``; the denominator
        (positions or reference power) from this process's reference forwards. A failed task becomes
        its score's problem."""
        start = time.perf_counter()
        keys = [(g.name, f.name) for g in self.groups for f in self.fmts
                if not self.problems[(g.name, f.name)]]
        denominator = sum(self._denominator(self._reference_run(batch)[0]) for batch in self.batches)
        bar = stage(self.progress, "sensitivity", "tasks", len(keys))
        results = executor.run(setup, _exact_task, keys,  # progress as each task comes back, in any order
                               on_done=lambda index, _: bar.advance(detail=f"{'/'.join(keys[index])} "
                                                                           f"on {executor.describe()}"))
        measured = {}
        for key, result in zip(keys, results, strict=True):
            if isinstance(result, TaskFailure):
                self.problems[key] = f"failed on {executor.name}: {result.reason}"
            else:
                measured[key] = result / denominator if denominator else math.nan
        self.cost["exact"] = (time.perf_counter() - start) / max(self.forward_s * len(self.batches), 1e-9)
        return measured

    def _exact_sum(self, ref: torch.Tensor, cand: torch.Tensor) -> float:
        if self.logits:
            rows = ref.reshape(-1, ref.shape[-1]).shape[0]
            return kl_divergence(ref.reshape(-1, ref.shape[-1]), cand.reshape(-1, cand.shape[-1])) * rows
        return float((cand.double() - ref.double()).pow(2).sum())


class InputScaled(nn.Module):
    """An AWQ layer outside its folded model: its codes hold ``W·s``, the folded norm before it emits
    ``x / s``; this applies the ``1/s`` itself, so the layer alone computes what the folded model does."""

    def __init__(self, inner: nn.Module, scales: torch.Tensor) -> None:
        super().__init__()
        self.inner = inner
        self.register_buffer("inverse", 1.0 / scales, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x * self.inverse.to(x.dtype))


def _kwargs(batch: Mapping) -> dict:
    kwargs = dict(batch)
    kwargs.setdefault("use_cache", False)
    return kwargs


class _capturing:
    """Forward hooks on ``layers``: keep each one's input and output (detached) and the gradient that
    reaches its output. Parameters are frozen meanwhile (no weight gradients are ever allocated)."""

    def __init__(self, model: nn.Module, layers: list[str], captured: dict, grads: dict):
        self.model, self.layers, self.captured, self.grads = model, layers, captured, grads
        self.handles, self.frozen = [], []

    def __enter__(self) -> _capturing:
        self.frozen = [p for p in self.model.parameters() if p.requires_grad]
        for p in self.frozen:
            p.requires_grad_(False)
        for name in self.layers:
            self.handles.append(self.model.get_submodule(name).register_forward_hook(self._hook(name)))
        return self

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            if not output.requires_grad:  # the first layers: nothing before them needs a gradient
                output = output.detach().requires_grad_()
            self.captured[name] = (args[0].detach(), output.detach())
            output.register_hook(lambda grad: self.grads.__setitem__(name, grad.detach()))
            return output
        return hook

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()
        for p in self.frozen:
            p.requires_grad_(True)


class _swapped:
    """``layers`` replaced by their quantized twins for the duration, then put back."""

    def __init__(self, model: nn.Module, twins: dict[str, nn.Module]):
        self.model, self.twins, self.originals = model, twins, {}

    def __enter__(self) -> _swapped:
        for name, twin in self.twins.items():
            self.originals[name] = self.model.get_submodule(name)
            set_submodule(self.model, name, twin)
        return self

    def __exit__(self, *exc: object) -> None:
        for name, original in self.originals.items():
            set_submodule(self.model, name, original)
