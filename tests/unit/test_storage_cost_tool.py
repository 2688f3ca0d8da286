"""tools/storage_cost.py: the bytes each 8-bit kind removes from a block equal the closed form
of the int8 format (codes plus one fp32 scale per group, :mod:`actcomp_dist.storage`), and the
alternating-step comparison reports every mix against ``none``."""

from __future__ import annotations

from actcomp_dist.models import get_model_config
from tools.storage_cost import _bytes_removed, main


def test_bytes_removed_per_kind_are_the_int8_closed_form():
    batch, seq = 2, 32
    config = get_model_config("tiny", seq_length=seq)
    n = batch * seq  # tokens
    h, f, d = config.hidden_size, config.ffn_hidden_size, config.head_dim
    heads, groups = config.num_attention_heads, config.query_groups

    def int8(numel: int, last: int) -> int:  # codes + an fp32 scale per group of 64 (or row)
        group = 64 if last % 64 == 0 else last
        return numel + 4 * numel // group

    removed = _bytes_removed(config, "int8", batch, seq, dtype_bytes=4)
    # Two norm outputs [n, h] per block.
    assert removed["norm"] == 2 * (4 * n * h - int8(n * h, h))
    # [gate | up] [n, 2f].
    assert removed["swiglu"] == 4 * n * 2 * f - int8(n * 2 * f, 2 * f)
    # q, k, v per head ([.., d] rows) and the attention output [n, heads d] (the attention's
    # and proj's one copy); SDPA's fp32 log-sum-exp per query head is kept by both (the 8-bit
    # backward on CPU starts from it).
    qkv = (heads + 2 * groups) * n * d
    kept = 4 * qkv + 4 * n * heads * d
    assert removed["attention"] == kept - int8(qkv, d) - int8(n * heads * d, heads * d)


def test_alternating_steps_report_each_mix(capsys):
    main(
        [
            "--micro-batch", "1", "--seq-length", "32", "--repeats", "1",
            "--mixes", "int8@norm/swiglu,ac_selective", "--rounds", "2",
        ]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert "| `none` |" in out and "| 1.000 [1.000-1.000] |" in out
    for row in ("| norm |", "| attention |", "| swiglu |", "`int8@norm/swiglu`", "`ac_selective`"):
        assert row in out, row
    # With ac_selective among the mixes every row is also a ratio to it, 1 for itself.
    assert "x none: median [quartiles] | x ac_selective: median [quartiles] |" in out
    (selective,) = [line for line in out.splitlines() if line.startswith("| `ac_selective`")]
    assert selective.endswith("| 1.000 [1.000-1.000] |")
