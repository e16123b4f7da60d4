"""gin_utils.parse: includes resolve whatever is on sys.path; refused bindings say what to write."""

from __future__ import annotations

import importlib
import sys

import gin
import pytest

from experiments.data import config  # noqa: F401 (registers the data configurables)
from experiments.runtime import gin_utils


@pytest.fixture(autouse=True)
def clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


def test_include_resolves_with_a_data_folder_on_sys_path(tmp_path, monkeypatch):
    # A notebook's working directory is on sys.path; with a `data/` folder there,
    # gin's package-resource reader took `include 'data/embedded_byte.gin'` for
    # the namespace package `data` and raised TypeError instead of searching on.
    (tmp_path / "data").mkdir()
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "data", raising=False)
    importlib.invalidate_caches()
    assert importlib.util.find_spec("data").origin is None  # the scenario above
    experiment = tmp_path / "experiment" / "x.gin"
    experiment.parent.mkdir()
    experiment.write_text("include 'data/embedded_byte.gin'\nDataConfig.seq_len = 64\n")
    gin_utils.parse([str(experiment)], [])
    assert gin.query_parameter("DataConfig.tokenizer") == "byte"
    assert gin.query_parameter("DataConfig.seq_len") == 64


def test_a_missing_include_is_still_an_error_naming_it(tmp_path):
    bad = tmp_path / "bad.gin"
    bad.write_text("include 'data/does_not_exist.gin'\n")
    with pytest.raises(gin_utils.GinConfigError, match="does_not_exist.gin"):
        gin_utils.parse([str(bad)], [])


def test_a_denied_binding_names_the_binding_to_write_instead():
    with pytest.raises(gin_utils.GinConfigError) as e:
        gin_utils.parse([], ["make_train_iterator.seq_len = 64"])
    first_line = str(e.value).splitlines()[0]
    assert first_line == ("invalid gin configuration: make_train_iterator.seq_len cannot be "
                          "bound: the caller of make_train_iterator always sets it; bind "
                          "DataConfig.seq_len instead.")
    assert "make_train_iterator.seq_len = 64" in str(e.value)  # gin's location of the line


def test_a_denied_binding_without_a_hint_still_names_the_parameter():
    @gin.configurable(module="gin_utils_test", denylist=["size"])
    def child(size=1, scale=1.0):
        return size * scale

    with pytest.raises(gin_utils.GinConfigError,
                       match=r"child.size cannot be bound: the caller of child always sets it\."):
        gin_utils.parse([], ["child.size = 3"])
