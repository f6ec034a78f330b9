"""Batches for training and evaluation: padding, packing, length grouping, a shard per rank, exact resume.

    batches = Batches(train, batch_size=4, pad_id=tokenizer.pad_id, seed=0, rank=rank, world_size=world_size)
    for batch in batches:  # the rest of the current epoch; the next `for` starts the next epoch
        ...
    state = batches.state_dict()  # {"epoch", "batch_index", ...}; batches.load_state_dict(state) resumes
    n_targets, n_tokens = token_counts(step_batches)  # what a step's loss is divided by; its tokens

A batch is a dict: input_ids (B, T) long, targets (B, T) long (already shifted, -100 = no loss),
position_ids (B, T) long, document_ids (B, T) long or None (packed rows only; -1 marks padding), real_tokens
(B, T) bool (False on padding: what a mixture of experts' load-balancing loss counts), sample_ids list[int]
(indices into the examples, for diagnostics). Rows are right-padded with pad_id to the longest row
of the batch.
"""

import bisect

import numpy as np
import torch

from nanoft.data_cache import TokenizedExamples
from nanoft.errors import UserError
from nanoft.loss import IGNORE_INDEX


def pack_examples(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Best-fit decreasing: longest example first, each into the fullest pack that still has room for it."""
    packs: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (space left, pack index), sorted
    for index in np.argsort(-lengths, kind="stable").tolist():
        position = bisect.bisect_left(room, (int(lengths[index]), -1))
        if position == len(room):
            packs.append([index])
            bisect.insort(room, (capacity - int(lengths[index]), len(packs) - 1))
        else:
            space, pack = room.pop(position)
            packs[pack].append(index)
            bisect.insort(room, (space - int(lengths[index]), pack))
    return packs


def token_counts(batches: list[dict]) -> tuple[int, int]:
    """(target tokens, tokens that are not padding) in `batches`: what a step's loss is divided by, and the
    tokens it trained on."""
    targets = sum(int((batch["targets"] != IGNORE_INDEX).sum()) for batch in batches)
    tokens = sum(int(batch["real_tokens"].sum()) for batch in batches)
    return targets, tokens


def no_target_batch() -> dict:
    """One token and no target: what a rank whose share of the last val batch is empty still runs under FSDP,
    whose forward is a collective the other ranks wait in."""
    return {"input_ids": torch.zeros((1, 1), dtype=torch.long), "targets": torch.full((1, 1), IGNORE_INDEX)}


class Batches:
    """Batches for one rank: global batch g holds world_size * batch_size rows, rank r reads its own slice of
    them, so ranks never share a sample and together read each one once per epoch. The order is a permutation
    seeded by (seed, epoch). The position (epoch, global batch index) is the whole state, so resuming from
    `state_dict()` yields exactly the batches an uninterrupted run would have.

    With pack=True a row is a pack of whole examples (up to examples.seq_len tokens, best-fit decreasing,
    fixed for the run) with position ids restarting and a document id per example, so the model attends
    within each example only. With group_by_length rows of similar length share a batch (less padding), the
    batch order still shuffled. With drop_last=False the last global batch is split as evenly as the ranks
    allow and a rank whose share is empty skips it: for evaluation, where losses are summed over ranks.
    """

    def __init__(
        self,
        examples: TokenizedExamples,
        batch_size: int,
        pad_id: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        pack: bool = False,
        group_by_length: bool = False,
        drop_last: bool = True,
    ):
        self.examples, self.batch_size, self.pad_id, self.seed = examples, batch_size, pad_id, seed
        self.rank, self.world_size, self.shuffle, self.pack = rank, world_size, shuffle, pack
        self.group_by_length, self.drop_last = group_by_length, drop_last
        lengths = examples.lengths
        self.rows = pack_examples(lengths, examples.seq_len) if pack else [[i] for i in range(len(examples))]
        self.row_lengths = np.array([lengths[row].sum() for row in self.rows], dtype=np.int64)
        self.global_batch_size = batch_size * world_size
        self.epoch, self.batch_index = 0, 0
        if len(self) == 0:
            raise UserError(
                f"{len(self.rows)} rows of data cannot fill one batch of {batch_size} x {world_size} "
                "ranks; lower --batch-size or add data"
            )

    def packing_line(self) -> str:
        """How full the packed rows are: the tokens a step computes on that are data, not padding."""
        capacity = len(self.rows) * self.examples.seq_len
        return (
            f"pack: {len(self.examples)} examples in {len(self.rows)} rows of up to {self.examples.seq_len} "
            f"tokens, {self.row_lengths.sum() / capacity:.1%} full ({self.row_lengths.sum():,} of "
            f"{capacity:,} token slots)"
        )

    def __len__(self) -> int:
        """Global batches per epoch (each rank yields its slice of each)."""
        full, rest = divmod(len(self.rows), self.global_batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def global_batches(self, epoch: int) -> list[np.ndarray]:
        """Row indices of every global batch of `epoch`; the same on every rank."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.rows)) if self.shuffle else np.arange(len(self.rows))
        if self.group_by_length:
            # Sort by length within windows of 50 global batches, then shuffle the batches themselves.
            window = 50 * self.global_batch_size
            order = np.concatenate(
                [
                    chunk[np.argsort(-self.row_lengths[chunk], kind="stable")]
                    for chunk in np.split(order, range(window, len(order), window))
                ]
            )
        batches = [
            order[i : i + self.global_batch_size] for i in range(0, len(order), self.global_batch_size)
        ]
        batches = batches[: len(self)]
        if self.group_by_length and self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def __iter__(self):
        batches = self.global_batches(self.epoch)
        if self.batch_index >= len(batches):  # stopped right after an epoch's last batch
            self.set_epoch(self.epoch + 1)
            batches = self.global_batches(self.epoch)
        while self.batch_index < len(batches):
            mine = np.array_split(batches[self.batch_index], self.world_size)[self.rank]
            # Advanced before the yield: a checkpoint taken while this batch trains resumes at the next one.
            self.batch_index += 1
            if len(mine):
                yield self.collate(mine)
        self.set_epoch(self.epoch + 1)

    def collate(self, row_indices: np.ndarray) -> dict:
        B, T = len(row_indices), int(self.row_lengths[row_indices].max())
        input_ids = np.full((B, T), self.pad_id, dtype=np.int64)
        targets = np.full((B, T), IGNORE_INDEX, dtype=np.int64)
        position_ids = np.tile(np.arange(T), (B, 1))
        document_ids = np.full((B, T), -1, dtype=np.int64)  # -1: padding
        for b, row in enumerate(row_indices):
            start = 0
            for document, index in enumerate(self.rows[row]):
                ids, example_targets = self.examples.example(index)
                end = start + len(ids)
                input_ids[b, start:end], targets[b, start:end] = ids, example_targets
                position_ids[b, start:end] = np.arange(len(ids))
                document_ids[b, start:end] = document
                start = end
        return {
            "input_ids": torch.from_numpy(input_ids),  # (B, T)
            "targets": torch.from_numpy(targets),
            "position_ids": torch.from_numpy(position_ids),
            "document_ids": torch.from_numpy(document_ids) if self.pack else None,
            "real_tokens": torch.from_numpy(document_ids >= 0),
            "sample_ids": [index for row in row_indices for index in self.rows[row]],
        }

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.batch_index = epoch, 0

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "batch_index": self.batch_index,
            "seed": self.seed,
            "global_batch_size": self.global_batch_size,
            "rows": len(self.rows),
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "global_batch_size", "rows"):
            if state[key] != self.state_dict()[key]:
                raise UserError(
                    f"the saved data position has {key}={state[key]} but this run has "
                    f"{self.state_dict()[key]}; resume with the same data, seed and batch size x ranks"
                )
        self.epoch, self.batch_index = state["epoch"], state["batch_index"]
