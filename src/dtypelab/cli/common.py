"""What every command shares: the one exception -> message table, options, device and rendering.

CLI layer: imports only the public names of the library (``dtypelab`` and its subpackages' ``__all__``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import click
from click.core import ParameterSource

from .. import models, variants
from ..errors import DtypelabError, InputError, SideOutputError, VariantFailed
from ..formats import NumberFormat
from ..lazy import lazy_module
from ..report import (
    ALL_COLUMNS,
    PLOT_SUFFIXES,
    TEXT_WIDTH,
    Table,
    TableMixin,
    is_all_columns,
    run_facts,
    tables_text,
    write_html,
)
from .progress import clear_status_line

torch = lazy_module("torch")  # imported when a command runs, not for its --help

# One table: exception family -> how it is reported. Anything else is a bug and keeps its traceback.
ERROR_MESSAGES: dict[type[BaseException], Callable[[BaseException], tuple[str, int]]] = {
    DtypelabError: lambda e: (f"error: {e}", getattr(e, "exit_code", 2)),
    FileNotFoundError: lambda e: (f"error: no such file: {e.filename}", 2),
    PermissionError: lambda e: (f"error: permission denied: {e.filename}", 2),
}

MODEL_HELP = ("MODEL: a built-in (" + ", ".join(models.builtin_names()) + "), a Hugging Face model folder, "
              "or package.module:factory.")


SideOutput = tuple[str, "str | os.PathLike", Callable[[], object]]
"""A side output: (option, path, the call that writes it)."""


def emit(result: TableMixin | TableGroup, as_json: bool, side_outputs: Sequence[SideOutput] = (), *,
         show: bool = True, columns: Sequence[str] | None = None) -> None:
    """Print ``result`` (unless ``show`` is False: ``--quiet``) with the chosen ``columns`` (None: each
    table's compact default, see :func:`parse_columns`), then write each side output; the result is never
    lost to a side output that fails, nor to a mistyped column (the default columns are printed first).

    Raises:
        InputError: a ``--columns`` name is no column of the result (exit 2, after the result).
        SideOutputError: a side output could not be written (exit 5; each one named).
        VariantFailed: some of the result's variants failed, each a row with its reason (exit 4).
    """
    clear_status_line()
    column_problem = None
    if show:
        try:
            text = result.to_json() if as_json else render_text(result, columns)
        except InputError as exc:  # an unknown column: the defaults shown, then the one line
            column_problem = InputError(f"--columns: {exc}")
            text = render_text(result, None)
        click.echo(text, color=colour_wanted() or None)
    problems = []
    for option, path, write in side_outputs:
        try:
            with side_output(option, path):
                write()
        except SideOutputError as exc:
            problems.append(str(exc))
    failed = failed_variants(result)
    failures = [f"{len(failed)} of {len(result.variants)} variant(s) failed: {', '.join(failed)} (each row "
                "says why)"] if failed else []
    if column_problem is not None:
        raise column_problem
    if problems:
        raise SideOutputError("; ".join(problems + failures))
    if failures:
        raise VariantFailed(failures[0])


# --- Terminal tables: chosen columns, a width to fit, colour only on a terminal ---------------------------

TABLE_STYLES: dict[str, dict[str, object]] = {
    "header": {"bold": True},
    "failed": {"fg": "red"},
    "warning": {"fg": "yellow"},
}
"""How each role of a table cell looks on a terminal (:data:`dtypelab.report.Styler` roles)."""


class TableGroup:
    """Several results printed as one (``headroom --weights``): their tables in order, so ``--columns``
    is checked against all of them at once (text only: their JSON is one composite document)."""

    def __init__(self, parts: Sequence[TableMixin]) -> None:
        self.parts = list(parts)

    def to_tables(self) -> list[Table]:
        return [table for part in self.parts for table in part.to_tables()]

    def to_text(self, columns: Sequence[str] | None = ALL_COLUMNS, **style) -> str:
        return tables_text(self.to_tables(), columns, **style)


def columns_option(f: Callable) -> Callable:
    return click.option("--columns", "columns", metavar="NAME,…|all", callback=_parse_columns_option,
                        help="Table columns to show, by header name (comma-separated; the first column "
                             "always), or all [default: a compact set for a 100-column terminal; a note "
                             "names the rest, and --json holds every field].")(f)


def _parse_columns_option(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple | None:
    return parse_columns(value)


def parse_columns(text: str | None) -> tuple[str, ...] | None:
    """``--columns a,b`` -> ``("a", "b")``; ``all`` -> :data:`ALL_COLUMNS`; None: the defaults.

    Raises:
        InputError: an empty name, or ``all`` beside other names.
    """
    if text is None:
        return None
    names = tuple(name.strip() for name in text.split(","))
    if any(not name for name in names):
        raise InputError(f"--columns {text!r}: an empty column name: write names between commas, e.g. "
                         "--columns variant,sqnr_db")
    if "all" in (n.lower() for n in names) and len(names) > 1:
        raise InputError(f"--columns {text!r}: all already shows every column: give all alone or only names")
    return ALL_COLUMNS if len(names) == 1 and names[0].lower() == "all" else names


def refuse_columns_with_json(columns: Sequence[str] | None, as_json: bool) -> None:
    """``--columns`` chooses what a terminal table shows; JSON holds every field, so both is a mistake."""
    if columns is not None and as_json:
        raise InputError("--columns chooses table columns and --json holds every field: drop one of them")


def render_text(result: TableMixin, columns: Sequence[str] | None) -> str:
    """The result's tables with ``columns``, fitted to the terminal (or :data:`TEXT_WIDTH` characters
    when stdout is no terminal; ``--columns all`` is every column as wide as it is), coloured only when
    :func:`colour_wanted`."""
    width = shutil.get_terminal_size((TEXT_WIDTH, 24)).columns if stdout_is_terminal() else TEXT_WIDTH
    if is_all_columns(columns):
        width = None
    style = _style if colour_wanted() else None
    return result.to_text(columns, width=width, style=style)


def stdout_is_terminal() -> bool:
    return sys.stdout.isatty()


def colour_wanted() -> bool:
    """Colour only on a terminal, and never when ``NO_COLOR`` is set to anything (no-color.org)."""
    return stdout_is_terminal() and not os.environ.get("NO_COLOR")


def _style(text: str, role: str) -> str:
    return click.style(text, **TABLE_STYLES[role])


def failed_variants(result: object) -> list[str]:
    """The names of a result's variants that failed (their ``failure`` is set); [] for other results."""
    return [v.name for v in getattr(result, "variants", []) if getattr(v, "failure", None)]


# --- Outputs: checked before any work, named when interrupted, never lost ------------------------------

_OUTPUTS: dict[str, bool] = {}
"""This run's outputs (as the user wrote them) -> whether each is written: what the one line after an
interruption names."""


def reset_outputs() -> None:
    _OUTPUTS.clear()


def will_write(path: str | os.PathLike) -> None:
    _OUTPUTS[str(path)] = False


def wrote(path: str | os.PathLike) -> None:
    _OUTPUTS[str(path)] = True


def interrupted_message() -> str:
    """``interrupted: nothing written to DST``, what was written before the interruption came, or just
    ``interrupted`` for a command that writes nothing."""
    pending = [p for p, done in _OUTPUTS.items() if not done]
    done = [p for p, done in _OUTPUTS.items() if done]
    words = [f"{', '.join(done)} written"] if done else []
    words += [f"nothing written to {', '.join(pending)}"] if pending else []
    return "interrupted" + (": " + "; ".join(words) if words else "")


def check_output(path: str | os.PathLike, option: str, *, suffixes: Sequence[str] = (),
                 sources: Sequence[str] = (), make_parents: bool = False) -> Path:
    """Refuse (exit 2, before any model loads) an output that could only fail after the work is done.

    Args:
        path: the file or folder to write.
        option: how the user named it (``--plot``), for the message.
        suffixes: the extensions accepted (lower case, with the dot); empty: any.
        sources: local paths the run reads; an output inside one (or one of them) is refused, so a source
            is never modified.
        make_parents: the writer creates missing parent folders (``convert -o``): then the nearest
            existing ancestor must be a writable folder; otherwise the parent itself must be one.

    Returns:
        ``path`` as a :class:`Path`; it is registered as an output of this run.
    """
    target = Path(path).expanduser()
    if suffixes and target.suffix.lower() not in suffixes:
        raise InputError(f"{option} {path}: cannot write a {target.suffix or 'suffix-less'} file: use a name "
                         f"ending in {' or '.join(suffixes)}")
    folder = target.parent
    while make_parents and not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise InputError(f"{option} {path}: no folder {folder} to write it in: create it or choose another "
                         "path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"{option} {path}: folder {folder} is not writable (read-only or not yours): "
                         "choose another path")
    if target.is_dir() and not make_parents:
        raise InputError(f"{option} {path}: is a folder: give a file name")
    for source in sources:
        _refuse_inside(target, Path(source).expanduser(), option, path)
    will_write(path)
    return target


def _refuse_inside(target: Path, source: Path, option: str, path: str | os.PathLike) -> None:
    if not source.exists():
        return
    resolved, root = target.resolve(), source.resolve()
    if resolved == root or (root.is_dir() and root in resolved.parents):
        raise InputError(f"{option} {path}: is inside the source {source}, which is never modified: choose "
                         "a path outside it")


def check_plot(path: str | None, sources: Sequence[str] = ()) -> Path | None:
    """``--plot``: a .png / .svg in a writable folder, and matplotlib there to draw it, checked up front."""
    if path is None:
        return None
    target = check_output(path, "--plot", suffixes=PLOT_SUFFIXES, sources=sources)
    if importlib.util.find_spec("matplotlib") is None:
        raise InputError("--plot needs matplotlib, which is not installed: pip install 'dtypelab[plot]'")
    return target


@contextmanager
def side_output(option: str, path: str | os.PathLike) -> Iterator[None]:
    """Write a side output after the main result: a failure becomes :class:`SideOutputError` (exit 5)
    naming it, never a traceback that hides a finished result."""
    try:
        yield
    except (OSError, DtypelabError) as exc:
        reason = exc.strerror or str(exc) if isinstance(exc, OSError) else str(exc)
        raise SideOutputError(f"the result is complete, but {option} {path} could not be written: "
                              f"{reason}") from exc
    wrote(path)


def set_options(*names: str) -> dict[str, bool]:
    """For each parameter name of the running command, whether the user gave it (not its default)."""
    ctx = click.get_current_context()
    return {name: ctx.get_parameter_source(name) not in (None, ParameterSource.DEFAULT) for name in names}


def refuse_without(mode_on: bool, mode: str, options: dict[str, str]) -> None:
    """Refuse options that act only in ``mode`` (``--layers``) when it is off, rather than ignore them.

    Args:
        options: each such parameter's name -> its flag (``{"threshold_db": "--threshold"}``).
    """
    given = set_options(*options)
    used = [flag for name, flag in options.items() if given[name]]
    if used and not mode_on:
        plural = len(used) > 1
        raise InputError(f"{' and '.join(used)} need{'' if plural else 's'} {mode}: add {mode} or drop "
                         f"{'them' if plural else 'it'}")


def json_option(f: Callable) -> Callable:
    return click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON output.")(f)


def device_option(f: Callable) -> Callable:
    return click.option("--device", default="cpu", show_default=True,
                        help="Where to run: cpu, cuda, cuda:1, mps …")(f)


def keep_option(f: Callable) -> Callable:
    return click.option("--keep", multiple=True, metavar="TYPE|GLOB",
                        help="Keep matching modules in float32: a class name (LayerNorm) or a name glob "
                             "(head, *.norm). Repeatable.")(f)


def select_options(f: Callable) -> Callable:
    f = click.option("--select", multiple=True, metavar="GLOB",
                     help="Only modules whose qualified name matches (layers.*.mlp). Repeatable.")(f)
    return click.option("--depth", type=int, help="Only modules at most N name components deep.")(f)


def pickle_option(f: Callable) -> Callable:
    return click.option("--allow-pickle", is_flag=True,
                        help="Accept .bin/.pt pickle weights (read with torch.load(weights_only=True)).")(f)


def input_options(f: Callable) -> Callable:
    """--text / --text-file / --input / --input-file / --text-set: one source; none = the model's default
    input. --ctx / --stride / --windows shape a text set's windows (default None: 512 / ctx / all,
    refused without one)."""
    for option in reversed([
        click.option("--text", "texts", multiple=True, help="A text to tokenise (repeatable: one batch)."),
        click.option("--text-file", type=click.Path(), help="Texts to tokenise, one per line."),
        click.option("--input", "input_ids", help="Token ids as JSON, e.g. '[[1, 0, 1]]'."),
        click.option("--input-file", type=click.Path(), help="Input tensors from .safetensors or .npy."),
        click.option("--text-set", type=click.Choice(list(models.TEXT_SETS)),
                     help="Real English prose (Python's pydoc_data documentation, PSF licence), cut into "
                          "--ctx token windows: the held-out evaluation part or the calibration part."),
        click.option("--ctx", type=int,
                     help=f"With --text-set: tokens per window [default: {models.DEFAULT_CTX}]."),
        click.option("--stride", type=int,
                     help="With --text-set: tokens between window starts [default: --ctx, no overlap]."),
        click.option("--windows", type=int,
                     help="With --text-set: measure only the first N windows (quicker, noisier) "
                          "[default: all]."),
    ]):
        f = option(f)
    return f


def executor_options(tasks: str) -> Callable[[Callable], Callable]:
    """``--workers N`` / ``--ray ADDRESS``: run ``tasks`` (words: "the output shards") on local worker
    processes or on Ray (:mod:`dtypelab.executor`, :func:`~dtypelab.executor.executor_for`)."""
    def decorate(f: Callable) -> Callable:
        f = click.option("--ray", "ray_address", metavar="auto|ADDRESS|local",
                         help=f"Run {tasks} on Ray, an actor per worker: auto joins the cluster `ray start "
                              "--head` began, local starts one of --workers CPUs on 127.0.0.1 only. Needs "
                              "pip install 'dtypelab[ray]'.")(f)
        f = click.option("--worker-threads", type=int, default=1, show_default=True,
                         help="With --workers / --ray: torch threads per worker (a Ray actor asks for as "
                              "many CPUs); results equal 1 thread's up to float32 summation order.")(f)
        return click.option("--workers", type=int,
                            help=f"Run {tasks} in N local worker processes (1 thread each, or "
                                 "--worker-threads); with --ray, N actors.")(f)
    return decorate


def resolve_device(name: str) -> torch.device:
    """The ``--device`` asked for, once an empty tensor has been put there (no CUDA, no MPS in this
    build, ``cuda:99``: one line before any model loads)."""
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise InputError(f"unknown device {name!r}: use cpu, cuda or cuda:N") from exc
    with models.device_errors(device, "anything"):
        torch.empty(0, device=device)
    return device


def calibration_options(f: Callable) -> Callable:
    """--calib-file / --calib-tokens: what ``:gptq`` / ``:awq`` formats calibrate on (refused without one)."""
    f = click.option("--calib-tokens", type=int,
                     help=":gptq / :awq formats: calibrate on at most this many tokens "
                          f"[default: {variants.DEFAULT_CALIB_TOKENS}].")(f)
    return click.option("--calib-file", type=click.Path(dir_okay=False),
                        help=":gptq / :awq formats: calibrate on this UTF-8 text (or .safetensors / .npy "
                             "input tensors) instead of the bundled calibration text (never the evaluation "
                             "text).")(f)


def model_inputs_on(loaded: models.LoadedModel, target: torch.device, *, texts: Sequence[str] = (),
                    text_file: str | None = None, input_ids: str | None = None, input_file: str | None = None,
                    text_set: str | None = None, ctx: int | None = None, stride: int | None = None,
                    windows: int | None = None):
    """The inputs the input options ask for (``--text``, ``--text-file``, ``--input-ids``, ``--input-file``,
    ``--text-set`` with ``--ctx`` / ``--stride`` / ``--windows``), on ``target``: one definition for
    compare (and its workers), headroom, sensitivity and plan."""
    inputs = models.model_inputs(loaded, texts=texts, text_file=text_file, input_ids=input_ids,
                                 tensor_file=input_file, text_set=text_set, ctx=ctx, stride=stride,
                                 windows=windows)
    return models.to_device(inputs, target)


def calibration_for(loaded: models.LoadedModel, formats: Sequence[NumberFormat | None],
                    calib_file: str | None, calib_tokens: int | None) -> variants.CalibrationData | None:
    """The calibration batches when some format is ``:gptq`` / ``:awq``; the options refused otherwise."""
    if not any(fmt is not None and fmt.calibration for fmt in formats):
        if calib_file is not None or calib_tokens is not None:
            raise InputError("--calib-file and --calib-tokens calibrate :gptq / :awq formats, and none is "
                             "asked for: add one (e.g. int4:g64:gptq) or drop them")
        return None
    tokens = variants.DEFAULT_CALIB_TOKENS if calib_tokens is None else calib_tokens
    return variants.calibration_data(loaded, calib_file, tokens)


# --- HTML reports: one self-contained file per result (dtypelab.report.html) ---------------------------

HTML_SUFFIXES = (".html", ".htm")


def html_option(f: Callable) -> Callable:
    return click.option("--html", "html_path", type=click.Path(dir_okay=False), metavar="FILE.html",
                        help="Also write the result as one self-contained HTML report: charts and sortable "
                             "tables, no network, readable without JavaScript.")(f)


def result_options(f: Callable) -> Callable:
    """``--json``, ``--columns`` and ``--html``: the ways a command that prints a result can render it."""
    return json_option(columns_option(html_option(f)))


def check_result_options(as_json: bool, columns: Sequence[str] | None, html_path: str | None,
                         sources: Sequence[str] = ()) -> None:
    """Refuse a bad combination or output of :func:`result_options` before any work (see
    :func:`refuse_columns_with_json`, :func:`check_html`)."""
    refuse_columns_with_json(columns, as_json)
    check_html(html_path, sources=sources)


def check_html(path: str | None, sources: Sequence[str] = (), option: str = "--html") -> Path | None:
    """``--html``: an .html file in a writable folder, outside the sources, checked before any work."""
    return None if path is None else check_output(path, option, suffixes=HTML_SUFFIXES, sources=sources)


def html_side_output(result: TableMixin, path: str | os.PathLike | None, **facts: str) -> list[SideOutput]:
    """The ``--html`` side output of ``result`` (none without a path): its JSON document rendered, with
    the run's facts (the command and the options given, versions, machine, date)."""
    if path is None:
        return []
    def write() -> None:
        write_html(path, json.loads(result.to_json()), run_facts(command_line(), **facts))
    return [("--html", path, write)]


def command_line() -> list[str]:
    """The running command as the user gave it, in words: ``dtypelab compare MODEL --to …`` (from the
    parsed parameters the user set, defaults left out)."""
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return []
    words = ctx.command_path.split()
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        given = ctx.get_parameter_source(param.name) not in (None, ParameterSource.DEFAULT)
        if not given or value in (None, (), False):
            continue
        values = [str(v) for v in value] if isinstance(value, tuple | list) else [str(value)]
        if isinstance(param, click.Argument):
            words += values
            continue
        option = max(param.opts, key=len)
        words += [option] if value is True else [w for v in values for w in (option, v)]
    return words
