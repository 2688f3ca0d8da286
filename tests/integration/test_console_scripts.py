"""The console scripts of ``setup.cfg``, as pip installs them.

The package is installed by pip (no dependencies, no network, no build isolation) from a copy
of this checkout's sources into a scratch ``--target``; the installed distribution's own
``console_scripts`` metadata is then read back, every entry point is loaded (it must resolve to
a callable ``main``) and called with ``--help`` (it must print its usage and exit 0), and one
generated script file is run as a program. The ``tools/*.py`` shims must reach the same
``main`` functions, so the README's ``python tools/X.py`` commands keep working.
"""

from __future__ import annotations

import ast
import configparser
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Every tool a user runs, and its module; the shims in tools/ must point at the same main().
EXPECTED = {
    "actcomp-pretrain": ("actcomp_dist.cli.pretrain", "launch/pretrain.py"),
    "actcomp-finetune": ("actcomp_dist.cli.finetune", "launch/finetune.py"),
    "actcomp-ablate": ("actcomp_dist.cli.ablate", "tools/ablate.py"),
    "actcomp-memory-plan": ("actcomp_dist.cli.memory_plan", "tools/memory_plan.py"),
    "actcomp-convert-hf": ("actcomp_dist.cli.convert_hf", "tools/convert_hf_llama.py"),
    "actcomp-merge-adapters": ("actcomp_dist.cli.merge_adapters", "tools/merge_adapters.py"),
    "actcomp-generate": ("actcomp_dist.cli.generate", "tools/generate.py"),
    "actcomp-train-tokenizer": ("actcomp_dist.cli.train_tokenizer", "tools/train_tokenizer.py"),
    "actcomp-preprocess-data": ("actcomp_dist.cli.preprocess_data", "tools/preprocess_data.py"),
}

# Run in the installed copy: load each entry point from the distribution's metadata, call it
# with --help, report what happened.
_PROBE = """
import contextlib, io, json, sys
from importlib.metadata import distribution
dist = distribution("actcomp_dist")
out = {}
for ep in dist.entry_points:
    if ep.group != "console_scripts":
        continue
    main = ep.load()
    stdout = io.StringIO()
    sys.argv = [ep.name, "--help"]
    code = None
    with contextlib.redirect_stdout(stdout):
        try:
            main(["--help"])
        except SystemExit as exit:
            code = exit.code
    out[ep.name] = {"value": ep.value, "callable": callable(main), "module": main.__module__,
                    "code": code, "help": stdout.getvalue()}
print(json.dumps({"dist_path": str(dist.locate_file("")), "scripts": out}))
"""


def _setup_cfg_scripts() -> dict[str, str]:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    lines = parser["options.entry_points"]["console_scripts"].strip().splitlines()
    return dict(tuple(part.strip() for part in line.split("=")) for line in lines)


def test_setup_cfg_declares_every_tool():
    declared = _setup_cfg_scripts()
    assert declared == {name: f"{module}:main" for name, (module, _) in EXPECTED.items()}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_the_checkout_scripts_call_the_same_main(name):
    """``tools/X.py`` / ``launch/X.py`` import ``main`` from the console script's module and run
    it as ``sys.exit(main())``."""
    module, script = EXPECTED[name]
    tree = ast.parse((ROOT / script).read_text())
    imports = {
        (node.module, alias.name)
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    assert (module, "main") in imports, (script, imports)
    exits = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and ast.unparse(node.func) == "sys.exit"
        and isinstance(node.args[0], ast.Call)
        and ast.unparse(node.args[0].func) == "main"
    ]
    assert exits, f"{script} does not run sys.exit(main(...))"


@pytest.mark.slow
def test_installed_console_scripts_resolve_and_print_help(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for name in ("setup.cfg", "setup.py", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(
        ROOT / "actcomp_dist", source / "actcomp_dist", ignore=shutil.ignore_patterns("__pycache__")
    )
    target = tmp_path / "installed"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index"]
        + ["--no-build-isolation", "--target", str(target), str(source)],
        check=True,
        env=env,
        timeout=300,
    )
    env["PYTHONPATH"] = str(target)  # the installed copy, not this checkout
    env["OMP_NUM_THREADS"] = "1"
    probe = subprocess.run(
        [sys.executable, "-c", _PROBE],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert probe.returncode == 0, probe.stderr[-3000:]
    report = json.loads(probe.stdout.strip().splitlines()[-1])
    assert Path(report["dist_path"]).resolve() == target.resolve()
    scripts = report["scripts"]
    assert sorted(scripts) == sorted(EXPECTED)
    for name, (module, _) in EXPECTED.items():
        entry = scripts[name]
        assert entry["value"] == f"{module}:main" and entry["callable"], entry
        assert entry["code"] == 0, (name, entry)
        assert entry["help"].startswith("usage: ") and "--help" in entry["help"], entry

    # A generated script, run as a program from another directory.
    script = target / "bin" / "actcomp-convert-hf"
    done = subprocess.run(
        [sys.executable, str(script), "to-hf", "--help"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--tokenizer" in done.stdout and "usage: actcomp-convert-hf to-hf" in done.stdout
