"""nanoft/export.py against what reads GGUF: transformers' GGUF loader, our importer, llama.cpp if installed.

Tiny random checkpoints written by transformers (llama, mistral, qwen2) with byte-level BPE tokenizers, and
the built-in SmolLM2 once. python -m pytest tests/test_export.py -q
"""

import json
import math
import shutil
import subprocess
import sys
from hashlib import sha256

import numpy as np
import pytest
import torch
import transformers
from conftest import TINY_WIDTHS, TOKENIZER_TEXTS
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize, quantize
from peft import PeftModel
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as BackendTokenizer
from transformers.convert_slow_tokenizer import TikTokenConverter
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as QWEN2_PRETOKENIZE_REGEX

from lora import LoRAConfig, inject_lora, save_adapter
from nanoft.default_data import default_data_path
from nanoft.errors import UserError
from nanoft.export import export_gguf
from nanoft.generate import generate
from nanoft.gguf_convert import convert_gguf
from nanoft.gguf_layout import pre_tokenizer_name
from nanoft.tokenizer import Tokenizer
from nanoft.weights import from_pretrained
from train import main as train_main

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3 + 3?"},
]
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Each family with the kind of tokenizer it comes with, all byte-level BPE: Llama 3's split, a BOS before
# every text, eos_token other than the end of a turn, vocab_size padded past the tokens, tied embeddings;
# Mistral with SmolLM's split; Qwen2's split (transformers' Qwen2Tokenizer) with q/k/v biases.
CASES = {
    "llama": dict(tokenizer="llama-bpe", tie_word_embeddings=True),
    "mistral": dict(tokenizer="smollm", tie_word_embeddings=False),
    "qwen2": dict(tokenizer="qwen2", tie_word_embeddings=True),
}
# RoPE scaling only our importer and llama.cpp read back (transformers' GGUF loader has no key for it).
ROPE_SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64},
}  # fmt: skip
# Largest |logit difference| / largest |logit| between a tiny model and its export, each weight as the file
# rounds it: f16 and bf16 as floats do, q8_0 in blocks of 32 with one scale (measured 0.1%, 1% and 2.8-3.9%
# on the three families over 4 x 64 tokens).
ROUNDING_TOLERANCE = {"f32": 1e-6, "f16": 2e-3, "bf16": 1.5e-2, "q8_0": 5e-2}
# q8_0 on SmolLM2 as a whole: the mean KL divergence of the next-token distribution per token (measured 0.0024
# over 1299 tokens of chat, bench/gguf_export.py; its largest logit change there is 12% of the largest logit).
Q8_0_SMOLLM2_MEAN_KL = 0.01


# Each tokenizer's split, as the tokenizer.json of its models has it: SmolLM's (every digit alone, then
# GPT-2's byte-level split), Llama 3's (what transformers' tiktoken converter writes) and Qwen2's.
SPLITS = {
    "smollm": [
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ],
    "llama-bpe": [
        pre_tokenizers.Split(Regex(TikTokenConverter().pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ],
    "qwen2": [
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ],
}


def train_byte_level_bpe(kind: str) -> BackendTokenizer:
    """A 512-token byte-level BPE trained with the kind's split on nanoft's built-in data and the test texts,
    so that it has merges (digits, runs of spaces and newlines) that tell the splits apart. Small because
    transformers' GGUF reader takes half a minute for a 49k vocabulary; SmolLM2's own is tested below."""
    records = [json.loads(line) for line in default_data_path().read_text().splitlines()]
    tokenizer = BackendTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(SPLITS[kind])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = [record["instruction"] + " " + record["output"] for record in records]
    tokenizer.train_from_iterator(texts + TOKENIZER_TEXTS * 1000, trainer)
    return tokenizer


def write_tokenizer(kind: str, path) -> int:
    """A tokenizer of the kind saved by transformers into `path`; returns its number of tokens."""
    backend = train_byte_level_bpe(kind)
    specials = dict(bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>")
    if kind == "qwen2":
        vocab, merges = backend.get_vocab(), json.loads(backend.to_str())["model"]["merges"]
        tokenizer = transformers.Qwen2Tokenizer(vocab=vocab, merges=[tuple(m) for m in merges], **specials)
    elif kind == "llama-bpe":
        backend.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"])
        backend.add_tokens([AddedToken("<think>", special=False, normalized=False)])  # USER_DEFINED
        bos_id = backend.token_to_id("<|begin_of_text|>")
        backend.post_processor = processors.Sequence(  # a BOS before every text
            [
                processors.ByteLevel(trim_offsets=False),
                processors.TemplateProcessing(
                    single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos_id)]
                ),
            ]
        )
        # Llama 3's first release: eos_token <|end_of_text|>, while its template ends turns with <|eot_id|>.
        specials = dict(bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")
        tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, **specials)
        tokenizer.chat_template = CHATML.replace("<|im_end|>", "<|eot_id|>")
    else:
        tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, **specials)
    tokenizer.chat_template = tokenizer.chat_template or CHATML
    tokenizer.save_pretrained(path)
    return len(tokenizer)


def write_checkpoint(family: str, path, **config_overrides):
    """A tiny random model of the family saved by transformers, with its case's tokenizer, into `path`."""
    case = CASES[family]
    n_tokens = write_tokenizer(case["tokenizer"], path)
    config = transformers.AutoConfig.for_model(
        family,
        **{
            **TINY_WIDTHS,
            "vocab_size": -(-n_tokens // 64) * 64,  # padded to a multiple of 64, as most checkpoints are
            "rope_theta": 50000.0,
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": case["tie_word_embeddings"],
            "initializer_range": 0.1,
            **config_overrides,
        },
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # norms and biases random too, so a swapped or dropped one shows
        for name, param in model.named_parameters():
            if "norm" in name or "bias" in name:
                param.copy_(torch.randn_like(param) * 0.1 + ("norm" in name))
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=list(CASES))
def checkpoint(request, tmp_path_factory):
    """(family, directory) for each case."""
    return request.param, write_checkpoint(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def input_ids():
    return torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))


def load_transformers(path, gguf_file=None):
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, gguf_file=gguf_file, dtype=torch.float32
    ).eval()


def logits(model, input_ids):
    with torch.no_grad():
        output = model(input_ids)
    return (output.logits if hasattr(output, "logits") else output).float()


def relative_gap(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def rounded_like_the_file(model, outtype):
    """The model with every matrix rounded as the GGUF stores it (norms and biases stay f32)."""
    kind = GGMLQuantizationType[outtype.upper()]
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                stored = dequantize(quantize(param.numpy(), kind), kind)
                param.copy_(torch.from_numpy(np.ascontiguousarray(stored)).reshape(param.shape))
    return model


@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16", "q8_0"])
def test_transformers_reads_the_export_with_the_same_logits(checkpoint, input_ids, outtype, tmp_path):
    family, path = checkpoint
    gguf = export_gguf(path, tmp_path / f"{family}-{outtype}.gguf", outtype)
    exported = logits(load_transformers(gguf.parent, gguf.name), input_ids)
    reference = load_transformers(path)
    original = logits(reference, input_ids)
    # The file holds exactly the rounded weights, in the right places: equal up to fp32 arithmetic.
    assert (exported - logits(rounded_like_the_file(reference, outtype), input_ids)).abs().max() < 1e-4
    # And rounding moved the logits by at most the stated tolerance.
    assert relative_gap(exported, original) <= ROUNDING_TOLERANCE[outtype]


def test_matrices_are_stored_as_asked_and_vectors_in_f32(checkpoint, tmp_path):
    family, path = checkpoint
    reader = GGUFReader(export_gguf(path, tmp_path / "model.gguf", "q8_0"))
    types = {tensor.name: tensor.tensor_type for tensor in reader.tensors}
    assert types["token_embd.weight"] == types["blk.1.ffn_down.weight"] == GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == types["output_norm.weight"] == GGMLQuantizationType.F32
    assert ("output.weight" in types) == (not CASES[family]["tie_word_embeddings"])
    assert ("blk.0.attn_q.bias" in types) == (family == "qwen2")
    field = reader.fields["general.architecture"]
    assert field.contents() == {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}[family]


def test_transformers_gguf_tokenizer_gives_the_same_ids_and_chat(checkpoint, tmp_path):
    family, path = checkpoint
    gguf = export_gguf(path, tmp_path / "model.gguf", "q8_0")
    ours = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    reference = transformers.AutoTokenizer.from_pretrained(path)
    for text in TOKENIZER_TEXTS:
        assert ours.encode(text) == reference.encode(text), text
    for name in ("bos_token", "eos_token", "pad_token"):
        assert getattr(ours, name) == getattr(reference, name), name
    rendered = reference.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True) == rendered
    assert ours.encode(rendered, add_special_tokens=False) == reference.encode(
        rendered, add_special_tokens=False
    )


def test_our_importer_reads_the_export_back(checkpoint, input_ids, tmp_path):
    family, path = checkpoint
    convert_gguf(export_gguf(path, tmp_path / "model.gguf", "f32"), tmp_path / "back")
    back = from_pretrained(tmp_path / "back")
    assert (logits(back, input_ids) - logits(load_transformers(path), input_ids)).abs().max() < 1e-4
    tokenizer, reference = Tokenizer.from_pretrained(tmp_path / "back"), Tokenizer.from_pretrained(path)
    for text in TOKENIZER_TEXTS:
        assert tokenizer.encode(text, add_special_tokens=True) == reference.encode(
            text, add_special_tokens=True
        )
    assert tokenizer.apply_chat_template(CONVERSATION) == reference.apply_chat_template(CONVERSATION)
    assert (tokenizer.eos_id, tokenizer.bos_id, tokenizer.add_bos) == (
        reference.eos_id,
        reference.bos_id,
        reference.add_bos,
    )


@pytest.mark.parametrize("variant", [dict(), dict(use_dora=True, targets="all-linear")], ids=["lora", "dora"])
def test_adapter_is_merged_into_the_export(tmp_path, input_ids, variant):
    base = write_checkpoint("llama", tmp_path / "base")
    model = inject_lora(from_pretrained(base), LoRAConfig(r=4, alpha=8, **variant))
    with torch.no_grad():  # B = 0 at initialisation would merge nothing
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(3)) * 0.2)
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(base))
    gguf = export_gguf(base, tmp_path / "merged.gguf", "f32", adapter_dir=tmp_path / "adapter")
    reference = PeftModel.from_pretrained(load_transformers(base), tmp_path / "adapter").eval()
    exported = logits(load_transformers(gguf.parent, gguf.name), input_ids)
    assert (exported - logits(reference, input_ids)).abs().max() < 1e-4
    assert (exported - logits(load_transformers(base), input_ids)).abs().max() > 1e-2  # the adapter counts


def llama_cpp_rope_factors(theta, head_dim, scaling: dict):
    """convert_hf_to_gguf.py's LlamaModel.generate_extra_tensors, as llama.cpp writes rope_freqs."""
    factor, low_freq_factor, high_freq_factor = (
        scaling[k] for k in ("factor", "low_freq_factor", "high_freq_factor")
    )
    old_context = scaling["original_max_position_embeddings"]
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    low_freq_wavelen, high_freq_wavelen = old_context / low_freq_factor, old_context / high_freq_factor
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            factors.append(1)
        elif wavelen > low_freq_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def test_llama3_rope_scaling_travels_as_llama_cpp_rope_factors(tmp_path):
    path = write_checkpoint("llama", tmp_path / "base", rope_scaling=ROPE_SCALINGS["llama3"])
    reader = GGUFReader(export_gguf(path, tmp_path / "model.gguf", "f32"))
    stored = next(tensor for tensor in reader.tensors if tensor.name == "rope_freqs.weight")
    expected = llama_cpp_rope_factors(50000.0, 16, ROPE_SCALINGS["llama3"])  # write_checkpoint's theta, head
    assert np.allclose(stored.data, expected, rtol=1e-6)
    with pytest.raises(UserError, match="rope_freqs"):  # a config.json cannot say it: refused, not lost
        convert_gguf(tmp_path / "model.gguf", tmp_path / "back")


def test_linear_rope_scaling_is_read_back(tmp_path, input_ids):
    path = write_checkpoint("llama", tmp_path / "base", rope_scaling=ROPE_SCALINGS["linear"])
    reader = GGUFReader(export_gguf(path, tmp_path / "model.gguf", "f32"))
    assert reader.fields["llama.rope.scaling.type"].contents() == "linear"
    convert_gguf(tmp_path / "model.gguf", tmp_path / "back")
    back = from_pretrained(tmp_path / "back")
    assert back.config.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert (logits(back, input_ids) - logits(load_transformers(path), input_ids)).abs().max() < 1e-4


def run_export(*args):
    return subprocess.run([sys.executable, "-m", "nanoft.export", *args], capture_output=True, text=True)


def test_what_cannot_be_exported_is_refused_in_one_line(tmp_path, tiny_tokenizer_dir):
    # A family nanoft trains but does not export yet, a word-level tokenizer, a missing adapter.
    gemma = transformers.AutoConfig.for_model(
        "gemma2", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, head_dim=8
    )
    transformers.AutoModelForCausalLM.from_config(gemma).save_pretrained(tmp_path / "gemma2")
    word_level = write_checkpoint("mistral", tmp_path / "word_level")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_tokenizer_dir / name, word_level / name)
    cases = {
        "gemma2": ([f"--model={tmp_path / 'gemma2'}"], "model_type 'gemma2' has no GGUF export yet"),
        "word-level": ([f"--model={word_level}"], "a WordLevel tokenizer; GGUF export supports byte-level"),
        "adapter": ([f"--model={word_level}", "--adapter=missing"], "--adapter missing: no such directory"),
    }
    for args, message in cases.values():
        result = run_export(*args, f"--gguf={tmp_path / 'out.gguf'}")
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "out.gguf").exists()


def test_train_py_writes_its_best_weights_as_gguf(tmp_path, input_ids):
    base = write_checkpoint("llama", tmp_path / "base")
    records = default_data_path().read_text().splitlines()
    (tmp_path / "train.jsonl").write_text("\n".join(records[:32]))
    (tmp_path / "val.jsonl").write_text("\n".join(records[32:40]))
    data = f"--data={tmp_path / 'train.jsonl'} --val-data={tmp_path / 'val.jsonl'}"
    flags = f"{data} --max-steps 1 --seq-len 64 --batch-size 4 --grad-accum 1 --eval-every 1 --lr 1e-2"
    out = tmp_path / "run"
    train_main([f"--model={base}", f"--out={out}", *flags.split(), "--lora-targets=all-linear", "--gguf=f32"])
    exported = logits(load_transformers(out, "model-f32.gguf"), input_ids)
    reference = PeftModel.from_pretrained(load_transformers(base), out / "adapter").eval()
    assert (exported - logits(reference, input_ids)).abs().max() < 1e-4  # the best adapter, merged
    assert (exported - logits(load_transformers(base), input_ids)).abs().max() > 1e-3  # step 1 was the best


def test_train_py_refuses_gguf_before_training(tmp_path, tiny_tokenizer_dir, capsys):
    base = write_checkpoint("llama", tmp_path / "base")
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
    ):  # a word-level tokenizer llama.cpp has no form for
        shutil.copy(tiny_tokenizer_dir / name, base / name)
    with pytest.raises(SystemExit) as exit_info:
        train_main([f"--model={base}", f"--out={tmp_path / 'run'}", "--gguf=q8_0"])
    assert exit_info.value.code == 2 and "WordLevel tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "run" / "config.json").exists()  # nothing trained, no run to --overwrite


def test_smollm2_pre_tokenizer_is_the_one_llama_cpp_recognises(smollm2_dir):
    # llama.cpp's converter names a pre-tokenizer by the sha256 of the ids of this text (get_vocab_base_pre);
    # the hash is the one it lists for HuggingFaceTB/SmolLM-135M under "smollm".
    text = (
        "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ "
        "(multiple emojis concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
        "កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
        "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
        "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
    )
    ids = Tokenizer.from_pretrained(smollm2_dir).encode(text, add_special_tokens=True)
    assert sha256(str(ids).encode()).hexdigest() == (
        "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249"
    )
    tokenizer_json = json.loads((smollm2_dir / "tokenizer.json").read_text())
    assert pre_tokenizer_name(tokenizer_json["pre_tokenizer"]) == "smollm"


def test_smollm2_round_trip_answers_paris(smollm2_dir, tmp_path):
    result = run_export(f"--gguf={tmp_path / 'smollm2.gguf'}")  # the built-in model, q8_0 by default
    assert result.returncode == 0 and "wrote" in result.stdout, result.stderr
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = Tokenizer.from_pretrained(smollm2_dir).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True
    )
    # transformers' GGUF tokenizer renders and tokenizes the chat as the checkpoint's own tokenizer does.
    gguf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="smollm2.gguf")
    rendered = gguf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert gguf_tokenizer.encode(rendered, add_special_tokens=False) == prompt
    # Our importer reads it back (the weights as transformers' loader dequantizes them: the tests above).
    convert_gguf(tmp_path / "smollm2.gguf", tmp_path / "back")
    back, tokenizer = from_pretrained(tmp_path / "back"), Tokenizer.from_pretrained(tmp_path / "back")
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True) == prompt
    exported, original = (logits(m, torch.tensor([prompt]))[0] for m in (back, from_pretrained(smollm2_dir)))
    log_p, log_q = original.log_softmax(-1), exported.log_softmax(-1)
    mean_kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean().item()
    assert mean_kl < Q8_0_SMOLLM2_MEAN_KL, mean_kl
    assert "Paris" in tokenizer.decode(generate(back, tokenizer, prompt, max_new_tokens=16))


@pytest.mark.parametrize("case", [*CASES, *(f"llama-{scaling}-rope" for scaling in ROPE_SCALINGS)])
def test_llama_cpp_computes_the_same_logits_and_token_ids(case, tmp_path, input_ids):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (README: GGUF)")
    family, _, scaling = case.partition("-")
    overrides = {"rope_scaling": ROPE_SCALINGS[scaling.removesuffix("-rope")]} if scaling else {}
    path = write_checkpoint(family, tmp_path / "base", **overrides)
    gguf = export_gguf(path, tmp_path / "model.gguf", "f32")
    # An f32 KV cache (type 0; llama.cpp's default f16 one alone moves the logits by ~7e-4 of the largest).
    f32_cache = dict(type_k=0, type_v=0)
    llm = llama_cpp.Llama(str(gguf), n_ctx=64, logits_all=True, n_threads=2, verbose=False, **f32_cache)
    llm.eval(input_ids[0].tolist())
    ours = torch.from_numpy(np.array(llm.scores[: llm.n_tokens]))
    expected = logits(load_transformers(path), input_ids[:1])[0]
    assert relative_gap(ours, expected) < 1e-5
    reference = transformers.AutoTokenizer.from_pretrained(path)
    for text in TOKENIZER_TEXTS:  # llama.cpp's own tokenizer: the split tokenizer.ggml.pre names, its BOS
        ids = llm.tokenize(text.encode(), add_bos=True, special=True)  # add_bos: as the file says
        assert ids == reference.encode(text), text


def test_llama_cpp_greedy_text_is_transformers_on_smollm2(smollm2_dir, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (README: GGUF)")
    gguf = export_gguf(smollm2_dir, tmp_path / "smollm2-f32.gguf", "f32")
    tokenizer = Tokenizer.from_pretrained(smollm2_dir)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=128, n_threads=2, verbose=False)
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == prompt
    answer = []
    for token in llm.generate(prompt, top_k=1, temp=0.0):
        if token == llm.token_eos() or len(answer) == 24:
            break
        answer.append(token)
    with torch.no_grad():
        reference = (
            load_transformers(smollm2_dir)
            .generate(
                torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=tokenizer.eos_id
            )[0, len(prompt) :]
            .tolist()
        )
    reference = reference[: reference.index(tokenizer.eos_id)] if tokenizer.eos_id in reference else reference
    assert answer == reference and "Paris" in tokenizer.decode(answer)
