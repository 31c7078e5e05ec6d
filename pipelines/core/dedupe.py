"""Near-duplicate detection: MinHash over word 5-gram shingles, with LSH (datasketch).

The recipe is BigCode's near-dedup for The Stack: shingles are 5-grams of the document's words
(runs of letters, digits and "_"), a MinHash signature estimates the Jaccard similarity of two
shingle sets, and locality-sensitive hashing finds candidate pairs without comparing all pairs.

The choice of which copy stays is deterministic: documents are offered in path order, and one
whose estimated Jaccard with an already kept document reaches the threshold is dropped as a
near-duplicate of the most similar such document (ties: the first path). Candidates from LSH are confirmed on the signatures,
so a band collision alone never drops a document.
"""

import re
import zlib
from dataclasses import dataclass, field

import numpy as np
from datasketch import LeanMinHash, MinHash, MinHashLSH

SCHEME = "affine32"  # datasketch 2.x default; stated so signatures built elsewhere load alike
SEED = 1
_WORD_RE = re.compile(r"\w+")
_MULTIPLIER = np.uint64(1_000_003)
_MASK32 = np.uint64(0xFFFFFFFF)


def shingle_hashes(text: str, size: int) -> np.ndarray:
    """The distinct 32-bit hashes of the document's word `size`-grams.

    Each word is hashed once (crc32) and a shingle's hash combines its words' hashes in numpy,
    instead of building and sha1-hashing every shingle string in Python: 4-5x faster, the same
    sets up to rare 32-bit collisions (datasketch's own default hash is 32-bit too). A document
    of `size` words or fewer is one shingle.
    """
    words = _WORD_RE.findall(text)
    if len(words) <= size:
        return np.array([zlib.crc32(" ".join(words).encode())], dtype=np.uint64)
    word_hashes = np.fromiter(map(zlib.crc32, map(str.encode, words)), dtype=np.uint64, count=len(words))
    n = len(words) - size + 1
    combined = word_hashes[:n].copy()
    for k in range(1, size):  # order matters: (a b c) and (c b a) differ; uint64 wraps around
        combined = combined * _MULTIPLIER ^ word_hashes[k : k + n]
    return np.unique((combined ^ (combined >> np.uint64(29))) & _MASK32)


def signature(text: str, num_perm: int, shingle_size: int) -> np.ndarray:
    """The MinHash signature (num_perm uint64 values) of a document's shingle set."""
    minhash = MinHash(num_perm=num_perm, seed=SEED, hashfunc=int)  # the values are hashes already
    minhash.update_batch(shingle_hashes(text, shingle_size).tolist())
    return minhash.hashvalues


@dataclass
class NearDuplicates:
    """Documents offered one at a time, in a fixed order; keeps the first of each cluster."""

    threshold: float
    num_perm: int
    clusters: dict[str, list[dict]] = field(default_factory=dict)  # kept path -> its near-duplicates

    def __post_init__(self):
        # Candidates are confirmed on the signatures below, so a false positive costs one
        # comparison while a false negative keeps a duplicate: weight the bands against the latter.
        self._lsh = MinHashLSH(threshold=self.threshold, num_perm=self.num_perm, weights=(0.1, 0.9))
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
