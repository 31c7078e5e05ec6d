from pathlib import Path

import pytest
from dvc.utils.serialize import parse_yaml

from pipelines.core.errors import ConfigError
from pipelines.core.params import Params, flatten, load_params, save_overrides

MAPPINGS = {"curate.scrub_patterns", "evaluate.slices"}


def params_drift(path: str | Path) -> tuple[set, set, dict]:
    """How a params file differs from the schema: (keys it sets that are no field, fields it
    does not set, {key: (its value, the default)} where the typed value differs)."""
    import yaml

    def leaves(node: dict, prefix: str = "") -> set[str]:
        keys = set()
        for key, value in node.items():
            # a mapping parameter (curate.scrub_patterns, evaluate.slices) is one value, an empty one too
            section = isinstance(value, dict) and prefix + key not in MAPPINGS
            keys |= leaves(value, f"{prefix}{key}.") if section else {prefix + key}
        return keys

    written = leaves(yaml.safe_load(Path(path).read_text()))
    defaults = flatten(Params())
    shipped = flatten(load_params(path))
    changed = {k: (shipped[k], v) for k, v in defaults.items() if shipped[k] != v}
    return written - set(defaults), set(defaults) - written, changed


def test_shipped_params_yaml_sets_every_field_to_its_schema_default():
    # params.yaml documents the defaults: a default changed in one place only fails here
    assert params_drift("params.yaml") == (set(), set(), {})
    assert load_params("params.yaml").data.source == "python-stdlib"


def test_params_drift_sees_an_unset_field_and_a_changed_value(tmp_path):
    steps, every = Params().train.max_steps, Params().train.log_every
    text = Path("params.yaml").read_text()
    assert f"  log_every: {every}\n" in text and f"  max_steps: {steps}\n" in text
    text = text.replace(f"  log_every: {every}\n", "")
    path = tmp_path / "params.yaml"
    path.write_text(text.replace(f"  max_steps: {steps}\n", f"  max_steps: {steps + 1}\n"))
    assert params_drift(path) == (set(), {"train.log_every"}, {"train.max_steps": (steps + 1, steps)})


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
        ("cost.cpu_hour_usd=0", "cost.cpu_hour_usd"),
        ("cost.tpu_hour_usd=1", "cost.tpu_hour_usd"),
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
    with pytest.raises(
        ConfigError, match=r"train.batch_size \(6\) must be divisible by train.nproc_per_node \(4\)"
    ):
        load_params("params.yaml", ["train.batch_size=6", "train.nproc_per_node=4"])
    assert (
        load_params("params.yaml", ["train.batch_size=6", "train.nproc_per_node=3"]).train.nproc_per_node == 3
    )


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


@pytest.mark.parametrize(("value", "expected"), [("off", "off"), ("on", "on"), ("auto", "auto")])
def test_on_off_switches_survive_yaml_reading_them_as_booleans(value, expected, tmp_path):
    # -S train.bf16=off reaches the schema as the string "off"; written to params.yaml unquoted (as
    # dvc exp run -S writes it), YAML 1.1 reads it back as False: both must mean "off"
    params = load_params("params.yaml", [f"train.bf16={value}", f"train.compile={value}"])
    assert (params.train.bf16, params.train.compile) == (expected, expected)
    path = tmp_path / "params.yaml"
    path.write_text(Path("params.yaml").read_text())
    save_overrides(path, [f"train.bf16={value}"])
    assert load_params(path).train.bf16 == expected
    # a later override of another key leaves the word as written: DVC reads `off` as the string
    # "off", and `false` in its place would be a param change in dvc.lock that nobody made
    save_overrides(path, ["train.max_steps=7"])
    assert f"  bf16: {value} " in path.read_text()
    assert parse_yaml(path.read_text(), str(path))["train"]["bf16"] == value


# What `dvc exp run -S` accepts, typed as Hydra's override grammar types it (not as YAML would:
# 3e-4 and 1e3 are numbers, on/yes stay words, 0x10 is no number)
DVC_OVERRIDES = [
    ("train.max_steps=30", "train.max_steps", 30),
    ("train.lr=3e-4", "train.lr", 3e-4),
    ("train.max_steps=1e3", "train.max_steps", 1000),
    ("train.tie_head=false", "train.tie_head", False),
    ("train.bf16=off", "train.bf16", "off"),
    ("data.max_documents=null", "data.max_documents", None),
    ("data.source='my corpus/*.py'", "data.source", "my corpus/*.py"),
    ("data.source=0x10", "data.source", "0x10"),
    (
        "curate.autogen_markers=[generated, 'do not edit']",
        "curate.autogen_markers",
        ["generated", "do not edit"],
    ),
    ("curate.prose_mean_word_length=[2, 12.5]", "curate.prose_mean_word_length", (2, 12.5)),
    ("curate.near_dedupe.threshold=0.9", "curate.near_dedupe.threshold", 0.9),
    ("curate.gate.drift.enabled=false", "curate.gate.drift.enabled", False),
    ("params.yaml:train.seed=7", "train.seed", 7),
    ("~evaluate.max_tokens", "evaluate.max_tokens", None),
]


@pytest.mark.parametrize(("override", "key", "value"), DVC_OVERRIDES)
def test_trainpipe_reads_an_override_as_dvc_exp_run_writes_it(override, key, value, tmp_path):
    from dvc.utils.cli_parse import to_path_overrides
    from dvc.utils.hydra import apply_overrides

    # what `dvc exp run -S override` does to params.yaml (dvc/repo/experiments/queue/base.py)
    by_dvc = tmp_path / "params.yaml"
    by_dvc.write_text(Path("params.yaml").read_text().replace("max_tokens: null", "max_tokens: 20000"))
    (path, dvc_overrides), *_ = to_path_overrides([override]).items()
    assert path == "params.yaml"
    apply_overrides(by_dvc, dvc_overrides)
    written_by_dvc = flatten(load_params(by_dvc))
    assert written_by_dvc[key] == value
    # trainpipe -S: validated in memory, then written to params.yaml; both equal DVC's, every key
    by_trainpipe = tmp_path / "trainpipe.yaml"
    by_trainpipe.write_text(Path("params.yaml").read_text().replace("max_tokens: null", "max_tokens: 20000"))
    assert flatten(load_params(by_trainpipe, [override])) == written_by_dvc
    save_overrides(by_trainpipe, [override])
    assert flatten(load_params(by_trainpipe)) == written_by_dvc


@pytest.mark.parametrize(
    ("override", "says"),
    [
        ("train.lr=1e-3,3e-3", "is a sweep of several values: queue them with `dvc exp run --queue -S"),
        ("other.yaml:train.lr=1", "trainpipe reads only params.yaml, not other.yaml"),
        ("train.lr=[1", "is not key=value as dvc exp run -S reads it"),
        ("+train.lr=1", "An item is already at 'train.lr'"),
        ("data.source=${nope}", "Interpolation key 'nope' not found"),
        ("data.source=~/src", "quote a value holding signs such as ~ # =: key='...'"),
    ],
)
def test_an_override_dvc_would_refuse_is_one_line(override, says):
    with pytest.raises(ConfigError) as err:
        load_params("params.yaml", [override])
    assert says in str(err.value) and override in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "value", [3e-4, 7, True, None, "a b", 'back\\slash "quoted" end\\', [1, "x y"], (3, 10.5)]
)
def test_override_text_reads_back_as_the_value(value):
    from pipelines.core.params import override_text, parse_override

    parsed = parse_override(override_text("data.source", value)).value()
    assert parsed == (list(value) if isinstance(value, tuple) else value)
