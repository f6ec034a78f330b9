"""nanoft/monitor.py: the spot-check prompts generated from at every eval, memory by step and by run.

python -m pytest tests/test_monitor.py -q
"""

import json

import pytest
import torch

from data import prepare_data
from nanoft.monitor import MemoryPeaks, memory_bytes, val_prompts
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


def test_each_step_reports_its_own_peak_and_the_run_keeps_the_largest():
    """A step that needed 256 MiB more shows that in its peak; the next, lighter step does not inherit it
    (the high-water mark is reset after each step), and the run's peak still holds it."""
    device = torch.device("cpu")
    memory = MemoryPeaks(device)
    memory.step()
    baseline = memory_bytes(device)
    big = torch.ones(2**28 // 4)  # 256 MiB, written, so resident, and freed within the step
    del big
    heavy = memory.step()
    light = memory.step()
    assert heavy["memory_peak_bytes"] >= baseline + 0.9 * 2**28
    assert light["memory_peak_bytes"] < heavy["memory_peak_bytes"] - 2**27
    assert memory.peak() >= heavy["memory_peak_bytes"]
    assert set(heavy) == {"memory_bytes", "memory_peak_bytes"}  # reserved is a GPU allocator's figure


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_steps_report_allocated_peak_and_reserved():
    device = torch.device("cuda")
    memory = MemoryPeaks(device)
    big = torch.ones(2**28 // 4, device=device)
    del big
    heavy = memory.step()
    light = memory.step()
    assert heavy["memory_peak_bytes"] >= 2**28 > light["memory_peak_bytes"]
    assert heavy["memory_reserved_bytes"] >= heavy["memory_peak_bytes"]
    assert memory.peak() >= 2**28
