"""Tokenize: train a byte-level BPE tokenizer on a sample of the training split, write token ids as
flat arrays. A fine-tune (finetune.parent_version set) encodes with its parent's tokenizer instead.

    python -m pipelines.stages.tokenize          # what `dvc repro tokenize` runs

The split is by a hash of each document's path (pipelines.core.data.is_validation), so it stays
stable as the corpus changes; the tokenizer sees training documents only: those a second hash of
the path draws, about tokenize.sample_bytes of them (all, on the default corpus), streamed into
the trainer. Encoding then runs shard by shard of data/curated, in tokenize.workers processes (or
on data.executor's cluster), each writing its shard's ids; the shards' ids are joined in order.
Documents are joined with the <|endoftext|> token. Outputs in data/tokens: tokenizer.json,
train.bin, val.bin (uint16, memory-mapped by training and evaluation), meta.json.
"""

import hashlib
import multiprocessing
import os
import shutil
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from pipelines.adapters.executor import map_shards
from pipelines.core.data import (
    EOT,
    TOKEN_DTYPE,
    TOKENIZER_FILE,
    atomic_path,
    is_validation,
    write_json,
)
from pipelines.core.errors import SourceError
from pipelines.core.params import Params
from pipelines.core.shards import SHARD_GLOB, iter_documents, list_shards, read_shard

ENCODE_BATCH_DOCUMENTS = 256  # documents encoded at once: their Encoding objects are large
SPLITS = ("train", "val")


def train_tokenizer(texts: Iterator[str] | list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE (GPT-2 style): every byte is in the alphabet, so any text round-trips."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def validation_set_hash(val_docs: list[dict]) -> str:
    """Identifies the held-out set: promotion compares models only on the same one."""
    h = hashlib.sha256()
    for doc in val_docs:
        h.update(doc["path"].encode() + b"\0" + doc["sha256"].encode() + b"\n")
    return h.hexdigest()


def train_sample_tokenizer(task: dict) -> None:
    """Train the BPE on the training documents in the sample, streamed from data/curated; save it."""
    texts = (
        d["text"]
        for d in iter_documents(task["curated"], columns=["path", "text"])
        if not is_validation(d["path"], task["val_fraction"]) and in_sample(d["path"], task["sample"])
    )
    train_tokenizer(texts, task["vocab_size"]).save(task["out"])


def in_sample(path: str, fraction: float) -> bool:
    """Whether a training document is in the tokenizer's sample: a hash of its path (another one
    than the split's) below fraction, so the sample is the same whatever the shards."""
    if fraction >= 1.0:
        return True
    digest = hashlib.sha1(b"tokenizer sample\0" + path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def encode_shard(task: dict) -> dict:
    """Shard i of data/curated -> its documents' ids, each followed by <|endoftext|>, in
    train-i.bin and val-i.bin under the work folder; their token and byte counts."""
    # one thread per worker: the workers are the parallelism (and a run's figures stay comparable)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tokenizer = Tokenizer.from_file(task["tokenizer"])
    eot = tokenizer.token_to_id(EOT)
    docs = read_shard(task["shard"], columns=["path", "text", "n_bytes"])
    counts = {}
    for split in SPLITS:
        want_val = split == "val"
        split_docs = [d for d in docs if is_validation(d["path"], task["val_fraction"]) == want_val]
        tokens = 0
        with (
            atomic_path(Path(task["work"]) / f"{split}-{task['index']:05d}.bin") as tmp,
            tmp.open("wb") as fh,
        ):
            for start in range(0, len(split_docs), ENCODE_BATCH_DOCUMENTS):
                batch = split_docs[start : start + ENCODE_BATCH_DOCUMENTS]
                for encoding in tokenizer.encode_batch([d["text"] for d in batch], add_special_tokens=False):
                    ids = np.empty(len(encoding.ids) + 1, dtype=TOKEN_DTYPE)
                    ids[:-1] = encoding.ids
                    ids[-1] = eot
                    fh.write(ids.tobytes())
                    tokens += len(ids)
        counts[split] = {
            "documents": len(split_docs),
            "tokens": tokens,
            "bytes": sum(d["n_bytes"] for d in split_docs),
        }
    return counts


def join_token_shards(work: Path, split: str, shards: int, out: Path) -> None:
    """The shards' ids of one split, in order, into the one array training memory-maps."""
    with atomic_path(out) as tmp, tmp.open("wb") as fh:
        for index in range(shards):
            with (work / f"{split}-{index:05d}.bin").open("rb") as part:
                shutil.copyfileobj(part, fh, 1 << 22)


def parent_tokenizer(params: Params) -> Tokenizer | None:
    """A fine-tune's tokenizer: its parent's, pinned by the parent stage (read_parent checks it
    has tokenize.vocab_size tokens); None when training from scratch."""
    from pipelines.stages.parent import read_parent

    if not read_parent(params)["version"]:
        return None
    return Tokenizer.from_file(str(Path(params.finetune.parent_dir) / TOKENIZER_FILE))


def run(params: Params) -> dict:
    curated = params.data.curated_dir
    shards = list_shards(curated)
    if not shards:
        raise SourceError(f"{curated} holds no {SHARD_GLOB}: run `trainpipe curate` first")
    fraction = params.tokenize.val_fraction
    # the first pass reads three small columns, never the text: the split's sizes and the held-out set
    val_docs, train_bytes, train_docs = [], 0, 0
    for doc in iter_documents(curated, columns=["path", "sha256", "n_bytes"]):
        if is_validation(doc["path"], fraction):
            val_docs.append(doc)
        else:
            train_docs += 1
            train_bytes += doc["n_bytes"]
    if not train_docs or not val_docs:
        raise SourceError(
            f"tokenize: {train_docs} training and {len(val_docs)} validation documents; "
            "both splits need at least one (more documents, or another tokenize.val_fraction)"
        )
    sample = min(1.0, params.tokenize.sample_bytes / train_bytes)
    out_dir = Path(params.data.tokens_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = parent_tokenizer(params)
    if tokenizer is None:
        # in a process of its own: the trainer's memory (hundreds of MB for the sample's words)
        # goes back with it, rather than stay in this one beside the encoding workers
        task = {
            "curated": str(Path(curated).resolve()),
            "val_fraction": fraction,
            "sample": sample,
            "vocab_size": params.tokenize.vocab_size,
            "out": str((out_dir / TOKENIZER_FILE).resolve()),
        }
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            pool.submit(train_sample_tokenizer, task).result()
        tokenizer = Tokenizer.from_file(str(out_dir / TOKENIZER_FILE))
    else:
        tokenizer.save(str(out_dir / TOKENIZER_FILE))
    work = out_dir.resolve() / ".work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        tasks = [
            {
                "index": i,
                "shard": str(shard.resolve()),
                "tokenizer": str((out_dir / TOKENIZER_FILE).resolve()),
                "val_fraction": fraction,
                "work": str(work),
            }
            for i, shard in enumerate(shards)
        ]
        counts = map_shards(
            encode_shard, tasks, params.data.executor, params.tokenize.workers, "shards encoded"
        )
        for split in SPLITS:
            join_token_shards(work, split, len(shards), out_dir / f"{split}.bin")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = {
        "vocab_size": tokenizer.get_vocab_size(),
        "tokenizer": "parent's" if params.finetune.parent_version else "trained",
        "tokenizer_sample": {"fraction": round(sample, 6), "of_train_bytes": train_bytes},
        "val_set_sha256": validation_set_hash(val_docs),
    }
    for split in SPLITS:
        summary[split] = {k: sum(c[split][k] for c in counts) for k in ("documents", "tokens", "bytes")}
    summary["bytes_per_token"] = summary["train"]["bytes"] / summary["train"]["tokens"]
    write_json(out_dir / "meta.json", summary)
    return summary


def describe(s: dict, params: Params) -> str:
    return (
        f"tokenize: vocab {s['vocab_size']} ({s['tokenizer']}), train {s['train']['tokens']:,} tokens "
        f"({s['train']['documents']} docs), val {s['val']['tokens']:,} tokens ({s['val']['documents']} docs), "
        f"{s['bytes_per_token']:.2f} bytes/token"
    )


def main(argv: list[str] | None = None) -> None:
    from pipelines.stages.entry import stage_main

    stage_main("tokenize", run, describe, argv)


if __name__ == "__main__":
    main()
