"""A Hugging Face tokenizer directory: tokenizer.json, its special tokens and its chat template.

    tokenizer = Tokenizer.from_pretrained("path/to/model")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                        tokenize=True)
    text = tokenizer.decode(ids)

The ids are the ones transformers' AutoTokenizer gives (tests/test_tokenizer.py proves it); the chat template
is rendered by nanoft/chat_template.py. Special tokens come from tokenizer_config.json first, then
generation_config.json, then config.json, the order in which checkpoints tend to be right.
"""

import json
from pathlib import Path

from tokenizers import Tokenizer as BackendTokenizer

from nanoft.chat_template import render_chat_template
from nanoft.errors import UserError

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")
END_OF_TURN_PROBE = "nanoft-end-of-turn-probe"


def read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise UserError(f"{path}: not valid JSON ({error})") from None


def token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value


def as_id_list(value) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def read_chat_template(path: Path, tokenizer_config: dict) -> str | None:
    """chat_template.jinja wins over tokenizer_config.json, as in transformers 5."""
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # several named templates: [{"name": "default", "template": ...}, ...]
        named = {entry["name"]: entry["template"] for entry in template}
        return named.get("default")
    return template


class Tokenizer:
    def __init__(
        self,
        backend: BackendTokenizer,
        tokenizer_config: dict,
        generation_config: dict,
        config: dict,
        chat_template: str | None,
    ):
        self.backend = backend
        self.chat_template = chat_template
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.special_tokens = {
            name: token_text(tokenizer_config[name])
            for name in SPECIAL_TOKEN_NAMES
            if token_text(tokenizer_config.get(name)) is not None
        }

        def special_id(name: str, config_key: str) -> int | None:
            token = self.special_tokens.get(name)
            if token is not None and backend.token_to_id(token) is not None:
                return backend.token_to_id(token)
            for fallback in (generation_config, config):
                ids = as_id_list(fallback.get(config_key))
                if ids:
                    return ids[0]
            return None

        self.bos_id = special_id("bos_token", "bos_token_id")
        self.eos_ids = set(as_id_list(generation_config.get("eos_token_id")))
        self.eos_ids |= set(as_id_list(config.get("eos_token_id")))
        eos_id = special_id("eos_token", "eos_token_id")
        # A chat model's turn ends with the template's end-of-turn token (<|im_end|>, <|eot_id|>), which is
        # not always the eos_token a checkpoint declares (Llama 3's first release said <|end_of_text|>).
        end_of_turn_id = self._end_of_turn_id()
        self.eos_id = end_of_turn_id if end_of_turn_id is not None else eos_id
        if self.eos_id is None:
            raise UserError(
                "tokenizer has no end-of-sequence token in tokenizer_config.json, generation_config.json"
                " or config.json; add eos_token to tokenizer_config.json"
            )
        self.eos_ids |= {self.eos_id} | ({eos_id} if eos_id is not None else set())
        # What the checkpoint itself declares, for exports that carry it on (GGUF): eos_token may differ from
        # eos_id above, and a checkpoint may declare no pad token at all.
        self.declared_eos_id = eos_id if eos_id is not None else self.eos_id
        self.declared_pad_id = special_id("pad_token", "pad_token_id")
        self.pad_id = self.declared_pad_id if self.declared_pad_id is not None else self.eos_id
        with_specials = backend.encode("a", add_special_tokens=True).ids
        self.add_bos = self.bos_id is not None and with_specials[:1] == [self.bos_id]
        self.add_eos = with_specials[-1:] == [self.declared_eos_id]

    @classmethod
    def from_pretrained(cls, path) -> "Tokenizer":
        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise UserError(
                f"{tokenizer_file}: not found; the model directory needs a Hugging Face tokenizer.json"
            )
        try:
            backend = BackendTokenizer.from_file(str(tokenizer_file))
        except Exception as error:  # tokenizers raises a bare Exception for malformed files
            raise UserError(f"{tokenizer_file}: cannot be read by the tokenizers library ({error})") from None
        tokenizer_config = read_json(path / "tokenizer_config.json")
        return cls(
            backend,
            tokenizer_config,
            read_json(path / "generation_config.json"),
            read_json(path / "config.json"),
            read_chat_template(path, tokenizer_config),
        )

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and the (start, end) character span of `text` each one came from (no special tokens added)."""
        encoding = self.backend.encode(text, add_special_tokens=False)
        return encoding.ids, encoding.offsets

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = False, tokenize: bool = False, **variables
    ) -> str | list[int]:
        """The conversation as the model saw it in training: its text, or its ids when `tokenize`."""
        if self.chat_template is None:
            raise UserError(
                "this tokenizer has no chat template (tokenizer_config.json or chat_template.jinja); "
                "use a chat model or drop --chat"
            )
        text = render_chat_template(
            self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            **{**self.special_tokens, **variables},
        )
        # The template writes BOS and the turn markers itself, so no special tokens are added here.
        return self.encode(text) if tokenize else text

    def _end_of_turn_id(self) -> int | None:
        """The special token the chat template writes right after an assistant message, if any."""
        if self.chat_template is None:
            return None
        probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": END_OF_TURN_PROBE}]
        try:
            text = self.apply_chat_template(probe)
        except UserError:  # a template that rejects the probe conversation: fall back to eos_token
            return None
        if END_OF_TURN_PROBE not in text:
            return None
        after = text[text.rfind(END_OF_TURN_PROBE) + len(END_OF_TURN_PROBE) :].lstrip()
        specials = [
            added.content for added in self.backend.get_added_tokens_decoder().values() if added.special
        ]
        matches = [token for token in specials if after.startswith(token)]
        return self.backend.token_to_id(max(matches, key=len)) if matches else None
