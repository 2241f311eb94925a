"""What `pip install .` ships: every package, the configs, the embedded checkpoint, the version.

The wheel itself is built and installed outside the source tree by CI (.ci/run); these checks
catch, in seconds, a new subpackage or data file the packaging rules would leave out.
"""

import fnmatch
import importlib
import pathlib
import tomllib

import minference_jax
from minference_jax.config_io import shipped_configs

ROOT = pathlib.Path(__file__).parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]


def test_every_package_is_shipped():
    include = SETUPTOOLS["packages"]["find"]["include"]
    for top in ("minference_jax", "pallas_kernels", "convert"):
        for init in (ROOT / top).rglob("__init__.py"):
            name = ".".join(init.parent.relative_to(ROOT).parts)
            assert any(fnmatch.fnmatch(name, pattern) for pattern in include), name
    assert not any(fnmatch.fnmatch(name, p) for p in include for name in ("tests", "benchmarks"))


def test_every_data_file_is_shipped():
    patterns = SETUPTOOLS["package-data"]["minference_jax"]
    package = ROOT / "minference_jax"
    data = [p for d in ("configs", "checkpoints") for p in (package / d).rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in data) and any(p.suffix == ".json" for p in data)
    for path in data:
        relative = pathlib.PurePosixPath(path.relative_to(package).as_posix())
        assert any(relative.match(pattern) for pattern in patterns), relative  # "*": no "/"


def test_version_and_license():
    assert SETUPTOOLS["dynamic"]["version"] == {"attr": "minference_jax.__version__"}
    assert minference_jax.__version__.count(".") == 2
    assert PYPROJECT["project"]["license"] == "MIT"
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")


def test_console_scripts():
    scripts = PYPROJECT["project"]["scripts"]
    assert set(scripts) == {"minference-prefill", "minference-search", "minference-convert"}
    for target in scripts.values():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), target


def test_every_shipped_config_says_where_it_comes_from():
    notes = (ROOT / "minference_jax" / "configs" / "README.md").read_text()
    for name in shipped_configs():
        assert f"`{name}`" in notes, name
    for name in [n for n in shipped_configs() if "searched" in n]:
        section = notes.split(f"`{name}`", 1)[1].split("\n## ", 1)[0]
        assert "minference_jax.search" in section, name  # the command that made it
