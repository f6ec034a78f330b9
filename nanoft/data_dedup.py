"""Find duplicate records: exact (same normalised text) and near (MinHash LSH from datasketch, word shingles).

    duplicates = find_duplicates(texts, near_dup_threshold=0.8)  # [Duplicate(removed, kept, method, ...)]

The first record of each cluster is kept, so the caller decides which copy wins by the order of `texts`.
Speed: datasketch's `MinHash.update` hashes one shingle at a time in Python (about an hour for 100k Alpaca
records here). The signatures are therefore computed here with numpy, by exactly datasketch's "affine32"
scheme (fmix32 pre-mix, then `a * h + b mod 2^32` with datasketch's own permutations; tests/test_data.py
checks equality with `MinHash.update_batch`), and handed to datasketch's `MinHashLSH` as `LeanMinHash`s.
"""

import hashlib
import re
import zlib
from dataclasses import dataclass

import numpy as np
from datasketch import LeanMinHash, MinHash, MinHashLSH

NUM_PERM = 128
MINHASH_SEED = 1
SCHEME = "affine32"
SHINGLE_WORDS = 3  # short instruction records: a 3-word shingle still changes when one word does
SHINGLES_PER_CHUNK = 100_000  # (NUM_PERM, chunk) uint32 work array: 51 MB
WORD = re.compile(r"\w+")
SHINGLE_MIXER = np.uint32(0x9E3779B1)  # odd, so no word's bits are lost when mixing


@dataclass
class Duplicate:
    removed: int  # index into texts
    kept: int  # the earlier record it duplicates
    method: str  # "exact" or "near"
    similarity: float  # estimated Jaccard of the word shingles (1.0 for exact)


def normalise(text: str) -> str:
    """Case and whitespace do not make a record different."""
    return " ".join(text.lower().split())


def find_duplicates(texts: list[str], near_dup_threshold: float | None = 0.8) -> list[Duplicate]:
    """Every record that repeats an earlier one; near duplicates only when `near_dup_threshold` is given."""
    normalised = [normalise(text) for text in texts]
    first_with_text: dict[bytes, int] = {}
    duplicates, unique = [], []
    for index, text in enumerate(normalised):
        digest = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
        kept = first_with_text.setdefault(digest, index)
        if kept != index:
            duplicates.append(Duplicate(index, kept, "exact", 1.0))
        else:
            unique.append(index)
    if near_dup_threshold is not None:
        duplicates += find_near_duplicates([normalised[i] for i in unique], unique, near_dup_threshold)
    return sorted(duplicates, key=lambda duplicate: duplicate.removed)


def find_near_duplicates(texts: list[str], indices: list[int], threshold: float) -> list[Duplicate]:
    signatures = minhash_signatures(texts)  # (N, NUM_PERM)
    lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
    duplicates = []
    for position, signature in enumerate(signatures):
        sketch = LeanMinHash(seed=MINHASH_SEED, hashvalues=signature, scheme=SCHEME)
        # LSH candidates are only likely matches: confirm each with the estimated Jaccard similarity.
        candidates = lsh.query(sketch)
        similarities = [(float(np.mean(signatures[c] == signature)), c) for c in candidates]
        best = max(similarities, default=(0.0, -1))
        if best[0] >= threshold:
            duplicates.append(Duplicate(indices[position], indices[best[1]], "near", best[0]))
        else:
            lsh.insert(position, sketch, check_duplication=False)
    return duplicates


class WordHashes(dict):
    """crc32 of each word, computed once per distinct word."""

    def __missing__(self, word: str) -> int:
        self[word] = zlib.crc32(word.encode("utf-8"))
        return self[word]


def shingle_hashes(text: str, word_hashes: WordHashes) -> np.ndarray:
    """uint32 hash of each run of SHINGLE_WORDS words (one shingle for shorter texts, even an empty one)."""
    hashes = np.array([word_hashes[word] for word in WORD.findall(text)], dtype=np.uint32)
    if len(hashes) < SHINGLE_WORDS:
        hashes = np.concatenate([hashes, np.zeros(SHINGLE_WORDS - len(hashes), dtype=np.uint32)])
    n = len(hashes) - SHINGLE_WORDS + 1
    shingles = np.zeros(n, dtype=np.uint32)
    for offset in range(SHINGLE_WORDS):  # a polynomial hash of the words in order (uint32 wraps)
        shingles = shingles * SHINGLE_MIXER + hashes[offset : offset + n]
    return shingles


def fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's finaliser, as datasketch applies it before permuting (uint32 arithmetic wraps)."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def minhash_signatures(texts: list[str]) -> np.ndarray:
    """(N, NUM_PERM) uint32: datasketch's MinHash(num_perm=128, seed=1) values of each text's shingles."""
    a, b = MinHash(num_perm=NUM_PERM, seed=MINHASH_SEED, scheme=SCHEME).permutations  # (NUM_PERM,) each
    word_hashes = WordHashes()
    signatures = np.empty((len(texts), NUM_PERM), dtype=np.uint32)
    start = 0
    while start < len(texts):
        # Shingles of as many records as fit one chunk, permuted all at once, then a min per record.
        chunk, n_shingles = [], 0
        while start + len(chunk) < len(texts) and (not chunk or n_shingles < SHINGLES_PER_CHUNK):
            chunk.append(shingle_hashes(texts[start + len(chunk)], word_hashes))
            n_shingles += len(chunk[-1])
        mixed = fmix32(np.concatenate(chunk))  # (S,)
        permuted = a[:, None] * mixed[None, :] + b[:, None]  # (NUM_PERM, S)
        record_starts = np.cumsum([0] + [len(s) for s in chunk[:-1]])
        signatures[start : start + len(chunk)] = np.minimum.reduceat(permuted, record_starts, axis=1).T
        start += len(chunk)
    return signatures
