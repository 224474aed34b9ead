"""A mixed-precision plan under a byte budget: the format per layer group with the least predicted damage.

Analysis stage: reads a :class:`~dtypelab.analysis.sensitivity_sweep.SensitivityResult` (bytes and damage of
every group in every format) and writes a :class:`~dtypelab.quant.MixedPlan`. The choice is a
multiple-choice knapsack: one choice per group, Σ bytes ≤ budget, minimise Σ damage (the damage is
additive to second order, which ``plan --verify`` checks against a measurement). It is solved exactly
by dynamic programming over the Pareto frontier of (bytes, damage) — Nemhauser–Ullmann: after each
group only partial plans that no other partial plan beats in both bytes and damage are kept, and those
that cannot fit whatever the remaining groups choose are dropped. Every byte is counted as ``convert``
writes it (elements, scales, zero points), so the budget is met to the byte, never approximately.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from torch import nn

from ..checkpoint import convert_support
from ..errors import InputError
from ..executor import Executor
from ..formats import get_format
from ..models import ModelKind
from ..naming import any_matches
from ..quant import DENSE, LayerChoice, MixedPlan
from ..report import ParetoPoint, Table, TableMixin, format_cell
from ..variants import CalibrationData, plan_variant
from .compare import CompareSetup, VariantResult, VariantTask, compare_models, compare_on
from .sensitivity_sweep import LayerGroup, SensitivityResult

BUDGET_UNITS = {"bpw": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20,
                "gib": 2**30, "x": 1}
"""Budget suffixes: bits per weight, bytes (decimal and binary), or a fraction of the float32 checkpoint."""


@dataclass(frozen=True)
class Budget:
    """What the user asked the plan to fit: ``kind`` ``bpw`` (average stored bits per weight over the
    planned layers), ``bytes`` (the whole checkpoint) or ``ratio`` (of the reference checkpoint)."""

    text: str
    kind: str
    value: float

    def planned_limit(self, planned_numel: int, fixed_bytes: int, reference_bytes: int) -> int:
        """Bytes the planned groups' weights may take (whole bytes, rounded down)."""
        if self.kind == "bpw":
            return math.floor(self.value * planned_numel / 8)
        whole = self.value * reference_bytes if self.kind == "ratio" else self.value
        return math.floor(whole) - fixed_bytes

    def describe(self, planned_bytes: int, planned_numel: int, fixed_bytes: int, reference_bytes: int) -> str:
        """``planned_bytes`` in this budget's units (for the feasible range of an error)."""
        if self.kind == "bpw":
            return f"{8 * planned_bytes / planned_numel:.4g}bpw"
        if self.kind == "ratio":
            return f"{(planned_bytes + fixed_bytes) / reference_bytes:.4g}x"
        return f"{planned_bytes + fixed_bytes:,} bytes"


def parse_budget(text: str) -> Budget:
    """``"4.5bpw"``, ``"80MB"`` (10^6 bytes), ``"80MiB"``, ``"0.3x"`` or a byte count."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).lower() if match else ""
    if not match or unit not in {*BUDGET_UNITS, ""} or float(match.group(1)) <= 0:
        raise InputError(f"cannot read budget {text!r}: write bits per weight (4.5bpw), checkpoint bytes "
                         "(80MB, 80MiB) or a fraction of the float32 checkpoint (0.3x)")
    value = float(match.group(1))
    if unit == "bpw":
        return Budget(text.strip(), "bpw", value)
    if unit == "x":
        return Budget(text.strip(), "ratio", value)
    return Budget(text.strip(), "bytes", value * BUDGET_UNITS.get(unit or "b", 1))


def parse_budgets(text: str) -> list[Budget]:
    """One budget, or a sweep ``START:STOP:STEP<unit>`` (``4.25:8:0.25bpw``, STOP included)."""
    if text.count(":") != 2:
        return [parse_budget(text)]
    start, stop, last = text.split(":")
    step = parse_budget(last)
    unit = re.sub(r"^[\d.\s]+", "", last)
    first, end = parse_budget(start + unit).value, parse_budget(stop + unit).value
    count = math.floor((end - first) / step.value + 1e-9) + 1 if end >= first else 0
    if count < 1 or count > 1000:
        raise InputError(f"budget sweep {text!r} gives {count} budgets: write START:STOP:STEP with STOP ≥ "
                         "START and at most 1000 steps, e.g. 4.25:8:0.25bpw")
    return [parse_budget(f"{first + i * step.value:.10g}{unit}") for i in range(count)]


@dataclass(frozen=True)
class Choice:
    """One option of a group: a format spec (or :data:`~dtypelab.quant.DENSE`), its bytes, its damage."""

    fmt: str
    stored_bytes: int
    damage: float


def solve(options: Sequence[Sequence[Choice]], limit_bytes: int) -> list[int]:
    """The index of one choice per group minimising Σ damage with Σ bytes ≤ ``limit_bytes`` (ties: the
    fewer bytes, then the earlier choices). Exact: a dynamic programme over the Pareto frontier.

    Raises:
        InputError: no combination fits (the caller reports the feasible range).
    """
    rest = np.cumsum([min(c.stored_bytes for c in group) for group in options][::-1])[::-1].tolist() + [0]
    if rest[0] > limit_bytes:
        raise InputError(f"no plan fits {limit_bytes} bytes: the smallest takes {rest[0]}")
    frontier_bytes, frontier_damage = np.zeros(1, dtype=np.int64), np.zeros(1)
    parents, picks = [], []
    for index, group in enumerate(options):
        nbytes = np.array([c.stored_bytes for c in group], dtype=np.int64)
        damage = np.array([c.damage for c in group], dtype=np.float64)
        cand_bytes = (frontier_bytes[:, None] + nbytes[None, :]).ravel()
        cand_damage = (frontier_damage[:, None] + damage[None, :]).ravel()
        fits = np.nonzero(cand_bytes + rest[index + 1] <= limit_bytes)[0]
        order = fits[np.lexsort((fits, cand_damage[fits], cand_bytes[fits]))]  # bytes, damage, index
        kept = order[_pareto(cand_damage[order])]
        frontier_bytes, frontier_damage = cand_bytes[kept], cand_damage[kept]
        parents.append(kept // len(group))
        picks.append(kept % len(group))
    best = int(np.argmin(frontier_damage))  # the first minimum: the fewest bytes among equal damage
    chosen = []
    for parent, pick in zip(reversed(parents), reversed(picks), strict=True):
        chosen.append(int(pick[best]))
        best = int(parent[best])
    return chosen[::-1]


def _pareto(damage_by_bytes: np.ndarray) -> np.ndarray:
    """Positions (in an array sorted by bytes) whose damage is strictly below every earlier one's."""
    if not len(damage_by_bytes):
        return np.zeros(0, dtype=np.int64)
    running = np.minimum.accumulate(damage_by_bytes)
    better = np.empty(len(damage_by_bytes), dtype=bool)
    better[0] = True
    better[1:] = damage_by_bytes[1:] < running[:-1]
    return np.nonzero(better)[0]


@dataclass
class PlanRow:
    """One group's decision: its format, bytes, predicted damage and the rule that limited it."""

    group: str
    layers: tuple[str, ...]
    fmt: str
    stored_bytes: int
    predicted_damage: float
    constraint: str = ""


@dataclass
class PlanResult(TableMixin):
    """The plan, what it fits, and how sure the prediction is once measured.

    ``planned_bytes``: the planned groups' weights; ``checkpoint_bytes``: the whole checkpoint (planned
    bytes plus ``fixed_bytes``: embeddings, norms, biases, the head), what ``convert --plan`` writes in
    tensor data; ``bits_per_weight``: 8 × planned bytes / planned weights. ``feasible``: the smallest
    and largest planned bytes any plan under these constraints could take.
    """

    plan: MixedPlan
    budget: Budget
    rows: list[PlanRow]
    limit_bytes: int
    planned_bytes: int
    planned_numel: int
    fixed_bytes: int
    reference_bytes: int
    metric: str
    feasible: tuple[int, int]
    measured: dict = field(default_factory=dict)

    @property
    def checkpoint_bytes(self) -> int:
        return self.planned_bytes + self.fixed_bytes

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.planned_bytes / self.planned_numel if self.planned_numel else math.nan

    @property
    def predicted_damage(self) -> float:
        return sum(r.predicted_damage for r in self.rows)

    def to_table(self) -> Table:
        rows = [[r.group, len(r.layers), r.fmt, r.stored_bytes, r.predicted_damage, r.constraint]
                for r in self.rows]
        counts: dict[str, int] = {}
        for r in self.rows:
            counts[r.fmt] = counts.get(r.fmt, 0) + 1
        notes = [f"budget {self.budget.text}: {self.limit_bytes:,} bytes for the planned layers' weights; "
                 f"planned {self.planned_bytes:,} bytes = {self.bits_per_weight:.4f} bits per weight over "
                 f"{self.planned_numel:,} weights",
                 f"checkpoint: {self.checkpoint_bytes:,} bytes of tensors ({self.fixed_bytes:,} dense "
                 f"outside the plan), x{self.checkpoint_bytes / self.reference_bytes:.4f} of float32",
                 f"predicted damage ({self.metric}): {format_cell(self.predicted_damage)}; groups per "
                 "format: " + ", ".join(f"{k} {v}" for k, v in counts.items())]
        if self.measured:
            m = self.measured
            se = f" ± {format_cell(m['stderr'])}" if m.get("stderr") is not None else ""
            notes.append(f"measured on {m['text']}: {format_cell(m['damage'])}{se} ({m['what']}); predicted "
                         f"{format_cell(self.predicted_damage)} on the calibration text")
        columns = ["group", "layers", "format", "bytes", "predicted", "constraint"]
        return Table("Mixed-precision plan", columns, rows, notes)


def plan_model(result: SensitivityResult, budget: str | Budget, *, keep: Sequence[str] = (),
               min_formats: Mapping[str, str] | None = None, edges: tuple[int, str] | None = None,
               model: str = "", model_hash: str = "", reference_bytes: int | None = None) -> PlanResult:
    """Choose a format (or dense) per group of ``result`` so the plan fits ``budget`` with the least
    predicted damage.

    Args:
        result: the sensitivity ranking (its formats are the candidates, with dense beside them).
        budget: ``"4.5bpw"``, ``"80MB"``, ``"0.3x"`` (see :func:`parse_budget`).
        keep: globs of layers (or groups) kept dense.
        min_formats: glob -> the least precise format those groups may take (``{"*down_proj": "int8"}``;
            ``"dense"`` keeps them dense); a choice is at least as precise when it stores as many bytes.
        edges: ``(n, format)``: the first and last ``n`` blocks take at least ``format``.
        model, model_hash: recorded in the plan (the fingerprint guards applying it to another model).
        reference_bytes: the float32 checkpoint's bytes, for ``x`` budgets (default: dense + fixed).

    Raises:
        InputError: a candidate ``convert`` cannot write, or a budget outside the feasible range.
    """
    budget = parse_budget(budget) if isinstance(budget, str) else budget
    for fmt in result.formats:
        problem = convert_support(get_format(fmt))
        if problem:
            raise InputError(f"plan candidates must be formats convert writes; {problem}")
    options, constraints = _options(result, keep, dict(min_formats or {}), edges)
    planned_numel = sum(g.weight_numel for g in result.groups)
    reference = reference_bytes or result.fixed_bytes + sum(result.dense_bytes.values())
    limit = budget.planned_limit(planned_numel, result.fixed_bytes, reference)
    low = sum(min(c.stored_bytes for c in o) for o in options)
    high = sum(max(c.stored_bytes for c in o) for o in options)
    if not low <= limit or limit >= high + _step(budget, planned_numel):
        span = (f"{budget.describe(low, planned_numel, result.fixed_bytes, reference)} to "
                f"{budget.describe(high, planned_numel, result.fixed_bytes, reference)}")
        raise InputError(f"budget {budget.text} is outside what a plan can take here ({span}, with "
                         f"{', '.join(result.formats)} and dense): choose a budget in that range")
    picks = solve(options, limit)
    rows = [PlanRow(g.name, g.layers, o[i].fmt, o[i].stored_bytes, o[i].damage, constraints.get(g.name, ""))
            for g, o, i in zip(result.groups, options, picks, strict=True)]
    plan = MixedPlan(_layer_choices(result, rows), model, model_hash, budget.text, result.metric,
                     {"groups": {r.group: list(r.layers) for r in rows if len(r.layers) > 1}})
    return PlanResult(plan, budget, rows, limit, sum(r.stored_bytes for r in rows), planned_numel,
                      result.fixed_bytes, reference, result.metric, (low, high))


def _step(budget: Budget, planned_numel: int) -> int:
    """A budget this far above the all-dense plan still names it (rounding of bpw / x budgets)."""
    return max(1, planned_numel // 8 // 10**4) if budget.kind != "bytes" else 1


def _options(result: SensitivityResult, keep: Sequence[str], min_formats: dict[str, str],
             edges: tuple[int, str] | None) -> tuple[list[list[Choice]], dict[str, str]]:
    """Each group's allowed choices (dense first), and the rule that narrowed them, by group."""
    blocks = sorted({g.block for g in result.groups if g.block >= 0})
    edge_blocks = set(blocks[:edges[0]] + blocks[-edges[0]:]) if edges and edges[0] > 0 else set()
    options, constraints = [], {}
    for group in result.groups:
        dense = Choice(DENSE, result.dense_bytes[group.name], 0.0)
        choices = [dense] + [Choice(f, s.stored_bytes, result.damage(s)) for f in result.formats
                             if not (s := result.score(group.name, f)).problem]
        floor, rule = _floor(group, keep, min_formats, edges, edge_blocks)
        if floor is not None:
            least = _floor_bytes(result, group, floor, dense)
            choices = [c for c in choices if c.stored_bytes >= least]
            constraints[group.name] = rule
        options.append([c for c in choices if not math.isnan(c.damage)] or [dense])
    return options, constraints


def _floor(group: LayerGroup, keep: Sequence[str], min_formats: dict[str, str],
           edges: tuple[int, str] | None, edge_blocks: set[int]) -> tuple[str | None, str]:
    names = [group.name, *group.layers]
    if keep and any(any_matches(n, keep) for n in names):
        return DENSE, "kept (--keep)"
    for pattern, fmt in min_formats.items():
        if any(any_matches(n, [pattern]) for n in names):
            return fmt, f"at least {fmt} ({pattern})"
    if edges and group.block in edge_blocks:
        return edges[1], f"at least {edges[1]} (first/last {edges[0]} blocks)"
    return None, ""


def _floor_bytes(result: SensitivityResult, group: LayerGroup, floor: str, dense: Choice) -> int:
    """The bytes a choice must store to be at least as precise as ``floor`` for this group."""
    if floor == DENSE:
        return dense.stored_bytes
    fmt = get_format(floor).name
    if fmt in result.formats and not result.score(group.name, fmt).problem:
        return result.score(group.name, fmt).stored_bytes
    bits = get_format(floor).effective_bits
    return math.ceil(bits * group.weight_numel / 8) if bits < 32 else dense.stored_bytes


def _layer_choices(result: SensitivityResult, rows: list[PlanRow]) -> dict[str, LayerChoice]:
    """Per layer: the group's format, the layer's own bytes and its share of the predicted damage."""
    choices = {}
    for row in rows:
        score = result.score(row.group, row.fmt) if row.fmt != DENSE else None
        per_layer = score.layer_predicted if score is not None and score.exact is None else ()
        for i, name in enumerate(row.layers):
            nbytes = _layer_bytes(result, row, name)
            damage = per_layer[i] if per_layer else row.predicted_damage / len(row.layers)
            choices[name] = LayerChoice(row.fmt, nbytes, damage)
    return choices


def _layer_bytes(result: SensitivityResult, row: PlanRow, name: str) -> int:
    table = result.layer_bytes.get((name, row.fmt))
    if table is None:
        raise InputError(f"no byte count for {name} in {row.fmt}: rerun the sensitivity")
    return table


def measure_plan(reference: nn.Module, plan: MixedPlan, inputs, *, text: str = "the given inputs",
                 output_kind: str = "auto", model_kind: ModelKind | None = None,
                 calibration: CalibrationData | None = None) -> dict:
    """The planned model measured against the reference on ``inputs`` (the held-out text for
    ``--verify``), in the sensitivity's units: the next-token KL mean ± its standard error for causal
    LMs, mean KL for other logits, relative noise power 10^(-SQNR/10) for hidden states. Also the
    checkpoint bytes the variant holds, which must equal the plan's. ``calibration``: what a plan's
    ``:gptq`` / ``:awq`` layers calibrate on (the batches ``convert --plan`` would use)."""
    variant = plan_variant(reference, plan, calibration=calibration)
    comparison = compare_models(reference, [variant], inputs, output_kind=output_kind,
                                model_kind=model_kind)
    return _measurement(comparison.variants[0], comparison.positions, text)


def measure_plans(plans: Sequence[MixedPlan], executor: Executor, setup: CompareSetup, *,
                  text: str = "the given inputs") -> list[dict]:
    """:func:`measure_plan` for every plan (a Pareto sweep's budgets, the uniform formats), one task each
    on ``executor``: each worker loads the reference and the held-out inputs once (``setup``, whose
    ``load`` returns them with the calibration), then measures its plans. The same numbers as one
    :func:`measure_plan` after another with the worker's thread count.

    Raises:
        InputError: a plan that cannot be applied, or whose task failed twice (named, with the reason).
    """
    comparison = compare_on(executor, setup, [VariantTask(plan=plan) for plan in plans])
    return [_measurement(row, comparison.positions, text) for row in comparison.variants]


def _measurement(row: VariantResult, positions: int, text: str) -> dict:
    """A measured plan's row in the sensitivity's units (see :func:`measure_plan`)."""
    if row.failure:
        raise InputError(f"the plan cannot be applied: {row.failure}")
    if row.next_token is not None:
        damage, stderr, what = row.next_token.kl_mean, row.next_token.kl_stderr, "next-token KL mean, nats"
    elif row.metrics.kl_divergence is not None:
        damage, stderr, what = row.metrics.kl_divergence, None, "mean KL, nats"
    else:
        damage, stderr, what = 10 ** (-row.metrics.sqnr_db / 10), None, "relative noise power"
    return {"text": text, "damage": damage, "stderr": stderr, "what": what, "stored_bytes": row.stored_bytes,
            "sqnr_db": row.metrics.sqnr_db, "positions": positions}


def uniform_plans(result: SensitivityResult, model: str = "", model_hash: str = "") -> dict[str, MixedPlan]:
    """Each candidate format applied to every group that can take it (dense where it cannot), as a plan:
    the uniform points a Pareto sweep is compared with (what ``compare --to FORMAT`` measures)."""
    plans = {}
    for fmt in result.formats:
        choices = {}
        for group in result.groups:
            usable = not result.score(group.name, fmt).problem
            for name in group.layers:
                key = (name, fmt if usable else DENSE)
                choices[name] = LayerChoice(key[1], result.layer_bytes[key], 0.0)
        plans[fmt] = MixedPlan(choices, model, model_hash, f"uniform {fmt}", result.metric)
    return plans


@dataclass
class PlanSweep(TableMixin):
    """Plans for a range of budgets (bytes against predicted and, verified, measured damage), with
    the uniform formats measured beside them: (format, plan, measurement) each."""

    plans: list[PlanResult]
    uniform: list[tuple[str, MixedPlan, dict]]
    fixed_bytes: int

    def pareto_points(self) -> list[ParetoPoint]:
        """The chart's points: each plan's checkpoint bytes against its measured damage (predicted when
        not verified), the uniform formats beside them."""
        points = [ParetoPoint(p.budget.text, p.checkpoint_bytes, p.measured.get("damage", p.predicted_damage),
                              p.measured.get("stderr")) for p in self.plans]
        return points + [ParetoPoint(fmt, plan.stored_bytes + self.fixed_bytes, m["damage"], m.get("stderr"),
                                     "uniform") for fmt, plan, m in self.uniform]

    def to_table(self) -> Table:
        measured = any(p.measured for p in self.plans)
        columns = ["plan", "bits/weight", "checkpoint bytes", "predicted"] + (["measured", "± se"] if measured
                                                                              else [])
        rows = []
        for p in self.plans:
            row = [f"budget {p.budget.text}", p.bits_per_weight, p.checkpoint_bytes, p.predicted_damage]
            rows.append(row + ([p.measured.get("damage"), p.measured.get("stderr")] if measured else []))
        for fmt, plan, m in self.uniform:
            numel = sum(r.planned_numel for r in self.plans[:1])
            bits = 8 * plan.stored_bytes / numel if numel else math.nan
            rows.append([f"uniform {fmt}", bits, plan.stored_bytes + self.fixed_bytes, None, m.get("damage"),
                         m.get("stderr")])
        first = self.plans[0]
        notes = [f"damage: {first.metric}; predicted on the calibration text"
                 + (f", measured on {first.measured['text']} ({first.measured['what']})" if measured else "")]
        return Table("Plans across budgets (Pareto sweep)", columns, rows, notes)
