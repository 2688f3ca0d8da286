"""The start-up filters of :mod:`actcomp_dist.training.quiet`: exactly the listed messages go,
everything else stays, and ``verbose`` keeps them all."""

from __future__ import annotations

import logging
import warnings

import pytest

from actcomp_dist.training import quiet


@pytest.fixture
def clean_filters():
    """No filter of ours installed during the test (an earlier test in this process may have
    run a launcher entry point that installed them); everything restored afterwards."""
    saved_filters = warnings.filters[:]
    logger = logging.getLogger("DeepSpeed")
    saved_logger_filters = logger.filters[:]
    ours = {pattern for _, pattern in quiet.WARNINGS}
    warnings.filters[:] = [f for f in saved_filters if getattr(f[1], "pattern", None) not in ours]
    logger.filters[:] = [f for f in saved_logger_filters if not isinstance(f, quiet._DropMessages)]
    yield
    warnings.filters[:] = saved_filters
    logger.filters[:] = saved_logger_filters


def _shown(message: str, category: type[Warning]) -> bool:
    with warnings.catch_warnings(record=True) as caught:
        # catch_warnings copies the filters installed before it; "always" only for the rest.
        warnings.simplefilter("always")
        warnings.filters[:] = [f for f in warnings.filters if f[0] == "ignore"] + [
            ("always", None, Warning, None, 0)
        ]
        warnings.warn(message, category, stacklevel=1)
    return bool(caught)


def _deepspeed_record_shown(message: str) -> bool:
    logger = logging.getLogger("DeepSpeed")
    record = logger.makeRecord("DeepSpeed", logging.WARNING, __file__, 1, message, None, None)
    return logger.filter(record)


def test_listed_messages_are_dropped_and_others_kept(clean_filters):
    megatron = "Transformer Engine and Apex are not installed. Falling back to Torch optimizers."
    accelerator = "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable"
    assert _shown(megatron, UserWarning) and _deepspeed_record_shown(accelerator)
    quiet.quiet_third_party(verbose=False)
    quiet.quiet_third_party(verbose=False)  # idempotent
    assert not _shown(megatron, UserWarning)
    assert not _shown(
        "`torch.distributed.all_gather_into_tensor` is deprecated. Please use ...", FutureWarning
    )
    assert not _deepspeed_record_shown(accelerator)
    drops = [
        f for f in logging.getLogger("DeepSpeed").filters if isinstance(f, quiet._DropMessages)
    ]
    assert len(drops) == 1
    # Anything else still shows: another warning of the same category, another DeepSpeed line.
    assert _shown("Apex could not be loaded for another reason", UserWarning)
    assert _deepspeed_record_shown("OVERFLOW! Skipping step.")


def test_verbose_installs_nothing(clean_filters):
    warnings_before = warnings.filters[:]
    logger_before = logging.getLogger("DeepSpeed").filters[:]
    quiet.quiet_third_party(verbose=True)
    assert warnings.filters == warnings_before
    assert logging.getLogger("DeepSpeed").filters == logger_before
