"""The typed schema of params.yaml, loaded and validated once.

    from pipelines.core.params import load_params
    params = load_params("params.yaml", overrides=["train.max_steps=50"])

Overrides follow `dvc exp run -S`: the same grammar (Hydra's), the same params.yaml. An unknown
key or a value of the wrong type is a ConfigError that names the key.
"""

import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipelines.core.errors import ConfigError
from pipelines.core.slices import DEFAULT_SLICES, SLICE_NAME_PATTERN

PARAMS_FILE = "params.yaml"
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# What a folder source takes by default: code and prose. Tables (.json, .csv, .parquet) are left
# out: a folder is a tree of documents, and one stray .json must not stop ingest; a table is read
# row by row only when data.source names it (a file or a glob).
DEFAULT_INCLUDE = ["**/*.py", "**/*.pyi", "**/*.md", "**/*.rst", "**/*.txt"]
# Never walked: version control, environments, caches, build output (`.*` covers .git, .venv,
# .tox, .mypy_cache, .env files); and binaries, in case an include rule is wider than the default.
DEFAULT_EXCLUDE = [
    ".*",
    "__pycache__/",
    "node_modules/",
    "venv/",
    "site-packages/",
    "build/",
    "dist/",
    "*.egg-info/",
    "*.pyc",
    "*.so",
    "*.dll",
    "*.exe",
    "*.png",
    "*.jpg",
    "*.pdf",
    "*.zip",
    "*.gz",
]


def check_patterns(patterns: list[str]) -> list[str]:
    """Each pattern must be a gitignore-style pattern that can match something (pathspec's rules:
    the ones .gitignore and .dvcignore use)."""
    import pathspec

    for pattern in patterns:
        try:
            (compiled,) = pathspec.PathSpec.from_lines("gitignore", [pattern]).patterns or [None]
        except Exception as exc:  # noqa: BLE001 -- pathspec's error types differ across versions
            raise ValueError(f"pattern {pattern!r} is not a valid gitignore-style pattern ({exc})") from None
        if compiled is None or compiled.include is None:
            raise ValueError(f"pattern {pattern!r} matches nothing (blank, or a # comment)")
    return patterns


class DataParams(Section):
    source: str = Field("python-stdlib", description="'python-stdlib' or a local file, folder or glob")
    include: list[str] = Field(
        DEFAULT_INCLUDE,
        min_length=1,
        description="folder sources: the files taken as documents, gitignore-style patterns matched "
        "against the path relative to the folder; a table file inside a folder is read as text",
    )
    exclude: list[str] = Field(
        DEFAULT_EXCLUDE,
        description="folder sources: files and folders left out (an excluded folder is not walked)",
    )
    text_field: str = Field("text", description="column holding the text in jsonl/parquet/csv sources")
    max_documents: int | None = Field(
        None, ge=1, description="keep only the first N documents (files by path, a table's rows in order)"
    )
    shard_bytes: int = Field(
        4_000_000,
        ge=1_000,
        description="raw bytes per Parquet shard of data/raw (and so of data/curated) on average, at "
        "most 3 times it: the unit of work a worker holds at once in ingest, curate and tokenize",
    )
    executor: Literal["local", "dask"] = Field(
        "local",
        description="where the data stages' shards run: local (a process pool, no server) or dask "
        "(the cluster DASK_SCHEDULER_ADDRESS names; docs/data-at-scale.md)",
    )
    raw_dir: str = Field("data/raw", description="ingest output: the raw snapshot")
    curated_dir: str = Field("data/curated", description="curate output: documents that passed")
    tokens_dir: str = Field("data/tokens", description="tokenize output: tokenizer and token arrays")
    quarantine_dir: str = Field("data/quarantine", description="curate output: dropped documents and why")
    inputs_dir: str = Field(
        "data/inputs", description="inputs output: the source manifest and the champion's data profile"
    )

    @field_validator("include", "exclude", mode="before")
    @classmethod
    def _one_pattern_is_a_list(cls, value):
        # `-S data.include=**/*.py`: one pattern needs no YAML list around it
        return [value] if isinstance(value, str) else value

    @field_validator("include", "exclude")
    @classmethod
    def _valid_patterns(cls, value: list[str]) -> list[str]:
        return check_patterns(value)


class DriftParams(Section):
    enabled: bool = Field(True, description="compare the curated set with the champion's training data")
    ratio_warn: float = Field(
        1.25, ge=1, description="warn when documents/bytes/median length are this many times off"
    )
    ratio_block: float = Field(2.0, ge=1, description="block when they are this many times off, either way")
    # Jensen-Shannon distance (0 same, 1 disjoint). Measured on the stdlib: a random half 0.01
    # (bytes) / 0.13 (words), a biased subset up to 0.08 / 0.36, French prose 0.45 / 1.0.
    byte_divergence_warn: float = Field(
        0.15, ge=0, le=1, description="warn above this byte-distribution distance"
    )
    byte_divergence_block: float = Field(
        0.3, ge=0, le=1, description="block above this byte-distribution distance"
    )
    word_divergence_warn: float = Field(
        0.4, ge=0, le=1, description="warn above this word-distribution distance"
    )
    word_divergence_block: float = Field(
        0.6, ge=0, le=1, description="block above this word-distribution distance"
    )

    @model_validator(mode="after")
    def _tiers_ordered(self):
        pairs = [("ratio", self.ratio_warn, self.ratio_block)]
        pairs += [
            (f"{k}_divergence", getattr(self, f"{k}_divergence_warn"), getattr(self, f"{k}_divergence_block"))
            for k in ("byte", "word")
        ]
        if any(warn > block for _, warn, block in pairs):
            raise ValueError("curate.gate.drift: a warn threshold must not exceed its block threshold")
        return self


class GateParams(Section):
    min_documents: int = Field(500, ge=1, description="fewest curated documents that may train a model")
    min_bytes: int = Field(5_000_000, ge=1, description="fewest curated UTF-8 bytes that may train a model")
    max_bytes: int = Field(
        1_000_000_000,
        ge=1,
        description="most curated UTF-8 bytes one run may train on (a misconfigured source)",
    )
    warn_min_kept_fraction: float = Field(
        0.5, ge=0, le=1, description="warn when curation keeps less of the input"
    )
    warn_min_median_alnum: float = Field(
        0.5, ge=0, le=1, description="warn when the median alnum fraction is lower"
    )
    warn_max_source_share: float = Field(
        0.5, gt=0, le=1, description="warn when one top-level folder or file holds more of the kept documents"
    )
    drift: DriftParams = Field(default_factory=DriftParams, description="drift against the champion's data")

    @model_validator(mode="after")
    def _byte_bounds_ordered(self):
        if self.min_bytes > self.max_bytes:
            raise ValueError("curate.gate.min_bytes must not exceed curate.gate.max_bytes")
        return self


class NearDedupeParams(Section):
    enabled: bool = Field(True, description="drop near-duplicates (MinHash LSH over word 5-grams)")
    threshold: float = Field(
        0.85, gt=0, le=1, description="estimated Jaccard similarity that makes a near-duplicate"
    )
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations")
    shingle_size: int = Field(5, ge=1, description="words per shingle")


class CurateParams(Section):
    min_chars: int = Field(200, ge=0, description="drop documents shorter than this")
    max_chars: int = Field(200_000, ge=1, description="drop documents longer than this")
    max_line_length: int = Field(1000, ge=1, description="drop documents with a longer line")
    min_alnum_fraction: float = Field(
        0.25, ge=0, le=1, description="drop documents with fewer letters/digits"
    )
    require_valid_python: bool = Field(True, description="drop .py documents that do not parse")
    autogen_markers: list[str] = Field(
        ["auto-generated", "autogenerated", "do not edit", "# generated by"],
        description="case-insensitive markers of generated files, searched in the head of each document",
    )
    autogen_scan_chars: int = Field(500, ge=0, description="how many leading characters to scan for markers")
    max_mean_line_length: float = Field(100, gt=0, description="drop documents whose mean line is longer")
    max_encoded_fraction: float = Field(
        0.5, ge=0, le=1, description="drop documents with more base64/hex/unicode-escape data than this share"
    )
    max_encoded_run: int = Field(1024, ge=1, description="drop documents with a longer encoded-data run")
    prose_min_words: int = Field(50, ge=0, description="prose (non-code) documents: fewest words")
    prose_mean_word_length: tuple[float, float] = Field(
        (3, 10), description="prose: allowed mean word length"
    )
    prose_max_symbol_ratio: float = Field(0.1, ge=0, description="prose: most '#' and '...' per word")
    prose_min_alpha_words: float = Field(
        0.8, ge=0, le=1, description="prose: least share of words with a letter"
    )
    scrub_secrets: bool = Field(True, description="replace emails, keys and tokens by typed placeholders")
    scrub_patterns: dict[str, str] = Field(
        default_factory=dict,
        description="your own secret formats: name -> regular expression (Python's re), each match "
        "replaced by <NAME> and counted under its name as the built-in kinds are; a group named "
        "'secret' replaces only that group. A pattern runs as written: one that backtracks "
        "(nested repeats such as (a+)+) can take time exponential in a line's length",
    )
    near_dedupe: NearDedupeParams = Field(default_factory=NearDedupeParams)
    workers: int = Field(2, ge=1, description="processes for the per-document work")
    gate: GateParams = Field(default_factory=GateParams, description="checks of the curated set")
    reports_dir: str = Field("reports", description="where curation.json and the Data Docs go")

    @field_validator("scrub_patterns")
    @classmethod
    def _valid_scrub_patterns(cls, value: dict[str, str]) -> dict[str, str]:
        if not value:
            return value
        from pipelines.core.scrub import check_pattern

        for name, pattern in value.items():
            check_pattern(name, pattern)
        return value

    @model_validator(mode="after")
    def _bounds_ordered(self):
        if self.min_chars >= self.max_chars:
            raise ValueError("curate.min_chars must be below curate.max_chars")
        return self


class TokenizeParams(Section):
    vocab_size: int = Field(4096, ge=260, le=65535, description="byte-level BPE vocabulary size")
    val_fraction: float = Field(0.05, gt=0, lt=0.5, description="share of documents held out, by path hash")
    sample_bytes: int = Field(
        32_000_000,
        ge=1_000,
        description="training text the BPE is trained on: documents drawn by a hash of their path, "
        "the same whatever the shards; encoding then streams every document, shard by shard",
    )
    workers: int = Field(2, ge=1, description="processes (data.executor=local) that encode the shards")


class TrainParams(Section):
    seed: int = Field(1337, description="seeds weights, data order and dropout")
    device: Literal["auto", "cpu", "cuda", "mps"] = Field(
        "auto", description="auto: cuda, then mps, then cpu"
    )
    bf16: Literal["auto", "on", "off"] = Field(
        "auto", description="bf16 autocast; auto: on CUDA with bf16, or a CPU with AVX512-BF16 or AMX"
    )
    compile: Literal["auto", "on", "off"] = Field(
        "auto",
        description="torch.compile the model; auto: on CUDA, and on a CPU where inductor builds (one process)",
    )
    max_steps: int = Field(645, ge=1, description="optimizer steps")
    batch_size: int = Field(16, ge=1, description="sequences per step")
    block_size: int = Field(256, ge=8, description="context length in tokens")
    n_layer: int = Field(4, ge=1, description="transformer blocks")
    n_head: int = Field(3, ge=1, description="attention heads")
    n_embd: int = Field(192, ge=8, description="embedding width")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout probability")
    positions: Literal["learned", "rope"] = Field("rope", description="rotary (RoPE) or learned embeddings")
    norm: Literal["layernorm", "rmsnorm"] = Field("rmsnorm", description="normalization layers")
    mlp: Literal["gelu", "relu2"] = Field("relu2", description="MLP activation (relu2: squared ReLU)")
    mlp_ratio: int = Field(4, ge=1, description="MLP hidden width in multiples of n_embd")
    tie_head: bool = Field(True, description="output head shares the token embedding's weights")
    qk_norm: bool = Field(False, description="RMS-normalize each attention head's q and k")
    optimizer: Literal["adamw", "muon"] = Field(
        "muon", description="muon: Muon on the blocks' matrices, AdamW on embeddings, head and norms"
    )
    muon_lr: float = Field(0.003, gt=0, description="Muon's peak learning rate (same schedule as lr)")
    lr: float = Field(3e-3, gt=0, description="peak learning rate")
    min_lr: float = Field(3e-4, ge=0, description="learning rate at the end of the cosine decay")
    warmup_steps: int = Field(50, ge=0, description="linear warm-up steps")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay on matrices")
    grad_clip: float = Field(1.0, ge=0, description="max gradient norm; 0 disables clipping")
    nproc_per_node: int = Field(
        1,
        ge=1,
        description="processes training together under torchrun (DistributedDataParallel: gloo on "
        "CPU, nccl on CUDA), each on a slice of every step's batch; it changes the order of float "
        "sums, so it is part of the checkpoint key",
    )
    checkpoint_every: int = Field(100, ge=1, description="steps between full checkpoints")
    log_every: int = Field(10, ge=1, description="steps between metric logs")
    system_metrics: bool = Field(
        True,
        description="MLflow logs CPU, memory, disk and network use (system/*) while training, every "
        "10 s; not a DVC param: it does not change the weights",
    )
    checkpoint_dir: str = Field("checkpoints", description="resume state, kept across failed runs")
    model_dir: str = Field("models", description="train output: weights, config, tokenizer")
    reports_dir: str = Field(
        "reports", description="where training.json goes: this run's speed, a DVC metric"
    )

    @field_validator("bf16", "compile", mode="before")
    @classmethod
    def _yaml_switch(cls, value):
        # YAML 1.1 (PyYAML, and so -S and `dvc exp run -S`) reads on/off as true/false
        return ("on" if value else "off") if isinstance(value, bool) else value

    @model_validator(mode="after")
    def _consistent(self):
        if self.n_embd % self.n_head:
            raise ValueError(
                f"train.n_embd ({self.n_embd}) must be divisible by train.n_head ({self.n_head})"
            )
        if self.min_lr > self.lr:
            raise ValueError("train.min_lr must not exceed train.lr")
        if self.batch_size % self.nproc_per_node:
            raise ValueError(
                f"train.batch_size ({self.batch_size}) must be divisible by train.nproc_per_node "
                f"({self.nproc_per_node}): each process takes an equal slice of every step's batch"
            )
        return self


class FinetuneParams(Section):
    """`trainpipe finetune`: train from a registered version's weights instead of random ones."""

    parent_version: int | None = Field(
        None,
        ge=1,
        description="the registered version training starts from; `trainpipe finetune` sets it (to "
        "what @champion or --from names) and `trainpipe run` clears it; null trains from scratch",
    )
    max_steps: int = Field(
        96, ge=1, description="optimizer steps of a fine-tune (a full run: train.max_steps)"
    )
    lr: float = Field(
        1e-3,
        gt=0,
        description="peak learning rate of a fine-tune; Muon's peak moves with it "
        "(train.muon_lr x finetune.lr / train.lr)",
    )
    min_lr: float = Field(1e-4, ge=0, description="learning rate at the end of the fine-tune's cosine decay")
    warmup_steps: int = Field(10, ge=0, description="linear warm-up steps of a fine-tune")
    optimizer_state: Literal["fresh"] = Field(
        "fresh",
        description="the optimizer starts from zero moments: a registered version keeps its weights, "
        "not its optimizer (and its moments belong to its own, finished, schedule)",
    )
    parent_dir: str = Field(
        "data/parent",
        description="the pinned parent: its weights, config and tokenizer, and parent.json (version, sha256)",
    )

    @model_validator(mode="after")
    def _consistent(self):
        if self.min_lr > self.lr:
            raise ValueError("finetune.min_lr must not exceed finetune.lr")
        return self


class EvaluateParams(Section):
    max_tokens: int | None = Field(None, ge=1, description="cap on validation tokens scored; null: all")
    num_samples: int = Field(3, ge=0, description="sampled completions written to the report")
    sample_tokens: int = Field(96, ge=1, description="tokens per sampled completion")
    memorization_max_spans: int = Field(
        256,
        ge=1,
        description="the memorization check: most distinct scrubbed secrets greedily completed from "
        "their preceding context (the most repeated first, every kind in turn); a challenger that "
        "reproduces one is never promoted",
    )
    memorization_context_tokens: int = Field(
        32,
        ge=1,
        description="the memorization check: tokens of curated text before a secret it completes from",
    )
    reports_dir: str = Field("reports", description="where metrics.json and plots go")
    slices: dict[str, list[str]] = Field(
        DEFAULT_SLICES,
        description="evaluation slices: name -> gitignore-style patterns on a document's path (the "
        "last matching pattern decides; !pattern takes documents out). Each slice is scored apart "
        "(reports/slices.json, MLflow val_bpb_slice_<name>) and gated apart at publish; a document "
        "may be in several slices or in none",
    )

    @field_validator("slices")
    @classmethod
    def _valid_slices(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        return check_slice_definitions(value)


def check_slice_definitions(slices: dict[str, list[str]]) -> dict[str, list[str]]:
    """Each slice has a name fit for a metric name and at least one pattern that takes documents in."""
    for name, patterns in slices.items():
        if not re.fullmatch(SLICE_NAME_PATTERN, name):
            raise ValueError(
                f"slice name {name!r} must be a letter or digit, then up to 39 letters, digits, '_' or '-' "
                "(it names the metric val_bpb_slice_<name>)"
            )
        try:
            check_patterns(patterns)
        except ValueError as exc:
            raise ValueError(f"slice {name!r}: {exc}") from None
        if not any(not p.startswith("!") for p in patterns):
            raise ValueError(f"slice {name!r} needs a pattern that takes documents in (not only !patterns)")
    return slices


class PublishParams(Section):
    model_name: str = Field(
        "trainpipe-code-completion",
        pattern=MODEL_NAME_PATTERN,
        description="registered model name: a letter or digit, then up to 63 letters, digits, '.', '_' "
        "or '-' (it is quoted into MLflow's search filters, where a quote or '%' would change the query)",
    )
    experiment: str = Field("trainpipe", min_length=1, description="MLflow experiment of the runs")
    min_improvement_bpb: float = Field(
        0.0,
        ge=0,
        description="margin in bits per byte: a challenger is promoted only if the whole 95% interval "
        "of its difference from the champion lies below minus this",
    )
    bootstrap_resamples: int = Field(
        2000, ge=2000, description="resamples of the documents in the paired bootstrap of the gate"
    )
    bootstrap_seed: int = Field(
        0, ge=0, description="seed of the bootstrap's resampling: the same scores, the same interval"
    )
    slice_tolerance: float = Field(
        0.01,
        ge=0,
        allow_inf_nan=False,
        description="bits per byte a challenger may lose on one evaluation slice: a slice whose whole 95% "
        "interval of challenger minus champion lies above +this (surely worse by more) blocks the promotion",
    )
    slice_min_documents: int = Field(
        20, ge=1, description="a slice with fewer scored documents is reported, not gated"
    )


class ServeParams(Section):
    host: str = Field("127.0.0.1", description="address the endpoint listens on")
    port: int = Field(5001, ge=1, le=65535, description="port the endpoint listens on")
    max_prompt_chars: int = Field(4000, ge=1, description="longest prompt accepted")
    max_new_tokens_limit: int = Field(
        512,
        ge=1,
        description="largest max_new_tokens accepted; the served model caps it at its block_size - 1, "
        "so that prompt and completion fit its context (the prompt's start is cropped to make room)",
    )
    max_prompts: int = Field(16, ge=1, description="most prompts in one request")
    max_total_new_tokens: int = Field(
        4096, ge=1, description="most new tokens in one request: prompts x max_new_tokens"
    )
    max_batch_sequences: int = Field(
        64, ge=1, le=1024, description="most sequences the served model steps together (continuous batching)"
    )
    max_queued_requests: int = Field(
        64, ge=1, description="most requests waiting for a slot; beyond, 503 with Retry-After"
    )
    request_timeout_s: int = Field(
        60, ge=1, description="time limit of one request, in seconds; past it, 504 and its slots are freed"
    )
    decode_threads: int = Field(
        1,
        ge=1,
        le=256,
        description="torch threads of the served model's decode loop (1: PyTorch's OpenMP outside the "
        "main thread costs more than a second thread gives to a step of small ops, on 2 cores)",
    )
    max_body_bytes: int = Field(
        1_048_576,
        ge=1024,
        description="largest request body `trainpipe serve` reads; larger ones get 413 unread",
    )
    poll_s: float = Field(5.0, gt=0, le=15, description="how often the endpoint reads @champion, in seconds")
    smoke_timeout_s: float = Field(
        120.0, gt=0, description="time a version has to load and pass its smoke test"
    )
    wait_s: float = Field(
        120.0, ge=0, description="how long the flow waits for a running endpoint to serve the new champion"
    )


class CostParams(Section):
    """Prices of device time for the cost ledger (pipelines/core/ledger.py). A stage that held a GPU
    (cuda) pays gpu_hour_usd per GPU for its seconds; any other stage pays cpu_hour_usd for the
    machine (mps included: no rental price applies to a laptop's GPU)."""

    cpu_hour_usd: float = Field(
        0.10264,
        gt=0,
        allow_inf_nan=False,
        description="price of one hour of the CPU machine, in USD (default: AWS c7a.large, 2 vCPU "
        "AMD EPYC Zen 4, Linux on-demand, us-east-1)",
    )
    gpu_hour_usd: float = Field(
        5.58,
        gt=0,
        allow_inf_nan=False,
        description="price of one GPU hour, in USD (default: an H200 141 GB, RunPod Serverless flex "
        "worker, $0.00155 per second)",
    )


class Params(Section):
    data: DataParams = Field(default_factory=DataParams)
    curate: CurateParams = Field(default_factory=CurateParams)
    tokenize: TokenizeParams = Field(default_factory=TokenizeParams)
    train: TrainParams = Field(default_factory=TrainParams)
    finetune: FinetuneParams = Field(default_factory=FinetuneParams)
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams)
    publish: PublishParams = Field(default_factory=PublishParams)
    serve: ServeParams = Field(default_factory=ServeParams)
    cost: CostParams = Field(default_factory=CostParams)


def parse_override(text: str):
    """One `-S` override, parsed as `dvc exp run -S` parses it: Hydra's override grammar
    (hydra.cc/docs/advanced/override_grammar/basic), which DVC applies to params.yaml.

    'train.lr=3e-4' -> 0.0003, 'x=null' -> None, 'x=[a, b]' -> a list, 'x=true' -> True, 'x=on' ->
    'on'; '~key' deletes a key, '+key=v' adds one; 'params.yaml:key=v' names the file as DVC allows.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    where, colon, _ = text.partition("=")[0].partition(":")
    line = text
    if colon:  # DVC's PATH:key=value; trainpipe has one params file
        if Path(where).name != PARAMS_FILE:
            raise ConfigError(f"override {text!r}: trainpipe reads only {PARAMS_FILE}, not {where}")
        line = text.partition(":")[2]
    try:
        override = OverridesParser.create().parse_override(line)
    except HydraException as exc:
        mapping = _mapping_value(line)
        if mapping is not None:  # JSON's {"name": "..."}, which Hydra's grammar does not read
            return parse_override(override_text(line.partition("=")[0], mapping))
        reason = str(exc).strip().splitlines()[0]
        raise ConfigError(
            f"override {text!r} is not key=value as dvc exp run -S reads it ({reason}); "
            "quote a value holding signs such as ~ # =: key='...'"
        ) from None
    if override.is_sweep_override():
        raise ConfigError(
            f"override {text!r} is a sweep of several values: queue them with "
            f"`dvc exp run --queue -S {text}` (a value with a comma in it is quoted: key='a,b')"
        )
    return override


def _mapping_value(line: str) -> dict | None:
    """The value of `key={...}` read as JSON or YAML, if it is a mapping of strings: what a mapping
    parameter (curate.scrub_patterns) takes as `-S 'key={"name": "pattern"}'` too. Hydra's own
    form, `key={name: "pattern"}`, is what DVC reads."""
    value = line.partition("=")[2].strip()
    if not value.startswith("{"):
        return None
    try:
        mapping = yaml.safe_load(value)
    except yaml.YAMLError:
        return None
    if not isinstance(mapping, dict) or not all(isinstance(k, str) for k in mapping):
        return None
    return mapping


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """raw (params.yaml as read) with overrides applied exactly as `dvc exp run -S` applies them to
    the file (Hydra's rules, through the loader DVC calls), after checking each key is a parameter.

    Deliberate differences: a parameter the file leaves out (its default applies) can be set
    without DVC's `+` prefix; in the shipped params.yaml, which lists every key, the two agree. A
    mapping parameter (curate.scrub_patterns) set as a whole takes the new mapping in place of the
    old (`key={}` empties it), where DVC merges the two or refuses new names; one name of it is
    set as `key.name=value`, as DVC's `+key.name=value` does."""
    if not overrides:  # every stage loads params: no Hydra import (about 0.2 s) when nothing is set
        return raw
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.core.override_parser.types import OverrideType
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    for text in overrides:
        override = parse_override(text)
        keys = override.key_or_group.split(".")
        whole_mapping = _check_known(keys, text)
        if override.type is OverrideType.CHANGE:
            node = raw
            for key in keys[:-1]:
                node = node.setdefault(key, {})
                if not isinstance(node, dict):
                    break
            else:
                if whole_mapping:  # the new mapping replaces the old one; Hydra would merge them
                    node[keys[-1]] = None
                else:
                    node.setdefault(keys[-1], None)
        config = OmegaConf.create(raw, flags={"allow_objects": True})
        OmegaConf.set_struct(config, True)
        try:
            ConfigLoaderImpl._apply_overrides_to_config([override], config)
            raw = OmegaConf.to_object(config)  # resolves ${...} interpolations, as DVC's does
        except (HydraException, OmegaConfBaseException) as exc:
            raise ConfigError(f"override {text!r}: {str(exc).strip().splitlines()[0]}") from None
    return raw


def _check_known(keys: list[str], text: str) -> bool:
    """A ConfigError naming the first part of keys that is not a parameter of the schema. True when
    keys name a mapping parameter (dict-typed, such as curate.scrub_patterns) as a whole; one
    level below it, any name is a key of the mapping."""
    model = Params
    for i, key in enumerate(keys):
        if model is None:
            raise ConfigError(
                f"unknown parameter {'.'.join(keys)!r}: {'.'.join(keys[:i])!r} is not a section"
            )
        if key not in model.model_fields:
            raise ConfigError(f"unknown parameter {'.'.join(keys[: i + 1])!r} in override {text!r}")
        annotation = model.model_fields[key].annotation
        if _is_mapping(annotation):
            if len(keys) > i + 2:
                raise ConfigError(
                    f"unknown parameter {'.'.join(keys)!r}: {'.'.join(keys[: i + 2])!r} is a value"
                )
            return len(keys) == i + 1
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return False


def _is_mapping(annotation) -> bool:
    """A dict-typed parameter (dict[str, str]): a value of its own, not a section."""
    return annotation is dict or getattr(annotation, "__origin__", None) is dict


def override_text(key: str, value: Any) -> str:
    """'key=value' that parse_override reads back as value: the way to pass a typed value as -S."""
    return f"{key}={_override_literal(value)}"


def _override_literal(value: Any) -> str:
    if isinstance(value, str):
        # Hydra's quoted string: a backslash is literal unless it precedes a quote or ends the string
        escaped = re.sub(r'(\\*)"', lambda m: m.group(1) * 2 + '\\"', value)
        return '"' + re.sub(r"(\\+)$", lambda m: m.group(1) * 2, escaped) + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_override_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_override_literal(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)  # numbers, booleans, null


def validate_params(raw: dict, where: str = PARAMS_FILE) -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(part) for part in err["loc"]) or "(top level)"
        reason = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        raise ConfigError(f"{where}: parameter {key!r}: {reason}") from None


def read_params_file(path: str | Path = PARAMS_FILE) -> dict:
    path = Path(path)
    if not path.exists():
        return {}
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc.__class__.__name__})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return raw


def load_params(path: str | Path = PARAMS_FILE, overrides: list[str] | None = None) -> Params:
    """Read params.yaml (a missing file means all defaults), apply overrides, validate."""
    raw = apply_overrides(read_params_file(path), list(overrides or []))
    return validate_params(raw, where=str(path))


def save_overrides(path: str | Path, overrides: list[str]) -> Params:
    """Validate overrides, then write them into params.yaml keeping its comments (as dvc exp run -S does).

    DVC stages read params.yaml, so an override that should change what a stage computes must
    be in the file for dvc.lock to record it. Nothing is written if validation fails.
    """
    params = load_params(path, overrides)
    if not overrides:
        return params
    from ruamel.yaml import YAML

    from pipelines.core.data import atomic_path

    rt = YAML()
    rt.preserve_quotes = True
    rt.width = 4096  # never re-wrap a long line
    # ruamel writes None as an empty value; params.yaml spells it `null`
    rt.representer.add_representer(
        type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null")
    )
    path = Path(path)
    doc = rt.load(path.read_text()) if path.exists() else {}
    _update_document(doc, apply_overrides(read_params_file(path), overrides))
    with atomic_path(path) as tmp, tmp.open("w") as fh:
        rt.dump(doc, fh)
    return params


def _update_document(doc, new: dict) -> None:
    """Make the round-trip YAML document doc hold new's values, touching only what differs.

    An equal value is left as written: re-assigning it would lose its flow style or its `null`
    spelling, and restart writes every recorded key back."""
    for key in [k for k in doc if k not in new]:  # `~key` deleted it
        del doc[key]
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(doc.get(key), dict):
            _update_document(doc[key], value)
        elif key not in doc or not _same_value(doc[key], value):
            doc[key] = value


# The words YAML 1.1 reads as booleans. new comes from read_params_file (YAML 1.1: `off` is False)
# while the document keeps the word: rewriting `compile: off` as `compile: false` would mean the
# same to trainpipe but change the value DVC records (DVC reads `off` as the string), so a later
# `dvc status` or `trainpipe restart` would see a param changed that nobody changed.
YAML11_BOOLS = {"on": True, "off": False, "yes": True, "no": False, "true": True, "false": False}


def _same_value(written: Any, value: Any) -> bool:
    if isinstance(written, str) and isinstance(value, bool):
        return YAML11_BOOLS.get(written.lower()) is value
    return written == value


def flatten(params: Params) -> dict[str, Any]:
    """{'train.lr': 0.003, ...}: the form MLflow params and Prefect artifacts want. A mapping
    parameter (curate.scrub_patterns) is one value: {'curate.scrub_patterns': {...}}."""
    out: dict[str, Any] = {}

    def walk(prefix: str, section: BaseModel) -> None:
        for name in type(section).model_fields:
            key, value = f"{prefix}.{name}" if prefix else name, getattr(section, name)
            if isinstance(value, BaseModel):
                walk(key, value)
            else:
                out[key] = value

    walk("", params)
    return out
