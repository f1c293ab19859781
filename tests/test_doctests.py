"""The ``Examples:`` of every docstring run as doctests, and every public name has one.

``--doctest-modules`` stays off in ``pyproject.toml``: this file collects the package's modules,
runs their doctests with :mod:`doctest` (torch seeded, one thread, warnings as errors as in the
rest of the suite) and fails with the runner's report.
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import io
import pkgutil
from types import ModuleType

import pytest
import torch

import pyro_iresnet

OPTIONFLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE

MODULE_NAMES = sorted(
    [pyro_iresnet.__name__]
    + [info.name for info in pkgutil.walk_packages(pyro_iresnet.__path__, prefix=pyro_iresnet.__name__ + ".")]
)


def _module(name: str) -> ModuleType:
    return importlib.import_module(name)


def _public_objects(module: ModuleType) -> dict[str, object]:
    """The classes and functions of ``module.__all__`` defined in ``module`` (not re-exported)."""
    objects = {}
    for name in getattr(module, "__all__", ()):
        obj = getattr(module, name)
        target = inspect.unwrap(obj) if callable(obj) else obj
        if (inspect.isclass(target) or inspect.isfunction(target)) and target.__module__ == module.__name__:
            objects[name] = obj
    return objects


def _doctests(module: ModuleType) -> list[doctest.DocTest]:
    """Every doctest of ``module``, including public functions the finder skips because a decorator
    (e.g. ``contextmanager``) gave them another module's globals."""
    finder = doctest.DocTestFinder(exclude_empty=True)
    tests = {test.name: test for test in finder.find(module, module.__name__)}
    for name, obj in _public_objects(module).items():
        qualified = f"{module.__name__}.{name}"
        if qualified not in tests:
            for test in finder.find(obj, qualified, module=module, globs=vars(module).copy()):
                tests.setdefault(test.name, test)
    return sorted((test for test in tests.values() if test.examples), key=lambda test: test.name)


@pytest.mark.parametrize("module_name", MODULE_NAMES)
def test_doctests(module_name: str) -> None:
    module = _module(module_name)
    tests = _doctests(module)
    if not tests:
        pytest.skip(f"{module_name} has no doctests")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    runner = doctest.DocTestRunner(optionflags=OPTIONFLAGS)
    report = io.StringIO()
    for test in tests:
        runner.run(test, out=report.write)
    if runner.failures:
        pytest.fail(f"{runner.failures} of {runner.tries} doctest examples failed in {module_name}:\n"
                    f"{report.getvalue()}", pytrace=False)
    assert runner.tries > 0


PUBLIC = [
    (module_name, name)
    for module_name in MODULE_NAMES
    for name in _public_objects(_module(module_name))
]


def test_public_names_found() -> None:
    # Guards the collection itself: the package exports a few dozen classes and functions.
    assert len(PUBLIC) >= 40


@pytest.mark.parametrize(("module_name", "name"), PUBLIC, ids=[f"{m}.{n}" for m, n in PUBLIC])
def test_public_name_has_example(module_name: str, name: str) -> None:
    module = _module(module_name)
    obj = getattr(module, name)
    doc = inspect.getdoc(obj) or ""
    assert "Examples:" in doc, f"{module_name}.{name} has no 'Examples:' section"
    assert ">>>" in doc.split("Examples:", 1)[1], f"{module_name}.{name}: 'Examples:' has no '>>>' line"
    # the example is really collected, so test_doctests runs it
    qualified = f"{module_name}.{name}"
    examples = [ex for test in _doctests(module) if test.name == qualified for ex in test.examples]
    assert examples, f"{qualified}: the doctest finder does not collect its examples"
