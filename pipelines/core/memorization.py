"""The memorization check: does a model complete a secret that curation removed from its data?

    spans = read_spans("reports/scrubbed_spans.jsonl")      # what the curate stage recorded
    picked = pick_spans(spans, max_spans=256)                # a bounded, deterministic sample
    result = count_memorized(model, tokenizer, picked, texts, context_tokens=32)

The curate stage records every placeholder of the curated data (scrub.scrub_spans): the
document, the placeholder's character offset in the curated text, the kind (or the name of one's
own pattern), and the removed text's length and sha256; never the text itself. For a sample of
those, the model greedily completes the curated text's last `context_tokens` tokens before the
placeholder, and a completion whose first `length` characters hash to the recorded sha256
reproduced the secret. A model trained on data that still held it (a champion trained before a
pattern existed) completes it from its usual prefix; one trained on the scrubbed data cannot
have learnt it from there.

The sample: one check per distinct secret (a key repeated in a hundred files is one secret),
from the context that precedes it most often; secrets seen most often first (the ones a model
learns), the kinds taken in turn so that a rare kind of one's own is checked beside thousands of
emails. Everything is a function of the spans and texts: the same inputs, the same count.

Used by the evaluate stage (pipelines/stages/evaluate.py): `trainpipe evaluate`.
"""

import hashlib
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from pipelines.core.model import GPT

# The context's characters read per token wanted: the tokenizer then has more than enough
# (code averages ~3 bytes a token) without encoding a whole long document.
CHARS_PER_TOKEN_READ = 8
# How often one secret's contexts are compared to find its usual one: a bound on the work per secret.
MAX_CONTEXTS_COMPARED = 64
# The shortest context a long secret is completed from: a secret longer than the model's block_size
# less this (a private-key block) is left out of the sample.
MIN_CONTEXT_TOKENS = 8


def longest_checkable(block_size: int, context_tokens: int) -> int:
    """The longest secret, in characters, whose completion fits the model's context beside at least
    min(context_tokens, MIN_CONTEXT_TOKENS) tokens of context."""
    return block_size - 1 - min(context_tokens, MIN_CONTEXT_TOKENS)


@dataclass(frozen=True)
class Check:
    """One secret to check: a span of it (its document and offset), how many spans it has."""

    path: str
    offset: int
    kind: str
    length: int
    sha256: str
    occurrences: int


def pick_spans(
    spans: list[dict],
    max_spans: int,
    texts: Mapping[str, str] | None = None,
    max_length: int | None = None,
    context_chars: int = 64,
) -> tuple[list[Check], int]:
    """(at most max_spans secrets to check, how many distinct secrets were left out): one Check per
    distinct (kind, sha256), the most repeated first within a kind, the kinds in turn (sorted by
    name). A secret longer than max_length characters (a completion cannot hold it) is left out.
    With texts (path -> curated text), a secret is checked at the span whose preceding
    context_chars characters are the most common among its spans (the first such in (path,
    offset) order), and spans of documents texts lacks are left out; without, at its first span."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for span in spans:
        if texts is not None and span["path"] not in texts:
            continue
        groups.setdefault((span["kind"], span["sha256"]), []).append(span)
    by_kind: dict[str, list[tuple[str, str]]] = {}
    for key, members in groups.items():
        if max_length is None or members[0]["length"] <= max_length:
            by_kind.setdefault(key[0], []).append(key)
    for keys in by_kind.values():
        keys.sort(key=lambda k: (-len(groups[k]), k[1]))
    order: list[tuple[str, str]] = []
    queues = [by_kind[kind] for kind in sorted(by_kind)]
    for rank in range(max((len(q) for q in queues), default=0)):
        order += [q[rank] for q in queues if rank < len(q)]
    picked = []
    for kind, sha in order[:max_spans]:
        members = sorted(groups[(kind, sha)], key=lambda s: (s["path"], s["offset"]))
        span = _usual_context(members, texts, context_chars) if texts is not None else members[0]
        picked.append(Check(span["path"], span["offset"], kind, span["length"], sha, len(members)))
    return picked, len(groups) - len(picked)


def _usual_context(members: list[dict], texts: Mapping[str, str], context_chars: int) -> dict:
    compared = members[:MAX_CONTEXTS_COMPARED]
    contexts = [texts[s["path"]][max(0, s["offset"] - context_chars) : s["offset"]] for s in compared]
    counts = Counter(contexts)
    best = max(counts.values())
    return next(s for s, c in zip(compared, contexts, strict=True) if counts[c] == best)


def prompt_for(tokenizer, text: str, offset: int, context_tokens: int) -> tuple[list[int], str]:
    """(the last context_tokens token ids of text[:offset], what the completion must start with).

    A byte-level BPE tokenizer joins a space to the word after it (" corp_live_..." is one
    pretoken): a context that ends in a space is one the model never saw end there. So one
    trailing space leaves the context and the completion must begin with it."""
    start = max(0, offset - context_tokens * CHARS_PER_TOKEN_READ)
    context, lead = text[start:offset], ""
    if context.endswith(" "):
        context, lead = context[:-1], " "
    ids = tokenizer.encode(context, add_special_tokens=False).ids if context else []
    return ids[-context_tokens:], lead


@torch.inference_mode()
def count_memorized(
    model: GPT,
    tokenizer,
    checks: list[Check],
    texts: Mapping[str, str],
    context_tokens: int,
    batch_size: int = 64,
    eot: int | None = None,
) -> list[bool]:
    """For each check, whether greedy decoding from its context reproduces the removed text: the
    first `length` characters after the expected lead hash to its sha256.

    Rows of one context length decode together (one batched KV cache, every row at one position),
    each until it has the characters it needs or ends (eot), the batch until all have. A
    byte-level token is at least one byte, so an ASCII secret of n characters takes at most n
    tokens, and a row stops as soon as its tokens' bytes cover it: a 20-character email costs
    the ~7 tokens it takes, not 20. A context is cut so that it and the completion fit the
    model's block_size; an empty one (a secret at a document's start) is eot, as in training."""
    block_size = model.config.block_size
    token_bytes = [len(tokenizer.id_to_token(i) or "") for i in range(tokenizer.get_vocab_size())]
    rows = []
    for i, check in enumerate(checks):
        room = max(1, min(context_tokens, block_size - (check.length + 1)))  # + 1: the lead, if any
        ids, lead = prompt_for(tokenizer, texts[check.path], check.offset, room)
        rows.append(
            (len(ids or [eot]), check.length + len(lead), i, ids or [eot if eot is not None else 0], lead)
        )
    rows.sort()  # one context length per batch, the shortest completions together
    found = [False] * len(checks)
    b = 0
    while b < len(rows):
        batch = [r for r in rows[b : b + batch_size] if r[0] == rows[b][0]]
        b += len(batch)
        completions = _greedy(
            model, tokenizer, [r[3] for r in batch], [r[1] for r in batch], token_bytes, eot
        )
        for (_, _, i, _, lead), completion in zip(batch, completions, strict=True):
            check = checks[i]
            candidate = completion[len(lead) : len(lead) + check.length]
            found[i] = (
                completion.startswith(lead)
                and len(candidate) == check.length
                and hashlib.sha256(candidate.encode("utf-8")).hexdigest() == check.sha256
            )
    return found


def _greedy(
    model: GPT, tokenizer, prompts: list[list[int]], needs: list[int], token_bytes: list[int], eot: int | None
) -> list[str]:
    """Greedy completions of prompts (all of one length): each row until its text has needs[r]
    characters or it produced eot, within the model's block_size."""
    from pipelines.core.model import KVCache

    device = next(model.parameters()).device
    idx = torch.tensor(prompts, dtype=torch.long, device=device)  # (B, T)
    cache = KVCache(model.config)
    logits = model.lm_head(model.hidden_states(idx, cache)[:, -1, :])  # (B, vocab)
    new_ids: list[list[int]] = [[] for _ in prompts]
    got = [0] * len(prompts)  # bytes so far
    live = set(range(len(prompts)))
    for _ in range(model.config.block_size - idx.size(1)):
        tokens = logits.float().argmax(dim=-1)  # (B,)
        for r, token in enumerate(tokens.tolist()):
            if r not in live:
                continue
            if token == eot:
                live.discard(r)
                continue
            new_ids[r].append(token)
            got[r] += token_bytes[token] if token < len(token_bytes) else 1
            # enough bytes; enough characters too, unless some are multibyte
            if got[r] >= needs[r] and len(tokenizer.decode(new_ids[r])) >= needs[r]:
                live.discard(r)
        if not live:
            break
        logits = model.lm_head(model.hidden_states(tokens[:, None], cache)[:, -1, :])
    return [tokenizer.decode(ids) for ids in new_ids]


def memorization_report(checks: list[Check], found: list[bool], left_out: int) -> dict:
    """The figures: secrets checked and reproduced, in all and per kind (every kind checked is
    listed, with 0 where none was reproduced), and the hashes of those reproduced."""
    per_kind: dict[str, dict[str, int]] = {}
    for check, hit in zip(checks, found, strict=True):
        figures = per_kind.setdefault(check.kind, {"checked": 0, "memorized": 0})
        figures["checked"] += 1
        figures["memorized"] += int(hit)
    return {
        "memorized_secrets": sum(found),
        "checked_secrets": len(checks),
        "left_out_secrets": left_out,
        "per_kind": dict(sorted(per_kind.items())),
        "memorized": [
            {"kind": c.kind, "sha256": c.sha256, "length": c.length, "path": c.path, "offset": c.offset}
            for c, hit in zip(checks, found, strict=True)
            if hit
        ],
    }
