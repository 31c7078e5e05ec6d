"""publish.model_name goes into MLflow's filter strings (`name = '...'`): the schema accepts only
names that cannot change such a filter's meaning."""

import pytest

from pipelines.core.errors import ConfigError
from pipelines.core.params import Params, PublishParams, load_params


@pytest.mark.parametrize(
    "name",
    ["trainpipe-code-completion", "e2e-model", "stack-model", "exp-model", "other", "a.b_c-1", "x" * 64],
)
def test_model_names_of_letters_digits_dots_dashes_and_underscores_pass(name):
    assert PublishParams(model_name=name).model_name == name


def test_the_default_model_name_passes():
    assert Params().publish.model_name == "trainpipe-code-completion"


@pytest.mark.parametrize(
    "name",
    ["x' OR name LIKE '%", "a'b", 'a"b', "a b", "a%", "-lead", ".lead", "_lead", "x" * 65, "é", "a\nb", ""],
)
def test_a_model_name_that_could_change_a_filter_string_is_one_line_naming_the_key(tmp_path, name):
    with pytest.raises(ConfigError) as exc:
        load_params(
            tmp_path / "params.yaml",
            [f"publish.model_name='{name}'" if "'" not in name else f'publish.model_name="{name}"'],
        )
    message = str(exc.value)
    assert "publish.model_name" in message
    assert len(message.splitlines()) == 1
