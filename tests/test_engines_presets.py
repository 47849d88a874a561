"""Training presets: shipped as package data, found by name, the top-level copy kept equal."""

from __future__ import annotations

import tomllib
from fnmatch import fnmatch
from importlib import resources
from pathlib import Path

import pytest

from pipeline.engines import DEFAULT_CONFIG, TrainConfig, find_preset, preset_names

REPO = Path(__file__).resolve().parents[1]
#: The presets users and docs point at (``configs/``) and their home inside the package.
TOP_LEVEL = REPO / "configs"
PACKAGED = REPO / "pipeline" / "configs"


def test_top_level_configs_are_byte_for_byte_the_packaged_presets():
    top = {p.name: p.read_bytes() for p in TOP_LEVEL.glob("*.json")}
    packaged = {p.name: p.read_bytes() for p in PACKAGED.glob("*.json")}
    assert sorted(top) == sorted(packaged), "configs/ and pipeline/configs/ hold other presets"
    differ = [name for name in top if top[name] != packaged[name]]
    assert differ == [], (f"edit the presets in pipeline/configs/ and copy them: "
                          f"cp pipeline/configs/*.json configs/ ({differ})")


def test_every_preset_resolves_by_name_from_the_package(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no repository folder to fall back on
    names = preset_names()
    assert names == sorted(p.stem for p in TOP_LEVEL.glob("*.json"))
    assert DEFAULT_CONFIG in names
    package = resources.files("pipeline")
    for name in names:
        for spelling in (name, f"{name}.json"):
            found = find_preset(spelling)
            assert str(found) == str(package / "configs" / f"{name}.json")
            assert found.read_bytes() == (TOP_LEVEL / f"{name}.json").read_bytes()
        by_name = TrainConfig.from_json(name, mode="joint")
        assert by_name == TrainConfig.from_json(TOP_LEVEL / f"{name}.json", mode="joint")


def test_a_file_takes_precedence_and_an_unknown_name_lists_the_presets(tmp_path,
                                                                         monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cpu").write_text('{"epochs": 3}')
    assert TrainConfig.from_json("cpu").epochs == 3
    assert find_preset(tmp_path / "cpu") == tmp_path / "cpu"
    with pytest.raises(ValueError, match=r"no preset of that name: camus_cpu, .*paper"):
        TrainConfig.from_json("no_such_preset")


def test_the_wheel_ships_every_preset():
    """The package-data globs of pyproject.toml take every packaged preset into a wheel."""
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    globs = setuptools["package-data"]["pipeline"]
    for path in PACKAGED.glob("*.json"):
        relative = path.relative_to(REPO / "pipeline").as_posix()
        assert any(fnmatch(relative, pattern) for pattern in globs), relative
