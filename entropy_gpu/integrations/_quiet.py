"""Known noise of the trainer libraries, filtered where we import them (issue 20, item 6).

Each filter names one message, its category and the module that raises it, so any other
warning of these libraries still shows. What they say does not apply to a reader of our
output: optional accelerator libraries (Transformer Engine, Apex, torchtitan, ...) that
a CPU machine or a plain GPU install does not have, and a transformers deprecation that TRL's
own config defaults trigger in every run.
"""

from __future__ import annotations

import logging
import warnings

KNOWN_WARNINGS = (  # (message regex, category, module regex)
    (r"Transformer Engine and Apex are not installed", UserWarning, r"megatron\."),
    (r"Apex is not installed", UserWarning, r"megatron\."),
    (r"(torchtitan|veomni|automodel) engine is not available", UserWarning, r"verl\.workers\.engine"),
    (r"`gradient_checkpointing` is deprecated", FutureWarning, r"transformers\.training_args"),
)
# logger name -> the start of the (unformatted) messages dropped from it
KNOWN_LOG_RECORDS = {
    "verl.plugin.platform.platform_manager": ("No supported accelerator detected",
                                              "Platform '%s' (%s) is registered but not available"),
}


class _DropKnown(logging.Filter):
    def __init__(self, starts: tuple[str, ...]):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith(self.starts))


def quiet_known_library_noise() -> None:
    """Install the filters (idempotent)."""
    for message, category, module in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name, starts in KNOWN_LOG_RECORDS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnown) for f in logger.filters):
            logger.addFilter(_DropKnown(starts))
