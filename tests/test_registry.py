"""The extension tables: every row points at a real implementation that takes what the row declares."""
import inspect
import subprocess
import sys

import pytest

from swssl import registry
from swssl.inference.backends import KINDS, ArtifactBackend
from swssl.scoring.scorers import build_scorer, scorer_options


@pytest.mark.parametrize("kind", registry.ARTIFACTS, ids=lambda kind: kind.name)
def test_every_artifact_kind_has_a_backend_and_an_exporter(kind):
    backend = kind.load("backend_class")
    assert issubclass(backend, ArtifactBackend) and not inspect.isabstract(backend)
    assert kind.backend in KINDS and kind.flag.startswith("--")
    exporter = kind.load("exporter")
    assert list(inspect.signature(exporter).parameters) == ["source", "out", "request", "device", "probe", "echo"]
    assert all(registry.kind_of_file(suffix) == kind.backend for suffix in kind.suffixes)
    assert kind.builds_from in (None, *registry.BY_NAME)


@pytest.mark.parametrize("kind", registry.SCORERS, ids=lambda kind: kind.name)
def test_every_scorer_takes_its_declared_options(kind):
    implementation = registry.load(kind.implementation)
    accepted = inspect.signature(implementation).parameters
    assert set(kind.options) <= set(accepted) and set(kind.options) <= set(registry.SCORER_OPTIONS)
    assert implementation.needs in ("windows", "grid")
    assert scorer_options([kind.name], radius=2, k=3, coreset_ratio=None, top=4, index=None) == {
        kind.name: {key: {"radius": 2, "k": 3, "coreset_ratio": None, "top": 4, "index": None}[key]
                    for key in kind.options}}


def test_an_unknown_scorer_is_refused_naming_the_choices():
    with pytest.raises(Exception, match="choose from aligned, global, reference"):
        build_scorer("nearest", bank=None)


def test_reading_the_tables_loads_no_torch():
    """The command lines read the tables for --help: that must stay fast."""
    code = "import sys, swssl.registry, swssl.cli; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
