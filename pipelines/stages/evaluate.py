"""Evaluate: held-out bits per byte of the trained model, next to gzip -9 and xz -9 on the same bytes.

    python -m pipelines.stages.evaluate          # what `dvc repro evaluate` runs

Scores the validation split (documents whose path hashes into it, see pipelines.core.data) in
non-overlapping windows of block_size tokens. Bits per byte = total negative log2-likelihood
of the tokens / UTF-8 bytes of the documents, so it compares across tokenizers and with
compressors. Writes:
    reports/metrics.json       the DVC metrics: numbers only, the headline (bits per byte) first,
                               the compressors beside it, then the training speed and split size
    reports/evaluation.json    what was scored and how (below), and the whole-split compressor figures
    reports/per_document.json  each scored document's bits and bytes: publish pairs them with the
                               champion's in a bootstrap
    reports/slices.json        the DVC metrics of the evaluation slices (evaluate.slices): each
                               slice's bits per byte and documents (pipelines.core.slices)
    reports/loss_curve.csv     the DVC plot of the training loss
    reports/samples.json       sampled completions
    reports/memorization.json  the memorization check (pipelines/core/memorization.py): secrets that
                               curation removed (reports/scrubbed_spans.jsonl), checked and reproduced
                               by greedy completion, per kind; metrics.json has the totals

A score belongs to its weights and to how it was scored: evaluation.json carries the sha256 of the
weights it scored (publish refuses a score of other weights) and a score key over everything
else that changes the number: the validation set, the token cap, the context length scored, the
precision and the scoring code. Scores compare only under equal keys; publish re-scores the
champion under the challenger's settings when its key differs.
"""

import csv
import gzip
import json
import lzma
import math
from array import array
from pathlib import Path

import torch

from pipelines.core.data import (
    EOT,
    atomic_path,
    is_validation,
    read_json,
    sha256_file,
    sha256_hex,
    write_json,
)
from pipelines.core.errors import TrainpipeError
from pipelines.core.memorization import (
    count_memorized,
    longest_checkable,
    memorization_report,
    pick_spans,
)
from pipelines.core.model import GPT
from pipelines.core.model_dir import WEIGHTS_FILE, load_model_dir
from pipelines.core.params import Params
from pipelines.core.scoring import (
    EVALUATION_FILE,
    MEMORIZATION_FILE,
    METRICS_FILE,
    PER_DOCUMENT_FILE,
    SCORE_KEY_FIELDS,
    scoring_code_sha256,
)
from pipelines.core.shards import iter_documents
from pipelines.core.slices import SLICES_FILE, slice_metrics
from pipelines.core.spans import SPANS_FILE, read_spans
from pipelines.stages.device import use_bf16

ENCODE_BATCH_DOCS = 256  # documents encoded at a time when scoring
SAMPLE_PROMPTS = ["def fibonacci(n):\n", "import os\n\n\ndef ", "class Stack:\n    def __init__(self):\n"]


def validation_documents(params: Params) -> list[dict]:
    """The held-out documents of the curated set, in its order, streamed from its shards."""
    fraction = params.tokenize.val_fraction
    return [d for d in iter_documents(params.data.curated_dir) if is_validation(d["path"], fraction)]


def validation_texts(params: Params) -> list[str]:
    return [d["text"] for d in validation_documents(params)]


@torch.no_grad()
def score_texts(
    model: GPT,
    tokenizer,
    texts: list[str],
    max_tokens: int | None = None,
    batch_size: int = 16,
    bf16: bool = False,
    context: int | None = None,
) -> dict:
    """Negative log-likelihood of texts under the model, in bits, with the bytes it covers, in all
    and per document (doc_bits, doc_bytes: one entry per document scored, in order).

    The stream is <|endoftext|> doc1 <|endoftext|> doc2 ...; every token after the first is
    predicted once, in windows of `context` tokens (default: the model's block_size). A predicted
    token counts to the document it belongs to, the <|endoftext|> that ends a document to that
    document, so the documents' bits add up to the total. With max_tokens, whole documents are
    taken until the cap is reached. Models compared with each other must be scored with the same
    texts, cap, context and bf16 setting (the score key).
    """
    T = context or model.config.block_size
    if T > model.config.block_size:
        raise ValueError(f"context {T} is longer than the model's block_size {model.config.block_size}")
    eot = tokenizer.token_to_id(EOT)
    # ids only, 8 bytes a token: a tokenizers Encoding holds offsets and strings besides, about
    # 100 bytes a token, too much to keep for a large split at once
    stream, doc_bytes, doc_tokens = array("q", [eot]), [], []
    # encoded ENCODE_BATCH_DOCS documents at a time, in order (inline: the score key hashes this function)
    encoded = (
        (enc.ids, text)
        for start in range(0, len(texts), ENCODE_BATCH_DOCS)
        for chunk in [texts[start : start + ENCODE_BATCH_DOCS]]
        for enc, text in zip(tokenizer.encode_batch(chunk, add_special_tokens=False), chunk, strict=True)
    )
    for doc_ids, text in encoded:
        if max_tokens and len(stream) > 1 and len(stream) + len(doc_ids) + 1 > max_tokens + 1:
            break
        stream.extend(doc_ids)
        stream.append(eot)
        doc_bytes.append(len(text.encode("utf-8")))
        doc_tokens.append(len(doc_ids) + 1)
    device = next(model.parameters()).device
    ids = torch.frombuffer(stream, dtype=torch.long)
    # the document of each predicted token ids[1:]: a document's tokens and the EOT that ends it
    owner = torch.repeat_interleave(torch.arange(len(doc_tokens)), torch.tensor(doc_tokens, dtype=torch.long))
    doc_nats = torch.zeros(len(doc_tokens), dtype=torch.float64)
    starts = list(range(0, len(ids) - 1, T))
    for b in range(0, len(starts), batch_size):
        for_batch = starts[b : b + batch_size]
        full = [s for s in for_batch if s + T + 1 <= len(ids)]
        groups = [full] + [[s] for s in for_batch if s not in full]  # the short tail window alone
        for group in groups:
            if not group:
                continue
            n = min(T, len(ids) - 1 - group[0])
            x = torch.stack([ids[s : s + n] for s in group]).to(device)
            y = torch.stack([ids[s + 1 : s + 1 + n] for s in group]).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits, _ = model(x)
            nll = torch.nn.functional.cross_entropy(
                logits.float().view(-1, logits.size(-1)), y.view(-1), reduction="none"
            )  # (len(group) * n,), in nats
            doc_nats.index_add_(0, torch.cat([owner[s : s + n] for s in group]), nll.double().cpu())
    n_tokens = len(ids) - 1
    nll_nats = doc_nats.sum().item()
    return {
        "nll_bits": nll_nats / math.log(2),
        "tokens": n_tokens,
        "bytes": sum(doc_bytes),
        "loss": nll_nats / n_tokens,
        "documents_scored": len(doc_bytes),
        "context": T,
        "doc_bits": (doc_nats / math.log(2)).tolist(),
        "doc_bytes": doc_bytes,
    }


def score_saved_model(
    model_dir: str | Path,
    texts: list[str],
    *,
    bf16: bool,
    max_tokens: int | None = None,
    context: int | None = None,
) -> dict:
    """score_texts of a saved model (used to re-score a champion, per document).

    bf16 has no default: a re-score must use the precision of the score it is compared with."""
    model, tokenizer = load_model_dir(model_dir)
    return score_texts(model, tokenizer, texts, max_tokens, bf16=bf16, context=context)


def score_model_dir(
    model_dir: str | Path,
    texts: list[str],
    *,
    bf16: bool,
    max_tokens: int | None = None,
    context: int | None = None,
) -> float:
    """Held-out bits per byte of a saved model on texts."""
    s = score_saved_model(model_dir, texts, bf16=bf16, max_tokens=max_tokens, context=context)
    return s["nll_bits"] / s["bytes"]


def document_scores(docs: list[dict], scored: dict) -> list[dict]:
    """One record per document scored (the first documents_scored of docs): its path, content
    hash, bits and bytes. The hashes let a later comparison check it pairs the same documents."""
    return [
        {"path": d["path"], "sha256": d["sha256"], "bits": bits, "bytes": n_bytes}
        for d, bits, n_bytes in zip(docs, scored["doc_bits"], scored["doc_bytes"], strict=False)
    ]


def score_key(settings: dict) -> str:
    """One hash over SCORE_KEY_FIELDS of a metrics dict: equal keys, comparable scores."""
    return sha256_hex(json.dumps({k: settings[k] for k in SCORE_KEY_FIELDS}, sort_keys=True))


def compression_bits_per_byte(texts: list[str]) -> dict:
    """What general-purpose compressors achieve on the same bytes: the bar a model should clear.

    Per document (each file compressed alone, as `gzip -9 FILE` would) is the headline figure,
    comparable with DESIGN.md's reference; the whole split as one stream lets the compressor
    reuse text across files, which the model's short context cannot, so it is reported apart.
    """
    docs = [t.encode("utf-8") for t in texts]
    n = sum(len(d) for d in docs)
    stream = b"".join(docs)
    return {
        "xz_bits_per_byte": 8 * sum(len(lzma.compress(d, preset=9)) for d in docs) / n,
        "gzip_bits_per_byte": 8 * sum(len(gzip.compress(d, compresslevel=9)) for d in docs) / n,
        "gzip_stream_bits_per_byte": 8 * len(gzip.compress(stream, compresslevel=9)) / n,
        "xz_stream_bits_per_byte": 8 * len(lzma.compress(stream, preset=9)) / n,
    }


def sample_completions(
    model: GPT, tokenizer, prompts: list[str], max_new_tokens: int, seed: int
) -> list[dict]:
    device = next(model.parameters()).device
    out = []
    for i, prompt in enumerate(prompts):
        g = torch.Generator(device=device).manual_seed(seed + i)
        idx = torch.tensor([tokenizer.encode(prompt).ids], device=device)
        ids = model.generate(
            idx, max_new_tokens, temperature=0.8, top_k=50, generator=g, stop_token=tokenizer.token_to_id(EOT)
        )
        out.append({"prompt": prompt, "completion": tokenizer.decode(ids[0, idx.size(1) :].tolist())})
    return out


def check_memorization(params: Params, model: GPT, tokenizer) -> dict:
    """The memorization check on the curate stage's spans (its report, with the spans file's sha256
    and the settings, which with the weights make the count); no spans file, nothing checked."""
    spans_path = Path(params.curate.reports_dir) / SPANS_FILE
    settings = {
        "spans_file": str(spans_path),
        "spans_sha256": sha256_file(spans_path) if spans_path.is_file() else None,
        "max_spans": params.evaluate.memorization_max_spans,
        "context_tokens": params.evaluate.memorization_context_tokens,
    }
    spans = read_spans(spans_path) if spans_path.is_file() else []
    texts = {}
    if spans:
        paths = {span["path"] for span in spans}
        texts = {d["path"]: d["text"] for d in iter_documents(params.data.curated_dir) if d["path"] in paths}
    context = params.evaluate.memorization_context_tokens
    checks, left_out = pick_spans(
        spans,
        params.evaluate.memorization_max_spans,
        texts,
        max_length=longest_checkable(model.config.block_size, context),
    )
    found = count_memorized(model, tokenizer, checks, texts, context, eot=tokenizer.token_to_id(EOT))
    return {**settings, **memorization_report(checks, found, left_out), "spans": len(spans)}


def write_loss_curve(history: list, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["step", "train_loss", "lr"])
        writer.writerows(history)


def evaluate_model(params: Params) -> dict:
    torch.manual_seed(params.train.seed)
    weights_sha = sha256_file(Path(params.train.model_dir) / WEIGHTS_FILE)  # the weights scored below
    model, tokenizer = load_model_dir(params.train.model_dir)
    docs = validation_documents(params)
    if not docs:
        raise TrainpipeError("evaluate: the validation split is empty")
    texts = [d["text"] for d in docs]
    bf16 = use_bf16(params.train.bf16, torch.device("cpu"))
    scored = score_texts(model, tokenizer, texts, params.evaluate.max_tokens, bf16=bf16)
    covered = texts[: scored["documents_scored"]]
    settings = {
        "val_set_sha256": read_json(Path(params.data.tokens_dir) / "meta.json")["val_set_sha256"],
        "score_max_tokens": params.evaluate.max_tokens,
        "score_context": scored["context"],
        "score_bf16": bf16,
        "scoring_code_sha256": scoring_code_sha256(),
    }
    compressors = compression_bits_per_byte(covered)
    train_summary = read_json(Path(params.train.model_dir) / "train.json")
    memorization = check_memorization(params, model, tokenizer)
    # Every key is a column of `dvc exp show`: numbers that matter, the headline first.
    metrics = {
        "val_bits_per_byte": scored["nll_bits"] / scored["bytes"],
        "xz_bits_per_byte": compressors["xz_bits_per_byte"],
        "gzip_bits_per_byte": compressors["gzip_bits_per_byte"],
        "val_documents": scored["documents_scored"],
        "val_bytes": scored["bytes"],
        # secrets curation removed that greedy completion reproduces: any blocks promotion
        "memorized_secrets": memorization["memorized_secrets"],
        "memorization_checked": memorization["checked_secrets"],
    }
    evaluation = {
        "weights_sha256": weights_sha,
        **settings,
        "score_key": score_key(settings),
        "val_loss": scored["loss"],  # nats per token: bits per byte is the figure that compares
        "val_tokens": scored["tokens"],
        **{k: v for k, v in compressors.items() if "_stream_" in k},
        "memorization_spans_sha256": memorization["spans_sha256"],  # publish checks it is curate's now
    }
    reports = Path(params.evaluate.reports_dir)
    write_json(reports / METRICS_FILE, metrics, sort_keys=False)
    write_json(reports / EVALUATION_FILE, evaluation)
    documents = document_scores(docs, scored)
    write_json(
        reports / PER_DOCUMENT_FILE,
        {"weights_sha256": weights_sha, "score_key": evaluation["score_key"], "documents": documents},
    )
    # the slices' figures come from the per-document scores alone: a change of evaluate.slices
    # changes no document's bits, so the score key stays the same
    write_json(reports / SLICES_FILE, slice_metrics(documents, params.evaluate.slices), sort_keys=False)
    write_json(reports / MEMORIZATION_FILE, {"weights_sha256": weights_sha, **memorization})
    write_loss_curve(train_summary.get("history", []), reports / "loss_curve.csv")
    samples = sample_completions(
        model,
        tokenizer,
        SAMPLE_PROMPTS[: params.evaluate.num_samples],
        params.evaluate.sample_tokens,
        params.train.seed,
    )
    write_json(reports / "samples.json", samples)
    return {**metrics, **evaluation}


def run(params: Params) -> dict:
    return evaluate_model(params)


def describe(m: dict, params: Params) -> str:
    return (
        f"evaluate: {m['val_bits_per_byte']:.3f} bits/byte on {m['val_bytes'] / 1e6:.2f} MB held out "
        f"(gzip -9 {m['gzip_bits_per_byte']:.3f}, xz -9 {m['xz_bits_per_byte']:.3f}); "
        f"memorization: {m['memorized_secrets']} of {m['memorization_checked']} removed secrets reproduced"
    )


def main(argv: list[str] | None = None) -> None:
    from pipelines.stages.entry import stage_main

    stage_main("evaluate", run, describe, argv)


if __name__ == "__main__":
    main()
