"""nanoft/monitor.py: the spot-check prompts generated from at every eval.

python -m pytest tests/test_monitor.py -q
"""

import json

from data import prepare_data
from nanoft.monitor import val_prompts
from nanoft.tokenizer import Tokenizer


def test_val_prompt_of_a_multi_turn_chat_references_the_first_answer_only(tiny_tokenizer_dir, tmp_path):
    """The prompt ends at the first assistant turn, so the reference is that turn's answer, not the rest of
    the conversation (the next user turn is context, never what the model should write)."""
    tokenizer = Tokenizer.from_pretrained(tiny_tokenizer_dir)
    turns = [("user", "w1 w2"), ("assistant", "w3 w4"), ("user", "w5"), ("assistant", "w6")]
    record = {"messages": [{"role": role, "content": content} for role, content in turns]}
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps(record) + "\n")
    _, examples, _ = prepare_data(
        data, tokenizer, 64, val_paths=data, dedup=False, cache_dir=tmp_path, log=lambda _: None
    )
    [(prompt_ids, reference_ids)] = val_prompts(examples, n=1)
    assert tokenizer.decode(prompt_ids, skip_special_tokens=False).endswith(
        "<|user|> w1 w2 <|end|> <|assistant|>"
    )
    assert tokenizer.decode(reference_ids, skip_special_tokens=False) == "w3 w4 <|end|>"
