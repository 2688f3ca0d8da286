"""tools/hf_memory.py: the measured saved bytes of ``lora+exact`` against ``lora`` equal the
closed form of tests/test_hf_peft.py (norms whose input needs a gradient: one hidden-sized
tensor each; per MLP two intermediate-sized tensors), at the tool's own shapes."""

from __future__ import annotations

import json

from tools.hf_memory import main


def test_tool_measures_the_closed_form_saving(tmp_path):
    layers, hidden, intermediate, rank, batch, words = 2, 32, 80, 4, 2, 7
    main(
        [
            "--steps", "2", "--warmup", "1", "--variants", "lora", "lora+exact",
            "--layers", str(layers), "--hidden", str(hidden), "--intermediate",
            str(intermediate), "--rank", str(rank), "--batch", str(batch), "--words",
            str(words), "--out", str(tmp_path),
        ]
    )  # fmt: skip
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    tokens = batch * (2 * words + 2)
    saving = 4 * tokens * ((2 * layers - 1) * hidden + layers * 2 * intermediate)
    assert results["lora"]["saved_bytes"] - results["lora+exact"]["saved_bytes"] == saving
    assert results["lora+exact"]["final_loss"] > 0
    assert "| lora+exact |" in (tmp_path / "results.md").read_text()
