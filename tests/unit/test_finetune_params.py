"""A fine-tune's settings: the schedule it trains on, the architecture check against its parent,
and `trainpipe run` clearing a fine-tune that came before it."""

import json

import pytest

from pipelines.cli import SCRATCH, run_overrides
from pipelines.core.errors import ConfigError
from pipelines.core.params import load_params
from pipelines.stages.parent import check_architecture
from pipelines.stages.train import model_config, run_fingerprint, training_schedule

NO_FILE = "no-such-params.yaml"  # the schema's defaults


def test_a_finetune_trains_on_its_own_schedule_and_muon_moves_with_lr():
    scratch = load_params(NO_FILE, ["train.max_steps=600", "train.lr=0.004", "train.muon_lr=0.002"])
    assert training_schedule(scratch) is scratch.train
    tuned = load_params(
        NO_FILE,
        ["train.lr=0.004", "train.muon_lr=0.002", "finetune.parent_version=3", "finetune.max_steps=50"]
        + ["finetune.lr=0.001", "finetune.min_lr=0.0001", "finetune.warmup_steps=5"],
    )
    cfg = training_schedule(tuned)
    assert (cfg.max_steps, cfg.lr, cfg.min_lr, cfg.warmup_steps) == (50, 0.001, 0.0001, 5)
    assert cfg.muon_lr == pytest.approx(0.0005)
    assert cfg.n_layer == tuned.train.n_layer  # the architecture is train's (the parent's)


def test_the_parent_is_part_of_the_checkpoint_fingerprint():
    params = load_params(NO_FILE, [])
    cfg = training_schedule(params)
    model_cfg = model_config(cfg, 512)
    base = run_fingerprint(cfg, model_cfg, False)
    one = run_fingerprint(cfg, model_cfg, False, parent={"version": 1, "weights_sha256": "a" * 64})
    other = run_fingerprint(cfg, model_cfg, False, parent={"version": 1, "weights_sha256": "b" * 64})
    assert len({json.dumps(f, sort_keys=True) for f in (base, one, other)}) == 3


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ([], None),
        (["train.n_layer=6"], "train.n_layer 6 (the parent's: 4)"),
        (["tokenize.vocab_size=8000"], "tokenize.vocab_size 8000 (the parent's: 4096)"),
        (
            ["train.positions=learned", "train.n_embd=384"],
            "train.n_embd 384 (the parent's: 192); train.positions",
        ),
    ],
)
def test_a_changed_architecture_or_tokenizer_is_a_config_error(tmp_path, overrides, message):
    parent = load_params(NO_FILE, [])
    (tmp_path / "config.json").write_text(json.dumps(model_config(parent.train, 4096).to_dict()))
    params = load_params(NO_FILE, overrides)
    if message is None:
        check_architecture(params, tmp_path, 7)
        return
    with pytest.raises(ConfigError, match="version 7") as err:
        check_architecture(params, tmp_path, 7)
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ([], [SCRATCH]),
        (["train.lr=0.001"], [SCRATCH, "train.lr=0.001"]),
        (["finetune.parent_version=4"], ["finetune.parent_version=4"]),
    ],
)
def test_trainpipe_run_trains_from_scratch_unless_told_a_parent(given, expected):
    assert run_overrides(given) == expected


def test_finetune_settings_are_validated():
    with pytest.raises(ConfigError, match="finetune.min_lr"):
        load_params(NO_FILE, ["finetune.lr=0.0001", "finetune.min_lr=0.001"])
    with pytest.raises(ConfigError, match="optimizer_state"):
        load_params(NO_FILE, ["finetune.optimizer_state=reuse"])
