"""The shape of the code: the import-linter contracts of ``[tool.importlinter]`` in
pyproject.toml (the floors of ARCHITECTURE.md, a training layer that knows nothing of Ray,
MLflow or Optuna, an analysis layer that never imports the study layer, no import circles).

import-linter's graph (grimp) is read from the source, nothing is imported: every import
statement counts, those inside functions (a deferred import is still a dependency) and under
``TYPE_CHECKING`` included. Its ``acyclic_siblings`` contract finds circles between sibling
modules only; a circle through a package's own ``__init__`` (``pkg`` -> ``pkg.mod`` -> ``pkg``)
is looked for here, on the same graph.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import grimp
import pytest
from importlinter.api import read_configuration
from importlinter.application.use_cases import lint_imports

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = str(ROOT / "pyproject.toml")
CONFIG = read_configuration(PYPROJECT)
PACKAGES = CONFIG["session_options"]["root_packages"]


@pytest.fixture(scope="module", autouse=True)
def _packages_of_this_checkout():
    """grimp finds the packages on ``sys.path``: they must be this checkout's (an editable
    install), or another copy would be checked."""
    for package in PACKAGES:
        spec = importlib.util.find_spec(package)
        assert spec and spec.origin and Path(spec.origin).is_relative_to(ROOT), (
            f"{package} is found at {spec and spec.origin}, not in {ROOT}: "
            "pip install -e '.[test]'")


@pytest.mark.parametrize("contract", [c["id"] for c in CONFIG["contracts_options"]])
def test_import_contract_is_kept(contract):
    """`lint-imports --contract CONTRACT`; the broken import chains are in the captured
    output."""
    assert lint_imports(PYPROJECT, limit_to_contracts=(contract,), cache_dir=None,
                        no_logo=True), f"import contract {contract!r} is broken: see stdout"


def circles(graph: grimp.ImportGraph) -> set[tuple[str, ...]]:
    """Every import circle of ``graph``, each as its modules in import order from the
    smallest name: an import ``a -> b`` closes one when a chain leads from ``b`` back to
    ``a``."""
    found = set()
    for importer in graph.modules:
        for imported in graph.find_modules_directly_imported_by(importer):
            back = graph.find_shortest_chain(importer=imported, imported=importer)
            if back:
                circle = (importer, *back[:-1])
                start = circle.index(min(circle))
                found.add(circle[start:] + circle[:start])
    return found


def test_no_import_circles():
    assert circles(grimp.build_graph(*PACKAGES, cache_dir=None)) == set()


def test_circle_finder_finds_a_package_importing_its_own_module():
    """The circles acyclic_siblings leaves out (a parent and its child are no siblings)."""
    graph = grimp.ImportGraph()
    for importer, imported in [("pkg", "pkg.mod"), ("pkg.mod", "pkg"), ("pkg.a", "pkg.mod"),
                               ("x", "y"), ("y", "z"), ("z", "x"), ("w", "x")]:
        graph.add_import(importer=importer, imported=imported)
    assert circles(graph) == {("pkg", "pkg.mod"), ("x", "y", "z")}
