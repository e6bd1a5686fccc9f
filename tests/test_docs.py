"""Issue 21 item 10: every command and snippet of README.md and docs/ works as written.

Every fenced python block compiles; every ``scancache ...`` command (fenced or inline) names
real subcommands and flags of the CLI's own argparse parser, and a concrete one parses whole;
``make`` targets and ``pip install`` extras exist. The cheap ones run for real against a small
store and a live server (addresses and store paths of the examples replaced by the test's):
the REST calls (curl, httpx, tensorstore), the Zarr readers, the reading interface and the
custom loader example.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from live_server import live_server

from service.cli import build_parser
from store.writer import write_scan

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHAPE = (64, 64, 12)  # the quick demo's scans (examples/demo.py)


@dataclass(frozen=True)
class Block:
    path: Path
    line: int
    lang: str
    text: str

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def fenced_blocks() -> list[Block]:
    found = []
    for path in DOCS:
        text = path.read_text()
        for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M):
            found.append(Block(path, text[: m.start()].count("\n") + 1, m.group(1), m.group(2)))
    return found


BLOCKS = fenced_blocks()
PYTHON = [b for b in BLOCKS if b.lang == "python"]
SHELL = [b for b in BLOCKS if b.lang in ("bash", "sh")]


def shell_commands(block: Block) -> list[str]:
    """The block's command lines: comments dropped, ``\\`` continuations and indented synopsis
    lines (``[--flag ...]`` under a ``scancache`` line) joined to their command."""
    commands: list[str] = []
    for raw in block.text.replace("\\\n", " ").splitlines():
        line = re.sub(r"(^|\s)#.*$", "", raw).rstrip()
        if not line.strip():
            continue
        if raw[:1].isspace() and commands:
            commands[-1] += " " + line.strip()
        else:
            commands.append(line.strip())
    return commands


def without_env(command: str) -> str:
    """``VAR=value scancache ...`` -> ``scancache ...``."""
    return re.sub(r"^(?:[A-Z_][A-Z0-9_]*=\S+\s+)+", "", command)


# -- the CLI ------------------------------------------------------------------------------------
PARSER = build_parser()
SUBCOMMANDS = next(a for a in PARSER._actions if a.dest == "command").choices


def check_scancache_command(command: str, whole: bool = True) -> None:
    """Subcommand and flags exist; a concrete command (no ``[...]`` or ``|``) parses whole
    (``whole``: a command line, not a mention in the prose such as `scancache serve`)."""
    tokens = without_env(command).split()
    assert tokens[0] == "scancache", command
    if tokens[1:] == ["--version"] or tokens[1:] == ["--help"]:
        return
    assert tokens[1] in SUBCOMMANDS, f"{command}: no subcommand {tokens[1]!r}"
    sub = SUBCOMMANDS[tokens[1]]
    for flag in re.findall(r"(?<![\w-])(--?[a-z][a-z0-9-]*)", " ".join(tokens[2:])):
        assert flag in sub._option_string_actions, f"{command}: scancache {tokens[1]} has no {flag}"
    if not whole or "[" in command or "|" in command or "..." in command:
        return  # a synopsis or a mention: names checked above
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            PARSER.parse_args(shlex.split(without_env(command))[1:])
        except SystemExit as exc:
            pytest.fail(f"{command}: {stderr.getvalue().strip() or exc}")


def inline_scancache_commands() -> list[tuple[str, str]]:
    found = []
    for path in DOCS:
        for m in re.finditer(r"`(scancache [^`]+)`", path.read_text()):
            found.append((path.name, m.group(1)))
    return found


@pytest.mark.parametrize("block", PYTHON, ids=lambda b: b.name)
def test_every_python_block_compiles(block):
    compile(block.text, block.name, "exec")


@pytest.mark.parametrize("block", SHELL, ids=lambda b: b.name)
def test_every_shell_command_names_real_commands_flags_targets_and_extras(block):
    makefile = (ROOT / "Makefile").read_text()
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for command in shell_commands(block):
        plain = without_env(command)
        if plain.startswith("scancache"):
            check_scancache_command(plain)
        elif plain.startswith("make "):
            for target in plain.split()[1:]:
                if "=" not in target:
                    assert re.search(rf"^{re.escape(target)}:", makefile, re.M), f"{command}: no target"
        elif plain.startswith("pip install -e"):
            names = re.search(r'"\.\[([^\]]+)\]"', plain)
            assert names, command
            for extra in names.group(1).split(","):
                assert extra in extras, f"{command}: no extra {extra!r}"


@pytest.mark.parametrize(("doc", "command"), inline_scancache_commands(), ids=lambda v: str(v))
def test_every_inline_scancache_command_names_real_commands_and_flags(doc, command):
    check_scancache_command(command, whole=False)


def test_the_extraction_finds_the_blocks_it_runs():
    assert len(PYTHON) >= 12 and len(SHELL) >= 12
    assert all(any(b.name.startswith(doc) and b.text.startswith(first) for b in BLOCKS) for doc, first in RUN)


# -- the cheap ones, for real ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def docs_store(tmp_path_factory):
    """Scans with the demo's ids and shape, 4 classes: what the examples read."""
    root = tmp_path_factory.mktemp("docs") / "store"
    rng = np.random.default_rng(0)
    for i, split in enumerate(("train", "valid", "test"), start=1):
        image = rng.normal(100, 30, size=SHAPE).astype(np.float32)
        labels = rng.integers(-1, 4, size=SHAPE)
        mask = np.stack([labels == k for k in range(4)], -1).astype(np.uint8)
        write_scan(root, f"{i:07d}_V00-Aug00", image, mask, {"split": split, "subject_id": i})
    return root


@pytest.fixture(scope="module")
def served(docs_store):
    with live_server(docs_store) as url:
        yield url


def localized(text: str, url: str, store: Path) -> str:
    """The example's server address and store paths, replaced by the test's."""
    for address in ("http://127.0.0.1:8000", "http://dataserver:8000", "http://data-server:8000"):
        text = text.replace(address, url)
    text = re.sub(r"(?<![\w/])localhost:8000", url, text)
    for path in ('"/data/store"', '"/data/oai-store"', '"/data/knee-store"', '"store"'):
        text = text.replace(path, f'"{store}"')
    return text


# (document, how the block starts): python blocks run as written, but for address and store
RUN = [
    ("README.md", "import zarr"),
    ("docs/rest-api.md", "import io, httpx"),
    ("docs/rest-api.md", "import httpx\nfrom client.wire"),
    ("docs/rest-api.md", "import tensorstore as ts"),
    ("docs/store-format.md", "import json, pathlib, zarr"),
    ("docs/user-guide.md", "from loaders import open_source"),
    ("docs/viewer.md", "import os\n\nimport ngff_zarr"),
]
# (docs/custom-dataloader.md's example runs in tests/test_custom_loader.py)


@pytest.mark.parametrize(("doc", "first"), RUN, ids=[d for d, _ in RUN])
def test_python_examples_run_against_a_server_and_a_store(served, docs_store, doc, first):
    block = next(b for b in PYTHON if b.name.startswith(doc) and b.text.startswith(first))
    code = localized(block.text, served, docs_store)
    assert code != block.text, "nothing pointed at the test's data"
    namespace: dict = {"__name__": "docs_example"}
    exec(compile(code, block.name, "exec"), namespace)
    arrays = [v for v in namespace.values() if isinstance(v, np.ndarray)]
    assert arrays or "arr" in namespace  # tensorstore's example opens an array: read it too
    if "arr" in namespace:
        arrays.append(np.asarray(namespace["arr"][:, :, 10].read().result()))
    assert all(a.size > 0 for a in arrays), [a.shape for a in arrays]


def test_curl_examples_run_as_written(served, docs_store, tmp_path):
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed here")
    commands = [c for b in SHELL for c in shell_commands(b) if c.startswith("curl")]
    assert len(commands) >= 4
    for command in commands:
        run = subprocess.run(
            shlex.split(localized(command, served, docs_store)),
            cwd=tmp_path,
            capture_output=True,
            timeout=60,
        )
        assert run.returncode == 0, f"{command}: {run.stderr.decode()[-300:]}"
        written = re.search(r"-o (\S+)", command)
        if written:  # a region as .npy
            assert np.load(tmp_path / written.group(1)).size > 0
        else:
            assert run.stdout.startswith(b"{"), run.stdout[:200]


def test_cheap_scancache_commands_run_for_real(docs_store):
    for args in (["--version"], ["scans", str(docs_store)], ["scans", str(docs_store), "--json"]):
        run = subprocess.run(
            [sys.executable, "-m", "service.cli", *args], capture_output=True, text=True, timeout=120
        )
        assert run.returncode == 0, run.stderr[-500:]
        assert "0000001_V00-Aug00" in run.stdout or run.stdout.startswith("scancache ")
