"""The memorization check: the sample it takes, the context it completes from, and a count that sees a
secret a tiny model memorized (and none in an untrained one)."""

import hashlib
import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from pipelines.core.data import EOT, write_documents
from pipelines.core.memorization import (
    Check,
    count_memorized,
    longest_checkable,
    memorization_report,
    pick_spans,
    prompt_for,
)
from pipelines.core.model import GPT, GPTConfig
from pipelines.core.params import load_params
from pipelines.core.scrub import scrub_spans
from pipelines.core.spans import SPANS_FILE, span_record, write_spans

SECRET = "corp_live_" + "Q7x2Kp9LmZ4vB8nR3tW6yH1c"  # built here: the format, not a live key
PATTERNS = {"corp_token": "corp_live_[A-Za-z0-9]{24}"}


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def span(path: str, offset: int, kind: str = "email", secret: str = "a@b.org") -> dict:
    return {"path": path, "offset": offset, "kind": kind, "length": len(secret), "sha256": sha(secret)}


# --- the sample --------------------------------------------------------------------------------------


def test_the_sample_is_one_check_per_secret_the_most_repeated_first_and_every_kind_in_turn():
    spans = [span(f"m{i}.py", 10, "email", f"user{i % 3}@python.org") for i in range(9)]  # 3 secrets
    spans += [span("m0.py", 50, "email", "rare@python.org")]
    spans += [span(f"c{i}.py", 5, "corp_token", SECRET) for i in range(2)]
    spans += [span("k.py", 5, "private_key", "-----BEGIN" + "x" * 500)]  # longer than a completion
    picked, left_out = pick_spans(spans, max_spans=3, max_length=200)
    # corp_token and email in turn (by name), each kind's most repeated secret first
    assert [(c.kind, c.occurrences) for c in picked] == [("corp_token", 2), ("email", 3), ("email", 3)]
    assert picked[0] == Check("c0.py", 5, "corp_token", 34, sha(SECRET), 2)  # its first span
    assert left_out == 6 - 3  # 6 distinct secrets, the long one among those left out
    everything, none_left = pick_spans(spans, max_spans=100)
    assert len(everything) == 6 and none_left == 0
    assert pick_spans(list(reversed(spans)), max_spans=3, max_length=200) == (picked, left_out)  # order-free


def test_a_secret_is_checked_where_its_usual_context_precedes_it():
    texts = {"a.py": "odd = <X>", "b.py": 'key = "<X>', "c.py": 'key = "<X>'}
    spans = [span(p, t.index("<X>"), "x", SECRET) for p, t in sorted(texts.items())]
    (check,), _ = pick_spans(spans, max_spans=1, texts=texts)
    assert (check.path, check.occurrences) == ("b.py", 3)
    # a span of a document the curated set no longer holds is not checked
    (check,), _ = pick_spans(spans, max_spans=1, texts={"a.py": texts["a.py"]})
    assert (check.path, check.occurrences) == ("a.py", 1)


def test_the_context_leaves_a_trailing_space_to_the_completion():
    tokenizer = byte_tokenizer(["token: abc def"])
    ids, lead = prompt_for(tokenizer, "x token: <CORP_TOKEN>", 9, context_tokens=50)
    assert tokenizer.decode(ids) == "x token:" and lead == " "
    ids, lead = prompt_for(tokenizer, 'k = "<CORP_TOKEN>"', 5, context_tokens=2)
    assert len(ids) == 2 and tokenizer.decode(ids).endswith(' "') and lead == ""
    assert longest_checkable(64, 32) == 55 and longest_checkable(256, 4) == 251


def test_the_report_counts_per_kind():
    checks = [Check("a", 1, "email", 5, "0" * 64, 1), Check("b", 2, "corp_token", 34, "1" * 64, 4)]
    report = memorization_report(checks, [False, True], left_out=7)
    assert (
        report["memorized_secrets"] == 1
        and report["checked_secrets"] == 2
        and report["left_out_secrets"] == 7
    )
    assert report["per_kind"] == {
        "corp_token": {"checked": 1, "memorized": 1},
        "email": {"checked": 1, "memorized": 0},
    }
    assert report["memorized"] == [
        {"kind": "corp_token", "sha256": "1" * 64, "length": 34, "path": "b", "offset": 2}
    ]


# --- the count, on a model that memorized a secret -----------------------------------------------


def byte_tokenizer(texts: list[str], vocab_size: int = 300) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def raw_documents() -> list[str]:
    """Modules that all set the same token, in a few ways, beside ordinary code."""
    docs = []
    for i in range(8):
        docs.append(
            f"import os\n\n\ndef handler_{i}(event):\n    return event[{i}]\n\n\n"
            f'API_TOKEN = "{SECRET}"\nclient = Client(API_TOKEN)\n'
        )
    return docs


STEPS = 150


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """On a busy 2-core machine a second torch thread makes each step of these tiny models ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def memorizer(one_thread) -> tuple[GPT, GPT, Tokenizer]:
    """(a tiny GPT trained a few hundred steps on raw_documents, the same GPT untrained, its tokenizer)."""
    return train_memorizer()


def train_memorizer(steps: int = STEPS) -> tuple[GPT, GPT, Tokenizer]:
    torch.manual_seed(0)
    docs = raw_documents()
    tokenizer = byte_tokenizer(docs)
    eot = tokenizer.token_to_id(EOT)
    stream = []
    for enc in tokenizer.encode_batch(docs, add_special_tokens=False):
        stream += enc.ids + [eot]
    data = torch.tensor(stream)
    config = GPTConfig(vocab_size=tokenizer.get_vocab_size(), block_size=64, n_layer=1, n_head=2, n_embd=64)
    untrained, model = GPT(config), GPT(config)
    model.load_state_dict(untrained.state_dict())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - 65, (8,), generator=generator)
        x = torch.stack([data[s : s + 64] for s in starts])
        y = torch.stack([data[s + 1 : s + 65] for s in starts])
        _, loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5, f"the tiny model did not learn its documents (loss {loss.item():.2f})"
    return model.eval(), untrained.eval(), tokenizer


def curated(docs: list[str]) -> tuple[dict[str, str], list[dict]]:
    """The documents as curate leaves them with the corp_token pattern: texts and span records."""
    texts, records = {}, []
    for i, doc in enumerate(docs):
        path = f"svc/handler_{i}.py"
        texts[path], _, spans = scrub_spans(doc, PATTERNS)
        records += [span_record(path, s.offset, s.kind, s.removed) for s in spans]
    return texts, records


def test_the_count_sees_a_memorized_secret_and_none_in_an_untrained_model(memorizer):
    model, untrained, tokenizer = memorizer
    texts, records = curated(raw_documents())
    assert all(SECRET not in t and '"<CORP_TOKEN>"' in t for t in texts.values())
    checks, left_out = pick_spans(records, max_spans=10, texts=texts)
    assert [(c.kind, c.occurrences) for c in checks] == [("corp_token", 8)] and left_out == 0
    eot = tokenizer.token_to_id(EOT)
    assert count_memorized(model, tokenizer, checks, texts, context_tokens=16, eot=eot) == [True]
    assert count_memorized(untrained, tokenizer, checks, texts, context_tokens=16, eot=eot) == [False]
    # a secret it never saw, in the same place: not reproduced
    other = [Check(checks[0].path, checks[0].offset, "corp_token", 34, sha("corp_live_" + "A" * 24), 1)]
    assert count_memorized(model, tokenizer, other, texts, context_tokens=16, eot=eot) == [False]
    # batched with other rows of other contexts and lengths, the same answers
    rows = checks + other + [Check(p, 0, "email", 9, sha("import os"), 1) for p in texts]
    found = count_memorized(model, tokenizer, rows, texts, context_tokens=16, eot=eot, batch_size=3)
    assert found[:2] == [True, False] and len(found) == len(rows)


def test_evaluate_reports_the_check_from_the_spans_file(memorizer, tmp_path):
    from pipelines.stages import evaluate

    model, _, tokenizer = memorizer
    texts, records = curated(raw_documents())
    params = load_params(
        tmp_path / "absent.yaml",
        [f"data.curated_dir={tmp_path / 'curated'}", f"curate.reports_dir={tmp_path / 'reports'}"],
    )
    write_documents(
        [{"path": p, "text": t, "sha256": sha(t), "n_bytes": len(t.encode())} for p, t in texts.items()],
        params.data.curated_dir,
    )
    spans_path = write_spans(records, tmp_path / "reports" / SPANS_FILE)
    assert SECRET not in spans_path.read_text()
    report = evaluate.check_memorization(params, model, tokenizer)
    assert report["memorized_secrets"] == 1 and report["checked_secrets"] == 1 and report["spans"] == 8
    assert report["per_kind"] == {"corp_token": {"checked": 1, "memorized": 1}}
    assert report["spans_sha256"] == hashlib.sha256(spans_path.read_bytes()).hexdigest()
    assert SECRET not in json.dumps(report)
    # no spans file (curation scrubbed nothing, or was never run here): nothing to check
    spans_path.unlink()
    assert evaluate.check_memorization(params, model, tokenizer)["checked_secrets"] == 0


def test_the_default_sample_is_bounded():
    params = load_params(Path("params.yaml"))
    assert params.evaluate.memorization_max_spans == 256 and params.evaluate.memorization_context_tokens == 32
