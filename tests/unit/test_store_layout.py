"""The store package's layering: the port and its helpers know no adapter, and the S3 SDK loads only when asked for."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import services.common.store as store_pkg

PACKAGE = "services.common.store"
PACKAGE_DIR = Path(store_pkg.__file__).parent
# Lower layers first; a module may import only modules of a lower layer.
LAYERS = [{"errors"}, {"helpers"}, {"port", "policies"}, {"local", "s3"}, {"factory"}]


def _package_imports(module: str) -> set[str]:
    """The sibling modules ``module`` imports (at any depth of its code, lazy imports included)."""
    tree = ast.parse((PACKAGE_DIR / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            if name.startswith(PACKAGE + "."):
                found.add(name[len(PACKAGE) + 1 :].split(".")[0])
            elif name == PACKAGE:
                found.add("__init__")
    return found


def test_every_module_of_the_store_imports_only_lower_layers() -> None:
    modules = {p.stem for p in PACKAGE_DIR.glob("*.py")} - {"__init__"}
    assert modules == set().union(*LAYERS)  # a new module gets a place in the layering
    layer_of = {m: i for i, layer in enumerate(LAYERS) for m in layer}
    for module in modules:
        for imported in _package_imports(module):
            assert imported != "__init__", f"{module} imports the package face; import the module itself"
            assert layer_of[imported] < layer_of[module], f"{module} imports {imported}"


def test_importing_the_store_does_not_load_the_s3_sdk() -> None:
    code = "import sys, services.common.store; print('minio' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
