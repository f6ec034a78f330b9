"""What data.py did to the data, told to people: the DataReport, its log lines, and the spot-check file.

report = DataReport(seq_len=1024)            # data.py fills the counts; report.to_dict() -> summary.json
log_report(report, print)
write_spot_check(run_dir / "samples.txt", train_examples, tokenizer, seed=0)
"""

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from nanoft.data_cache import TokenizedExamples
from nanoft.loss import IGNORE_INDEX

SPOT_CHECK_SAMPLES = 50
TRAINED_OPEN, TRAINED_CLOSE = "⟦", "⟧"


@dataclass
class DataReport:
    """What happened to the data, for the log and summary.json."""

    files: list[dict] = field(
        default_factory=list
    )  # per file: path, split, format, records, skipped_bad_records
    alpaca_style: str | None = None  # how Alpaca records were rendered: "chat" template or "alpaca" prompt
    dedup: bool = True
    dedup_unit: str = "record"  # what dedup compares: a record, and a paragraph of raw text (.txt files)
    near_dup_threshold: float | None = None
    exact_duplicates_removed: int = 0
    near_duplicates_removed: int = 0
    skipped_bad_records: int = 0
    skipped_reasons: list[str] = field(default_factory=list)
    truncated_examples: int = 0  # longer than seq_len, cut
    truncated_tokens: int = 0  # tokens lost by that cut, plus raw text that did not fill a last block
    dropped_examples: int = 0  # no trained token left after truncation (the answer starts past seq_len)
    seq_len: int = 0
    val_source: str = "split"  # "split" of the data, "files" (val_paths), or "none"
    val_split: str = ""  # how many the split held out, and why (data.val_split_size)
    train_examples: int = 0
    val_examples: int = 0
    train_tokens: int = 0
    val_tokens: int = 0
    train_target_tokens: int = 0  # tokens with a loss
    val_target_tokens: int = 0
    cache: str = "miss"  # "hit": loaded from the cache, nothing re-tokenized

    def to_dict(self) -> dict:
        return asdict(self)


def log_report(report: DataReport, log) -> None:
    for file in report.files:
        count = f"{file['records']} {file['unit']}s"
        log(
            f"data: {file['path']} ({file['split']}): {count}, format {file['format']}"
            + (f", {file['skipped_bad_records']} bad records skipped" if file["skipped_bad_records"] else "")
        )
    if report.alpaca_style:
        how = "the model's chat template" if report.alpaca_style == "chat" else "the Stanford Alpaca prompt"
        log(f"data: Alpaca records rendered with {how} (alpaca_style={report.alpaca_style})")
    if report.dedup:
        log(
            f"data: dedup removed {report.exact_duplicates_removed} exact and "
            f"{report.near_duplicates_removed} near duplicates "
            f"(MinHash Jaccard >= {report.near_dup_threshold}; unit: {report.dedup_unit})"
        )
    else:
        log("data: deduplication is OFF (--no-dedup): repeated records may leak from train into val")
    if report.skipped_bad_records:
        log(f"data: skipped {report.skipped_bad_records} bad records, e.g. {report.skipped_reasons[0]}")
    if report.truncated_examples or report.dropped_examples or report.truncated_tokens:
        log(
            f"data: {report.truncated_examples} examples truncated to {report.seq_len} tokens "
            f"({report.truncated_tokens} tokens lost); "
            f"{report.dropped_examples} dropped (no answer token within --seq-len {report.seq_len})"
        )
    log(
        f"data: train {report.train_examples} examples ({report.train_tokens} tokens, "
        f"{report.train_target_tokens} trained), val {report.val_examples} ({report.val_source}"
        + (f": {report.val_split})" if report.val_split else ")")
    )


def marked_text(ids: np.ndarray, targets: np.ndarray, tokenizer) -> str:
    """The example as text with every trained token (the label of a target) inside ⟦ ⟧."""
    # Token t is trained when it is the label of position t-1; the first token never is.
    trained = np.concatenate([[False], targets[:-1] != IGNORE_INDEX])
    pieces, start = [], 0
    for end in range(1, len(ids) + 1):
        if end == len(ids) or trained[end] != trained[start]:
            text = tokenizer.decode(ids[start:end].tolist(), skip_special_tokens=False)
            pieces.append(f"{TRAINED_OPEN}{text}{TRAINED_CLOSE}" if trained[start] else text)
            start = end
    return "".join(pieces)


def write_spot_check(path: Path, examples: TokenizedExamples, tokenizer, seed: int) -> None:
    chosen = np.random.default_rng(seed).permutation(len(examples))[:SPOT_CHECK_SAMPLES]
    lines = [
        f"# {len(chosen)} training samples exactly as the model sees them. Text inside "
        f"{TRAINED_OPEN} {TRAINED_CLOSE} is trained on (has a loss); everything else is context only.\n"
    ]
    for number, index in enumerate(chosen, start=1):
        ids, targets = examples.example(index)
        lines.append(
            f"==== sample {number}: example {index} from {examples.sources[index]}, {len(ids)} tokens, "
            f"{int((targets != IGNORE_INDEX).sum())} trained ===="
        )
        lines.append(marked_text(ids, targets, tokenizer) + "\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines), encoding="utf-8")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
