"""Which steps the ablation times: after the warm-up, only those where the trainer did not
count saved tensors or measure model states (their records have no ``saved_activation_bytes``).
Reference: the step lists written out by hand."""

from __future__ import annotations

from actcomp_dist.ablation.runner import median_over_steps, timed_steps


def _history(steps: int, measured: set[int]) -> list[dict]:
    history = []
    for step in range(1, steps + 1):
        record = {"step": step, "step_cpu_s": float(step)}
        if step in measured:
            record["saved_activation_bytes"] = 1024
        history.append(record)
    return history


def test_timed_steps_leave_out_the_warm_up_and_the_measured_steps():
    # 10 steps, logged every 5: the trainer measured 1, 2, 5 and 10.
    history = _history(10, {1, 2, 5, 10})
    assert timed_steps(history, warmup_steps=2) == [3, 4, 6, 7, 8, 9]
    assert median_over_steps(history, "step_cpu_s", [3, 4, 6, 7, 8, 9]) == 6.5


def test_a_run_with_only_measured_steps_after_the_warm_up_times_those():
    history = _history(3, {1, 2, 3})
    assert timed_steps(history, warmup_steps=1) == [2, 3]
    assert timed_steps(history, warmup_steps=3) == [1, 2, 3]
