"""Training data: read, check, deduplicate, render with the chat template, mask, tokenize, split, cache.

    tokenizer = Tokenizer.from_pretrained(model_dir)
    train, val, report = prepare_data(["train.jsonl"], tokenizer, seq_len=1024, run_dir="runs/x")
    batches = data_batches.Batches(train, batch_size=4, pad_id=tokenizer.pad_id, seed=0, rank=0, world_size=1)
    for batch in batches:  # the rest of the current epoch; the next `for` starts the next epoch
        loss_sum, n_targets = model(batch["input_ids"], batch["targets"], position_ids=batch["position_ids"],
                                    document_ids=batch["document_ids"])
    checkpoint["data"] = batches.state_dict()   # and batches.load_state_dict(...) to resume exactly there

The data pipeline is this file and the nanoft/data_*.py modules it calls, in the order data flows:
- data_records.py: read JSONL/JSON/.txt files into checked records (Alpaca, chat, ShareGPT, text);
- data_dedup.py: exact and MinHash near-duplicates;
- this file: render each record with the chat template, mask what is not trained, tokenize, split;
- data_cache.py: `TokenizedExamples` (example i is `examples.example(i) -> (input_ids, targets)` numpy
  arrays) and their on-disk cache;
- data_report.py: `DataReport` (`.to_dict()` goes into summary.json), its log lines, samples.txt;
- data_batches.py: `Batches(examples, batch_size, pad_id, *, seed=0, rank=0, world_size=1, shuffle=True,
  pack=False, group_by_length=False, drop_last=True)`: iterable of batch dicts {input_ids (B, T), targets
  (B, T) (already shifted, -100 = no loss), position_ids (B, T), document_ids (B, T) or None (packed only),
  sample_ids list[int] (indices into examples)}, right-padded to the longest row of the batch. `len()` is
  batches per epoch; `state_dict()` / `load_state_dict()` / `set_epoch()`.

Public API of this file (everything else here is a helper): `prepare_data(paths, tokenizer, seq_len, *,
val_paths=None, val_frac=0.05, seed=0, format="auto", dedup=True, near_dup_threshold=0.8,
train_on_everything=False, skip_bad_records=False, alpaca_style="auto", run_dir=None, cache_dir=None,
log=print) -> (train, val, DataReport)`. `paths` empty or None: the built-in dataset
(nanoft/default_data.py). train and val are `TokenizedExamples` (val may be empty). With
`run_dir` it writes samples.txt (50 training samples, trained spans marked ⟦ ⟧) and dedup_examples.jsonl
there. Tokenized data is cached under cache_dir (default $NANOFT_CACHE/data).

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
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from nanoft.config import ALPACA_STYLES, DATA_FORMATS
from nanoft.data_cache import (
    TokenizedExamples,
    cache_file,
    cache_key,
    default_cache_dir,
    load_cached,
    save_cached,
)
from nanoft.data_dedup import find_duplicates
from nanoft.data_records import BadRecord, Record, check_data_file, read_records
from nanoft.data_report import (
    DataReport,
    log_report,
    write_jsonl,
    write_spot_check,
)
from nanoft.default_data import default_data_path
from nanoft.errors import UserError
from nanoft.loss import IGNORE_INDEX

MIN_VAL_EXAMPLES, MAX_VAL_EXAMPLES = 20, 1000  # a val loss from fewer is noise; more only slows evaluation
DEDUP_EXAMPLES_PER_METHOD = 10
DEDUP_EXAMPLE_CHARS = 500  # of each text in dedup_examples.jsonl: enough to judge the pair
TURN_PROBE = "nanoft-assistant-turn-probe"
ENCODE_BATCH = 1024  # texts per call to the tokenizer (it parallelises within a call)

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
class DataSettings:
    """Everything besides the files and the tokenizer that changes the tokenized data (so: the cache key)."""

    seq_len: int
    format: str
    dedup: bool
    near_dup_threshold: float
    train_on_everything: bool
    skip_bad_records: bool
    alpaca_style: str  # resolved: "chat" or "alpaca"


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
        # Templates that rewrite earlier turns (Qwen3 drops the thinking of answers before the last question)
        # cannot be cut into prefixes: render the conversation with this message's content swapped for a
        # probe; the text around the probe is the text around the message, then its end-of-turn token.
        probed = [*messages[:index], {"role": "assistant", "content": TURN_PROBE}, *messages[index + 1 :]]
        before, found, after = render(tokenizer, probed).partition(TURN_PROBE)
        start, end = len(before), len(text) - len(after)
        if not (found and text.startswith(before) and text.endswith(after) and start <= end):
            raise BadRecord(
                f"the chat template changes assistant message {index}, so its tokens cannot be "
                "located for masking (train on everything, or use another template)"
            )
        end_of_turn = tokenizer.decode([tokenizer.eos_id], skip_special_tokens=False)
        if text[end:].lstrip().startswith(end_of_turn):
            end = text.index(end_of_turn, end) + len(end_of_turn)
        spans.append((start, end))
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


@dataclass
class Rendered:
    """A record as text, with the character spans that are trained."""

    text: str
    spans: list[tuple[int, int]]
    closes_with_eos: bool  # the final span ends the sequence: it must end in an end-of-turn token
    prepend_bos: bool  # the Alpaca prompt on a model whose encode adds BOS (a chat template writes its own)


def rendered_as(record_format: str, alpaca_style: str) -> str:
    """How records of a format become text: what the model learns to read and write."""
    if record_format == "chat" or (record_format == "alpaca" and alpaca_style == "chat"):
        return "the model's chat template"
    return "the Stanford Alpaca prompt" if record_format == "alpaca" else "raw text"


def render_record(record: Record, tokenizer, alpaca_style: str) -> Rendered:
    if rendered_as(record.format, alpaca_style) == "the model's chat template":
        messages = record.content if record.format == "chat" else alpaca_messages(record.content)
        text, spans = chat_template_spans(messages, tokenizer)
        return Rendered(text, spans, messages[-1]["role"] == "assistant", False)
    fields = record.content
    prompt = (ALPACA_PROMPT_WITH_INPUT if fields["input"] else ALPACA_PROMPT).format(**fields)
    text = prompt + fields["output"]
    return Rendered(text, [(len(prompt), len(text))], True, tokenizer.add_bos)


def label_tokens(
    rendered: Rendered,
    ids: list[int],
    offsets: list[tuple[int, int]],
    tokenizer,
    is_eos: np.ndarray,
    train_on_everything: bool,
) -> tuple[list[int], list[int]]:
    """The ids of `rendered.text` (with BOS / EOS added where needed) and their labels: id or -100.

    A token belongs to a span when it starts inside it. A span is trained up to the first end-of-turn token in
    it (the template's newline after <|im_end|>, or Phi-3's <|endoftext|> after its <|end|>, is not something
    to learn); a span with none ends at its last non-space character. If the final span has no end-of-turn
    token (the Alpaca prompt, templates without one), the text is cut there and EOS appended as a trained
    label, so the model always learns to stop.
    `is_eos` is a vocabulary-sized table of the tokenizer's stop ids.
    """
    text = rendered.text
    ids = np.asarray(ids, dtype=np.int64)
    starts = np.asarray([start for start, _ in offsets], dtype=np.int64)
    trained = np.zeros(len(ids), dtype=bool)
    final_has_eos = False
    for start, end in rendered.spans:
        inside = np.flatnonzero((starts >= start) & (starts < end))
        eos_inside = inside[is_eos[ids[inside]]]
        if len(eos_inside):
            inside = inside[inside <= eos_inside[0]]
        else:
            inside = inside[starts[inside] < start + len(text[start:end].rstrip())]
        trained[inside] = True
        final_has_eos = len(eos_inside) > 0
    if rendered.spans and rendered.closes_with_eos and not final_has_eos:
        start, end = rendered.spans[-1]
        keep = starts < start + len(text[start:end].rstrip())
        ids, trained = np.append(ids[keep], tokenizer.eos_id), np.append(trained[keep], True)
    if rendered.prepend_bos:
        ids, trained = np.insert(ids, 0, tokenizer.bos_id), np.insert(trained, 0, False)
    if train_on_everything:
        trained[:] = True
    return ids.tolist(), np.where(trained, ids, IGNORE_INDEX).tolist()


def eos_table(tokenizer) -> np.ndarray:
    table = np.zeros(tokenizer.vocab_size, dtype=bool)
    table[list(tokenizer.eos_ids)] = True
    return table


def record_tokens(record: Record, tokenizer, alpaca_style: str, train_on_everything: bool):
    """(ids, labels) of one chat or Alpaca record, not yet truncated or shifted."""
    rendered = render_record(record, tokenizer, alpaca_style)
    ids, offsets = tokenizer.encode_with_offsets(rendered.text)
    return label_tokens(rendered, ids, offsets, tokenizer, eos_table(tokenizer), train_on_everything)


def encode_many(tokenizer, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """`encode_with_offsets` of many texts at once: the tokenizers library spreads a batch over all cores."""
    return [(e.ids, e.offsets) for e in tokenizer.backend.encode_batch(texts, add_special_tokens=False)]


def shifted(labels: list[int]) -> list[int]:
    """targets[t] = label of token t+1; the last token predicts nothing."""
    return labels[1:] + [IGNORE_INDEX]


def tokenize_records(
    records: list[Record], tokenizer, settings: DataSettings, report: DataReport
) -> TokenizedExamples:
    """Chat and Alpaca records become one example each (truncated; dropped when no answer token is left within
    seq_len); raw text documents become one stream cut into full seq_len blocks."""
    seq_len = settings.seq_len
    rendered, sources = [], []
    for record in records:
        if record.format == "text":
            continue
        try:
            rendered.append(render_record(record, tokenizer, settings.alpaca_style))
            sources.append(record.source)
        except BadRecord as problem:
            if not settings.skip_bad_records:
                raise UserError(f"{record.source}: {problem} (fix it, or pass --skip-bad-records)") from None
            report.skipped_bad_records += 1
            report.skipped_reasons.append(f"{record.source}: {problem}")

    input_ids, targets, kept_sources, is_eos = [], [], [], eos_table(tokenizer)
    for first in range(0, len(rendered), ENCODE_BATCH):
        chunk = rendered[first : first + ENCODE_BATCH]
        encoded = encode_many(tokenizer, [r.text for r in chunk])
        for index, (rendered_record, (ids, offsets)) in enumerate(zip(chunk, encoded, strict=True)):
            ids, labels = label_tokens(
                rendered_record, ids, offsets, tokenizer, is_eos, settings.train_on_everything
            )
            if len(ids) > seq_len:
                report.truncated_examples += 1
                report.truncated_tokens += len(ids) - seq_len
                ids, labels = ids[:seq_len], labels[:seq_len]
            example_targets = shifted(labels)
            if all(target == IGNORE_INDEX for target in example_targets):
                report.dropped_examples += 1
                continue
            input_ids.append(ids)
            targets.append(example_targets)
            kept_sources.append(sources[first + index])

    # Raw text: one stream of documents, each closed by EOS. Block k is tokens [k*T, (k+1)*T) predicting
    # [k*T+1, (k+1)*T], so every token is a target exactly once.
    documents = join_paragraphs([record for record in records if record.format == "text"])
    stream, document_starts = [], []
    bos = [tokenizer.bos_id] if tokenizer.add_bos else []
    for ids, _ in encode_many(tokenizer, [document.content for document in documents]):
        document_starts.append(len(stream))
        stream += bos + ids + [tokenizer.eos_id]
    n_blocks = max(0, (len(stream) - 1) // seq_len)
    report.truncated_tokens += len(stream) - n_blocks * seq_len if stream else 0
    for block in range(n_blocks):
        start = block * seq_len
        input_ids.append(stream[start : start + seq_len])
        targets.append(stream[start + 1 : start + seq_len + 1])
        kept_sources.append(documents[bisect.bisect_right(document_starts, start) - 1].source)
    return TokenizedExamples.from_lists(input_ids, targets, kept_sources, seq_len)


def join_paragraphs(records: list[Record]) -> list[Record]:
    """Raw text records with the paragraphs of each .txt file (those left after dedup) joined back into one
    document, a blank line between them; JSONL `text` records are documents already."""
    documents = []
    for record in records:
        if record.document and documents and documents[-1].document == record.document:
            documents[-1].content += "\n\n" + record.content
        else:
            documents.append(Record(record.source, record.format, record.content, record.document))
    return documents


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
            examples.append(
                {
                    "method": duplicate.method,
                    "similarity": round(duplicate.similarity, 3),
                    "kept": {
                        "source": records[duplicate.kept].source,
                        "text": dedup_text(records[duplicate.kept])[:DEDUP_EXAMPLE_CHARS],
                    },
                    "removed": {
                        "source": records[duplicate.removed].source,
                        "text": dedup_text(records[duplicate.removed])[:DEDUP_EXAMPLE_CHARS],
                    },
                }
            )
    return [record for index, record in enumerate(records) if index not in removed], examples


def build_pools(train_files, val_files, tokenizer, settings: DataSettings, report: DataReport, log):
    """Read every file, deduplicate, tokenize: ({"train": examples[, "val": examples]}, dedup examples)."""
    records, renderings = {"train": [], "val": []}, {}
    for split, paths in (("train", train_files), ("val", val_files)):
        for path in paths:
            file_records, file_report = read_records(path, settings.format, settings.skip_bad_records)
            records[split] += file_records
            renderings[path] = {rendered_as(r.format, settings.alpaca_style) for r in file_records}
            report.files.append({"split": split, **file_report})
            report.skipped_bad_records += file_report["skipped_bad_records"]
            report.skipped_reasons += file_report["skipped_reasons"]
    if any(r.format == "chat" for r in records["train"] + records["val"]) and tokenizer.chat_template is None:
        raise UserError(
            "chat data needs a chat template, and this tokenizer has none "
            "(use an instruct model, or Alpaca / raw text data)"
        )
    trained = set().union(*(renderings[path] for path in train_files))
    for path in val_files:  # the val loss and the gates must measure the format the model learns
        if unseen := renderings[path] - trained:
            raise UserError(
                f"{path}: --val-data renders as {' and '.join(sorted(unseen))}, which the --data does not "
                f"({' and '.join(sorted(trained))}); its val loss would measure a prompt format the model "
                "never trained on: give val data in the training data's format"
                + (" or --alpaca-style chat" if "the Stanford Alpaca prompt" in trained | unseen else "")
            )
    log(
        f"data: read {len(records['train'])} train and {len(records['val'])} val records; deduplicating and "
        "tokenizing (cached for the next run)"
    )
    units = {
        "a paragraph of a .txt file" if file["unit"] == "paragraph" else "a record" for file in report.files
    }
    report.dedup_unit = " / ".join(sorted(units, reverse=True))  # "a record / a paragraph of a .txt file"
    dedup_examples = []
    if settings.dedup:
        # Validation records come first so that a copy of one in the training data is the one removed.
        ordered = records["val"] + records["train"]
        kept, dedup_examples = remove_duplicates(ordered, settings.near_dup_threshold, report)
        kept_ids = {id(record) for record in kept}
        records = {
            split: [r for r in split_records if id(r) in kept_ids] for split, split_records in records.items()
        }
    pools = {
        split: tokenize_records(split_records, tokenizer, settings, report)
        for split, split_records in records.items()
        if split == "train" or val_files
    }
    return pools, dedup_examples


def val_split_size(n: int, val_frac: float) -> tuple[int, str]:
    """How many of n examples the split holds out, and why that many: val_frac of them, but at least
    MIN_VAL_EXAMPLES (and at most a quarter of the data) and at most MAX_VAL_EXAMPLES."""
    if val_frac == 0:
        return 0, "--val-frac 0"
    wanted = round(val_frac * n)
    n_val = min(max(wanted, MIN_VAL_EXAMPLES), MAX_VAL_EXAMPLES, n // 4)
    share = f"{val_frac:.0%} of {n} is {wanted}"
    if n_val == wanted:
        return n_val, share
    if n_val == MAX_VAL_EXAMPLES:
        return n_val, f"{share}, capped at {MAX_VAL_EXAMPLES}: more only slows evaluation"
    if n_val == MIN_VAL_EXAMPLES:
        return n_val, f"{share}, raised to {MIN_VAL_EXAMPLES}: a val loss over fewer is noise"
    return n_val, (
        f"{share}, raised towards {MIN_VAL_EXAMPLES} (a val loss over fewer is noise) but at most a quarter "
        "of the data"
    )


def split_train_val(examples: TokenizedExamples, val_frac: float, seed: int):
    """(train, val, why val is that size): a seeded random val_split_size(...) of the examples held out."""
    n_val, why = val_split_size(len(examples), val_frac)
    order = np.random.default_rng(seed).permutation(len(examples))
    return examples.subset(np.sort(order[n_val:])), examples.subset(np.sort(order[:n_val])), why


def resolve_alpaca_style(alpaca_style: str, tokenizer) -> str:
    if alpaca_style not in ALPACA_STYLES:
        raise UserError(f"alpaca style '{alpaca_style}' is unknown; use one of {', '.join(ALPACA_STYLES)}")
    if alpaca_style == "chat" and tokenizer.chat_template is None:
        raise UserError("alpaca style 'chat' needs a tokenizer with a chat template; use 'alpaca' or 'auto'")
    if alpaca_style == "auto":
        return "chat" if tokenizer.chat_template is not None else "alpaca"
    return alpaca_style


def as_paths(paths) -> list[Path]:
    """One path, a list of them, or None (none) as a list of Paths."""
    return [Path(p) for p in ([paths] if isinstance(paths, str | Path) else paths or [])]


def prepare_data(
    paths,
    tokenizer,
    seq_len: int,
    *,
    val_paths=None,
    val_frac: float = 0.05,
    seed: int = 0,
    format: str = "auto",
    dedup: bool = True,
    near_dup_threshold: float = 0.8,
    train_on_everything: bool = False,
    skip_bad_records: bool = False,
    alpaca_style: str = "auto",
    run_dir=None,
    cache_dir=None,
    log=print,
):
    """Tokenized train and val examples and a DataReport; see the module docstring."""
    if format not in DATA_FORMATS:
        raise UserError(f"data format '{format}' is unknown; use one of {', '.join(DATA_FORMATS)}")
    if seq_len < 2:
        raise UserError(f"seq_len {seq_len} is too short; an example needs at least 2 tokens")
    if not 0 <= val_frac < 1:
        raise UserError(f"val_frac {val_frac} must be in [0, 1)")
    if not 0 < near_dup_threshold <= 1:
        raise UserError(f"near-duplicate threshold {near_dup_threshold} must be in (0, 1]")
    # No files: the built-in dataset, as `python train.py` without --data trains on.
    train_files = as_paths(paths) or [default_data_path()]
    val_files = as_paths(val_paths)
    for path in train_files + val_files:  # before the cache key, which reads every file
        check_data_file(path)
    settings = DataSettings(
        seq_len,
        format,
        dedup,
        near_dup_threshold,
        train_on_everything,
        skip_bad_records,
        resolve_alpaca_style(alpaca_style, tokenizer),
    )
    key = cache_key(train_files + val_files, tokenizer, {**asdict(settings), "val_files": len(val_files)})
    cache_path = cache_file(cache_dir or default_cache_dir(), key)

    cached = load_cached(cache_path)
    if cached is not None:
        pools, meta = cached
        report = DataReport(**{**meta["report"], "cache": "hit"})
        dedup_examples = meta["dedup_examples"]
        log(f"data: loaded tokenized data from the cache {cache_path}")
    else:
        report = DataReport(
            dedup=dedup, near_dup_threshold=near_dup_threshold if dedup else None, seq_len=seq_len
        )
        pools, dedup_examples = build_pools(train_files, val_files, tokenizer, settings, report, log)
        has_alpaca = any(file["format"] == "alpaca" for file in report.files)
        report.alpaca_style = settings.alpaca_style if has_alpaca else None
        save_cached(cache_path, pools, {"report": report.to_dict(), "dedup_examples": dedup_examples})

    if val_files:
        train, val, report.val_source = pools["train"], pools["val"], "files"
    else:
        train, val, report.val_split = split_train_val(pools["train"], val_frac, seed)
        report.val_source = "split" if len(val) else "none"
    report.train_examples, report.val_examples = len(train), len(val)
    report.train_tokens, report.val_tokens = train.n_tokens, val.n_tokens
    report.train_target_tokens, report.val_target_tokens = train.n_target_tokens, val.n_target_tokens
    if not len(train):
        raise UserError(
            f"no training examples are left: {report.dropped_examples} had no answer token within --seq-len "
            f"{seq_len} (raise it), {report.exact_duplicates_removed + report.near_duplicates_removed} were "
            f"duplicates, {len(val)} went to validation; raw text shorter than one --seq-len block gives none"
        )
    log_report(report, log)
    if run_dir is not None:
        write_spot_check(Path(run_dir) / "samples.txt", train, tokenizer, seed)
        write_jsonl(Path(run_dir) / "dedup_examples.jsonl", dedup_examples)
    return train, val, report
