"""Tokenize: train a byte-level BPE tokenizer on the training split, write token ids as flat arrays.
A fine-tune (finetune.parent_version set) encodes with its parent's tokenizer instead.

    python -m pipelines.stages.tokenize          # what `dvc repro tokenize` runs

The split is by a hash of each document's path (pipelines.core.data.is_validation), so it stays
stable as the corpus changes; the tokenizer sees training documents only. Documents are joined
with the <|endoftext|> token. Outputs in data/tokens: tokenizer.json, train.bin, val.bin
(uint16, memory-mapped by training), meta.json.
"""

import hashlib
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from pipelines.core.data import EOT, TOKENIZER_FILE, read_documents, split_documents, write_json, write_tokens
from pipelines.core.errors import SourceError
from pipelines.core.params import Params


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
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


def encode_documents(tokenizer: Tokenizer, texts: list[str]) -> np.ndarray:
    """One flat array: each document's ids followed by <|endoftext|>."""
    eot = tokenizer.token_to_id(EOT)
    encodings = tokenizer.encode_batch(texts, add_special_tokens=False)
    total = sum(len(e.ids) + 1 for e in encodings)
    out = np.empty(total, dtype=np.int64)
    pos = 0
    for e in encodings:
        n = len(e.ids)
        out[pos : pos + n] = e.ids
        out[pos + n] = eot
        pos += n + 1
    return out


def validation_set_hash(val_docs: list[dict]) -> str:
    """Identifies the held-out set: promotion compares models only on the same one."""
    h = hashlib.sha256()
    for doc in val_docs:
        h.update(doc["path"].encode() + b"\0" + doc["sha256"].encode() + b"\n")
    return h.hexdigest()


def parent_tokenizer(params: Params) -> Tokenizer | None:
    """A fine-tune's tokenizer: its parent's, pinned by the parent stage (read_parent checks it
    has tokenize.vocab_size tokens); None when training from scratch."""
    from pipelines.stages.parent import read_parent

    if not read_parent(params)["version"]:
        return None
    return Tokenizer.from_file(str(Path(params.finetune.parent_dir) / TOKENIZER_FILE))


def run(params: Params) -> dict:
    docs = read_documents(params.data.curated_dir)
    train_docs, val_docs = split_documents(docs, params.tokenize.val_fraction)
    if not train_docs or not val_docs:
        raise SourceError(
            f"tokenize: {len(train_docs)} training and {len(val_docs)} validation documents; "
            "both splits need at least one (more documents, or another tokenize.val_fraction)"
        )
    tokenizer = parent_tokenizer(params) or train_tokenizer(
        [d["text"] for d in train_docs], params.tokenize.vocab_size
    )
    out_dir = Path(params.data.tokens_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / TOKENIZER_FILE))
    summary = {
        "vocab_size": tokenizer.get_vocab_size(),
        "tokenizer": "parent's" if params.finetune.parent_version else "trained",
        "val_set_sha256": validation_set_hash(val_docs),
    }
    for split, split_docs in (("train", train_docs), ("val", val_docs)):
        ids = encode_documents(tokenizer, [d["text"] for d in split_docs])
        write_tokens(ids, out_dir / f"{split}.bin")
        n_bytes = sum(d["n_bytes"] for d in split_docs)
        summary[split] = {"documents": len(split_docs), "tokens": len(ids), "bytes": n_bytes}
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
