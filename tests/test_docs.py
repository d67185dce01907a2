"""The documentation stays inside the project and true to the code.

- Nothing a user receives (README, package, configs, scripts, docs, benchmarks, notebooks) refers to files
  outside the repository (a ``../`` path must name something the repository holds): the method lives in
  ``docs/method.md``.
- Every config key and every repository path that the docs pages name exists; every relative link and image
  of README.md and ``docs/`` resolves; the README stays a short page that links every docs page.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
from pathlib import Path

import pytest

from stitching import rundir as R
from stitching.config import SECTIONS

ROOT = Path(__file__).resolve().parent.parent
METHOD = ROOT / "docs" / "method.md"
#: the pages a user reads (the figures' generated captions / tables are checked by the study tests)
PAGES = [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").rglob("*.md") if "figures" not in p.parts)]
LINK = re.compile(r"\]\(([^)\s]+)\)")
SHIPPED = ["README.md", "stitching", "configs", "scripts", "docs", "benchmarks", "notebooks"]
# a relative path that climbs out of its folder: it must end in a path the repository holds
PARENT_PATH = re.compile(r"(?:\.\./)+([\w.-]+(?:/[\w.-]+)*)")


def _shipped_files() -> list[Path]:
    """Tracked files and new files git does not ignore, under :data:`SHIPPED` (a plain walk without git)."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", *SHIPPED],
                             cwd=ROOT, capture_output=True, text=True, check=True).stdout
        files = [ROOT / line for line in out.splitlines() if line]
    except (OSError, subprocess.CalledProcessError):
        files = [p for name in SHIPPED for p in ([ROOT / name] if (ROOT / name).is_file()
                                                 else (ROOT / name).rglob("*"))]
    return [f for f in files if f.is_file()]


def _outside(line: str, repo_paths: list[str]) -> list[str]:
    """The ``../`` paths of ``line`` that name nothing in the repository (a folder beside the checkout,
    notes users never get)."""
    return [m for m in PARENT_PATH.findall(line)
            if not any(p == m or p.endswith("/" + m) or p.startswith(m + "/") or f"/{m}/" in p
                       for p in repo_paths)]


def test_the_outside_check_can_fail():
    repo = ["configs/paper/imagenet.yaml", "docs/method.md"]
    assert _outside("base: ../paper/imagenet.yaml  (see ../docs/method.md)", repo) == []
    assert _outside("method: ../notes/method_notes.md", repo) == ["notes/method_notes.md"]


def test_nothing_shipped_refers_outside_the_project():
    files = _shipped_files()
    assert any(f.name == "method.md" for f in files) and any(f.suffix == ".py" for f in files)
    repo_paths = [f.relative_to(ROOT).as_posix() for f in files]
    hits = []
    for path in files:
        data = path.read_bytes()
        if b"\0" in data:          # a binary file (a figure): its bytes may spell anything
            continue
        text = data.decode("utf-8", errors="ignore")
        for n, line in enumerate(text.splitlines(), 1):
            if _outside(line, repo_paths):
                hits.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()[:100]}")
    assert not hits, "refers to files outside the project (point to docs/method.md instead):\n" + "\n".join(hits)


def test_readme_points_to_the_method():
    assert "docs/method.md" in (ROOT / "README.md").read_text()


def _method_text() -> str:
    return METHOD.read_text()


def _pages_text() -> str:
    return "\n".join(p.read_text() for p in PAGES)


def test_config_keys_named_in_the_docs_exist():
    named = set(re.findall(r"`((?:model|data|train|output)\.[a-z_]+)\b(?!\()", _pages_text()))
    assert {"model.adapter_style", "train.frozen_bn", "model.resize", "model.schedule"} <= named
    fields = {f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
    assert sorted(named - fields - {R.MODEL, R.LOG}) == []       # less the run directory's files


def test_paths_named_in_the_docs_exist():
    named = set(re.findall(r"`((?:stitching|configs|scripts|benchmarks|docs|tests|notebooks)/[\w./*-]*)`",
                           _pages_text()))
    assert "configs/paper/imagenet_code.yaml" in named and "stitching/stitch/cost.py" in named
    missing = [p for p in sorted(named) if not list(ROOT.glob(p.rstrip("/")))]
    assert missing == []


@pytest.mark.parametrize("config", ["resnet50_1to4_bottleneck", "resnet50_1to2_bottleneck",
                                    "resnet50_to_swin_t_1to3", "imagenet", "imagenet_code"])
def test_configs_named_in_the_method_load(config):
    from stitching.validate import load_config

    assert f"configs/paper/{config}.yaml" in _method_text()
    load_config(ROOT / "configs" / "paper" / f"{config}.yaml", ["model.pretrained=false"])


def _broken_links(page: Path) -> list[str]:
    """The relative links and images of ``page`` whose file is not in the repository (anchors ignored)."""
    broken = []
    for target in LINK.findall(page.read_text()):
        if target.startswith(("http://", "https://", "mailto:", "#")):
            continue
        if not (page.parent / target.split("#", 1)[0]).exists():
            broken.append(target)
    return broken


def test_the_link_check_can_fail(tmp_path):
    page = tmp_path / "docs" / "page.md"
    page.parent.mkdir()
    (tmp_path / "docs" / "there.md").write_text("x")
    page.write_text("[a](there.md) [b](there.md#part) [c](../docs/gone.md) ![d](figures/x.png) [e](https://x.org)")
    assert _broken_links(page) == ["../docs/gone.md", "figures/x.png"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    assert _broken_links(page) == []


def test_the_readme_is_a_short_page_that_links_every_docs_page():
    readme = ROOT / "README.md"
    assert len(readme.read_text().splitlines()) <= 200
    linked = {(ROOT / t.split("#", 1)[0]).resolve() for t in LINK.findall(readme.read_text())}
    assert [p.relative_to(ROOT).as_posix() for p in PAGES[1:] if p.resolve() not in linked] == []
