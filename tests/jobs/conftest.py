"""The job tests run with the ``slowtest`` filter registered (and removed after each test)."""
import pytest

from helpers.jobs import slowtest_driver  # noqa: F401  (the fixture, visible to this tree)


@pytest.fixture(autouse=True)
def _slowtest(slowtest_driver):  # noqa: F811
    yield
