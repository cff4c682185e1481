"""The package's layers: the core imports neither the baselines nor the harness, the baselines never import the
harness (read from each module's import statements, lazy ones inside functions included)."""
import ast
from pathlib import Path

import pytest

import scalabl_pyro

ROOT = Path(scalabl_pyro.__file__).parent


def _package_imports(path: Path) -> set[str]:
    """Absolute names (``scalabl_pyro.harness.data``) of the package modules ``path`` imports."""
    pkg = ["scalabl_pyro", *path.parent.relative_to(ROOT).parts]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[:len(pkg) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            names = [name] if node.module else [f"{name}.{a.name}" for a in node.names]
            out.update(n for n in names if n.startswith("scalabl_pyro"))
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("scalabl_pyro"))
    return out


def _modules(sub: str | None):
    folder = ROOT / sub if sub else ROOT
    return sorted(p for p in folder.glob("*.py") if p.name not in ("__init__.py", "__main__.py"))


@pytest.mark.parametrize("path", _modules(None), ids=lambda p: p.stem)
def test_core_modules_import_only_the_core(path):
    bad = sorted(n for n in _package_imports(path) if n.startswith(("scalabl_pyro.harness", "scalabl_pyro.baselines")))
    assert not bad, f"scalabl_pyro/{path.name} (core) imports {bad}"


@pytest.mark.parametrize("path", _modules("baselines"), ids=lambda p: p.stem)
def test_baselines_never_import_the_harness(path):
    bad = sorted(n for n in _package_imports(path) if n.startswith("scalabl_pyro.harness"))
    assert not bad, f"scalabl_pyro/baselines/{path.name} imports {bad}"


def test_the_checker_sees_relative_and_lazy_imports(tmp_path):
    """The rule above can fail: a lazy relative import of the harness from a core-level file is found."""
    (tmp_path / "scalabl_pyro").mkdir()
    f = tmp_path / "scalabl_pyro" / "mod.py"
    f.write_text("from .config import ScalaBLConfig\n\ndef g():\n    from .harness.data import load_task\n")
    global ROOT
    saved, ROOT = ROOT, tmp_path / "scalabl_pyro"
    try:
        assert _package_imports(f) == {"scalabl_pyro.config", "scalabl_pyro.harness.data"}
    finally:
        ROOT = saved
