"""Hugging Face and PEFT entry point: the storage policies on a ``transformers`` model.

::

    model = AutoModelForCausalLM.from_pretrained(path)        # Llama, Mistral or Qwen2
    model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear"))
    apply_memory_policy(model, "exact")                       # or a memory.policy mapping

See :mod:`actcomp_dist.hf.policy` for what each policy patches.
"""

from actcomp_dist.hf.families import register_family, supported_families
from actcomp_dist.hf.policy import PRESETS, HfPolicy, apply_memory_policy, resolve_policy


def __getattr__(name: str):
    # The callback imports transformers' Trainer machinery: only when asked for.
    if name == "ScheduleCallback":
        from actcomp_dist.hf.callback import ScheduleCallback

        return ScheduleCallback
    raise AttributeError(name)


__all__ = [
    "PRESETS",
    "HfPolicy",
    "ScheduleCallback",
    "apply_memory_policy",
    "register_family",
    "resolve_policy",
    "supported_families",
]
