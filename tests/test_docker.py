"""The Dockerfiles stay in step with pyproject.toml and the README (no engine runs here)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = [REPO / "docker" / "Dockerfile.cpu", REPO / "docker" / "Dockerfile.cuda"]


def _install_command() -> str:
    makefile = (REPO / "Makefile").read_text()
    flags = re.search(r"^PIP_FLAGS \?= (.+)$", makefile, re.M).group(1).strip()
    target = re.search(r"pip install \$\(PIP_FLAGS\) (.+)$", makefile, re.M).group(1).strip()
    return f"pip install {flags} {target}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_installs_like_the_readme_and_runs_mmcrf(dockerfile):
    text = dockerfile.read_text()
    assert _install_command() in text
    assert 'ENTRYPOINT ["mmcrf"]' in text
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert "mmcrf" in scripts
    for folder in ("pipeline", "configs", "bundles", "data_manifests"):
        assert re.search(rf"^COPY {folder} \./{folder}$", text, re.M), folder
        assert (REPO / folder).is_dir()
    assert "COPY pyproject.toml README.md ./" in text


def test_readme_and_makefile_agree_on_the_install():
    readme = (REPO / "README.md").read_text()
    assert _install_command() in readme
    assert "make demo" in readme and "make test" in readme


def test_cpu_image_pins_torch_like_pyproject():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_spec = next(d for d in deps if d.startswith("torch"))
    text = DOCKERFILES[0].read_text()
    assert f'ARG TORCH_SPEC="{torch_spec}"' in text


def test_dockerignore_keeps_local_artifacts_out():
    ignored = (REPO / ".dockerignore").read_text().split()
    for entry in (".venv", ".git", "demo_output"):
        assert entry in ignored


def test_ci_runs_the_readmes_make_targets_and_every_marked_test_set():
    ci = [line.split()[1] for line in (REPO / ".ci" / "run").read_text().splitlines()
          if line.startswith("make ")]
    readme = (REPO / "README.md").read_text()
    makefile = (REPO / "Makefile").read_text()
    assert ci[0] == "test"
    for target in ci:
        assert f"`make {target}`" in readme or f"make {target} " in readme, target
        assert re.search(rf"^{target}:", makefile, re.M), target
    # each marker a default run leaves out has a target that CI runs
    left_out = re.search(r'^test: lint\n\t.*pytest -m "([^"]+)"', makefile, re.M).group(1)
    markers = re.findall(r"not (\w+)", left_out)
    assert markers
    for marker in markers:
        runners = [t for t in ci if re.search(rf"^{t}:.*\n(?:\t.*\n)*?\t.*pytest -m \"?{marker}\b",
                                              makefile, re.M)]
        assert runners, f"no CI target runs the {marker} tests"
