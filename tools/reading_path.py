"""The reading-path rule (docs/contributing.md): prints the counts it checks, and exits 1 when one is over.

    python tools/reading_path.py          # the two reading-path counts, the longest functions, any violation

1. The reading path stays small: the model math and the IC-LoRA core each have a budget of code lines
   (docstrings, comments and blank lines excluded). Everything else is judged by clarity, not by length.
2. Every function outside tests/ is at most 50 lines from `def` to its last line (a nested function counts
   in its parent) and takes at most 10 parameters. The two recipes a reader follows step by step may be
   longer, and so may an argument parser made of `add_argument` calls (at least 3/4 of its statements).
3. ruff's C901 holds every function to complexity 12; the two recipes carry a `noqa: C901`, held to 20 here.
"""

import ast
import io
import subprocess
import sys
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL_MATH = ["minflux/layers.py", "minflux/model.py", "minflux/sampling.py", "minflux/autoencoder.py",
              "minflux/t5.py", "minflux/clip.py"]
ICLORA_CORE = ["iclora/lora.py", "iclora/training.py", "iclora/panels.py", "iclora/references.py"]
READING_PATH = {"model math": (700, MODEL_MATH), "IC-LoRA core": (450, ICLORA_CORE)}
CHECKED = ["minflux", "iclora", "toy", "bench", "tools", "train.py", "sample.py", "bench.py"]
MAX_LINES = 50
MAX_PARAMETERS = 10
MAX_COMPLEXITY = 12
# the recipes read top to bottom as numbered steps: (file, function) -> (lines, complexity)
RECIPES = {("train.py", "train"): (120, 20), ("sample.py", "main"): (100, 20)}


def code_lines(path: Path) -> int:
    """Lines holding code: not blank, not only a comment, not part of a docstring."""
    source = path.read_text()
    docstring_lines = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            first = node.body[0] if node.body else None
            is_docstring = (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                            and isinstance(first.value.value, str))
            if is_docstring:
                docstring_lines.update(range(first.lineno, first.end_lineno + 1))
    lines_with_code = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        skipped = (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                   tokenize.ENDMARKER)
        if token.type in skipped:
            continue
        lines_with_code.update(range(token.start[0], token.end[0] + 1))
    return len(lines_with_code - docstring_lines)


def python_files() -> list[Path]:
    files = []
    for name in CHECKED:
        path = ROOT / name
        files.extend(sorted(path.rglob("*.py")) if path.is_dir() else [path])
    return [f for f in files if f.exists()]


def is_parser(function: ast.FunctionDef) -> bool:
    """Whether three quarters of the function's statements at least are `....add_argument(...)` calls."""
    statements = [node for node in ast.walk(function) if isinstance(node, ast.stmt) and node is not function]
    calls = 0
    for node in statements:
        is_call = isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)
        if is_call and isinstance(node.value.func, ast.Attribute) and node.value.func.attr == "add_argument":
            calls += 1
    return bool(statements) and calls >= 0.75 * len(statements)


def parameter_count(function: ast.FunctionDef) -> int:
    """Its parameters, *args and **kwargs included, self and cls not."""
    args = function.args
    names = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
    names += [a.arg for a in (args.vararg, args.kwarg) if a is not None]
    return len([name for name in names if name not in ("self", "cls")])


def outer_functions(node: ast.AST) -> list[ast.FunctionDef]:
    """The functions under `node` that are not inside another function: module functions and methods."""
    found = []
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found.append(child)  # its nested functions count in its own lines
        else:
            found.extend(outer_functions(child))
    return found


def functions(path: Path) -> list[tuple[str, int, int, bool]]:
    """(name, lines, parameters, is_parser) of each function not inside another function (methods too)."""
    found = []
    for function in outer_functions(ast.parse(path.read_text())):
        lines = function.end_lineno - function.lineno + 1
        found.append((function.name, lines, parameter_count(function), is_parser(function)))
    return found


def recipe_complexity() -> dict:
    """McCabe complexity of the two recipes, from ruff (which their noqa would otherwise silence)."""
    files = sorted({ROOT / file for file, _ in RECIPES})
    command = [sys.executable, "-m", "ruff", "check", "--isolated", "--ignore-noqa", "--select", "C901",
               "--config", "lint.mccabe.max-complexity=0", "--output-format", "concise", *map(str, files)]
    try:
        output = subprocess.run(command, capture_output=True, text=True, cwd=ROOT).stdout
    except FileNotFoundError:
        return {}
    found = {}
    for line in output.splitlines():  # path:row:col: C901 `name` is too complex (N > 0)
        if "C901" not in line:
            continue
        path = Path(line.split(":")[0]).resolve().relative_to(ROOT).as_posix()
        name = line.split("`")[1]
        found[(path, name)] = int(line.split("(")[-1].split(" ")[0])
    return found


def main() -> int:
    problems = []
    for label, (limit, files) in READING_PATH.items():
        count = sum(code_lines(ROOT / f) for f in files)
        print(f"{label}: {count} code lines (limit {limit}): {', '.join(files)}")
        if count > limit:
            problems.append(f"{label} is {count} code lines, over its {limit}")
    rows = []
    for path in python_files():
        relative = path.relative_to(ROOT).as_posix()
        for name, lines, parameters, parser in functions(path):
            line_limit = RECIPES.get((relative, name), (MAX_LINES, 0))[0]
            rows.append((lines, f"{relative}:{name}"))
            if lines > line_limit and not parser:
                problems.append(f"{relative}:{name} is {lines} lines, over {line_limit}")
            if parameters > MAX_PARAMETERS:
                problems.append(f"{relative}:{name} takes {parameters} parameters, over {MAX_PARAMETERS}")
    print("longest functions:")
    for lines, name in sorted(rows, reverse=True)[:5]:
        print(f"  {lines:4d}  {name}")
    complexity = recipe_complexity()
    for (file, name), (_, limit) in RECIPES.items():
        value = complexity.get((file, name))
        print(f"complexity of {file}:{name}: {value if value is not None else '?'} (limit {limit})")
        if value is not None and value > limit:
            problems.append(f"{file}:{name} has complexity {value}, over {limit}")
    for problem in problems:
        print(f"error: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
