"""The shape the code keeps (bench/code_shape.py): no class of more than 20 methods (`Keys`, a method per Redis key,
aside), no function of more than 60 lines, no constructor of more than 8 parameters. A change that grows past one
of them is seen here, not at the next measurement by hand."""

from pathlib import Path

from bench.code_shape import measure

SERVICES = Path(__file__).resolve().parent.parent / "services"


def test_the_services_keep_their_shape():
    shape = measure(SERVICES, most=10_000)
    classes = [(n, where) for n, where in shape["largest classes (methods)"] if not where.endswith(":Keys")]
    assert [c for c in classes if c[0] > 20] == []
    assert [f for f in shape["longest functions (lines)"] if f[0] > 60] == []
    assert [c for c in shape["constructors (parameters)"] if c[0] > 8] == []


def test_the_lines_are_told_apart_by_kind(tmp_path):
    """Code, docstrings, comments and blank lines add up to the lines; the least lines keep one line of each
    docstring and the blank lines ruff's format requires (two before a top-level definition, one before each method
    but a class's first with no docstring above it)."""
    (tmp_path / "module.py").write_text(
        '"""A module,\n\nin three lines."""\n'
        "\n"
        "# why\n"
        "VALUE = 1\n"
        "\n"
        "\n"
        "class Thing:\n"
        '    """One line."""\n'
        "\n"
        "    def first(self):\n"
        "        return VALUE  # a trailing comment is code's line\n"
        "\n"
        "    def second(self):\n"
        '        """Two\n        lines."""\n'
        "        return 2\n"
    )
    shape = measure(tmp_path)
    kinds = shape["lines by kind"]
    assert kinds == {"code": 6, "docstrings": 6, "comments": 1, "blank": 5, "least lines": 6 + 3 + 2 + 2}
    assert shape["lines"] == sum(kinds[k] for k in ("code", "docstrings", "comments", "blank"))
