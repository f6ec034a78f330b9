"""Tokenized examples in flat arrays, and their on-disk cache keyed by everything that made them.

    examples = TokenizedExamples.from_lists(input_ids, targets, sources, seq_len)
    key = cache_key(data_files, tokenizer, settings)
    save_cached(cache_file(cache_dir, key), {"pool": examples}, meta)   # atomic: temp file + os.replace
    pools, meta = load_cached(cache_file(cache_dir, key))                # None when absent or unreadable

100k Alpaca examples (~17M tokens) as Python lists of lists take gigabytes and long to pickle; as two int32
arrays and an offsets array they take ~140 MB and load in about a second.
"""

import hashlib
import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nanoft.loss import IGNORE_INDEX

CACHE_FORMAT_VERSION = 2  # bump when what data.py produces for the same inputs changes


@dataclass
class TokenizedExamples:
    """Example i is `input_ids[offsets[i]:offsets[i+1]]` with its shifted `targets` (-100 = not trained)."""

    input_ids: np.ndarray  # (total tokens,) int32
    targets: np.ndarray  # (total tokens,) int32; targets[t] is the label of token t+1
    offsets: np.ndarray  # (N + 1,) int64
    sources: list[str]  # "path:line" of the record each example came from
    seq_len: int  # the longest an example may be (packing capacity)

    @classmethod
    def from_lists(
        cls, input_ids: list[list[int]], targets: list[list[int]], sources: list[str], seq_len: int
    ):
        lengths = np.array([len(ids) for ids in input_ids], dtype=np.int64)
        flat = lambda lists: np.array(list(itertools.chain.from_iterable(lists)), dtype=np.int32)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        return cls(flat(input_ids), flat(targets), offsets, list(sources), seq_len)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def example(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        start, end = self.offsets[index], self.offsets[index + 1]
        return self.input_ids[start:end], self.targets[start:end]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def n_target_tokens(self) -> int:
        return int((self.targets != IGNORE_INDEX).sum())

    def subset(self, indices) -> "TokenizedExamples":
        indices = np.asarray(indices, dtype=np.int64)
        lengths = self.lengths[indices]
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        # Token positions of the chosen examples, in order: each one's start plus 0, 1, ... its length - 1.
        take = np.repeat(self.offsets[indices] - offsets[:-1], lengths) + np.arange(offsets[-1])
        sources = [self.sources[i] for i in indices]
        return TokenizedExamples(self.input_ids[take], self.targets[take], offsets, sources, self.seq_len)


def default_cache_dir() -> Path:
    return Path(os.environ.get("NANOFT_CACHE") or "~/.cache/nanoft").expanduser() / "data"


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """All of tokenizer.json (vocabulary, merges, normaliser, added tokens), the template, special ids."""
    parts = [
        tokenizer.backend.to_str(),
        tokenizer.chat_template or "",
        json.dumps(
            [
                tokenizer.bos_id,
                tokenizer.eos_id,
                sorted(tokenizer.eos_ids),
                tokenizer.pad_id,
                tokenizer.add_bos,
                tokenizer.special_tokens,
            ]
        ),
    ]
    return hashlib.sha256("\0".join(parts).encode("utf-8")).hexdigest()


def cache_key(data_files: list[Path], tokenizer, settings: dict) -> str:
    identity = {
        "version": CACHE_FORMAT_VERSION,
        "files": [[str(path.resolve()), file_digest(path)] for path in data_files],  # sources name them
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "settings": settings,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode("utf-8")).hexdigest()[:32]


def cache_file(cache_dir, key: str) -> Path:
    return Path(cache_dir) / f"{key}.pt"


def save_cached(path: Path, pools: dict[str, TokenizedExamples], meta: dict) -> None:
    """Written to a temporary name and renamed, so a crash or a second process never leaves half a file."""
    payload = {"meta": json.dumps(meta)}
    for name, examples in pools.items():
        payload[name] = {
            "input_ids": torch.from_numpy(examples.input_ids),
            "targets": torch.from_numpy(examples.targets),
            "offsets": torch.from_numpy(examples.offsets),
            "sources": "\n".join(examples.sources),  # one string: unpickling 100k small ones is slow
            "seq_len": examples.seq_len,
        }
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    torch.save(payload, temporary)
    os.replace(temporary, path)


def load_cached(path: Path) -> tuple[dict[str, TokenizedExamples], dict] | None:
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, weights_only=True)
    except Exception:  # a cache written by another version or damaged on disk: rebuild it
        return None
    meta = json.loads(payload.pop("meta"))
    pools = {
        name: TokenizedExamples(
            stored["input_ids"].numpy(),
            stored["targets"].numpy(),
            stored["offsets"].numpy(),
            stored["sources"].split("\n") if stored["sources"] else [],
            int(stored["seq_len"]),
        )
        for name, stored in payload.items()
    }
    return pools, meta
