"""The documentation site builds with warnings as errors (broken links and anchors, docstrings the API
reference cannot read), every design-notes citation in the code names a section that exists, and CI runs
exactly the README's test set-up line."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CITATION = re.compile(r"docs/design\.md#([\w-]+)")


def design_anchors() -> set[str]:
    return set(re.findall(r"^#+ .*\{#([\w-]+)\}\s*$", (ROOT / "docs" / "design.md").read_text(), flags=re.M))


def code_citations() -> dict[str, set[str]]:
    cited: dict[str, set[str]] = {}
    for folder in ("cepo", "tests", "benchmarks"):
        for path in (ROOT / folder).rglob("*.py"):
            for anchor in CITATION.findall(path.read_text()):
                cited.setdefault(anchor, set()).add(str(path.relative_to(ROOT)))
    return cited


def test_every_design_citation_in_the_code_resolves():
    cited = code_citations()
    assert {"segmenting", "jacobians", "counterfactuals", "combiner"} <= set(cited)
    missing = {anchor: sorted(files) for anchor, files in cited.items() if anchor not in design_anchors()}
    assert not missing, f"code cites design-notes sections that docs/design.md lacks: {missing}"
    # The check bites: a section that is not there is reported.
    assert "no-such-section" not in design_anchors()


def test_no_code_cites_a_design_file_the_repository_lacks():
    stale = [str(path.relative_to(ROOT)) for folder in ("cepo", "tests", "benchmarks")
             for path in (ROOT / folder).rglob("*.py") if path.name != Path(__file__).name
             and re.search(r"DESIGN(\.md| §)|design reference", path.read_text())]
    assert not stale, f"cite docs/design.md#<section> instead: {stale}"


@pytest.mark.slow
def test_the_site_builds_strict_and_offline(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "NO_MKDOCS_2_WARNING": "1", "HF_HUB_OFFLINE": "1"}
    site = tmp_path / "site"
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    # Every page of the navigation is built, and the API reference holds the documented functions.
    for page in ("getting-started", "configs", "reward", "evaluation", "logging", "troubleshooting",
                 "results", "design", "gpu", "api"):
        assert (site / page / "index.html").is_file(), page
    api = (site / "api" / "index.html").read_text()
    assert "power_mean" in api and "channel_score" in api and "log_completions" in api


def readme_test_line() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    (line,) = [line for line in readme.splitlines() if line.startswith("python3 -m venv") and "pytest" in line]
    return [part.strip() for part in line.split("&&")]


def test_ci_runs_the_readmes_test_set_up_line():
    steps = readme_test_line()
    script = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
              if line.strip() and not line.startswith(("#", "set ", "cd "))]
    # CI spells pip as `python -m pip` and keeps it quiet; otherwise the same steps in the same order.
    normalised = [shlex.join(w for w in shlex.split(line.replace("python -m pip", "pip")) if w != "--quiet")
                  for line in script]
    assert normalised == [shlex.join(shlex.split(step)) for step in steps]
