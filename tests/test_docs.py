"""The docs cannot rot: the site builds (strict), every code block of the docs and the README runs on SmolLM2, and
so does every script in examples/.

Python blocks of a page run in order in one namespace; shell blocks run line by line with the venv's commands on
PATH (``hf-encore`` lines through the same entry point, in this process). Both run in a scratch directory beside a
link to ../shared, so the pages' relative paths hold. Sizes are cut to small settings by the rewrites in SMALL (more
edits would only take longer). The README's `make` lines are the setup that CI itself runs, so they are the one thing
not run here.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from hf_encore.apps.cli import main as cli_main

pytestmark = pytest.mark.slow  # the docs' and examples' code runs on the real SmolLM2; the site build takes a while

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PAGES = sorted((ROOT / "docs").rglob("*.md")) + [ROOT / "README.md"]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
SETUP_COMMANDS = ("make ",)
RUNNABLE = ("python", "bash", "sh", "shell")

# (pattern, replacement) applied to shell lines: the same commands at small sizes.
SMALL = [
    (r"--edits \d+", "--edits 2"),
    (r"--methods [\w+ ]+?(?= --|$)", "--methods encore"),
    (r"--batch-size \d+", "--batch-size 2"),
    (r"--eval-every \d+", "--eval-every 2"),
    (r"--limit \d+", "--limit 4"),
    (r"(hf-encore bench|-m hf_encore\.lifelong)( .*)",
     r"\1\2 --tasks sst2 --downstream-items 4 --perplexity-tokens 400 --known-facts 4 --edited-sample 4"),
    (r"(speed\.py.*)", r"\1 --stats-tokens 512 --methods encore memit"),
    (r"--requests \d+", "--requests 2"),
    (r"(sweep\.py.*)", r"\1 --known-facts 4"),
    (r"(degradation_ablation\.py.*)",
     r"\1 --configs defaults new-defaults --perplexity-tokens 400 --edited-sample 2 --known-facts 4"),
    (r"(--vary \S+ \S+)(?: (?!--)\S+)+", r"\1"),  # one value per varied setting
    (r"python benchmarks/", f"python {ROOT}/benchmarks/"),
    (r"\.venv/bin/", f"{BIN}/"),
]


# Benchmark commands check that the scripts run end to end, not figures: they run on the tiny random model (in
# seconds, where SmolLM2 took minutes per command), which knows no facts to probe.
ON_TINY_MODEL = ("hf-encore bench", "benchmarks/speed.py", "benchmarks/memory.py", "benchmarks/sweep.py",
                 "benchmarks/degradation_ablation.py")


def on_tiny_model(command: str, model_dir: Path) -> str:
    if not any(marker in command for marker in ON_TINY_MODEL):
        return command
    command = re.sub(r"--model \S+", f"--model {model_dir}", command)
    return re.sub(r"--known-facts \d+", "--known-facts 0", command)


def code_blocks(page: Path) -> list[tuple[str, str]]:
    """(language, code) of each fenced block of a markdown page."""
    return [(m.group(1), m.group(2)) for m in
            re.finditer(r"^```(\w*)\n(.*?)^```", page.read_text(encoding="utf-8"), re.S | re.M)]


def shell_lines(code: str) -> list[str]:
    """Commands of a shell block: continuation lines joined, comments dropped, here-documents kept whole."""
    lines, current, heredoc = [], "", None
    for line in code.splitlines():
        if heredoc:
            current += "\n" + line
            if line.strip() == heredoc:
                lines.append(current)
                current, heredoc = "", None
            continue
        stripped = line.split(" #", 1)[0].rstrip() if not line.lstrip().startswith("echo") else line.rstrip()
        if not stripped or stripped.lstrip().startswith("#"):
            continue
        current = f"{current} {stripped.rstrip(chr(92))}".strip() if current else stripped.rstrip(chr(92))
        marker = re.search(r"<<'?(\w+)'?", stripped)
        if marker:
            heredoc = marker.group(1)
        elif not stripped.endswith("\\"):
            lines.append(current)
            current = ""
    return lines


def small(command: str) -> str:
    for pattern, replacement in SMALL:
        command = re.sub(pattern, replacement, command)
    return command


@pytest.fixture
def workdir(tmp_path, monkeypatch, shared_data):
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "shared").symlink_to(shared_data.parent)
    monkeypatch.chdir(work)
    return work


@pytest.fixture
def fake_hub(monkeypatch):
    """Pages that push reach a local fake Hub (tests/fake_hub.py) instead of huggingface.co."""
    import huggingface_hub.constants as hub_constants

    from fake_hub import FakeHub

    with FakeHub() as hub:
        monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(hub_constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(hub_constants, "ENDPOINT", hub.endpoint)
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        monkeypatch.setenv("HF_TOKEN", "hf_dummy")
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        yield hub


def test_site_builds_strictly(tmp_path):
    mkdocs = BIN / "mkdocs"
    result = subprocess.run([str(mkdocs), "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "site" / "reference" / "api" / "index.html").is_file()


def test_code_blocks_are_found_and_tagged():
    blocks = [(page, lang) for page in PAGES for lang, _ in code_blocks(page)]
    assert sum(lang in RUNNABLE for _, lang in blocks) >= 20  # a guard for the parser
    # An untagged block is not run, so only diagrams and listings may be untagged.
    assert {page.name for page, lang in blocks if not lang} <= {"architecture.md", "README.md"}


@pytest.mark.parametrize("page", [p for p in PAGES if any(lang in RUNNABLE for lang, _ in code_blocks(p))],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_code_blocks_run(page, workdir, fake_hub, tiny_dir):
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "0"}
    namespace: dict = {"__name__": "__docs__"}
    ran = 0
    for language, code in code_blocks(page):
        if language == "python":
            exec(compile(code, f"{page.name}:block", "exec"), namespace)
            ran += 1
        elif language in RUNNABLE:
            for command in shell_lines(code):
                if command.startswith(SETUP_COMMANDS):
                    continue
                command = on_tiny_model(small(command), tiny_dir)
                words = shlex.split(command) if "\n" not in command else []
                if words and Path(words[0]).name == "hf-encore":
                    # In this process: the same entry point as the console script, without a fresh import.
                    assert cli_main(words[1:]) == 0, f"{page.name}: `{command}` failed"
                else:
                    result = subprocess.run(command, shell=True, cwd=workdir, env=env, capture_output=True,
                                            text=True)
                    assert result.returncode == 0, f"{page.name}: `{command}` failed:\n{result.stderr[-3000:]}"
                ran += 1
    if page.name == "share.md":
        assert "me/sports-edits" in fake_hub.repos
    assert ran > 0


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_examples_run(script, workdir, fake_hub):
    arguments = {
        "lifelong_counterfact.py": ["--edits", "4", "--batch-size", "2"],
        "share_on_hub.py": ["--repo-id", "me/example-edits", "--endpoint", fake_hub.endpoint, "--token", "hf_x"],
    }.get(script.name, [])
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1"}
    result = subprocess.run([sys.executable, str(script), *arguments], cwd=workdir, env=env, capture_output=True,
                            text=True)
    assert result.returncode == 0, f"{shlex.join([script.name, *arguments])}:\n{result.stderr[-3000:]}"
    if script.name == "share_on_hub.py":
        assert "me/example-edits" in fake_hub.repos
    if script.name == "lifelong_counterfact.py":
        assert len([line for line in result.stdout.splitlines() if re.match(r"\s+\d+ ", line)]) == 2
