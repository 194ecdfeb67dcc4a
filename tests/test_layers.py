"""The package's layers, as the README's Layout section draws them: a module imports only from its own
package and from lower layers, never from a peer or a higher one."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "cepo"

# Bottom to top; the one statement of the layer order. Packages on one line are peers and do not import
# each other. "cepo" is the package's __init__ (its exports are imported lazily, by name).
LAYERS = [
    ("cepo.records", "cepo.registry"),
    ("cepo.answers", "cepo.rollout"),  # cepo.rollout: the old import path of Rollout
    ("cepo.data", "cepo.policy", "cepo.rl"),
    ("cepo.assets", "cepo.coherence"),
    ("cepo.rewards", "cepo.evaluation"),
    ("cepo.training",),
    ("cepo.experiments", "cepo.cli", "cepo"),
    ("cepo.__main__",),
]
LAYER = {unit: level for level, units in enumerate(LAYERS) for unit in units}


def unit_of_file(path: Path) -> str:
    """The layer unit of a source file: its top package below cepo, or the top-level module itself."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts == ("cepo", "__init__"):
        return "cepo"
    return ".".join(parts[:2])


def unit_of_import(module: str) -> str | None:
    if module != "cepo" and not module.startswith("cepo."):
        return None
    parts = module.split(".")
    return ".".join(parts[:2])


def cepo_imports(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every import of a cepo module in ``path``, at any depth (lazy imports count)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "cepo":  # from cepo import x: x may be a subpackage
                found += [(node.lineno, f"cepo.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, node.module))
    return [(line, module) for line, module in found if unit_of_import(module) is not None]


def violations(files, unit_of=unit_of_file) -> list[str]:
    """Every import in ``files`` of a peer or a higher layer (``unit_of(path)``: the file's layer unit)."""
    out = []
    for path in files:
        unit = unit_of(path)
        for line, module in cepo_imports(path):
            target = unit_of_import(module)
            if target != unit and (target not in LAYER or LAYER[target] >= LAYER[unit]):
                out.append(f"{path.name}:{line} ({unit}, layer {LAYER[unit]}) imports {module} "
                           f"({target}, layer {LAYER.get(target, 'unknown')})")
    return out


def source_files():
    return sorted(PACKAGE.rglob("*.py"))


def test_every_package_has_a_layer():
    units = {unit_of_file(path) for path in source_files()}
    missing = sorted(units - set(LAYER))
    assert not missing, f"give {missing} a place in LAYERS (and in the README's Layout section)"


def test_no_module_imports_a_peer_or_a_higher_layer():
    assert violations(source_files()) == []


def test_an_upward_or_peer_import_is_caught(tmp_path):
    # The checker itself, on snippets judged as files of cepo/rl: importing the training layer (upward, at
    # module level) and the data layer (a peer, inside a function) are reported; its own package and a
    # lower layer are not.
    snippet = tmp_path / "snippet.py"
    snippet.write_text(
        "import torch\nfrom cepo.training.module import CEPOModule\nfrom cepo.rl import kl\n"
        "from cepo.registry import Registry\n\ndef f():\n    from cepo.data.prompts import render_prompt\n"
    )
    found = violations([snippet], unit_of=lambda path: "cepo.rl")
    assert [line.split(" ")[0] for line in found] == ["snippet.py:2", "snippet.py:7"]


@pytest.mark.parametrize("module", ["cepo.rl", "cepo.records", "cepo.answers", "cepo.registry"])
def test_lower_layers_import_without_lightning_or_peft(module):
    code = f"import sys, {module}; print(sorted(m for m in ('lightning', 'peft') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", f"import {module} loaded {out.stdout.strip()}"
