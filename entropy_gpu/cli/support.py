"""What every ``entropy-gpu`` command shares: offline mode, user errors, the options and
parser every subcommand has, and argument checks that run before any model load or analysis.
Each folder's ``cli.py`` builds its subcommands from these.

A user error (a bad flag value, a missing model, an unwritable folder) is raised as
``UsageError`` and printed by ``entropy_gpu.cli.main`` as one line on stderr with exit
code 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ALLOW_DOWNLOAD_ENV = "ENTROPY_GPU_ALLOW_DOWNLOAD"
# Set unless the user opts in to downloads: huggingface_hub, transformers and datasets
# then read only local files, and no telemetry request is sent (TRL reports usage
# through huggingface_hub's telemetry thread).
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "HF_HUB_DISABLE_TELEMETRY": "1"}


class UsageError(Exception):
    """A user error: printed as one line (no traceback), exit code 2."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in the help; string defaults quoted, so ``'\\n'`` and ``' '`` show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or "(default:" in text or any(action.default is x
                                                              for x in (None, False, argparse.SUPPRESS)):
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return text + (" (default: %(default)r)" if isinstance(action.default, str)
                           else " (default: %(default)s)")
        return text


class Parser(argparse.ArgumentParser):
    """argparse with defaults in the help and one-line errors (no usage block)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def text_with_escapes(value: str) -> str:
    """argparse ``type`` of text flags: ``\\n``, ``\\t``, ``\\r`` and ``\\\\`` typed on the command
    line become a newline, a tab, a carriage return and one backslash (as the help shows the
    defaults); any other backslash is kept as typed."""
    import re

    return re.sub(r"\\([ntr\\])", lambda m: _ESCAPES[m.group(1)], value)


def downloads_allowed(flag: bool = False) -> bool:
    """True when the user opted in: ``--allow-download`` or ``ENTROPY_GPU_ALLOW_DOWNLOAD=1``."""
    return flag or os.environ.get(ALLOW_DOWNLOAD_ENV, "").strip().lower() in ("1", "true", "yes")


def go_offline() -> None:
    """Keep this process off the model hub: set the offline variables (unless the user
    set them), and switch already-imported hub libraries to offline too."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    hub = sys.modules.get("huggingface_hub.constants")
    if hub is not None:  # imported before us: its constants were read at import time
        hub.HF_HUB_OFFLINE = True
        hub.HF_HUB_DISABLE_TELEMETRY = True


# --------------------------------------------------------------------------- checks


def positive_int(flag: str, value: int | None, *, minimum: int = 1) -> None:
    if value is not None and value < minimum:
        raise UsageError(f"{flag} must be >= {minimum}, got {value}")


def positive_float(flag: str, value: float | None) -> None:
    import math

    if value is not None and not (math.isfinite(value) and value > 0):
        raise UsageError(f"{flag} must be a finite number > 0, got {value}")


def check_device(name: str, flag: str = "--device"):
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``, present on this machine -> torch.device."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"{flag} {name}: not a device name; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"{flag} {name}: CUDA is not available on this machine (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"{flag} {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise UsageError(f"{flag} {name}: only cpu and cuda devices are supported")
    return device


def writable_dir(path: str | Path, flag: str) -> Path:
    """Create ``path`` (and parents) and check that a file can be written in it."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except FileExistsError:
        raise UsageError(f"{flag} {path}: exists and is not a folder") from None
    except OSError as exc:
        raise UsageError(f"{flag} {path}: cannot write there ({exc.strerror or exc})") from None
    return folder


def writable_file(path: str | Path, flag: str) -> Path:
    """Check that ``path`` can be written (its folder is created) without writing it."""
    target = Path(path)
    if target.is_dir():
        raise UsageError(f"{flag} {path}: is a folder, expected a file name")
    writable_dir(target.parent if str(target.parent) else ".", flag)
    return target


def check_model(name: str, allow_download: bool, flag: str = "--model") -> None:
    """Fail at once unless ``name`` is the bundled model, an existing path, a model in
    the local Hugging Face cache, or a hub name with downloads allowed."""
    from ..analysis.models import resolve_model

    try:
        resolve_model(name, allow_download=allow_download)
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as exc:
        raise UsageError(f"{flag} {name}: {exc}") from None


# --------------------------------------------------------------------------- options


def common_options(has_model: bool = True) -> argparse.ArgumentParser:
    """Options every subcommand takes (``parents=`` of each subparser); ``has_model``: the
    command takes ``--model``."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the traceback of an error")
    common.add_argument("--allow-download", action="store_true",
                        help=(f"let --model name a model on the Hugging Face hub and download it "
                              f"(also: {ALLOW_DOWNLOAD_ENV}=1); without it nothing contacts a hub"
                              if has_model else
                              f"allow Hugging Face hub access (also: {ALLOW_DOWNLOAD_ENV}=1); this command "
                              f"uses only local files, and without it nothing contacts a hub"))
    return common


def add_threads_option(parser) -> None:
    """``--threads`` of every command that computes (``cpu_threads.use_cpu_threads`` applies it)."""
    parser.add_argument("--threads", type=int,
                        help="torch CPU threads (default: the cores left idle by the current load, at "
                             "least 1; on an oversubscribed machine OpenMP threads wait on each other)")


__all__ = ["ALLOW_DOWNLOAD_ENV", "OFFLINE_ENV", "Parser", "UsageError", "add_threads_option",
           "check_device", "check_model", "common_options", "downloads_allowed", "go_offline",
           "positive_float", "positive_int", "text_with_escapes", "writable_dir", "writable_file"]
