"""pyproject.toml installs quietly and ships what the package needs at run time (issue 15)."""

from __future__ import annotations

import warnings

import pytest

from tests.conftest import REPO


def test_pyproject_applies_without_deprecation_warnings():
    setuptools = pytest.importorskip("setuptools")
    from setuptools.config.pyprojecttoml import apply_configuration

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dist = apply_configuration(setuptools.Distribution(), REPO / "pyproject.toml")
    messages = [str(w.message) for w in caught if issubclass(w.category, Warning)]
    assert not [m for m in messages if "deprecated" in m.lower()], messages
    assert dist.get_license() == "Apache-2.0" or dist.metadata.license_expression == "Apache-2.0"
    # the page microbert-serve answers GET / with travels as package data
    assert "static/*" in dist.package_data["serve"]
    assert {p.name for p in (REPO / "serve" / "static").iterdir()} >= {"index.html", "page.js"}
