"""The commands of README.md and docs/*.md run as written. Each `--model toy` command (and every toy/score.py
one) runs, shortened to a few steps, from a temporary folder that holds copies of sets/ and toy/examples/, in
the order its page gives them; the FLUX.1-dev commands (34 GB of weights) are only parsed, by their script's
parser. The pages are read when the tests run, so a command added to them is checked with no change here."""

import os
import random
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import sample
import train
from toy.world import random_scene, render

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PARSERS = {"sample.py": sample.build_parser, "train.py": train.build_parser}
# Appended to a toy command (argparse keeps the last value), so that it runs in seconds.
SHORTER = {"train.py": ["--steps", "2", "--sample-every", "0"],
           "sample.py": ["--steps", "2"],
           "toy/score.py": ["--count", "1", "--steps", "2"]}
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.M | re.S)


def commands(page: Path) -> list[tuple[str, list[str]]]:
    """(script, its arguments) of each `python X.py ...` or `torchrun ... X.py ...` in the page's code blocks,
    for the scripts of PARSERS and toy/score.py; lines continued with a backslash are joined, comments and
    `cmd && cmd` chains are split off."""
    found = []
    for block in FENCE.findall(page.read_text(encoding="utf-8")):
        for line in block.replace("\\\n", " ").splitlines():
            if line.split()[:1] not in (["python"], ["torchrun"], ["pip"]):
                continue  # prose in a code block (a folder layout) is no command
            words = shlex.split(line, comments=True)
            start = 0
            for end in range(len(words) + 1):
                if end == len(words) or words[end] == "&&":
                    found += script_call(words[start:end])
                    start = end + 1
    return found


def script_call(words: list[str]) -> list[tuple[str, list[str]]]:
    """[(script, arguments)] when `words` runs one of our scripts, else []."""
    if not words or words[0] not in ("python", "torchrun"):
        return []
    for i, word in enumerate(words):
        if word in SHORTER:
            return [(word, words[i + 1:])]
    return []


def is_toy(script: str, args: list[str]) -> bool:
    return script == "toy/score.py" or "--model toy" in " ".join(args)


def flux_commands() -> list:
    """A pytest.param(script, arguments) for each command of the pages that is not a toy one."""
    params = []
    for page in PAGES:
        for script, args in commands(page):
            if not is_toy(script, args):
                params.append(pytest.param(script, args, id=f"{page.name}: {script} {' '.join(args)}"[:90]))
    return params


TOY_PAGES = [page for page in PAGES if any(is_toy(*command) for command in commands(page))]


def written_files(folder: Path) -> set[Path]:
    return {path.relative_to(folder) for path in folder.rglob("*") if path.is_file()}


@pytest.fixture(scope="module", params=TOY_PAGES, ids=[page.name for page in TOY_PAGES])
def toy_run(request, tmp_path_factory):
    """Runs the page's toy commands in order in a fresh folder: (page, [(command, completed process)], the
    files they wrote, relative to the folder)."""
    page = request.param
    folder = tmp_path_factory.mktemp(page.stem)
    shutil.copytree(ROOT / "sets", folder / "sets")
    shutil.copytree(ROOT / "toy" / "examples", folder / "toy" / "examples")
    before = written_files(folder)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    runs = []
    for script, args in commands(page):
        if is_toy(script, args):
            argv = [sys.executable, str(ROOT / script), *args, *SHORTER[script]]
            done = subprocess.run(argv, cwd=folder, env=env, capture_output=True, text=True, timeout=300)
            runs.append((f"{script} {shlex.join(args)}", done))
    return page, runs, written_files(folder) - before


@pytest.mark.slow
def test_every_toy_command_of_the_page_runs_shortened_and_exits_0(toy_run):
    page, runs, _ = toy_run
    for command, done in runs:
        assert done.returncode == 0, f"{page.name}: {command}\n{done.stderr[-3000:]}"


@pytest.mark.slow
def test_every_file_the_page_toy_commands_write_is_git_ignored(toy_run):
    page, _, written = toy_run
    names = [str(path) for path in sorted(written)]
    check = ["git", "check-ignore", "--no-index", "--stdin"]
    ignored = subprocess.run(check, cwd=ROOT, input="\n".join(names), capture_output=True, text=True).stdout
    assert sorted(set(names) - set(ignored.splitlines())) == [], f"{page.name}: files .gitignore lets through"


def test_the_pages_hold_the_toy_walkthrough():
    """The README's and docs/toy.md's toy commands are found: a parsing slip cannot empty the tests above."""
    assert {ROOT / "README.md", ROOT / "docs" / "toy.md"} <= set(TOY_PAGES)


@pytest.mark.parametrize("script, args", flux_commands())
def test_every_flux_command_of_the_docs_parses(script, args):
    PARSERS[script]().parse_args(args)


def test_the_example_scene_is_the_one_its_readme_command_draws():
    shipped = np.asarray(Image.open(ROOT / "toy" / "examples" / "scene.png").convert("RGB"))
    assert np.array_equal(shipped, np.asarray(render(random_scene(random.Random(3)))))
