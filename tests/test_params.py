import pytest

from pipelines.errors import ConfigError
from pipelines.params import Params, flatten, load_params, save_overrides


def test_shipped_params_yaml_is_valid_and_matches_schema_defaults():
    params = load_params("params.yaml")
    assert params.data.source == "python-stdlib"
    # every key the file sets is one the schema knows (load would have raised otherwise)
    assert set(flatten(params)) == set(flatten(Params()))


@pytest.mark.parametrize(
    "override, value",
    [
        ("train.lr=3e-4", 3e-4),
        ("train.max_steps=7", 7),
        ("data.max_documents=null", None),
        ("data.source=some/dir", "some/dir"),
        ("curate.gate.min_documents=3", 3),
        ("curate.require_valid_python=false", False),
    ],
)
def test_override_sets_typed_value(override, value):
    params = load_params("params.yaml", [override])
    section, *rest = override.split("=")[0].split(".")
    node = getattr(params, section)
    for key in rest:
        node = getattr(node, key)
    assert node == value


@pytest.mark.parametrize(
    "override, named",
    [
        ("train.lrr=1", "train.lrr"),
        ("nosuch.key=1", "nosuch"),
        ("train.lr=fast", "train.lr"),
        ("train.max_steps=0", "train.max_steps"),
        ("train.device=tpu", "train.device"),
        ("train.lr.x=1", "train.lr.x"),
        ("curate.gate.min_bytes=-5", "curate.gate.min_bytes"),
    ],
)
def test_bad_override_names_the_key(override, named):
    with pytest.raises(ConfigError) as err:
        load_params("params.yaml", [override])
    assert named in str(err.value)
    assert "\n" not in str(err.value)


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="n_head"):
        load_params("params.yaml", ["train.n_embd=30", "train.n_head=4"])
    with pytest.raises(ConfigError, match="min_chars"):
        load_params("params.yaml", ["curate.min_chars=10", "curate.max_chars=5"])


def test_unknown_key_in_file_is_an_error(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="train.learning_rate"):
        load_params(path)


def test_save_overrides_keeps_comments_and_refuses_bad_values(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  max_steps: 10  # short\n  lr: 0.001\n")
    save_overrides(path, ["train.max_steps=20"])
    text = path.read_text()
    assert "max_steps: 20" in text and "# short" in text
    with pytest.raises(ConfigError):
        save_overrides(path, ["train.max_steps=-1"])
    assert "max_steps: 20" in path.read_text()  # nothing written on a bad override


def test_save_overrides_leaves_equal_values_as_written(tmp_path):
    path = tmp_path / "params.yaml"
    text = 'data:\n  max_documents: null   # all\ncurate:\n  autogen_markers: ["a", "b"]\n  min_chars: 200\n'
    path.write_text(text)
    save_overrides(path, ["data.max_documents=null", "curate.autogen_markers=[a, b]", "curate.min_chars=200"])
    assert path.read_text() == text
    save_overrides(path, ["curate.min_chars=100"])
    assert path.read_text() == text.replace("min_chars: 200", "min_chars: 100")
