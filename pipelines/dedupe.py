"""Near-duplicate detection: MinHash over word 5-gram shingles, with LSH (datasketch).

The recipe is BigCode's near-dedup for The Stack: shingles are 5-grams of the document's words
(runs of letters, digits and "_"), a MinHash signature estimates the Jaccard similarity of two
shingle sets, and locality-sensitive hashing finds candidate pairs without comparing all pairs.

The choice of which copy stays is deterministic: documents are offered in path order, and one
whose estimated Jaccard with an already kept document reaches the threshold is dropped as a
near-duplicate of the first such document. Candidates from LSH are confirmed on the signatures,
so a band collision alone never drops a document.
"""

import re
from dataclasses import dataclass, field

import numpy as np
from datasketch import LeanMinHash, MinHash, MinHashLSH

SCHEME = "affine32"  # datasketch 2.x default; stated so signatures built elsewhere load alike
SEED = 1
_WORD_RE = re.compile(r"\w+")


def shingles(text: str, size: int) -> set[bytes]:
    """The set of word `size`-grams; a document with fewer words is one shingle of all of them."""
    words = _WORD_RE.findall(text)
    if len(words) <= size:
        return {" ".join(words).encode()}
    return {" ".join(words[i : i + size]).encode() for i in range(len(words) - size + 1)}


def signature(text: str, num_perm: int, shingle_size: int) -> np.ndarray:
    """The MinHash signature (num_perm uint64 values) of a document's shingle set."""
    minhash = MinHash(num_perm=num_perm, seed=SEED)
    minhash.update_batch(list(shingles(text, shingle_size)))
    return minhash.hashvalues


@dataclass
class NearDuplicates:
    """Documents offered one at a time, in a fixed order; keeps the first of each cluster."""

    threshold: float
    num_perm: int
    clusters: dict[str, list[dict]] = field(default_factory=dict)  # kept path -> its near-duplicates

    def __post_init__(self):
        self._lsh = MinHashLSH(threshold=self.threshold, num_perm=self.num_perm)
        self._signatures: dict[str, LeanMinHash] = {}

    def offer(self, path: str, hashvalues: np.ndarray) -> tuple[str, float] | None:
        """None if `path` is kept, else (the kept document it nearly duplicates, estimated Jaccard)."""
        minhash = LeanMinHash(seed=SEED, hashvalues=hashvalues, scheme=SCHEME)
        best = None
        for candidate in self._lsh.query(minhash):
            similarity = minhash.jaccard(self._signatures[candidate])
            if similarity >= self.threshold and (
                best is None or (-similarity, candidate) < (-best[1], best[0])
            ):
                best = (candidate, similarity)
        if best is not None:
            self.clusters.setdefault(best[0], []).append({"path": path, "jaccard": round(best[1], 3)})
            return best
        self._lsh.insert(path, minhash)
        self._signatures[path] = minhash
        return None
