"""Unit and smoke tests of ingest, tokenize, train and evaluate on tiny data, on CPU."""

import inspect
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from pipelines.core import model as model_code
from pipelines.core import scoring
from pipelines.core.data import (
    EOT,
    TOKENIZER_FILE,
    is_validation,
    load_tokens,
    sha256_file,
    sha256_hex,
    write_documents,
)
from pipelines.core.errors import DivergenceError, SourceError
from pipelines.core.model import GPT, GPTConfig
from pipelines.core.model_dir import load_model_dir, save_model_dir
from pipelines.core.params import load_params
from pipelines.core.shards import read_documents
from pipelines.stages import evaluate, ingest, tokenize, train
from pipelines.stages.device import cpu_multiplies_bf16, use_bf16

TINY_TRAIN = [
    "train.max_steps=30",
    "train.batch_size=4",
    "train.block_size=32",
    "train.n_layer=1",
    "train.n_head=2",
    "train.n_embd=32",
    "train.checkpoint_every=10",
    "train.log_every=5",
    "train.warmup_steps=5",
    "train.compile=off",  # auto compiles on a CPU (seconds of inductor); test_resume holds the compiled path
    "train.lr=0.01",
    "train.min_lr=0.001",
    "tokenize.vocab_size=300",
    "tokenize.val_fraction=0.2",
    "evaluate.sample_tokens=8",
]


def tiny_params(root, *extra):
    dirs = [
        f"data.raw_dir={root}/raw",
        f"data.curated_dir={root}/curated",
        f"data.quarantine_dir={root}/quarantine",
        f"data.tokens_dir={root}/tokens",
        f"train.checkpoint_dir={root}/ckpt",
        f"train.model_dir={root}/models",
        f"train.reports_dir={root}/reports",
        f"evaluate.reports_dir={root}/reports",
        f"curate.reports_dir={root}/reports",
    ]
    return load_params(root / "absent.yaml", dirs + TINY_TRAIN + list(extra))


def curated_from_stdlib(params, n=60):
    """A curated set without the curate stage: the first n decodable stdlib files."""
    docs = []
    for rec in ingest.collect_documents("python-stdlib", max_documents=n * 2):
        try:
            text = rec["content"].decode("utf-8")
        except UnicodeDecodeError:
            continue
        if len(text) > 300:
            docs.append(
                {"path": rec["path"], "text": text, "sha256": sha256_hex(text), "n_bytes": len(text.encode())}
            )
    write_documents(docs[:n], params.data.curated_dir)
    return docs[:n]


# ---- ingest -------------------------------------------------------------------------------


def test_ingest_stdlib_snapshot_is_raw_bytes_sorted_by_path(tmp_path):
    params = tiny_params(tmp_path, "data.max_documents=25")
    summary = ingest.run(params)
    docs = read_documents(params.data.raw_dir)
    assert summary["documents"] == len(docs) == 25
    assert [d["path"] for d in docs] == sorted(d["path"] for d in docs)
    assert all(isinstance(d["content"], bytes) and d["path"].endswith(".py") for d in docs)


def test_ingest_local_folder_keeps_bytes_undecoded(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("hello\n")
    (src / "sub" / "b.py").write_bytes("x = '\xe9'\n".encode("latin-1"))  # not UTF-8: curate decides
    docs = ingest.collect_documents(str(src))
    assert [d["path"] for d in docs] == ["a.txt", "sub/b.py"]
    assert docs[1]["content"] == b"x = '\xe9'\n"


@pytest.mark.parametrize("kind", ["jsonl", "csv", "parquet"])
def test_ingest_tables_take_the_text_field(tmp_path, kind):
    import pandas as pd

    frame = pd.DataFrame({"text": ["print(1)\n", "print(2)\n"], "other": [1, 2]})
    path = tmp_path / f"rows.{kind}"
    {
        "jsonl": lambda: frame.to_json(path, orient="records", lines=True),
        "csv": lambda: frame.to_csv(path, index=False),
        "parquet": lambda: frame.to_parquet(path),
    }[kind]()
    docs = ingest.collect_documents(str(path))
    assert [d["content"] for d in docs] == [b"print(1)\n", b"print(2)\n"]


@pytest.mark.parametrize(
    "make_source, message",
    [
        (lambda p: str(p / "nowhere"), "no such file"),
        (lambda p: (p / "empty").mkdir() or str(p / "empty"), "no files"),
        (
            lambda p: (p / "rows.jsonl").write_text('{"body": "x"}\n') and str(p / "rows.jsonl"),
            "no column 'text'",
        ),
        (
            lambda p: (p / "bad.parquet").write_bytes(b"PAR1 truncated") and str(p / "bad.parquet"),
            "cannot be read",
        ),
    ],
)
def test_ingest_bad_sources_are_one_line_errors(tmp_path, make_source, message):
    with pytest.raises(SourceError, match=message) as err:
        ingest.collect_documents(make_source(tmp_path))
    assert "\n" not in str(err.value)


# ---- tokenize -----------------------------------------------------------------------------


@pytest.mark.parametrize("row_group_bytes", [None, 20_000])  # one row group; several
def test_document_tables_are_written_byte_for_byte_as_datasets_writes_them(
    tmp_path, monkeypatch, row_group_bytes
):
    """write_documents skips importing datasets but must write its exact file: DVC hashes the bytes,
    so any difference would re-run every stage after ingest and curate."""
    import datasets.config
    from datasets import Dataset

    from pipelines.core import data

    stdlib = ingest.collect_documents("python-stdlib", max_documents=300)  # MBs: content-defined chunks
    tables = {
        "raw": stdlib,
        "curated": [
            {
                "path": r["path"],
                "text": r["content"].decode("latin-1"),
                "sha256": sha256_hex(r["content"]),
                "n_bytes": len(r["content"]),
            }
            for r in stdlib
        ],
        "other values": [{"path": f"p{i}", "score": i / 7, "kept": i % 2 == 0, "n": -i} for i in range(50)],
    }
    if row_group_bytes:
        monkeypatch.setattr(data, "PARQUET_ROW_GROUP_BYTES", row_group_bytes)
        monkeypatch.setattr(datasets.config, "MAX_ROW_GROUP_SIZE", row_group_bytes)
    for name, records in tables.items():
        ours = write_documents(records, tmp_path / name / "ours").read_bytes()
        theirs = tmp_path / name / "datasets.parquet"
        Dataset.from_list(records).to_parquet(str(theirs))
        assert ours == theirs.read_bytes(), name
        assert read_documents(tmp_path / name / "ours") == records


def test_split_depends_on_path_only():
    docs = [{"path": f"pkg/mod{i}.py"} for i in range(400)]
    val = [d for d in docs if is_validation(d["path"], 0.1)]
    assert 20 < len(val) < 60
    # dropping other documents never moves a document between splits
    val_half = [d for d in docs[::2] if is_validation(d["path"], 0.1)]
    assert {d["path"] for d in val_half} == {d["path"] for d in val if d in docs[::2]}
    assert all(is_validation(d["path"], 0.1) for d in val)


def test_tokenizer_round_trips_any_text():
    tok = tokenize.train_tokenizer(["def f(x):\n    return x * 2\n"] * 20, vocab_size=300)
    for text in ["def g(y):\n\treturn 'é' + \"\\n\"\n", "日本語 🐍", "\x00\x01 odd bytes"]:
        assert tok.decode(tok.encode(text).ids) == text


def test_tokenize_writes_arrays_and_stable_split(tmp_path):
    params = tiny_params(tmp_path)
    curated_from_stdlib(params)
    summary = tokenize.run(params)
    tokens = tmp_path / "tokens"
    assert len(load_tokens(tokens / "train.bin")) == summary["train"]["tokens"]
    assert summary["val"]["documents"] > 0 and summary["train"]["documents"] > summary["val"]["documents"]
    assert summary["vocab_size"] <= 300
    assert json.loads((tokens / "meta.json").read_text())["val_set_sha256"] == summary["val_set_sha256"]


# ---- train and evaluate -------------------------------------------------------------------


@pytest.fixture
def tokenized(tmp_path, mlflow_env):
    params = tiny_params(tmp_path)
    curated_from_stdlib(params)
    tokenize.run(params)
    return params


def test_train_smoke_loss_falls_and_writes_model(tokenized):
    summary = train.train_model(tokenized, log=lambda *_: None)
    models = tokenized.train.model_dir
    history = summary["history"]
    assert history[-1][1] < history[0][1] - 0.5  # loss fell
    for name in ("model.safetensors", "config.json", "tokenizer.json", "train.json"):
        assert (tokenized.data.tokens_dir and __import__("pathlib").Path(models, name)).exists()


def test_checkpoint_of_another_config_is_not_resumed(tokenized):
    train.train_model(tokenized, log=lambda *_: None)
    other = tokenized.model_copy(deep=True)
    other.train.lr = 0.005
    messages = []
    summary = train.train_model(other, log=messages.append)
    # the first run's checkpoints went with its model; another config has its own folder anyway
    assert messages[0] == "train: no checkpoint" and summary["resumed_from_step"] == 0


def test_nan_loss_stops_training_and_writes_no_model(tokenized, tmp_path):
    bad = tokenized.model_copy(deep=True)
    bad.train.lr = 1e12
    bad.train.warmup_steps = 0
    bad.train.grad_clip = 0
    bad.train.optimizer = "adamw"  # with Muon the gradient check trips first (test_ddp's diverged rank)
    bad.train.model_dir = str(tmp_path / "never")
    with pytest.raises(DivergenceError, match="loss became"):
        train.train_model(bad, log=lambda *_: None)
    assert not (tmp_path / "never").exists()


def test_evaluate_writes_metrics_next_to_compressors(tokenized):
    train.train_model(tokenized, log=lambda *_: None)
    metrics = evaluate.evaluate_model(tokenized)
    assert 0 < metrics["val_bits_per_byte"] < 8  # below a byte-uniform model
    assert (
        1.0 < metrics["gzip_bits_per_byte"] < 4
        and metrics["xz_bits_per_byte"] < metrics["gzip_bits_per_byte"]
    )
    # the score names its weights and how it was scored (the promotion gate compares on these)
    assert metrics["weights_sha256"] == sha256_file(f"{tokenized.train.model_dir}/model.safetensors")
    assert (metrics["score_context"], metrics["score_max_tokens"]) == (32, None)
    assert metrics["score_bf16"] is use_bf16(tokenized.train.bf16, torch.device("cpu"))
    assert metrics["scoring_code_sha256"] == evaluate.scoring_code_sha256()
    assert metrics["score_key"] == evaluate.score_key(metrics)
    reports = tokenized.evaluate.reports_dir
    # the DVC metrics are numbers only, the headline first; the score's identity is kept apart
    dvc_metrics = json.load(open(f"{reports}/{evaluate.METRICS_FILE}"))
    assert list(dvc_metrics)[:3] == ["val_bits_per_byte", "xz_bits_per_byte", "gzip_bits_per_byte"]
    assert all(isinstance(v, int | float) and not isinstance(v, bool) for v in dvc_metrics.values())
    evaluation = json.load(open(f"{reports}/{evaluate.EVALUATION_FILE}"))
    assert {**dvc_metrics, **evaluation} == metrics and not set(dvc_metrics) & set(evaluation)
    # each scored document's bits and bytes, for the paired promotion gate, in validation order
    per_document = json.load(open(f"{reports}/{evaluate.PER_DOCUMENT_FILE}"))
    assert (per_document["weights_sha256"], per_document["score_key"]) == (
        metrics["weights_sha256"],
        metrics["score_key"],
    )
    docs = per_document["documents"]
    val_docs = evaluate.validation_documents(tokenized)
    assert [(d["path"], d["sha256"]) for d in docs] == [(d["path"], d["sha256"]) for d in val_docs]
    assert [d["bytes"] for d in docs] == [len(d["text"].encode()) for d in val_docs]
    assert sum(d["bytes"] for d in docs) == metrics["val_bytes"] and len(docs) == metrics["val_documents"]
    assert sum(d["bits"] for d in docs) / metrics["val_bytes"] == pytest.approx(
        metrics["val_bits_per_byte"], rel=1e-12
    )
    assert open(f"{reports}/loss_curve.csv").readline().strip() == "step,train_loss,lr"
    samples = json.load(open(f"{reports}/samples.json"))
    assert len(samples) == 3 and all(isinstance(s["completion"], str) for s in samples)


def test_score_texts_counts_every_byte_and_honours_max_tokens(tokenized):
    train.train_model(tokenized, log=lambda *_: None)
    model, tok = load_model_dir(tokenized.train.model_dir)
    texts = ["def a():\n    return 1\n", "x = [i for i in range(3)]\n"]
    full = evaluate.score_texts(model, tok, texts)
    assert full["bytes"] == sum(len(t.encode()) for t in texts) and full["documents_scored"] == 2
    assert full["doc_bytes"] == [len(t.encode()) for t in texts] and len(full["doc_bits"]) == 2
    capped = evaluate.score_texts(model, tok, texts, max_tokens=3)
    assert capped["documents_scored"] == 1 and capped["bytes"] == len(texts[0].encode())
    assert capped["doc_bytes"] == [len(texts[0].encode())] and len(capped["doc_bits"]) == 1


def byte_model_dir(path, block_size: int):
    """A model dir whose tokenizer has no merges (one token per byte of ASCII text, and
    <|endoftext|>: V = 257) and whose weights are all zero, so every logit is 0: each predicted
    token costs exactly log2(V) bits."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=257, special_tokens=[EOT], initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(["aaaa bbbb"], trainer)
    assert tok.get_vocab_size() == 257
    path.mkdir()
    tok.save(str(path / TOKENIZER_FILE))
    config = GPTConfig(vocab_size=257, block_size=block_size, n_layer=1, n_head=2, n_embd=8)
    model = GPT(config)
    for p in model.parameters():
        torch.nn.init.zeros_(p)
    save_model_dir(path, model)
    return path


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("context", [None, 5])
def test_bits_per_byte_of_a_uniform_model_matches_a_hand_count(tmp_path, bf16, context):
    texts = ["def f(x):\n    return x\n", "a = 1\n"]  # 23 + 6 = 29 bytes, all ASCII
    # The stream is EOT doc1 EOT doc2 EOT: 29 + 3 = 32 tokens, of which all but the first are
    # predicted: 31 tokens at log2(257) bits each (windows of 16, or of 5, and a short tail).
    expected = 31 * math.log2(257) / 29
    model_dir = byte_model_dir(tmp_path / "m", block_size=16)
    model, tok = load_model_dir(model_dir)
    scored = evaluate.score_texts(model, tok, texts, bf16=bf16, context=context)
    assert (scored["tokens"], scored["bytes"], scored["documents_scored"]) == (31, 29, 2)
    assert scored["nll_bits"] == pytest.approx(31 * math.log2(257), rel=1e-6)
    # per document: its 23 (6) bytes and the EOT that ends it, whichever window predicted them
    assert scored["doc_bytes"] == [23, 6]
    assert scored["doc_bits"] == pytest.approx([24 * math.log2(257), 7 * math.log2(257)], rel=1e-6)
    assert evaluate.score_model_dir(model_dir, texts, bf16=bf16, context=context) == pytest.approx(
        expected, rel=1e-6
    )


def total_bits_by_windows(model, tok, texts, context) -> float:
    """The total as score_texts summed it before it kept documents apart: the stream's tokens
    predicted in windows of `context`, cross-entropy summed over each window."""
    eot = tok.token_to_id(EOT)
    stream = [eot]
    for text in texts:
        stream += tok.encode(text, add_special_tokens=False).ids + [eot]
    ids, nats = torch.tensor(stream), 0.0
    with torch.no_grad():
        for s in range(0, len(ids) - 1, context):
            n = min(context, len(ids) - 1 - s)
            logits, _ = model(ids[s : s + n][None])
            nats += torch.nn.functional.cross_entropy(
                logits[0].float(), ids[s + 1 : s + 1 + n], reduction="sum"
            ).item()
    return nats / math.log(2)


@pytest.mark.parametrize("context", [None, 7, 13])
def test_per_document_bits_add_up_to_the_total(tmp_path, context):
    from conftest import SNIPPETS, make_model_dir

    model, tok = load_model_dir(make_model_dir(tmp_path / "m", seed=3, block_size=32))
    texts = SNIPPETS * 2  # 12 documents, several longer than a window: windows cross documents
    scored = evaluate.score_texts(model, tok, texts, context=context, batch_size=4)
    assert len(scored["doc_bits"]) == len(texts) and all(b > 0 for b in scored["doc_bits"])
    assert math.fsum(scored["doc_bits"]) == pytest.approx(scored["nll_bits"], rel=1e-12)
    assert scored["nll_bits"] == pytest.approx(
        total_bits_by_windows(model, tok, texts, context or 32), rel=1e-6
    )
    # a document's bits do not depend on what else is scored when windows start at its start
    alone = evaluate.score_texts(model, tok, texts[:1], context=context)
    assert alone["doc_bits"][0] == pytest.approx(scored["doc_bits"][0], rel=1e-5)


def test_score_texts_refuses_a_context_longer_than_the_model(tmp_path):
    model, tok = load_model_dir(byte_model_dir(tmp_path / "m", block_size=16))
    with pytest.raises(ValueError, match="context 17 is longer than the model's block_size 16"):
        evaluate.score_texts(model, tok, ["x = 1\n"], context=17)


def test_score_key_changes_with_each_setting_that_changes_a_score():
    base = {
        "val_set_sha256": "a" * 64,
        "score_max_tokens": None,
        "score_context": 64,
        "score_bf16": False,
        "scoring_code_sha256": evaluate.scoring_code_sha256(),
    }
    changed = [
        ("val_set_sha256", "b" * 64),
        ("score_max_tokens", 20000),
        ("score_context", 32),
        ("score_bf16", True),
        ("scoring_code_sha256", "c" * 64),
    ]
    assert [field for field, _ in changed] == list(evaluate.SCORE_KEY_FIELDS)
    keys = {evaluate.score_key(base)} | {evaluate.score_key({**base, f: v}) for f, v in changed}
    assert len(keys) == len(changed) + 1
    assert evaluate.score_key({**base, "val_loss": 1.0}) == evaluate.score_key(base)  # only the key's fields


def test_auto_precision_on_cpu_is_bf16_only_where_the_cpu_multiplies_bf16():
    """On a CPU without bf16 instructions (AVX2 alone) torch's bf16 matmul is ~140x slower than
    fp32: "auto" must pick fp32 there. The CPU's own flags say which kind this machine is."""
    flags = set()
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    if not flags:
        pytest.skip("no /proc/cpuinfo flags on this platform")
    native = bool(flags & {"avx512_bf16", "amx_bf16"})
    cpu = torch.device("cpu")
    assert cpu_multiplies_bf16() is native
    assert use_bf16("auto", cpu) is native
    assert (use_bf16("on", cpu), use_bf16("off", cpu)) == (True, False)


def test_scoring_code_hash_is_the_imported_scorers_source():
    # publish reads the hash from the files (no torch); it must be the code evaluate runs: the
    # source inspect gives for score_texts (decorator included) and for the model module.
    imported = sha256_hex(inspect.getsource(evaluate.score_texts) + inspect.getsource(model_code))
    assert scoring.scoring_code_sha256() == imported
    text = "import torch\n\n\n@torch.no_grad()\ndef f(x):\n    return x  # done\n\n\ndef g():\n    pass\n"
    assert scoring.function_source(text, "f") == "@torch.no_grad()\ndef f(x):\n    return x  # done\n"
    with pytest.raises(LookupError, match="no function h"):
        scoring.function_source(text, "h")


def test_publish_imports_no_torch():
    # An unchanged `trainpipe run` imports the publish code (the promotion command and the publish
    # stage) and publishes nothing: torch, 2.2 s of imports, waits for a run that logs or scores a model.
    probe = "import sys, pipelines.commands.promotion; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch')[:3])"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", result.stdout


def test_compile_auto_compiles_on_a_cpu_where_inductor_builds_and_trains_eager_where_not(tmp_path):
    # auto asks inductor to build one real kernel: with this machine's C++ compiler it compiles (a
    # run of one process); with a compiler that is not there (CXX, read by inductor; an empty cache
    # so that no kernel built before is reused) it says why and stays eager.
    probe = (
        "import torch; from pipelines.stages.device import compile_decision, use_compile; cpu = torch.device('cpu'); "
        "print(use_compile('auto', cpu), use_compile('auto', cpu, world=2), use_compile('on', cpu, world=2)); "
        "print(compile_decision('auto', cpu)[1])"  # why auto trains eager: what the train stage logs
    )

    def ask(**env) -> list[str]:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache" / str(len(env))), **env}
        result = subprocess.run(
            [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
        )
        return result.stdout.splitlines()

    assert ask() == ["True False True", ""]
    decision, problem = ask(CXX=str(tmp_path / "no-such-c++"))
    assert decision == "False False True"
    assert problem, "a failed probe names its reason"


def test_cpu_training_reuses_freed_memory_instead_of_faulting_in_fresh_pages():
    # Tensors the size of the default's logits (67 MB), each freed before the next, as a step frees
    # its logits. With glibc's default each is its own mmap, outside the heap, whose 16,384 pages
    # the kernel faults in afresh; after reuse_freed_memory they come from the heap, which keeps
    # freed memory. Where in the heap, and so how many pages are new, depends on the heap's layout
    # (torch's 64-byte alignment can leave two regions taking turns; CI once saw half the default's
    # faults while the first ten were still settling), so the faults are counted after a warm-up
    # and the bound leaves room for that.
    probe = """
import resource, sys, torch
from pipelines.stages.device import reuse_freed_memory
applied = reuse_freed_memory(torch.device(sys.argv[1])) if sys.argv[1] != "none" else None
def zeros_in_heap():
    data = torch.zeros(16, 256, 4096).data_ptr()
    for line in open("/proc/self/maps"):
        if line.rstrip().endswith("[heap]"):
            low, high = (int(end, 16) for end in line.split()[0].split("-"))
            if low <= data < high:
                return True
    return False
for _ in range(10):
    zeros_in_heap()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
in_heap = all([zeros_in_heap() for _ in range(10)])  # a list: all ten run, faults and all
print(applied, in_heap, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

    def ask(device: str) -> tuple[str, str, int]:
        result = subprocess.run(
            [sys.executable, "-c", probe, device], capture_output=True, text=True, check=True
        )
        applied, in_heap, faults = result.stdout.split()
        return applied, in_heap, int(faults)

    # another device than a CPU leaves glibc's default untouched
    default, reused, untouched = ask("none"), ask("cpu"), ask("meta")
    assert default[1] == "False" and default[2] > 0, default
    assert reused[:2] == ("True", "True") and reused[2] <= default[2] * 3 / 4, (reused, default)
    assert untouched[:2] == ("False", "False") and untouched[2] > default[2] / 2, (untouched, default)


def test_the_resolved_compilation_is_part_of_the_checkpoint_key():
    # compiled and eager kernels sum in different orders: a checkpoint of one does not resume the other
    params = load_params("params.yaml", TINY_TRAIN)
    model_cfg = train.model_config(params.train, 300)
    eager = train.run_fingerprint(params.train, model_cfg, bf16=False, compiled=False)
    compiled = train.run_fingerprint(params.train, model_cfg, bf16=False, compiled=True)
    assert eager != compiled and {k for k in eager if eager[k] != compiled[k]} == {"compiled"}
