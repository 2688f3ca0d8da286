"""Start-up messages of the libraries underneath that say nothing a user can act on,
filtered at their source, message by message.

A CPU or plain-PyTorch run of this project prints, per rank, megatron-core's "Transformer
Engine and Apex are not installed" (four times, at import: the fallbacks it names are the ones
this project uses), torch's deprecation of ``all_gather_into_tensor`` (megatron-core's call,
not ours), megatron's advice on ``CUDA_DEVICE_MAX_CONNECTIONS`` (for its own overlapped
all-reduce, which these layers do not use) and DeepSpeed's "Setting accelerator to CPU"
(on a machine without a GPU, where that is the point). Each is removed by an exact message
match; every other warning and log line still shows. ``logging.verbose=true`` in the run config
(``--set logging.verbose=true``) keeps all of them.
"""

from __future__ import annotations

import logging
import warnings

#: (category, regular expression matched at the start of the message)
WARNINGS = (
    (UserWarning, r"Transformer Engine and Apex are not installed"),
    (FutureWarning, r"`torch\.distributed\.all_gather_into_tensor` is deprecated"),
    (FutureWarning, r"`torch\.distributed\.reduce_scatter_tensor` is deprecated"),
    (UserWarning, r"When using async grad allreduce it is recommended to set the environment"),
)
#: DeepSpeed log records (logger "DeepSpeed"), by the start of their message.
DEEPSPEED_RECORDS = ("Setting accelerator to CPU. If you have GPU or other accelerator",)


class _DropMessages(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


def quiet_third_party(verbose: bool = False) -> None:
    """Install the filters (idempotent); call before megatron-core and DeepSpeed are
    imported so that their import-time messages are caught too."""
    if verbose:
        return
    for category, pattern in WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=category)
    # DeepSpeed's logger is created at its import with logging.getLogger("DeepSpeed"); a filter
    # added to that logger now stays on it.
    deepspeed_logger = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _DropMessages) for f in deepspeed_logger.filters):
        deepspeed_logger.addFilter(_DropMessages(DEEPSPEED_RECORDS))
