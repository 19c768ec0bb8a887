"""The shape of the code: a core that never imports Lightning or W&B, entry scripts that nothing imports, no private
name used outside its module, no import cycle."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the installed package's folders and the names they install as (pyproject.toml's package-dir)
PACKAGES = {
    "delta_influence": "delta_influence",
    "callbacks": "delta_influence.callbacks",
    "cli": "delta_influence.cli",
    "datamodules": "delta_influence.datamodules",
    "lightning_modules": "delta_influence.lightning_modules",
}


def _modules() -> dict[str, Path]:
    """Every module of the installed package by its installed name."""
    found = {}
    for folder, name in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            found[".".join((name, *parts))] = path
    return found


def _imports(path: Path, module: str) -> list[tuple[str, list[str], bool]]:
    """(imported module, names imported from it, whether at module level) of every import in a file."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], id(node) in top) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this module's package
                package = module.split(".")[: -node.level if path.name != "__init__.py" else None]
                base = ".".join([*package[: len(package) - node.level + 1], base]).strip(".")
            found.append((base, [alias.name for alias in node.names], id(node) in top))
    return found


def test_the_core_imports_neither_lightning_nor_wandb():
    lightning = {"callbacks", "cli", "datamodules", "lightning_modules", "lightning"}
    core = [name for name in _modules() if name == "delta_influence" or name.split(".")[1] not in lightning]
    assert "delta_influence.correction" in core and "delta_influence.audit" in core
    code = "import sys\n" + "".join(f"import {name}\n" for name in core)
    code += "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pytorch_lightning', 'lightning', 'wandb')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_nothing_imports_the_entry_scripts_or_generic_top_level_names():
    generic = {"train", "unlearn", "callbacks", "cli", "datamodules", "lightning_modules", "common"}
    files = {**_modules(), **{f"benchmarks.{p.stem}": p for p in (ROOT / "benchmarks").glob("*.py")}}
    offenders = [
        f"{module}: {imported}"
        for module, path in files.items()
        for imported, _, _ in _imports(path, module)
        if imported.split(".")[0] in generic
        and not module.startswith("benchmarks.")
        or imported.split(".")[0] in generic - {"common"}
    ]
    assert offenders == []


def test_no_module_uses_another_modules_private_names():
    modules = _modules()
    offenders = [
        f"{module}: {imported}.{name}"
        for module, path in modules.items()
        for imported, names, _ in _imports(path, module)
        for name in names
        if name.startswith("_") and imported in modules and imported != module
    ]
    assert offenders == []


def test_the_package_has_no_import_cycle():
    modules = _modules()
    graph = {}
    for module, path in modules.items():
        graph[module] = set()
        for imported, names, top in _imports(path, module):
            # `from package import module` depends on that module, `from module import name` on the module
            targets = [f"{imported}.{name}" if f"{imported}.{name}" in modules else imported for name in names or [""]]
            graph[module] |= {target for target in targets if top and target in modules and target != module}
    cycles, done, stack = [], set(), []

    def visit(module: str) -> None:
        stack.append(module)
        for target in sorted(graph[module]):
            if target in stack:
                cycles.append(" -> ".join(stack[stack.index(target) :] + [target]))
            elif target not in done:
                visit(target)
        stack.pop()
        done.add(module)

    for module in sorted(graph):
        if module not in done:
            visit(module)
    assert cycles == []
