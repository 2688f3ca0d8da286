"""Model flops utilisation (MFU): the model's useful flops per second over the devices' peak.

Model flops per token are ``6 P + 12 L h s``: ``6 P`` for the forward (2 flops per parameter
per token) and the backward (twice the forward) of every weight matrix, plus ``12 L h s`` for
the attention score and value products (``2 * 2 * s * h`` per layer and token forward, times
3 with the backward). Recomputation (activation checkpointing, the memory-efficient ops) is not
counted, as in the usual MFU definition (PaLM, appendix B): MFU measures the model's work, not
the work a memory saving adds.

The peak is the dense bf16 tensor-core rate of the device, from a table of known devices by
a substring of ``torch.cuda.get_device_name()``; an unknown device (and a CPU) has none, and
then no MFU is reported.
"""

from __future__ import annotations

# Dense bf16 tensor-core peak in TFLOP/s, by a substring of the device name. The first matching
# key wins, so the more specific names ("H100 PCIe") come before the shorter ones ("H100").
PEAK_TFLOPS = {
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10G": 125.0,
}


def peak_flops(device_name: str, override_tflops: float | None = None) -> float | None:
    """The peak flop/s of one device named ``device_name``; ``None`` when it is not in the
    table (``override_tflops``, in TFLOP/s, wins when given)."""
    if override_tflops is not None:
        return override_tflops * 1e12
    for key, tflops in PEAK_TFLOPS.items():
        if key in device_name:
            return tflops * 1e12
    return None


def device_peak_flops(device) -> float | None:
    """The peak of ``device`` (a ``torch.device``): the table's entry for a CUDA device, else
    ``None``."""
    if device.type != "cuda":
        return None
    import torch

    return peak_flops(torch.cuda.get_device_name(device))


def model_flops_per_token(model_config, seq_length: int) -> float:
    """``6 P + 12 L h s`` for a :class:`~actcomp_dist.models.LlamaConfig` (``P`` its logical,
    unsharded parameter count)."""
    from actcomp_dist.models import parameter_count

    c = model_config
    return 6.0 * parameter_count(c) + 12.0 * c.num_layers * c.hidden_size * seq_length
