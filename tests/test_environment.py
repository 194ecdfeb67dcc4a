"""The declared environment matches what the code and the tests use.

- every fast-moving dependency has an upper bound, and the installed version lies within the bounds;
- every third-party module that a test imports comes with ``pip install -e ".[test]"`` (directly or as
  a dependency of a declared package), so CI runs every test;
- ``environment.yml`` installs the same thing as the README's pip commands;
- the oldest Python that ``requires-python`` allows can run these checks too (``tomli`` stands in for
  ``tomllib`` before 3.11).
"""

import ast
import re
import sys
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10, which requires-python allows: the same parser from its backport (in the test extra)
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
FAST_MOVING = {"torch": None, "lightning": None, "transformers": None, "peft": None, "jsonargparse": None,
               "datasets": "hub", "trl": "bench", "wandb": "wandb", "mlflow": "mlflow", "mkdocs": "docs",
               "mkdocs-material": "docs", "mkdocstrings": "docs"}  # package -> extra that declares it (None: core)


def requirements(extra: str | None) -> dict[str, Requirement]:
    listed = PYPROJECT["dependencies"] if extra is None else PYPROJECT["optional-dependencies"][extra]
    return {canonicalize_name(Requirement(text).name): Requirement(text) for text in listed}


def installed(name: str) -> Version | None:
    try:
        return Version(metadata.version(name))
    except metadata.PackageNotFoundError:
        return None


@pytest.mark.parametrize("name, extra", FAST_MOVING.items())
def test_fast_moving_dependencies_are_bounded_and_the_installed_version_fits(name, extra):
    requirement = requirements(extra)[name]
    assert any(spec.operator in ("<", "<=", "==", "~=") for spec in requirement.specifier), requirement
    version = installed(name)
    if version is None:
        pytest.skip(f"{name} is not installed here")
    assert requirement.specifier.contains(version, prereleases=True), f"{name} {version} outside {requirement}"


def test_datasets_is_optional():
    assert "datasets" not in requirements(None)


def closure(requested: dict[str, set[str]]) -> set[str]:
    """Distributions installed by the requested ``{name: extras}``, following installed metadata."""
    seen: set[str] = set()
    todo = [(name, extras) for name, extras in requested.items()]
    while todo:
        name, extras = todo.pop()
        key = (name, frozenset(extras))
        if key in seen:
            continue
        seen.add(key)
        try:
            required = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for text in required:
            requirement = Requirement(text)
            environments = [{"extra": extra} for extra in extras] or [{"extra": ""}]
            if requirement.marker is None or any(requirement.marker.evaluate(env) for env in environments):
                todo.append((canonicalize_name(requirement.name), set(requirement.extras)))
    return {name for name, _ in seen}


def declared_test_install() -> dict[str, set[str]]:
    """``{distribution: extras}`` of ``pip install -e ".[test]"``, the project's self-references expanded."""
    requested: dict[str, set[str]] = {}
    extras_todo, extras_done = [None, "test"], set()
    while extras_todo:
        extra = extras_todo.pop()
        if extra in extras_done:
            continue
        extras_done.add(extra)
        for name, requirement in requirements(extra).items():
            if name == "cepo":
                extras_todo.extend(requirement.extras)
            else:
                requested.setdefault(name, set()).update(requirement.extras)
    return requested


def imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            modules.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "importorskip" and node.args:
            if isinstance(node.args[0], ast.Constant):
                modules.add(str(node.args[0].value).split(".")[0])
    return modules


def not_for_this_python() -> set[str]:
    """Modules declared in the test extra for other Pythons only (``tomli; python_version < "3.11"``): the
    tests import them on those Pythons alone, so here they need not be installed."""
    return {name for name, requirement in requirements("test").items()
            if requirement.marker is not None and not requirement.marker.evaluate()}


def test_every_module_the_tests_import_comes_with_the_test_extra():
    tests = ROOT / "tests"
    local = {"cepo", "tests", "conftest"} | {path.stem for path in tests.glob("*.py")}
    local |= {path.parent.name for path in tests.glob("*/__init__.py")}  # helper packages such as tests/helpers
    local |= {path.stem for path in (ROOT / "benchmarks").glob("*.py")}  # benchmark scripts some tests import
    third_party = set()
    for path in sorted((ROOT / "tests").glob("*.py")):
        third_party |= imported_modules(path) - local - set(sys.stdlib_module_names) - {"__future__"}
    provided = closure(declared_test_install())
    distributions = metadata.packages_distributions()
    missing = {}
    for module in sorted(third_party - not_for_this_python()):
        names = {canonicalize_name(name) for name in distributions.get(module, [])}
        if not names & provided:
            missing[module] = sorted(names) or "not installed"
    assert not missing, f"imported by tests but not installed by .[test]: {missing}"


def test_the_test_extra_holds_the_hub_and_notebook_tools():
    names = set(declared_test_install())
    expected = {"pytest", "hypothesis", "datasets", "nbclient", "nbformat", "ipykernel", "matplotlib", "pandas", "trl",
                "wandb", "mlflow", "mkdocs", "mkdocs-material", "mkdocstrings"}
    assert expected <= names


def test_environment_yml_installs_what_the_readme_installs():
    environment = yaml.safe_load((ROOT / "environment.yml").read_text(encoding="utf-8"))
    entries = environment["dependencies"]
    python = next(entry for entry in entries if isinstance(entry, str) and entry.startswith("python="))
    assert SpecifierSet(PYPROJECT["requires-python"]).contains(python.split("=")[1] + ".0")
    pip = next(entry["pip"] for entry in entries if isinstance(entry, dict))
    assert "-e .[test]" in pip
    torch_pin = Requirement(next(line for line in pip if line.startswith("torch")))
    pinned = Version(next(iter(torch_pin.specifier)).version)
    assert requirements(None)["torch"].specifier.contains(pinned)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert re.search(rf"pip install torch=={re.escape(str(pinned))} ", readme), "README and environment.yml differ"


def test_the_oldest_allowed_python_has_a_toml_parser():
    # requires-python admits 3.10, where tomllib does not exist: the test extra must bring tomli there.
    oldest = min(spec.version for spec in SpecifierSet(PYPROJECT["requires-python"]) if spec.operator == ">=")
    tomli = requirements("test").get("tomli")
    if Version(oldest) < Version("3.11"):
        assert tomli is not None and tomli.marker is not None, "add 'tomli>=1.1; python_version < \"3.11\"' to test"
        assert tomli.marker.evaluate({"python_version": oldest}) and not tomli.marker.evaluate({"python_version": "3.11"})
