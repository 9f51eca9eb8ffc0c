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
