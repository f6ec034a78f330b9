"""Find duplicate records: exact (same normalised text) and near (word-shingle Jaccard, found by MinHash LSH).

    duplicates = find_duplicates(texts, near_dup_threshold=0.8)  # [Duplicate(removed, kept, method, ...)]

The first record of each cluster is kept, so the caller decides which copy wins by the order of `texts`.
Two records are near duplicates when the Jaccard similarity of their sets of word 3-shingles (`shingle_set`)
is at least the threshold. Comparing every pair is quadratic, so MinHash LSH proposes candidates and each is
confirmed with the exact Jaccard of the two sets. A MinHash estimate alone misjudges pairs near the threshold
(its standard error at 0.8 with 128 hashes is 0.035: half of the pairs at exactly 0.8 fall below), and LSH
banded for the threshold itself (datasketch's MinHashLSH(0.8): 9 bands of 13 hashes) misses 60% of them, so
the bands are chosen for recall (`lsh_bands`: a pair at the threshold is missed with probability under
1e-6), and only candidates whose estimate is more than 5 standard errors below the threshold are dropped
unconfirmed. A record is compared with the records kept so far: one that resembles only a removed record
stays, so no two kept records are near duplicates and every removed one has a kept one it duplicates.

Speed: datasketch's `MinHash.update` hashes one shingle at a time in Python (about an hour for 100k Alpaca
records here). The signatures are therefore computed here with numpy, by exactly datasketch's "affine32"
scheme (fmix32 pre-mix, then `a * h + b mod 2^32` with datasketch's own permutations; tests/test_data.py
checks equality with `MinHash.update_batch`). The LSH is a dict from (band, the band's hashes folded into a
64-bit key by numpy) to the kept records in that bucket, holding only buckets two records share: 32 bands
took datasketch's MinHashLSH about 15 s per 100k records, in Python, one band at a time.
"""

import hashlib
import math
import re
import zlib
from dataclasses import dataclass

import numpy as np
from datasketch import MinHash

NUM_PERM = 128
MINHASH_SEED = 1
SCHEME = "affine32"
SHINGLE_WORDS = 3  # short instruction records: a 3-word shingle still changes when one word does
SHINGLES_PER_CHUNK = 100_000  # (NUM_PERM, chunk) uint32 work array: 51 MB
WORD = re.compile(r"\w+")
SHINGLE_MIXER = np.uint32(0x9E3779B1)  # odd, so no word's bits are lost when mixing
BAND_MIXER = np.uint64(0x9E3779B97F4A7C15)  # the same for a band's hashes (a collision only adds a candidate)
LSH_MISS_PROBABILITY = 1e-6  # of a pair exactly at the threshold never becoming a candidate
ESTIMATE_MARGIN = 5  # standard errors of the MinHash estimate below the threshold still worth confirming


@dataclass
class Duplicate:
    removed: int  # index into texts
    kept: int  # the earlier record it duplicates
    method: str  # "exact" or "near"
    similarity: float  # Jaccard similarity of the two records' word shingles (1.0 for exact)


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
    buckets = lsh_buckets(signatures, *lsh_bands(threshold))
    standard_error = math.sqrt(threshold * (1 - threshold) / NUM_PERM)  # of the estimate at the threshold
    lowest_estimate = threshold - ESTIMATE_MARGIN * standard_error
    shingles = ShingleSets(texts)
    kept_in_bucket: dict[tuple[int, int], list[int]] = {}
    duplicates = []
    for position, record_buckets in buckets.items():  # in record order
        # The kept records that share a whole band with this one.
        candidates = {kept for bucket in record_buckets for kept in kept_in_bucket.get(bucket, ())}
        similarity, kept = 0.0, -1
        if candidates:
            candidates = np.fromiter(candidates, dtype=np.int64, count=len(candidates))
            estimates = (signatures[candidates] == signatures[position]).mean(axis=1)
            worth_confirming = candidates[estimates >= lowest_estimate].tolist()
            similarity, kept = max(
                ((jaccard(shingles[position], shingles[other]), other) for other in worth_confirming),
                default=(0.0, -1),
            )
        if similarity >= threshold:
            duplicates.append(Duplicate(indices[position], indices[kept], "near", similarity))
        else:
            for bucket in record_buckets:
                kept_in_bucket.setdefault(bucket, []).append(position)
    return duplicates


def lsh_bands(threshold: float) -> tuple[int, int]:
    """(bands, rows per band) for MinHashLSH: the most rows (fewest chance candidates) with which a pair at
    Jaccard `threshold` still shares a whole band with probability >= 1 - LSH_MISS_PROBABILITY. A band of r
    rows matches with probability J^r, so a pair is missed with probability (1 - J^r)^bands; at 0.8 that
    gives 32 bands of 4 rows (datasketch's own choice for 0.8, 9 bands of 13, misses 60% of such pairs)."""
    for rows in range(NUM_PERM, 0, -1):
        bands = NUM_PERM // rows
        if (1 - threshold**rows) ** bands <= LSH_MISS_PROBABILITY:
            return bands, rows
    return NUM_PERM, 1  # a threshold this low: every shared hash makes a candidate


def lsh_buckets(signatures: np.ndarray, bands: int, rows: int) -> dict[int, list[tuple[int, int]]]:
    """{record: its (band, key) buckets} for the records that share at least one bucket with another: each
    band's `rows` hashes folded into one 64-bit key with numpy (uint64 arithmetic wraps). A bucket no other
    record has can make no candidate, so most records (all but the duplicates and chance matches) never
    reach the Python loop."""
    banded = signatures[:, : bands * rows].reshape(len(signatures), bands, rows).astype(np.uint64)
    keys = np.zeros((len(signatures), bands), dtype=np.uint64)
    for row in range(rows):
        keys = keys * BAND_MIXER + banded[:, :, row]
    shared = np.zeros(keys.shape, dtype=bool)
    for band in range(bands):
        _, inverse, counts = np.unique(keys[:, band], return_inverse=True, return_counts=True)
        shared[:, band] = counts[inverse] > 1
    records, record_bands = np.nonzero(shared)  # in record order, then band order
    buckets: dict[int, list[tuple[int, int]]] = {}
    for record, band, key in zip(
        records.tolist(), record_bands.tolist(), keys[records, record_bands].tolist(), strict=True
    ):
        buckets.setdefault(record, []).append((band, key))
    return buckets


def shingle_set(text: str) -> frozenset[tuple[str, ...]]:
    """The runs of SHINGLE_WORDS words of a text (one shorter run for shorter texts): what is compared."""
    words = WORD.findall(text)
    return frozenset(
        tuple(words[start : start + SHINGLE_WORDS]) for start in range(max(1, len(words) - SHINGLE_WORDS + 1))
    )


def jaccard(a: frozenset, b: frozenset) -> float:
    return len(a & b) / len(a | b)


class ShingleSets(dict):
    """shingle_set of texts[i], computed once, and only for the texts that are LSH candidates."""

    def __init__(self, texts: list[str]):
        super().__init__()
        self.texts = texts

    def __missing__(self, position: int) -> frozenset:
        self[position] = shingle_set(self.texts[position])
        return self[position]


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
