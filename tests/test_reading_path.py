"""The reading-path rule (docs/contributing.md) holds for the repository, and tools/reading_path.py measures
what it says: code lines without docstrings or comments, functions with their nested functions inside."""

import ast
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import reading_path  # noqa: E402 (tools/ is not a package)

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, source: str) -> Path:
    path = tmp_path / "example.py"
    path.write_text(textwrap.dedent(source))
    return path


@pytest.mark.slow
def test_the_repository_keeps_the_reading_path_rule():
    run = subprocess.run([sys.executable, "tools/reading_path.py"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_code_lines_leave_out_docstrings_comments_and_blank_lines(tmp_path):
    path = write(tmp_path, '''
        """A module docstring
        over two lines."""

        # a comment
        def f(x):
            """A function docstring."""
            y = x + 1  # a trailing comment keeps its line

            return (y,
                    y)
        ''')
    assert reading_path.code_lines(path) == 4  # def, y = ..., and the return's two lines


def test_a_nested_function_counts_in_its_parent(tmp_path):
    path = write(tmp_path, """
        def outer():
            def inner():
                return 1
            return inner()
        """)
    assert [(name, lines) for name, lines, _, _ in reading_path.functions(path)] == [("outer", 4)]


def test_parameters_leave_out_self_and_count_starred_ones(tmp_path):
    path = write(tmp_path, """
        class A:
            def method(self, a, b=1, *args, c, **kwargs):
                pass
        """)
    assert [(name, parameters) for name, _, parameters, _ in reading_path.functions(path)] == [("method", 5)]


def test_a_parser_of_add_argument_calls_is_recognised(tmp_path):
    path = write(tmp_path, """
        def build_parser():  # 6 of its 8 statements
            p = make()
            p.add_argument("--a")
            p.add_argument("--b")
            p.add_argument("--c")
            p.add_argument("--d")
            p.add_argument("--e")
            p.add_argument("--f")
            return p

        def not_a_parser():
            p = make()
            p.add_argument("--a")
            return p
        """)
    found = {name: parser for name, _, _, parser in reading_path.functions(path)}
    assert found == {"build_parser": True, "not_a_parser": False}


def test_the_reading_guides_line_ranges_are_the_functions_they_name():
    guide = (ROOT / "docs" / "reading-guide.md").read_text()
    ranges = re.findall(r"`([\w/]+\.py)` lines\s+(\d+)–(\d+)", guide)
    assert len(ranges) >= 4, "the guide gives the recipes' and the loss's line ranges"
    for file, first, last in ranges:
        tree = ast.parse((ROOT / file).read_text())
        spans = [(node.lineno, node.end_lineno) for node in ast.walk(tree)
                 if isinstance(node, (ast.FunctionDef, ast.ClassDef))]
        assert (int(first), int(last)) in spans, f"{file} lines {first}–{last} is not one function"
