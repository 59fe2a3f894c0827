"""Fixtures shared by several test files."""
import pytest

from tiny import make_tiny_data


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """The tiny dataset (tests/tiny.py), built once per test module."""
    return make_tiny_data(tmp_path_factory.mktemp("tiny"))
