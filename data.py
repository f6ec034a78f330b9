"""Training data: read, check, deduplicate, render with the chat template, mask, tokenize, split, cache, batch.

    tokenizer = Tokenizer.from_pretrained(model_dir)
    train, val, report = prepare_data(["train.jsonl"], tokenizer, seq_len=1024, run_dir="runs/x")
    batches = Batches(train, batch_size=4, pad_id=tokenizer.pad_id, seed=0, rank=rank, world_size=world_size)
    for batch in batches:  # the rest of the current epoch; the next `for` starts the next epoch
        loss_sum, n_targets = model(batch["input_ids"], batch["targets"], position_ids=batch["position_ids"],
                                    document_ids=batch["document_ids"])
    checkpoint["data"] = batches.state_dict()   # and batches.load_state_dict(...) to resume exactly there

Public API (everything else here is a helper):
- `prepare_data(paths, tokenizer, seq_len, *, val_paths=None, val_frac=0.05, seed=0, format="auto", dedup=True,
  near_dup_threshold=0.8, train_on_everything=False, skip_bad_records=False, alpaca_style="auto", run_dir=None,
  cache_dir=None, log=print) -> (train, val, DataReport)`. train and val are `TokenizedExamples` (val may be
  empty). With `run_dir` it writes samples.txt (50 training samples, trained spans marked ⟦ ⟧) and
  dedup_examples.jsonl there.
- `Batches(examples, batch_size, pad_id, *, seed=0, rank=0, world_size=1, shuffle=True, pack=False,
  group_by_length=False, drop_last=True)`: iterable of batch dicts {input_ids (B, T) long, targets (B, T) long
  (already shifted, -100 = no loss), position_ids (B, T) long, document_ids (B, T) long or None (packed only),
  sample_ids list[int] (indices into examples)}, right-padded to the longest row of the batch. `len()` is batches
  per epoch; `state_dict()` / `load_state_dict()` / `set_epoch()`.
- `DataReport` (`.to_dict()` goes into summary.json); `TokenizedExamples` (nanoft/dataset_cache.py).

What the model learns from each format (the rest of every sequence has target -100):
- chat `messages` / ShareGPT `conversations`: each assistant turn as the chat template writes it after the
  generation prompt, through the end-of-turn token that closes it (<|im_end|>, <|eot_id|>, </s>).
- Alpaca: the output and EOS; the prompt is the Stanford Alpaca one (base models) or the user turn of the chat
  template (models that have one), `alpaca_style="auto"` picking by whether the tokenizer has a template.
- raw text (.txt, or JSONL `text`): every token; documents joined by EOS and cut into full seq_len blocks.
Targets are pre-shifted: targets[t] is the label of token t+1, and the last token of an example has none, so a
packed sequence never predicts one example's first token from the previous one.
"""

import bisect
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from nanoft.data_records import FORMATS, BadRecord, Record, read_records
from nanoft.dataset_cache import TokenizedExamples, cache_file, cache_key, default_cache_dir, load_cached, save_cached
from nanoft.dedup import find_duplicates
from nanoft.errors import UserError

IGNORE = -100
ALPACA_STYLES = ("auto", "chat", "alpaca")
MIN_VAL_EXAMPLES, MAX_VAL_EXAMPLES = 20, 1000  # a val loss from fewer is noise; more only slows evaluation
SPOT_CHECK_SAMPLES = 50
DEDUP_EXAMPLES_PER_METHOD = 10
TRAINED_OPEN, TRAINED_CLOSE = "⟦", "⟧"
TURN_PROBE = "nanoft-assistant-turn-probe"

# The Stanford Alpaca prompts (github.com/tatsu-lab/stanford_alpaca, train.py PROMPT_DICT).
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


@dataclass
class DataReport:
    """What happened to the data, for the log and summary.json."""

    files: list[dict] = field(default_factory=list)  # per file: path, split, format, records, skipped_bad_records
    alpaca_style: str | None = None  # how Alpaca records were rendered: "chat" template or "alpaca" prompt
    dedup: bool = True
    near_dup_threshold: float | None = None
    exact_duplicates_removed: int = 0
    near_duplicates_removed: int = 0
    skipped_bad_records: int = 0
    skipped_reasons: list[str] = field(default_factory=list)
    truncated_examples: int = 0  # longer than seq_len, cut
    truncated_tokens: int = 0  # tokens lost by that cut, plus raw text that did not fill a last block
    dropped_examples: int = 0  # nothing left to learn (no trained token after truncation)
    seq_len: int = 0
    val_source: str = "split"  # "split" of the data, "files" (val_paths), or "none"
    train_examples: int = 0
    val_examples: int = 0
    train_tokens: int = 0
    val_tokens: int = 0
    train_target_tokens: int = 0  # tokens with a loss
    val_target_tokens: int = 0
    cache: str = "miss"  # "hit": loaded from the cache, nothing re-tokenized

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------- rendering and masking


def alpaca_messages(fields: dict) -> list[dict]:
    user = fields["instruction"] + (f"\n\n{fields['input']}" if fields["input"] else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": fields["output"]}]


def chat_template_spans(messages: list[dict], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of each assistant turn in it.

    A turn starts where the template's text for the conversation so far plus the generation prompt ends (what
    the model writes at inference starts there) and ends where the text up to and including that turn ends.
    """
    text = render(tokenizer, messages)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        turn = render(tokenizer, messages[: index + 1])
        start = turn_start(text, messages, index, tokenizer)
        if start is not None and text.startswith(turn) and start <= len(turn):
            spans.append((start, len(turn)))
            continue
        # Templates that rewrite earlier turns cannot be cut into prefixes: find the message itself after the
        # previous turn instead.
        content = message["content"].strip()
        start = text.find(content, spans[-1][1] if spans else 0) if content else -1
        if start < 0:
            raise BadRecord(f"the chat template changes assistant message {index}, so its tokens cannot be "
                            "located for masking (train on everything, or use another template)")
        spans.append((start, start + len(content)))
    return text, spans


def turn_start(text: str, messages: list[dict], index: int, tokenizer) -> int | None:
    """Where assistant message `index` starts in `text`, or None if the template's prefixes do not line up."""
    if index:
        prompt = render(tokenizer, messages[:index], add_generation_prompt=True)
        return len(prompt) if text.startswith(prompt) else None
    # A conversation that opens with the assistant has no prompt to render: mark the spot with a probe.
    probed = render(tokenizer, [{"role": "assistant", "content": TURN_PROBE}])
    start = probed.find(TURN_PROBE)
    return start if start >= 0 and text.startswith(probed[:start]) else None


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    except UserError as error:  # e.g. "roles must alternate": a problem of this record, not of the run
        raise BadRecord(str(error)) from None


def label_tokens(text: str, spans: list[tuple[int, int]], tokenizer, closes_with_eos: bool,
                 train_on_everything: bool) -> tuple[list[int], list[int]]:
    """Token ids of `text` and their labels: the id inside a span, -100 elsewhere.

    A token belongs to a span when it starts inside it. A span is trained up to the last end-of-turn token in
    it (the template's trailing newline after <|im_end|> is not something to learn); a span with none ends at
    its last non-space character. If the final span has no end-of-turn token, the text is cut there and EOS is
    appended as a trained label, so the model always learns to stop (`closes_with_eos=False` skips that for
    middle turns whose template simply has no end-of-turn token).
    """
    ids, offsets = tokenizer.encode_with_offsets(text)
    ids = np.asarray(ids, dtype=np.int64)
    starts = np.asarray([start for start, _ in offsets], dtype=np.int64).reshape(-1)
    is_eos = np.isin(ids, list(tokenizer.eos_ids))
    trained = np.zeros(len(ids), dtype=bool)
    final_has_eos = False
    for start, end in spans:
        inside = np.flatnonzero((starts >= start) & (starts < end))
        eos_inside = inside[is_eos[inside]]
        if len(eos_inside):
            inside = inside[inside <= eos_inside[-1]]
        else:
            inside = inside[starts[inside] < start + len(text[start:end].rstrip())]
        trained[inside] = True
        final_has_eos = len(eos_inside) > 0
    if spans and closes_with_eos and not final_has_eos:
        keep = starts < spans[-1][0] + len(text[spans[-1][0] : spans[-1][1]].rstrip())
        ids, trained = np.append(ids[keep], tokenizer.eos_id), np.append(trained[keep], True)
    if train_on_everything:
        trained[:] = True
    return ids.tolist(), np.where(trained, ids, IGNORE).tolist()


def record_tokens(record: Record, tokenizer, alpaca_style: str, train_on_everything: bool):
    """(ids, labels) of one chat or Alpaca record, not yet truncated or shifted."""
    if record.format == "chat" or (record.format == "alpaca" and alpaca_style == "chat"):
        messages = record.content if record.format == "chat" else alpaca_messages(record.content)
        text, spans = chat_template_spans(messages, tokenizer)
        return label_tokens(text, spans, tokenizer, messages[-1]["role"] == "assistant", train_on_everything)
    fields = record.content
    prompt = (ALPACA_PROMPT_WITH_INPUT if fields["input"] else ALPACA_PROMPT).format(**fields)
    text = prompt + fields["output"]
    ids, labels = label_tokens(text, [(len(prompt), len(text))], tokenizer, True, train_on_everything)
    if tokenizer.add_bos:
        ids, labels = [tokenizer.bos_id] + ids, [tokenizer.bos_id if train_on_everything else IGNORE] + labels
    return ids, labels


def shifted(labels: list[int]) -> list[int]:
    """targets[t] = label of token t+1; the last token predicts nothing."""
    return labels[1:] + [IGNORE]


def tokenize_records(records: list[Record], tokenizer, seq_len: int, alpaca_style: str,
                     train_on_everything: bool, skip_bad_records: bool, report: DataReport) -> TokenizedExamples:
    input_ids, targets, sources = [], [], []
    text_stream, text_sources = [], []  # raw text: one token stream, cut into blocks at the end
    for record in records:
        if record.format == "text":
            text_sources += [(len(text_stream), record.source)]
            bos = [tokenizer.bos_id] if tokenizer.add_bos else []
            text_stream += bos + tokenizer.encode(record.content) + [tokenizer.eos_id]
            continue
        try:
            ids, labels = record_tokens(record, tokenizer, alpaca_style, train_on_everything)
        except BadRecord as problem:
            if not skip_bad_records:
                raise UserError(f"{record.source}: {problem} (fix it, or pass --skip-bad-records)") from None
            report.skipped_bad_records += 1
            report.skipped_reasons.append(f"{record.source}: {problem}")
            continue
        if len(ids) > seq_len:
            report.truncated_examples += 1
            report.truncated_tokens += len(ids) - seq_len
            ids, labels = ids[:seq_len], labels[:seq_len]
        example_targets = shifted(labels)
        if all(target == IGNORE for target in example_targets):
            report.dropped_examples += 1
            continue
        input_ids.append(ids), targets.append(example_targets), sources.append(record.source)

    # Block k is tokens [k*T, (k+1)*T) predicting [k*T+1, (k+1)*T]: every token is a target exactly once.
    n_blocks = max(0, (len(text_stream) - 1) // seq_len)
    report.truncated_tokens += len(text_stream) - n_blocks * seq_len if text_stream else 0
    block_sources = [source for start, source in text_sources]
    source_starts = [start for start, source in text_sources]
    for block in range(n_blocks):
        start = block * seq_len
        input_ids.append(text_stream[start : start + seq_len])
        targets.append(text_stream[start + 1 : start + seq_len + 1])
        sources.append(block_sources[bisect.bisect_right(source_starts, start) - 1])
    return TokenizedExamples.from_lists(input_ids, targets, sources, seq_len)


# ---------------------------------------------------------------- reading, dedup, split, cache


def dedup_text(record: Record) -> str:
    if record.format == "alpaca":
        return "\n".join(record.content.values())
    if record.format == "chat":
        return "\n".join(message["content"] for message in record.content)
    return record.content


def remove_duplicates(records: list[Record], near_dup_threshold: float | None, report: DataReport):
    """Records without their duplicates, and a few removed pairs for dedup_examples.jsonl."""
    duplicates = find_duplicates([dedup_text(record) for record in records], near_dup_threshold)
    examples, removed = [], set()
    for duplicate in duplicates:
        removed.add(duplicate.removed)
        if duplicate.method == "exact":
            report.exact_duplicates_removed += 1
        else:
            report.near_duplicates_removed += 1
        if sum(example["method"] == duplicate.method for example in examples) < DEDUP_EXAMPLES_PER_METHOD:
            examples.append({
                "method": duplicate.method,
                "similarity": round(duplicate.similarity, 3),
                "kept": {"source": records[duplicate.kept].source, "text": dedup_text(records[duplicate.kept])},
                "removed": {"source": records[duplicate.removed].source,
                            "text": dedup_text(records[duplicate.removed])},
            })
    return [record for index, record in enumerate(records) if index not in removed], examples


def build_pools(train_files, val_files, tokenizer, seq_len, format, dedup, near_dup_threshold,
                train_on_everything, skip_bad_records, alpaca_style, report, log):
    """Read every file, deduplicate, tokenize: {"train": examples[, "val": examples]} and the dedup examples."""
    records = {"train": [], "val": []}
    for split, paths in (("train", train_files), ("val", val_files)):
        for path in paths:
            file_records, file_report = read_records(path, format, skip_bad_records)
            records[split] += file_records
            report.files.append({"split": split, **file_report})
            report.skipped_bad_records += file_report["skipped_bad_records"]
            report.skipped_reasons += file_report["skipped_reasons"]
    if any(r.format == "chat" for r in records["train"] + records["val"]) and tokenizer.chat_template is None:
        raise UserError("chat data needs a chat template, and this tokenizer has none "
                        "(use an instruct model, or Alpaca / raw text data)")
    log(f"data: read {len(records['train'])} train and {len(records['val'])} val records; deduplicating and "
        "tokenizing (cached for the next run)")
    dedup_examples = []
    if dedup:
        # Validation records come first so that a copy of one in the training data is the one removed.
        ordered = records["val"] + records["train"]
        kept, dedup_examples = remove_duplicates(ordered, near_dup_threshold, report)
        kept_ids = {id(record) for record in kept}
        records = {split: [r for r in split_records if id(r) in kept_ids] for split, split_records in records.items()}
    pools = {
        split: tokenize_records(split_records, tokenizer, seq_len, alpaca_style, train_on_everything,
                                skip_bad_records, report)
        for split, split_records in records.items()
        if split == "train" or val_files
    }
    return pools, dedup_examples


def split_train_val(examples: TokenizedExamples, val_frac: float, seed: int):
    """A seeded random val_frac of the examples, at least MIN_VAL_EXAMPLES (but at most a quarter of the data)
    and at most MAX_VAL_EXAMPLES."""
    n = len(examples)
    n_val = 0 if val_frac == 0 else min(max(round(val_frac * n), MIN_VAL_EXAMPLES), MAX_VAL_EXAMPLES, n // 4)
    order = np.random.default_rng(seed).permutation(n)
    return examples.subset(np.sort(order[n_val:])), examples.subset(np.sort(order[:n_val]))


def resolve_alpaca_style(alpaca_style: str, tokenizer) -> str:
    if alpaca_style not in ALPACA_STYLES:
        raise UserError(f"alpaca style '{alpaca_style}' is unknown; use one of {', '.join(ALPACA_STYLES)}")
    if alpaca_style == "chat" and tokenizer.chat_template is None:
        raise UserError("alpaca style 'chat' needs a tokenizer with a chat template; use 'alpaca' or 'auto'")
    if alpaca_style == "auto":
        return "chat" if tokenizer.chat_template is not None else "alpaca"
    return alpaca_style


def prepare_data(paths, tokenizer, seq_len: int, *, val_paths=None, val_frac: float = 0.05, seed: int = 0,
                 format: str = "auto", dedup: bool = True, near_dup_threshold: float = 0.8,
                 train_on_everything: bool = False, skip_bad_records: bool = False, alpaca_style: str = "auto",
                 run_dir=None, cache_dir=None, log=print):
    """Tokenized train and val examples and a DataReport; see the module docstring."""
    if format not in FORMATS:
        raise UserError(f"data format '{format}' is unknown; use one of {', '.join(FORMATS)}")
    if seq_len < 2:
        raise UserError(f"seq_len {seq_len} is too short; an example needs at least 2 tokens")
    if not 0 <= val_frac < 1:
        raise UserError(f"val_frac {val_frac} must be in [0, 1)")
    if not 0 < near_dup_threshold <= 1:
        raise UserError(f"near-duplicate threshold {near_dup_threshold} must be in (0, 1]")
    train_files = [Path(p) for p in ([paths] if isinstance(paths, str | Path) else paths)]
    val_files = [Path(p) for p in ([val_paths] if isinstance(val_paths, str | Path) else val_paths or [])]
    if not train_files:
        raise UserError("no data files given; pass --data FILE")
    for path in train_files + val_files:
        if not path.is_file():
            raise UserError(f"{path}: data file not found (check the path given to --data / --val-data)")
    style = resolve_alpaca_style(alpaca_style, tokenizer)
    settings = dict(seq_len=seq_len, format=format, dedup=dedup, near_dup_threshold=near_dup_threshold,
                    train_on_everything=train_on_everything, skip_bad_records=skip_bad_records,
                    alpaca_style=style, val_files=len(val_files))
    cache_path = cache_file(cache_dir or default_cache_dir(), cache_key(train_files + val_files, tokenizer, settings))

    cached = load_cached(cache_path)
    if cached is not None:
        pools, meta = cached
        report = DataReport(**{**meta["report"], "cache": "hit"})
        dedup_examples = meta["dedup_examples"]
        log(f"data: loaded tokenized data from the cache {cache_path}")
    else:
        report = DataReport(dedup=dedup, near_dup_threshold=near_dup_threshold if dedup else None, seq_len=seq_len)
        pools, dedup_examples = build_pools(train_files, val_files, tokenizer, seq_len, format, dedup,
                                            near_dup_threshold, train_on_everything, skip_bad_records, style,
                                            report, log)
        report.alpaca_style = style if any(f["format"] == "alpaca" for f in report.files) else None
        save_cached(cache_path, pools, {"report": report.to_dict(), "dedup_examples": dedup_examples})

    if val_files:
        train, val, report.val_source = pools["train"], pools["val"], "files"
    else:
        train, val = split_train_val(pools["train"], val_frac, seed)
        report.val_source = "split" if len(val) else "none"
    report.train_examples, report.val_examples = len(train), len(val)
    report.train_tokens, report.val_tokens = train.n_tokens, val.n_tokens
    report.train_target_tokens, report.val_target_tokens = train.n_target_tokens, val.n_target_tokens
    if not len(train):
        raise UserError("no training examples are left after reading, deduplicating and truncating the data; "
                        f"see the data report: {report.to_dict()}")
    log_report(report, log)
    if run_dir is not None:
        write_spot_check(Path(run_dir) / "samples.txt", train, tokenizer, seed)
        write_jsonl(Path(run_dir) / "dedup_examples.jsonl", dedup_examples)
    return train, val, report


def log_report(report: DataReport, log) -> None:
    for file in report.files:
        log(f"data: {file['path']} ({file['split']}): {file['records']} records, format {file['format']}"
            + (f", {file['skipped_bad_records']} bad records skipped" if file["skipped_bad_records"] else ""))
    if report.alpaca_style:
        how = "the model's chat template" if report.alpaca_style == "chat" else "the Stanford Alpaca prompt"
        log(f"data: Alpaca records rendered with {how} (alpaca_style={report.alpaca_style})")
    if report.dedup:
        log(f"data: dedup removed {report.exact_duplicates_removed} exact and {report.near_duplicates_removed} "
            f"near duplicates (MinHash Jaccard >= {report.near_dup_threshold})")
    else:
        log("data: deduplication is OFF (--no-dedup): repeated records may leak from train into val")
    if report.skipped_bad_records:
        log(f"data: skipped {report.skipped_bad_records} bad records, e.g. {report.skipped_reasons[0]}")
    if report.truncated_examples or report.dropped_examples or report.truncated_tokens:
        log(f"data: {report.truncated_examples} examples truncated to {report.seq_len} tokens "
            f"({report.truncated_tokens} tokens lost); {report.dropped_examples} dropped with nothing to learn")
    log(f"data: train {report.train_examples} examples ({report.train_tokens} tokens, "
        f"{report.train_target_tokens} trained), val {report.val_examples} ({report.val_source})")


# ---------------------------------------------------------------- files for people


def marked_text(ids: np.ndarray, targets: np.ndarray, tokenizer) -> str:
    """The example as text with every trained token (the label of a target) inside ⟦ ⟧."""
    trained = np.concatenate([[False], targets[:-1] != IGNORE])  # token t is trained if targets[t-1] is set
    pieces, start = [], 0
    for end in range(1, len(ids) + 1):
        if end == len(ids) or trained[end] != trained[start]:
            text = tokenizer.decode(ids[start:end].tolist(), skip_special_tokens=False)
            pieces.append(f"{TRAINED_OPEN}{text}{TRAINED_CLOSE}" if trained[start] else text)
            start = end
    return "".join(pieces)


def write_spot_check(path: Path, examples: TokenizedExamples, tokenizer, seed: int) -> None:
    chosen = np.random.default_rng(seed).permutation(len(examples))[:SPOT_CHECK_SAMPLES]
    lines = [f"# {len(chosen)} training samples exactly as the model sees them. Text inside "
             f"{TRAINED_OPEN} {TRAINED_CLOSE} is trained on (has a loss); everything else is context only.\n"]
    for number, index in enumerate(chosen, start=1):
        ids, targets = examples.example(index)
        lines.append(f"==== sample {number}: example {index} from {examples.sources[index]}, {len(ids)} tokens, "
                     f"{int((targets != IGNORE).sum())} trained ====")
        lines.append(marked_text(ids, targets, tokenizer) + "\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines), encoding="utf-8")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


# ---------------------------------------------------------------- batches


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


class Batches:
    """Batches for one rank: global batch g holds world_size * batch_size rows, rank r reads its own slice of
    them, so ranks never share a sample and together read each one once per epoch. The order is a permutation
    seeded by (seed, epoch). The position (epoch, global batch index) is the whole state, so resuming from
    `state_dict()` yields exactly the batches an uninterrupted run would have.

    With pack=True a row is a pack of whole examples (up to examples.seq_len tokens, best-fit decreasing, fixed
    for the run) with position ids restarting and a document id per example, so the model attends within each
    example only. With group_by_length rows of similar length share a batch (less padding), the batch order
    still shuffled. With drop_last=False the last global batch is split as evenly as the ranks allow, and a
    rank whose share is empty skips it: use that for evaluation, where losses are summed over ranks afterwards.
    """

    def __init__(self, examples: TokenizedExamples, batch_size: int, pad_id: int, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True, pack: bool = False, group_by_length: bool = False,
                 drop_last: bool = True):
        self.examples, self.batch_size, self.pad_id, self.seed = examples, batch_size, pad_id, seed
        self.rank, self.world_size, self.shuffle, self.pack = rank, world_size, shuffle, pack
        self.group_by_length, self.drop_last = group_by_length, drop_last
        lengths = examples.lengths
        self.rows = pack_examples(lengths, examples.seq_len) if pack else [[i] for i in range(len(examples))]
        self.row_lengths = np.array([lengths[row].sum() for row in self.rows], dtype=np.int64)
        self.global_batch_size = batch_size * world_size
        self.epoch, self.batch_index = 0, 0
        if len(self) == 0:
            raise UserError(f"{len(self.rows)} rows of data cannot fill one batch of {batch_size} x {world_size} "
                            "ranks; lower --batch-size or add data")

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
            order = np.concatenate([chunk[np.argsort(-self.row_lengths[chunk], kind="stable")]
                                    for chunk in np.split(order, range(window, len(order), window))])
        batches = [order[i : i + self.global_batch_size] for i in range(0, len(order), self.global_batch_size)]
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
            self.batch_index += 1  # advanced before the yield: a checkpoint taken now resumes at the next batch
            if len(mine):
                yield self.collate([self.rows[row] for row in mine])
        self.set_epoch(self.epoch + 1)

    def collate(self, rows: list[list[int]]) -> dict:
        T = int(max(sum(len(self.examples.example(i)[0]) for i in row) for row in rows))
        input_ids = torch.full((len(rows), T), self.pad_id, dtype=torch.long)  # (B, T)
        targets = torch.full((len(rows), T), IGNORE, dtype=torch.long)
        position_ids = torch.arange(T).repeat(len(rows), 1)
        document_ids = torch.full((len(rows), T), -1, dtype=torch.long)  # -1: padding
        for b, row in enumerate(rows):
            start = 0
            for document, index in enumerate(row):
                ids, example_targets = self.examples.example(index)
                end = start + len(ids)
                input_ids[b, start:end] = torch.from_numpy(ids.astype(np.int64))
                targets[b, start:end] = torch.from_numpy(example_targets.astype(np.int64))
                position_ids[b, start:end] = torch.arange(len(ids))
                document_ids[b, start:end] = document
                start = end
        return {
            "input_ids": input_ids,
            "targets": targets,
            "position_ids": position_ids,
            "document_ids": document_ids if self.pack else None,
            "sample_ids": [index for row in rows for index in row],
        }

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.batch_index = epoch, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch_index": self.batch_index, "seed": self.seed,
                "global_batch_size": self.global_batch_size, "rows": len(self.rows)}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "global_batch_size", "rows"):
            if state[key] != self.state_dict()[key]:
                raise UserError(f"the saved data position has {key}={state[key]} but this run has "
                                f"{self.state_dict()[key]}; resume with the same data, seed and batch size x ranks")
        self.epoch, self.batch_index = state["epoch"], state["batch_index"]
