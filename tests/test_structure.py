"""The package's structure stays what docs/DESIGN.md says: no import cycle between its modules, and
backends read buckets only through BucketView (no private Bucket fields, nothing cached on the
bucket)."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "tvlars_fused"


def module_graph() -> dict:
    """{module: modules it imports at module scope} for the package's relative imports (a
    `from .. import x` counts as importing the submodule x, not the package body)."""
    mods = {}
    for path in ROOT.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts)
        mods[name[:-len(".__init__")] if name.endswith(".__init__") else name] = path
    graph = {}
    for name, path in mods.items():
        pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.level:
                base = pkg.split(".")[:len(pkg.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                subs = {f"{target}.{a.name}" for a in node.names} & set(mods)
                deps |= subs or ({target} & set(mods))
        graph[name] = deps - {name}
    return graph


def test_no_import_cycles():
    graph = module_graph()
    assert "tvlars_fused.buckets" in graph and graph["tvlars_fused.stats"] == {"tvlars_fused.abi"}
    state = {}

    def visit(n, stack):
        state[n] = "open"
        for d in sorted(graph[n]):
            assert state.get(d) != "open", "import cycle: " + " -> ".join(stack + [d])
            if d not in state:
                visit(d, stack + [d])
        state[n] = "done"

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])


def test_backends_use_the_bucket_view_only():
    """kernels/ never touches a private field of a bucket (`b._seg_rows`, `bucket._rows`, ...) nor
    sets attributes on it; per-bucket plans go through BucketView.plan."""
    for path in (ROOT / "kernels").glob("*.py"):
        text = path.read_text()
        assert not re.search(r"\b(b|bucket|view)\._\w", text), f"{path.name} reads a private bucket field"
        assert not re.search(r"\b(b|bucket)\.\w+\s*=[^=]", text), f"{path.name} sets an attribute on a bucket"
