"""The documentation site: ``mkdocs build --strict`` passes and covers every method, application and
command, and the Python examples of the pages run.

The examples of a page run in order in one namespace, in a fresh working directory. A block is left
out only when the line before its fence is ``<!-- docs-test: skip (reason) -->`` (training for
minutes, an optional package); executed examples train tiny models (every ``*steps=`` at most 50).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
SKIP = re.compile(r"<!--\s*docs-test:\s*skip\s*\((?P<reason>[^)]+)\)\s*-->")
FENCE = re.compile(r"^```(?P<lang>[\w-]*)\s*$")
MAX_STEPS = 50


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    code: str
    skip: str | None  # the reason, when the page marks the block to be skipped


def code_blocks(page: Path, lang: str = "python") -> list[Block]:
    """The fenced ``lang`` blocks of a Markdown page, with their skip markers."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m or not m["lang"]:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
        prev = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        marker = SKIP.search(prev)
        if m["lang"] == lang:
            code = "\n".join(lines[i + 1 : end]) + "\n"
            blocks.append(Block(page, i + 1, code, marker["reason"] if marker else None))
        i = end + 1
    return blocks


def pages() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md") if "hooks" not in p.parts)


PAGES_WITH_CODE = [p for p in pages() if code_blocks(p)]


def test_the_extractor_reads_fences_and_skip_markers(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "text\n```python\nx = 1\n```\n\n<!-- docs-test: skip (slow) -->\n```python\ny = 2\n```\n"
        "```bash\nls\n```\n```python\nz = 3\n```\n"
    )
    blocks = code_blocks(page)
    assert [(b.line, b.code, b.skip) for b in blocks] == [
        (2, "x = 1\n", None), (7, "y = 2\n", "slow"), (13, "z = 3\n", None)
    ]  # fmt: skip


def test_pages_have_runnable_examples_and_skip_few() -> None:
    blocks = [b for p in pages() for b in code_blocks(p)]
    run = [b for b in blocks if b.skip is None]
    assert len(run) >= 15 and len(blocks) - len(run) <= 3, [(b.page.name, b.line) for b in blocks]
    for b in run:  # tiny models only: every optimiser or solver step count at most MAX_STEPS
        for name, value in re.findall(r"(\w*steps)\s*=\s*(\d+)", b.code):
            assert int(value) <= MAX_STEPS, f"{b.page.name}:{b.line}: {name}={value}"


@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=lambda p: str(p.relative_to(DOCS)))
def test_the_python_examples_of_a_page_run(
    page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # examples write run folders under runs/
    namespace: dict[str, object] = {"__name__": "__docs__"}
    for block in code_blocks(page):
        if block.skip is not None:
            continue
        code = compile(block.code, f"{page.relative_to(REPO)}:{block.line}", "exec")
        exec(code, namespace)  # the page's own example


def test_site_builds_strictly_and_covers_every_method_and_command(tmp_path: Path) -> None:
    for module in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
        pytest.importorskip(
            module, reason="the docs extra is not installed (pip install -e '.[docs]')"
        )
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(REPO / "mkdocs.yml")]
    proc = subprocess.run(
        [*cmd, "-d", str(site)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    import typer

    from iterflow.cli.app import app
    from iterflow.methods import METHODS

    for name in METHODS:  # a page per built-in method (other tests register toy methods)
        if METHODS.get(name).__module__.startswith("iterflow."):
            assert (site / "methods" / name / "index.html").is_file(), name
    for name in ("transport", "ratio", "worst-case", "images", "python"):
        assert (site / "applications" / name / "index.html").is_file(), name
    cli = (site / "cli" / "index.html").read_text()
    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    for name, command in commands.items():  # the generated reference: every command and flag
        assert f'id="iterflow-{name}"' in cli, name
        for param in command.params:
            for flag in getattr(param, "opts", []):
                if flag.startswith("--"):
                    assert f"{flag} " in cli or f"{flag}<" in cli, (name, flag)
    api = (site / "api" / "train" / "index.html").read_text()
    assert "TrainConfig" in api and "optimize" in api  # mkdocstrings rendered the docstrings
