import importlib
import pkgutil

import pytest

import convert
import minference_jax
import pallas_kernels


def _modules():
    for package in (minference_jax, pallas_kernels, convert):
        yield package.__name__
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if not info.name.endswith("__main__"):
                yield info.name


@pytest.mark.parametrize("name", sorted(_modules()))
def test_every_module_imports(name):
    importlib.import_module(name)


def test_public_api_names_exist():
    for name in minference_jax.__all__:
        assert hasattr(minference_jax, name), name
