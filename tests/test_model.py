"""nanoft/model.py against transformers: logits, padding, packing, KV cache, the chunked loss, for every
supported family (tiny checkpoints written by transformers: tests/families.py)."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import TINY_WIDTHS
from families import FAMILIES, WINDOW, reference_gradients

import nanoft.cpu_attention
from nanoft.errors import UserError
from nanoft.loss import IGNORE_INDEX
from nanoft.model import KVCache, ModelConfig, RMSNorm, Transformer
from nanoft.weights import from_pretrained, load_config, save_pretrained

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
LLAMA_VARIANTS = {
    "llama2": dict(model_type="llama"),
    "llama3": dict(model_type="llama", rope_theta=500000.0, rope_scaling=LLAMA3_ROPE),
    "llama-linear-rope": dict(model_type="llama", rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "smollm2": dict(model_type="llama", tie_word_embeddings=True, rope_theta=100000.0),
    "mistral": dict(model_type="mistral", sliding_window=8),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=True, rope_theta=1000000.0),
}


def tiny_config(**overrides) -> ModelConfig:
    values = {**TINY_WIDTHS, "vocab_size": 128, "intermediate_size": 96, "rms_norm_eps": 1e-5}
    return ModelConfig.from_hf({"model_type": "llama", **values, **overrides})


def random_model(config: ModelConfig, seed=0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(config)
    for parameter in model.parameters():
        torch.nn.init.normal_(parameter, std=0.2)  # norms and biases too, so no term hides behind a 1 or a 0
    return model.eval()


def reference_pair(config, tmp_path):
    """Our model and transformers' model loaded from the same saved directory."""
    save_pretrained(random_model(config).state_dict(), config, tmp_path)
    ours = from_pretrained(tmp_path).eval()
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    return ours, reference


@pytest.mark.parametrize("family", LLAMA_VARIANTS)
def test_logits_match_transformers(family, tmp_path):
    ours, reference = reference_pair(tiny_config(**LLAMA_VARIANTS[family]), tmp_path)
    input_ids = torch.randint(0, 128, (2, 40))  # 40 > sliding window and > llama3's original context
    with torch.no_grad():
        difference = (ours(input_ids) - reference(input_ids).logits).abs().max().item()
    assert difference <= 1e-4


@pytest.mark.parametrize("family", ["llama2", "qwen2"])
def test_padding_matches_transformers(family, tmp_path):
    ours, reference = reference_pair(tiny_config(**LLAMA_VARIANTS[family]), tmp_path)
    input_ids = torch.randint(0, 128, (2, 12))
    attention_mask = torch.ones(2, 12, dtype=torch.long)
    attention_mask[0, :4] = 0  # left padding
    attention_mask[1, -3:] = 0  # right padding
    with torch.no_grad():
        ours_logits = ours(input_ids, attention_mask=attention_mask)
        reference_logits = reference(input_ids, attention_mask=attention_mask).logits
    real = attention_mask.bool()
    assert (ours_logits[real] - reference_logits[real]).abs().max().item() <= 1e-4


def test_packed_documents_do_not_see_each_other():
    model = random_model(tiny_config())
    first, second = torch.randint(0, 128, (1, 7)), torch.randint(0, 128, (1, 5))
    packed = torch.cat([first, second], dim=1)
    position_ids = torch.cat([torch.arange(7), torch.arange(5)])[None]
    document_ids = torch.tensor([[0] * 7 + [1] * 5])
    with torch.no_grad():
        packed_logits = model(packed, position_ids=position_ids, document_ids=document_ids)
        separate = torch.cat([model(first), model(second)], dim=1)
    assert (packed_logits - separate).abs().max().item() <= 1e-5


def test_kv_cache_decoding_equals_full_recomputation():
    config = tiny_config(
        **LLAMA_VARIANTS["mistral"]
    )  # sliding window 8 < sequence: exercises the windowed mask
    model = random_model(config)
    input_ids = torch.randint(0, 128, (2, 14))
    cache = KVCache(config, batch_size=2, max_len=14, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        full = model(input_ids)
        steps = [model(input_ids[:, :6], kv_cache=cache)]  # prefill, then one token at a time
        steps += [model(input_ids[:, t : t + 1], kv_cache=cache) for t in range(6, 14)]
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-5


def test_chunked_loss_equals_cross_entropy_and_its_gradients(monkeypatch):
    import nanoft.loss

    monkeypatch.setattr(nanoft.loss, "LOGITS_PER_CHUNK", 128 * 5)  # 5 rows a chunk: several chunks
    monkeypatch.setattr(nanoft.loss, "MIN_ROWS_PER_CHUNK", 1)
    config = tiny_config(tie_word_embeddings=True)
    model = random_model(config).train()
    reference = random_model(config).train()
    input_ids = torch.randint(0, 128, (2, 16))
    targets = torch.randint(0, 128, (2, 16))
    targets[0, :5] = IGNORE_INDEX
    loss_sum, n_targets = model(input_ids, targets)
    logits = reference(input_ids)
    expected = F.cross_entropy(
        logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    assert n_targets.item() == 27
    assert abs(loss_sum.item() - expected.item()) <= 1e-4 * expected.item()
    loss_sum.backward()
    expected.backward()
    for (name, ours), (_, theirs) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        assert torch.allclose(ours.grad, theirs.grad, atol=1e-5, rtol=1e-4), name


def test_chunked_loss_under_autocast_matches_autocast_logits(monkeypatch):
    """A full fine-tune's case: fp32 master weights, bf16 autocast, the tied weight's gradient wanted."""
    import nanoft.loss

    monkeypatch.setattr(nanoft.loss, "LOGITS_PER_CHUNK", 128 * 5)
    monkeypatch.setattr(nanoft.loss, "WEIGHT_GRAD_CHUNK_FACTOR", 2)  # 10 rows a chunk: several chunks
    monkeypatch.setattr(nanoft.loss, "MIN_ROWS_PER_CHUNK", 1)
    config = tiny_config(tie_word_embeddings=True)
    model, reference = random_model(config).train(), random_model(config).train()
    input_ids, targets = torch.randint(0, 128, (2, 16)), torch.randint(0, 128, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_sum, n_targets = model(input_ids, targets)
        logits = reference(input_ids)
    expected = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum")
    assert abs(loss_sum.item() - expected.item()) <= 0.01 * expected.item()
    (loss_sum / n_targets).backward()
    (expected / n_targets).backward()
    for (name, ours), (_, theirs) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        assert ours.grad.dtype == torch.float32, name
        assert F.cosine_similarity(ours.grad.flatten(), theirs.grad.flatten(), dim=0) > 0.99, name


def test_loss_in_bf16_is_close_to_fp32():
    model = random_model(tiny_config())
    input_ids, targets = torch.randint(0, 128, (2, 16)), torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        fp32, _ = model(input_ids, targets)
        bf16, _ = model.to(torch.bfloat16)(input_ids, targets)
    assert bf16.dtype == torch.float32
    assert abs(bf16.item() - fp32.item()) <= 0.02 * fp32.item()


@pytest.mark.parametrize("style", ["llama", "olmo2", "gemma"])
def test_rmsnorm_in_bf16_matches_transformers(style):
    """The bf16 path (on CPU x is cast to fp32 once, for the norm and the product): each family's RMSNorm of
    transformers, run by autograd, as the reference for the output and both gradients."""
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm

    reference = {"llama": LlamaRMSNorm, "olmo2": Olmo2RMSNorm, "gemma": Gemma2RMSNorm}[style](64, eps=1e-5)
    ours = RMSNorm(64, 1e-5, style)
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(64, generator=generator) * 0.2 + (0 if style == "gemma" else 1)
    for norm in (ours, reference):
        norm.weight.data = weight.clone()
        norm.bfloat16()
    x = (torch.randn(2, 16, 64, generator=generator) * 3).bfloat16()
    grad = torch.randn(2, 16, 64, generator=generator).bfloat16()
    results = []
    for norm in (ours, reference):
        x_leaf = x.clone().requires_grad_()
        output = norm(x_leaf)
        output.backward(grad)
        results.append((output, x_leaf.grad, norm.weight.grad))
    for name, mine, theirs in zip(("output", "x grad", "weight grad"), *results, strict=True):
        torch.testing.assert_close(mine, theirs, atol=0.02, rtol=0.016, msg=name)  # bf16: 1-2 roundings


def test_activation_checkpointing_gives_the_same_gradients():
    model = random_model(tiny_config()).train()
    input_ids, targets = torch.randint(0, 128, (2, 16)), torch.randint(0, 128, (2, 16))
    model(input_ids, targets)[0].backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.activation_checkpointing = True
    model(input_ids, targets)[0].backward()
    for before, after in zip(plain, (p.grad for p in model.parameters()), strict=True):
        assert torch.allclose(before, after, atol=1e-6)


def test_unsupported_architecture_or_feature_is_named():
    supported = (
        "nanoft supports model_type llama, mistral, qwen2, qwen3, smollm3, gemma, gemma2, gemma3_text, phi3"
    )
    with pytest.raises(UserError, match=f"model_type 'gpt2' is not supported; {supported}"):
        ModelConfig.from_hf({"model_type": "gpt2"})
    with pytest.raises(UserError, match="hidden_act 'gelu' is not supported"):
        tiny_config(hidden_act="gelu")
    with pytest.raises(UserError, match="mlp_bias: true is not supported"):
        tiny_config(mlp_bias=True)
    with pytest.raises(UserError, match="rope scaling 'yarn' is not supported"):
        tiny_config(rope_scaling={"rope_type": "yarn", "factor": 4.0})
    phi3_128k = {"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}
    with pytest.raises(UserError, match="rope scaling 'longrope' is not supported"):
        tiny_config(model_type="phi3", rope_scaling=phi3_128k)
    with pytest.raises(UserError, match="model_type 'gemma3' is Gemma 3 with its vision tower"):
        ModelConfig.from_hf({"model_type": "gemma3", "text_config": {}, "vision_config": {}})
    with pytest.raises(UserError, match="use_bidirectional_attention: true .* is not supported"):
        tiny_config(model_type="gemma3_text", use_bidirectional_attention=True)


# ---------------------------------------------------------------- every family against transformers

FAMILY_NAMES = list(FAMILIES)
LONGER_THAN_WINDOWS = 3 * WINDOW


def family_pair(family_dir, family):
    path = family_dir(family)
    reference = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return from_pretrained(path).eval(), reference


def left_padded_batch():
    """Two rows longer than any window; row 0 left-padded by 5, its positions counting from its first one."""
    input_ids = torch.randint(3, 128, (2, LONGER_THAN_WINDOWS), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :5] = 0
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids, attention_mask, position_ids


@pytest.mark.parametrize("attention", ["matmuls", "sdpa"])
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_family_logits_match_transformers_with_left_padding(family_dir, family, attention, monkeypatch):
    """Both attention paths: nanoft/cpu_attention.py's matmuls (fp32 CPU, small), and with its size limit at
    0, SDPA (or, for soft-capped Gemma 2, the matmuls a block of queries at a time)."""
    if attention == "sdpa":
        monkeypatch.setattr(nanoft.cpu_attention, "CPU_ATTENTION_SCORES", 0)
    ours, reference = family_pair(family_dir, family)
    input_ids, attention_mask, position_ids = left_padded_batch()
    with torch.no_grad():
        mine = ours(input_ids, attention_mask=attention_mask, position_ids=position_ids)
        expected = reference(input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    real = attention_mask.bool()
    assert (mine[real] - expected[real]).abs().max().item() <= 1e-4
    assert expected[real].abs().max() > 1  # logits that a wrong norm, scale or cap would visibly change


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_family_packed_sequences_match_transformers_one_by_one(family_dir, family):
    ours, reference = family_pair(family_dir, family)
    lengths = (LONGER_THAN_WINDOWS - 10, 13)
    documents = [torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(n)) for n in lengths]
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    document_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    with torch.no_grad():
        packed = ours(torch.cat(documents, dim=1), position_ids=position_ids, document_ids=document_ids)
        one_by_one = torch.cat([reference(ids).logits for ids in documents], dim=1)
    assert (packed - one_by_one).abs().max().item() <= 1e-4


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_family_loss_and_gradients_match_transformers(family_dir, family):
    ours, reference = family_pair(family_dir, family)
    ours.train(), reference.train()
    input_ids = torch.randint(3, 128, (2, LONGER_THAN_WINDOWS), generator=torch.Generator().manual_seed(2))
    labels = input_ids.clone()
    labels[0, :7] = -100  # a prompt
    targets = torch.cat([labels[:, 1:], torch.full((2, 1), -100)], dim=1)  # pre-shifted, as data.py does
    loss_sum, n_targets = ours(input_ids, targets)
    loss = loss_sum / n_targets
    expected = reference(input_ids, labels=labels).loss
    assert abs(loss.item() - expected.item()) <= 1e-5 * expected.item()
    loss.backward()
    expected.backward()
    theirs = reference_gradients(reference)
    assert len(theirs) == len(list(ours.parameters()))
    for name, parameter in ours.named_parameters():
        torch.testing.assert_close(parameter.grad, theirs[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_family_kv_cache_decoding_equals_full_recomputation(family_dir, family):
    """Prefill, then one token at a time past every window, with a left-padded row, as generate.py runs it."""
    ours, _ = family_pair(family_dir, family)
    input_ids, attention_mask, position_ids = left_padded_batch()
    cache = KVCache(ours.config, batch_size=2, max_len=LONGER_THAN_WINDOWS, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        full = ours(input_ids, attention_mask=attention_mask, position_ids=position_ids)
        steps = []
        for start, end in [(0, 6)] + [(t, t + 1) for t in range(6, LONGER_THAN_WINDOWS)]:
            steps.append(
                ours(
                    input_ids[:, start:end],
                    attention_mask=attention_mask[:, :end],  # the mask covers the cache and the new tokens
                    position_ids=position_ids[:, start:end],
                    kv_cache=cache,
                )
            )
    real = attention_mask.bool()
    assert (torch.cat(steps, dim=1)[real] - full[real]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_family_config_round_trips_through_transformers(family_dir, family, tmp_path):
    """The config.json to_hf writes makes transformers build the same model, and from_hf reads it back."""
    config = load_config(family_dir(family))
    (tmp_path / "config.json").write_text(json.dumps(config.to_hf()))
    shutil.copy(family_dir(family) / "model.safetensors", tmp_path)
    assert load_config(tmp_path) == config
    input_ids, attention_mask, position_ids = left_padded_batch()
    with torch.no_grad():
        logits = [
            transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)(input_ids).logits
            for path in (family_dir(family), tmp_path)
        ]
    assert torch.equal(*logits)


def test_a_config_built_by_hand_must_match_its_family():
    gemma_with_llama_norms = ModelConfig(model_type="gemma", hidden_size=64, num_attention_heads=4)
    with pytest.raises(ValueError, match=r"differs in \['norm_style', 'embedding_multiplier'\]"):
        gemma_with_llama_norms.to_hf()
