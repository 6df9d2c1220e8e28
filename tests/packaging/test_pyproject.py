"""pyproject.toml as setuptools reads it: no deprecation warnings per install, an SPDX license expression.

Oracle: setuptools' own reading of the file (apply_configuration, what a build does), whose
SetuptoolsDeprecationWarning for a `license` table is what printed three times per install.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[2]


def test_setuptools_reads_pyproject_without_deprecations(tmp_path: Path) -> None:
    setuptools = pytest.importorskip("setuptools")
    from packaging.specifiers import SpecifierSet
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    shutil.copy(ROOT / "README.md", tmp_path)  # `readme` is read relative to the project folder
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            dist = apply_configuration(Distribution(), tmp_path / "pyproject.toml")
    finally:
        os.chdir(cwd)
    deprecations = [str(w.message).splitlines()[0] for w in caught if "Deprecat" in type(w.message).__name__]
    assert deprecations == []
    assert dist.metadata.license_expression == "Apache-2.0"
    # the build requirement admits only setuptools versions that understand the SPDX string (PEP 639: 77)
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    spec = SpecifierSet(next(r for r in requires if r.startswith("setuptools"))[len("setuptools") :])
    assert "76.9" not in spec and "77.0" in spec and setuptools.__version__ in spec


def test_gpu_extra_and_torch_floor() -> None:
    """The `gpu` extra carries the CUDA kernels' library; torch's floor is the GPU machines' 2.11 (both
    F.grouped_mm and F.scaled_mm exist there) and admits the torch this suite runs on."""
    import torch
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert any(r.replace(" ", "").startswith("fla-core>=") for r in project["optional-dependencies"]["gpu"])
    torch_req = next(r for r in project["dependencies"] if r.startswith("torch"))
    spec = SpecifierSet(torch_req[len("torch") :])
    assert "2.11.0" in spec and "2.10.2" not in spec
    assert Version(torch.__version__.split("+")[0]) in spec
