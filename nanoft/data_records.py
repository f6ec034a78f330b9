"""Read training data files into checked records: Alpaca, chat `messages`, ShareGPT `conversations`, raw text.

    records, file_report = read_records("train.jsonl", format="auto", skip_bad_records=False)

Every problem names the file and line and says what to do, as a UserError (exit code 2). With
`skip_bad_records` a bad record is counted in `file_report["skipped_bad_records"]` and its first few reasons
are kept, never dropped silently. ShareGPT is mapped to chat messages here, so the rest of data.py sees three
kinds of record: alpaca (instruction, input, output), chat (a list of {role, content}) and text.
"""

import json
from dataclasses import dataclass
from pathlib import Path

from nanoft.errors import UserError

CHAT_ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
SKIP_HINT = "fix it, or pass --skip-bad-records to skip such records"
REASONS_KEPT = 5  # skipped-record reasons quoted in the log and report


@dataclass
class Record:
    source: str  # "path:line", for error messages and the spot-check file
    format: str  # alpaca | chat | text (ShareGPT arrives here as chat)
    content: dict | list | str  # alpaca: {instruction, input, output}; chat: [{role, content}]; text: str
    # Raw text of a .txt file arrives a paragraph per record, so dedup can find repeated paragraphs; the
    # paragraphs of one file (its path here) are joined back into one document after dedup.
    document: str = ""


class BadRecord(Exception):
    """One record's problem, without its location (the reader adds `path:line`)."""


def read_records(path, format: str = "auto", skip_bad_records: bool = False) -> tuple[list[Record], dict]:
    """All records of one file, and {path, format, records, skipped_bad_records, skipped_reasons}."""
    path = Path(path)
    check_data_file(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark is not part of the data
    except UnicodeDecodeError as error:
        raise UserError(
            f"{path}: is not UTF-8 text ({error.reason} at byte {error.start}); re-save it as UTF-8"
        ) from None
    if not text.strip():
        raise UserError(f"{path}: is empty, there are no records in it (remove it from the data files)")
    if path.suffix == ".txt":
        if format not in ("auto", "text"):
            raise UserError(f"{path}: a .txt file is raw text, it cannot be read as --data-format {format}")
        records = [
            Record(f"{path}:{line}", "text", paragraph, str(path)) for line, paragraph in paragraphs(text)
        ]
        return records, file_report(path, "text", len(records), [], unit="paragraph")

    records, skipped = [], []
    file_format = None if format == "auto" else format
    for line, value in json_values(path, text, skip_bad_records, skipped):
        try:
            if file_format is None:
                file_format = detect_format(value)
            records.append(Record(f"{path}:{line}", *check_record(value, file_format)))
        except BadRecord as problem:
            if not skip_bad_records:
                raise UserError(f"{path}:{line}: {problem} ({SKIP_HINT})") from None
            skipped.append(f"{path}:{line}: {problem}")
    if not records:
        raise UserError(f"{path}: no usable records ({len(skipped)} bad); first problem: {skipped[0]}")
    return records, file_report(path, file_format, len(records), skipped)


def paragraphs(text: str):
    """(line, paragraph) for each run of non-blank lines: the unit raw text is deduplicated by."""
    start, lines = None, text.splitlines()
    for number, line in enumerate(lines + [""], start=1):
        if line.strip() and start is None:
            start = number
        elif not line.strip() and start is not None:
            yield start, "\n".join(lines[start - 1 : number - 1])
            start = None


COMPRESSED_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".zip")
TABLE_SUFFIXES = (".csv", ".tsv", ".parquet", ".arrow", ".xlsx")


def check_data_file(path: Path) -> None:
    if not path.exists():
        raise UserError(f"{path}: data file not found (check the path given to --data / --val-data)")
    if not path.is_file():
        raise UserError(f"{path}: is not a file (give .jsonl, .json or .txt files)")
    # Read as text these would fail with a JSON or UTF-8 error that hides the real problem.
    if path.suffix in COMPRESSED_SUFFIXES:
        raise UserError(f"{path}: is compressed; decompress it first (nanoft reads .jsonl, .json and .txt)")
    if path.suffix in TABLE_SUFFIXES:
        raise UserError(f"{path}: {path.suffix} is not supported; convert it to JSON Lines, a record a line")


def file_report(path: Path, format: str, n_records: int, skipped: list[str], unit="record") -> dict:
    return {
        "path": str(path),
        "format": format,
        "records": n_records,
        "unit": unit,  # a record is a line of JSONL or an element of a JSON array; .txt files: a paragraph
        "skipped_bad_records": len(skipped),
        "skipped_reasons": skipped[:REASONS_KEPT],
    }


def json_values(path: Path, text: str, skip_bad_records: bool, skipped: list[str]):
    """(line, value) for each record: a JSON array's elements, or each non-blank line of JSON Lines."""
    if text.lstrip().startswith("["):
        yield from json_array_values(path, text)
        return
    if path.suffix == ".json":  # one (maybe pretty-printed) object; JSON Lines named .json falls through
        try:
            yield 1, json.loads(text)
            return
        except json.JSONDecodeError:
            pass
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            yield line, json.loads(raw)
        except json.JSONDecodeError as error:
            problem = f"not valid JSON ({error.msg} at column {error.colno})"
            if not skip_bad_records:
                raise UserError(f"{path}:{line}: {problem} ({SKIP_HINT})") from None
            skipped.append(f"{path}:{line}: {problem}")


def json_array_values(path: Path, text: str):
    """Elements of a top-level JSON array with the line each starts on (json.load would lose the lines)."""
    decoder = json.JSONDecoder()
    position = text.index("[") + 1
    while True:
        position = skip_whitespace(text, position)
        if text.startswith("]", position):
            return
        try:
            value, end = decoder.raw_decode(text, position)
        except json.JSONDecodeError as error:
            raise UserError(
                f"{path}:{error.lineno}: not valid JSON ({error.msg} at column {error.colno}); "
                "fix the file (a JSON array cannot be read past a syntax error)"
            ) from None
        yield text.count("\n", 0, position) + 1, value
        position = skip_whitespace(text, end)
        if text.startswith(",", position):
            position += 1
        elif not text.startswith("]", position):
            line = text.count("\n", 0, position) + 1
            raise UserError(f"{path}:{line}: expected ',' or ']' between the array's records; fix the file")


def skip_whitespace(text: str, position: int) -> int:
    while position < len(text) and text[position] in " \t\r\n":
        position += 1
    return position


def detect_format(value) -> str:
    if not isinstance(value, dict):
        raise BadRecord(f"a record must be a JSON object, got {type(value).__name__}")
    for key, format in (
        ("messages", "chat"),
        ("conversations", "sharegpt"),
        ("instruction", "alpaca"),
        ("text", "text"),
    ):
        if key in value:
            return format
    raise BadRecord(
        f"cannot tell the data format from the keys {sorted(value)}: expected 'messages' (chat), "
        "'conversations' (ShareGPT), 'instruction' + 'output' (Alpaca) or 'text'; or pass --data-format"
    )


def check_record(value, format: str) -> tuple[str, dict | list | str]:
    """(record format, content) for a parsed JSON value, or BadRecord saying what is wrong with it."""
    if not isinstance(value, dict):
        raise BadRecord(f"a record must be a JSON object, got {type(value).__name__}")
    if format == "alpaca":
        fields = {
            name: string_field(value, name, required=name != "input")
            for name in ("instruction", "input", "output")
        }
        for name in ("instruction", "output"):  # an empty output would teach the model to answer nothing
            if not fields[name].strip():
                raise BadRecord(f"'{name}' is empty")
        return "alpaca", fields
    if format == "text":
        return "text", string_field(value, "text", required=True)
    if format == "chat":
        messages = [
            chat_message(message, index, "role", "content", {r: r for r in CHAT_ROLES})
            for index, message in enumerate(message_list(value, "messages"))
        ]
    else:
        messages = [
            chat_message(message, index, "from", "value", SHAREGPT_ROLES)
            for index, message in enumerate(message_list(value, "conversations"))
        ]
    return "chat", check_conversation(messages, "content" if format == "chat" else "value")


def check_conversation(messages: list[dict], content_key: str) -> list[dict]:
    """A conversation the model can learn from: an assistant turn, and no empty user or assistant message."""
    if not any(message["role"] == "assistant" for message in messages):
        raise BadRecord(
            "has no assistant turn: nothing to learn (roles: " + ", ".join(m["role"] for m in messages) + ")"
        )
    for index, message in enumerate(messages):
        if message["role"] != "system" and not message["content"].strip():
            raise BadRecord(f"message {index} ({message['role']}) has an empty '{content_key}'")
    return messages


def string_field(value: dict, name: str, required: bool) -> str:
    if name not in value or value[name] is None:
        if required:
            raise BadRecord(f"missing field '{name}' (record has {sorted(value)})")
        return ""
    if not isinstance(value[name], str):
        raise BadRecord(f"field '{name}' must be a string, got {type(value[name]).__name__}")
    return value[name]


def message_list(value: dict, name: str) -> list:
    if name not in value:
        raise BadRecord(f"missing field '{name}' (record has {sorted(value)})")
    messages = value[name]
    if not isinstance(messages, list):
        raise BadRecord(f"field '{name}' must be a list of messages, got {type(messages).__name__}")
    if not messages:
        raise BadRecord(f"field '{name}' is an empty conversation")
    return messages


def chat_message(message, index: int, role_key: str, content_key: str, roles: dict) -> dict:
    where = f"message {index}"
    if not isinstance(message, dict):
        raise BadRecord(
            f"{where} must be an object with '{role_key}' and '{content_key}', got {type(message).__name__}"
        )
    for key in (role_key, content_key):
        if key not in message:
            raise BadRecord(f"{where} has no '{key}' (it has {sorted(message)})")
    role, content = message[role_key], message[content_key]
    if not isinstance(role, str) or role not in roles:
        raise BadRecord(f"{where} has unknown {role_key} {role!r}; expected one of {', '.join(roles)}")
    if not isinstance(content, str):
        raise BadRecord(f"{where} '{content_key}' must be a string, got {type(content).__name__}")
    chat = {"role": roles[role], "content": content}
    reasoning = message.get("reasoning_content")  # an answer's thinking, apart from it (Qwen3's templates)
    if reasoning is not None:
        if not isinstance(reasoning, str):
            raise BadRecord(f"{where} 'reasoning_content' must be a string, got {type(reasoning).__name__}")
        chat["reasoning_content"] = reasoning
    return chat
