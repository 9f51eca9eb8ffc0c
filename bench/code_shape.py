"""The shape of the code, measured: lines of a package, its largest classes (by methods), its longest functions (by
lines) and its constructors with the most parameters. Run by hand, before and after a refactor, side by side:

    python -m bench.code_shape services
    git stash && python -m bench.code_shape services; git stash pop

Lines are physical lines of the .py files (docstrings and comments included, as a reader meets them), then split by
kind: code, docstrings, comments, blank. "least lines" is what the package would keep with every docstring cut to
one line, no comment, and only the blank lines ruff's format requires (two before a top-level definition, one before
each method but a class's first with no docstring above it): how far prose and spacing alone could take the count
down. A dataclass's fields are listed apart from the constructors written out: its generated constructor takes one
parameter a field.
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path


def _line_kinds(text: str, tree: ast.Module) -> dict[str, int]:
    """How many of a module's lines are code, docstrings, comments and blank, and its least lines (as above)."""
    documented = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    docstrings = [
        node.body[0]
        for node in ast.walk(tree)
        if isinstance(node, documented) and ast.get_docstring(node, clean=False) is not None
    ]
    in_docstring = {n for doc in docstrings for n in range(doc.lineno, doc.end_lineno + 1)}
    kinds = {"code": 0, "docstrings": len(in_docstring), "comments": 0, "blank": 0}
    for number, line in enumerate(text.splitlines(), 1):
        if number in in_docstring:
            continue
        kind = "blank" if not line.strip() else "comments" if line.lstrip().startswith("#") else "code"
        kinds[kind] += 1
    definitions = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    top_level = [node for node in tree.body if isinstance(node, definitions)]
    methods = [
        m for node in top_level if isinstance(node, ast.ClassDef) for m in node.body[1:] if isinstance(m, definitions)
    ]
    kinds["least lines"] = kinds["code"] + len(docstrings) + 2 * len(top_level) + len(methods)
    return kinds


def measure(root: Path, most: int = 8) -> dict:
    lines = 0
    kinds = {"code": 0, "docstrings": 0, "comments": 0, "blank": 0, "least lines": 0}
    classes: list[tuple[int, str]] = []
    functions: list[tuple[int, str]] = []
    constructors: list[tuple[int, str]] = []
    records: list[tuple[int, str]] = []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text()
        lines += text.count("\n")
        tree = ast.parse(text)
        for kind, count in _line_kinds(text, tree).items():
            kinds[kind] += count
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                methods = [n for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
                if any("dataclass" in ast.unparse(decorator) for decorator in node.decorator_list):
                    fields = [n for n in node.body if isinstance(n, ast.AnnAssign) and n.simple]
                    records.append((len(fields), f"{path}:{node.name}"))
                classes.append((len(methods), f"{path}:{node.name}"))
                for method in methods:
                    if method.name == "__init__":
                        arguments = method.args
                        count = len(arguments.args) + len(arguments.kwonlyargs) - 1  # without self
                        constructors.append((count, f"{path}:{node.name}"))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions.append((node.end_lineno - node.lineno + 1, f"{path}:{node.name}"))
    return {
        "lines": lines,
        "lines by kind": kinds,
        "largest classes (methods)": sorted(classes, reverse=True)[:most],
        "longest functions (lines)": sorted(functions, reverse=True)[:most],
        "constructors (parameters)": sorted(constructors, reverse=True)[:most],
        "dataclasses (fields: a generated constructor's parameters)": sorted(records, reverse=True)[:most],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("package", nargs="?", default="services")
    parser.add_argument("--most", type=int, default=8)
    options = parser.parse_args(argv)
    for name, value in measure(Path(options.package), options.most).items():
        if isinstance(value, int):
            print(f"{name}: {value}")
            continue
        print(f"{name}:")
        if isinstance(value, dict):
            for kind, count in value.items():
                print(f"  {kind}: {count}")
            continue
        for count, where in value:
            print(f"  {count:4d}  {where}")


if __name__ == "__main__":
    main()
