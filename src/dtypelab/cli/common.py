"""What every command shares: the one exception -> message table, options, device and rendering.

CLI layer: imports only the public names of the library (``dtypelab`` and its subpackages' ``__all__``).
"""

from __future__ import annotations

from collections.abc import Callable

import click
import torch

from ..errors import DtypelabError, InputError
from ..models import DEFAULT_CTX, TEXT_SETS, builtin_names, device_errors
from ..report import TableMixin

# One table: exception family -> how it is reported. Anything else is a bug and keeps its traceback.
ERROR_MESSAGES: dict[type[BaseException], Callable[[BaseException], tuple[str, int]]] = {
    DtypelabError: lambda e: (f"error: {e}", getattr(e, "exit_code", 2)),
    FileNotFoundError: lambda e: (f"error: no such file: {e.filename}", 2),
    PermissionError: lambda e: (f"error: permission denied: {e.filename}", 2),
    KeyboardInterrupt: lambda e: ("interrupted", 130),
}

MODEL_HELP = ("MODEL: a built-in (" + ", ".join(builtin_names()) + "), a Hugging Face model folder, "
              "or package.module:factory.")


def emit(result: TableMixin, as_json: bool) -> None:
    click.echo(result.to_json() if as_json else result.to_text())


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
        click.option("--text-set", type=click.Choice(list(TEXT_SETS)),
                     help="Real English prose (Python's pydoc_data documentation, PSF licence), cut into "
                          "--ctx token windows: the held-out evaluation part or the calibration part."),
        click.option("--ctx", type=int, help=f"With --text-set: tokens per window [default: {DEFAULT_CTX}]."),
        click.option("--stride", type=int,
                     help="With --text-set: tokens between window starts [default: --ctx, no overlap]."),
        click.option("--windows", type=int,
                     help="With --text-set: measure only the first N windows (quicker, noisier) "
                          "[default: all]."),
    ]):
        f = option(f)
    return f


def resolve_device(name: str) -> torch.device:
    """The ``--device`` asked for, once an empty tensor has been put there (no CUDA, no MPS in this
    build, ``cuda:99``: one line before any model loads)."""
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise InputError(f"unknown device {name!r}: use cpu, cuda or cuda:N") from exc
    with device_errors(device, "anything"):
        torch.empty(0, device=device)
    return device
