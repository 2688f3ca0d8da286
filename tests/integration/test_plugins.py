"""A compression method that lives outside the package, end to end (README, "Adding a
compression method").

The plugin below is written into ``tmp_path`` as a user would write it: one module that
registers a ``Compressor`` with ``@register_compressor`` and declares what the rest of the
system asks (saved width, ablation option). It keeps the first ``r`` features of each token,
so its weight gradient has a known form: the exact ``g^T X`` on the kept columns and zero on
the others. Reference for the layer: float64 ``g^T X``; for the runs: the analytic memory model
(the planner) against the trainer's byte counts, and the uncompressed variant of the same run.

The method is imported only where a test says so: in subprocesses (launcher, tools) through
``plugins`` / ``--plugin``, and in this process under a fixture that restores the registry, so
the other tests' method matrices never see it.
"""

from __future__ import annotations

import csv
import importlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from actcomp_dist.compression.registry import COMPRESSORS
from tests.helpers.launcher import launch_deepspeed, srun_ranks, startup_saved_bytes, wait_or_kill
from tests.helpers.runs import ROOT, TINY, read_metrics, tiny_config

PLUGIN = "leading_features_method"
PLUGIN_SOURCE = '''
"""``leading``: keep the first r features of every token (a test plugin).

Saves ``X[:, :r]`` [N, r]; the lift puts ``g^T X[:, :r]`` into the first r columns of dW and
zeros elsewhere. A row-parallel shard keeps the first r/t features of its own shard.
"""

import torch

from actcomp_dist.compression import Compressed, Compressor, SavedWidth, register_compressor
from actcomp_dist.compression.base import parse_rank_argument


@register_compressor("leading")
class LeadingFeatures(Compressor):
    options = ("rank",)
    ablation_option = "rank"

    @classmethod
    def saved_width(cls, config, layout):
        return SavedWidth(layout.local_rank(config.resolve_rank(layout.total_width)))

    @classmethod
    def parse_ablation_argument(cls, text):
        return parse_rank_argument(text)

    def compress(self, x2d):
        kept = torch.arange(self.compressed_width, device=x2d.device)
        return Compressed(tokens=x2d.index_select(1, kept))  # a copy, not a view of X

    def lift(self, ghat, basis, seeds):
        grad = ghat.new_zeros(ghat.shape[0], self.in_features)
        grad[:, : ghat.shape[1]] = ghat
        return grad
'''


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("plugin")
    (directory / f"{PLUGIN}.py").write_text(textwrap.dedent(PLUGIN_SOURCE))
    return directory


@pytest.fixture
def plugin_registered(plugin_dir, monkeypatch):
    """The plugin imported into this process; the registry and sys.modules restored after."""
    monkeypatch.setattr(COMPRESSORS, "_classes", dict(COMPRESSORS._classes))
    monkeypatch.syspath_prepend(str(plugin_dir))
    yield importlib.import_module(PLUGIN)
    sys.modules.pop(PLUGIN, None)


def _env(plugin_dir: Path) -> dict[str, str]:
    """PYTHONPATH with the plugin's directory (what a user sets), no launcher variables."""
    launcher = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    env["PYTHONPATH"] = os.pathsep.join([str(plugin_dir), str(ROOT), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


def _tool(name: str, plugin_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / name), *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env=_env(plugin_dir),
    )


def test_plugin_lift_is_exact_on_kept_features_and_zero_elsewhere(plugin_registered):
    from actcomp_dist import CompressedLinear, CompressionConfig, list_compressors
    from actcomp_dist.memory import saved_activation_bytes

    assert "leading" in list_compressors()
    n, m, r, tokens = 32, 24, 8, 64
    cfg = CompressionConfig(method="leading", rank=r)
    torch.manual_seed(0)
    layer = CompressedLinear(n, m, bias=False, compression=cfg)
    x = torch.randn(tokens, n, requires_grad=True)
    g = torch.randn(tokens, m)
    layer(x).backward(g)
    exact = g.double().t() @ x.detach().double()  # [m, n]
    # float32 dot products of length N: |error| <= N * eps32 * sum_k |g_ik||x_kj| (elementwise).
    bound = tokens * torch.finfo(torch.float32).eps * (g.abs().double().t() @ x.abs().double())
    assert torch.all((layer.weight.grad[:, :r].double() - exact[:, :r]).abs() <= bound[:, :r])
    assert torch.equal(layer.weight.grad[:, r:], torch.zeros(m, n - r))
    assert torch.equal(x.grad, g @ layer.weight.detach())  # dX stays exact
    assert saved_activation_bytes(lambda: layer(x).sum()) == tokens * r * 4


def test_a_method_without_ablation_option_is_written_alone(monkeypatch):
    """The grammar asks the method: no ``ablation_option`` means ``METHOD`` with no argument."""
    from actcomp_dist.ablation import Variant, VariantError, parse_variant
    from actcomp_dist.compression import register_compressor
    from actcomp_dist.compression.none import NoCompression

    monkeypatch.setattr(COMPRESSORS, "_classes", dict(COMPRESSORS._classes))
    register_compressor("exact_copy")(type("ExactCopy", (NoCompression,), {}))
    variant = parse_variant("exact_copy+ac_full")
    assert variant == Variant("exact_copy", None, "full") and variant.name == "exact_copy+ac_full"
    raw = variant.apply({"compression": {"method": "compact", "grad_mode": "subspace"}})
    assert raw["compression"] == {"method": "exact_copy", "grad_mode": "lift"}
    with pytest.raises(VariantError, match="exact_copy takes no argument"):
        parse_variant("exact_copy:4")


@pytest.mark.slow
@pytest.mark.distributed
def test_plugin_trains_through_the_launcher_with_predicted_bytes(tmp_path, plugin_dir, corpus):
    """``plugins`` in the run config: both ranks import it, train with it through the
    ``deepspeed`` launcher, and the start-up report's measured saved bytes equal the analytic
    prediction (and are below the same batch uncompressed)."""
    raw = tiny_config(
        tmp_path / "run",
        corpus,
        f'plugins=["{PLUGIN}"]',
        "compression.method=leading",
        "compression.rank=0.5",
    )
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(raw))
    log = tmp_path / "launcher.log"
    env_path = os.pathsep.join([str(plugin_dir), os.environ.get("PYTHONPATH", str(ROOT))])
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", env_path)  # inherited by the launcher and its ranks
        returncode = wait_or_kill(launch_deepspeed(config_file, [], log))
    output = log.read_text()
    assert returncode == 0, output[-3000:]
    measured, predicted, uncompressed = startup_saved_bytes(output)
    assert measured == predicted != uncompressed
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == list(range(1, 7))
    assert records[-1]["loss"] < records[0]["loss"]
    resolved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert resolved["plugins"] == [PLUGIN] and resolved["compression"]["method"] == "leading"


@pytest.mark.slow
def test_plugin_variant_in_the_ablation_and_the_planner(tmp_path, plugin_dir, corpus):
    """``--plugin`` for the tools: the ablation trains ``leading:0.5`` with measured saved bytes
    equal to the planner's prediction (on the naive block, where the linears' inputs are not
    kept by a neighbour, also below ``naive``); the planner lists the variant with the same
    prediction as the memory model computed here."""
    out = tmp_path / "ablation"
    data = [arg for override in corpus for arg in ("--set", override)]
    result = _tool(
        "ablate.py", plugin_dir, "--config", str(TINY), "--plugin", PLUGIN,
        "--variants", "naive,leading:0.5+naive,leading:0.5", "--steps", "2", "--out", str(out),
        "--set", "data.seq_length=32", *data,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    with open(out / "results.csv") as handle:
        rows = {row["variant"]: row for row in csv.DictReader(handle)}
    for variant in ("leading:0.5", "leading:0.5+naive"):
        saved = int(rows[variant]["saved_activation_bytes"])
        assert saved == int(rows[variant]["predicted_saved_activation_bytes"]), variant
    naive_leading, naive = rows["leading:0.5+naive"], rows["naive"]
    assert int(naive_leading["saved_activation_bytes"]) < int(naive["saved_activation_bytes"])
    run = json.loads((out / "runs" / "leading-0.5" / "repeat0" / "config.json").read_text())
    assert run["plugins"] == [PLUGIN]  # every run imports it, whatever process trains it

    plan = _tool(
        "memory_plan.py", plugin_dir, "--config", str(TINY), "--plugin", PLUGIN,
        "--variants", "none,leading:0.5", "--micro-batch", "64", "--seq-lengths", "1024",
        "--precision", "bf16", "--vocab-size", "32000",
    )  # fmt: skip
    assert plan.returncode == 0, plan.stderr[-3000:]
    table = plan.stdout.split("Saved activations per micro-batch")[1].splitlines()
    row = next(line.split() for line in table if line.startswith("leading:0.5"))
    predicted = _predicted_saved_bytes(plugin_dir, micro_batch=64, seq=1024, vocab=32000)
    assert row[1] == f"{predicted / 1e9:.2f}"


def _predicted_saved_bytes(plugin_dir: Path, micro_batch: int, seq: int, vocab: int) -> int:
    """The memory model's saved bytes of tiny + ``leading`` at rank n/2, bf16 (the efficient
    block with the default chunked loss), computed in a subprocess that imports the plugin (this process's registry stays as it is)."""
    script = f"""
import {PLUGIN}
from actcomp_dist import CompressionConfig
from actcomp_dist.memory_model import ActivationSetting, predict_saved_activations
from actcomp_dist.models import get_model_config
model = get_model_config("tiny", vocab_size={vocab}, seq_length={seq})
setting = ActivationSetting({micro_batch}, {seq}, dtype_bytes=2, loss_chunk_tokens=1024)
compression = CompressionConfig(method="leading", rank=0.5)
print(predict_saved_activations(model, compression, setting).total)
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=_env(plugin_dir)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return int(result.stdout)


@pytest.mark.slow
@pytest.mark.distributed
def test_bad_plugin_fails_on_every_rank_and_in_the_tools(tmp_path, plugin_dir, corpus):
    """A module that cannot be imported: one line naming it, exit 2, on every rank, before any
    collective (no hang), run directory not created; the same line from both tools."""
    raw = tiny_config(tmp_path / "run", corpus, 'plugins=["no_such_plugin_module"]')
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(raw))
    ranks = srun_ranks(config_file, [], tmp_path)
    message = "plugins: cannot import module 'no_such_plugin_module' (ModuleNotFoundError"
    for rank, process in enumerate(ranks):
        assert wait_or_kill(process, timeout=120) == 2, rank
        err = (tmp_path / f"rank{rank}.err").read_text()
        assert f"error (rank {rank}/2): " in err and message in err, err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()

    for tool, extra in (("ablate.py", ["--out", str(tmp_path / "out")]), ("memory_plan.py", [])):
        result = _tool(
            tool, plugin_dir, "--config", str(TINY), "--plugin", "no_such_plugin_module", *extra
        )
        assert result.returncode == 2, (tool, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr, (tool, result)
    assert not (tmp_path / "out").exists()
