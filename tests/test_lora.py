"""lora.py against the reference: PEFT on the transformers model, both directions, on tiny random models.

python -m pytest tests/test_lora.py -q
"""

import json
import re

import pytest
import torch
from conftest import TINY_WIDTHS
from families import FAMILIES, QV_TARGETS, WINDOW
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from lora import (
    LoRAConfig,
    LoRALinear,
    base_state_dict,
    count_parameters,
    inject_lora,
    load_adapter,
    lora_state_dict,
    merge_lora,
    save_adapter,
    trainable_parameters_line,
    unmerge_lora,
)
from nanoft.errors import UserError
from nanoft.merge import merge_adapter
from nanoft.model import ModelConfig, Transformer
from nanoft.weights import from_pretrained, save_pretrained

TOLERANCE = 1e-4
# Qwen2 has q/k/v biases (DoRA subtracts them); the tied one shares embed_tokens with lm_head.
LLAMA_AND_TIED_QWEN2 = pytest.mark.parametrize(
    "base_dir", [("llama", False), ("qwen2", True)], indirect=True, ids=["llama", "qwen2"]
)
ADAPTER_CASES = {
    "lora": dict(),
    "rslora": dict(use_rslora=True),
    "dora": dict(use_dora=True),
    "all-linear": dict(targets="all-linear"),
    "dora-all-linear": dict(targets="all-linear", use_dora=True),
}


def tiny_config(model_type="llama", tie_word_embeddings=False) -> ModelConfig:
    return ModelConfig.from_hf(
        {
            **TINY_WIDTHS,
            "model_type": model_type,
            "vocab_size": 96,
            "max_position_embeddings": 64,
            "tie_word_embeddings": tie_word_embeddings,
            "bos_token_id": 1,
            "eos_token_id": 2,
        }
    )


@pytest.fixture
def base_dir(tmp_path, request):
    """A Hugging Face directory with a random tiny model: model_type and tying from the test's parameters."""
    model_type, tie = getattr(request, "param", ("llama", False))
    torch.manual_seed(0)
    model = Transformer(tiny_config(model_type, tie))
    with torch.no_grad():  # random biases and norms too, so nothing the adapters touch is trivially 0 or 1
        for name, param in model.named_parameters():
            if "bias" in name or "norm" in name:
                param.copy_(torch.randn_like(param) * 0.1 + ("norm" in name))
    path = tmp_path / "base"
    save_pretrained(model.state_dict(), model.config, path)
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    return path


def randomize_trainable(model, seed=1):
    """Non-zero B (and perturbed DoRA magnitudes): with B = 0 every test would pass trivially."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.2)


def input_ids():
    return torch.randint(3, 96, (2, 10), generator=torch.Generator().manual_seed(2))


def our_logits(model):
    with torch.no_grad():
        return model.eval()(input_ids())


def hf_logits(model):
    with torch.no_grad():
        return model.eval()(input_ids()).logits


def load_transformers(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


@LLAMA_AND_TIED_QWEN2
@pytest.mark.parametrize("case", ADAPTER_CASES)
def test_peft_loads_our_adapter_with_same_logits(base_dir, tmp_path, case):
    model = inject_lora(from_pretrained(base_dir), LoRAConfig(r=4, alpha=8, **ADAPTER_CASES[case]))
    randomize_trainable(model)
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(base_dir))
    reference = PeftModel.from_pretrained(load_transformers(base_dir), tmp_path / "adapter")
    assert (our_logits(model) - hf_logits(reference)).abs().max() < TOLERANCE


PEFT_CASES = {
    "lora": dict(target_modules=["q_proj", "v_proj"]),
    "rslora": dict(target_modules=["k_proj", "down_proj"], use_rslora=True),
    "dora": dict(target_modules=["q_proj", "o_proj", "up_proj"], use_dora=True),
    "all-linear": dict(target_modules="all-linear"),
    "modules_to_save": dict(target_modules=["v_proj"], modules_to_save=["embed_tokens"]),
}


@LLAMA_AND_TIED_QWEN2
@pytest.mark.parametrize("case", PEFT_CASES)
def test_we_load_peft_adapter_with_same_logits(base_dir, tmp_path, case):
    options, reference = PEFT_CASES[case], load_transformers(base_dir)
    if "modules_to_save" in options and reference.config.tie_word_embeddings:
        options = {**options, "ensure_weight_tying": True}
    reference = get_peft_model(reference, LoraConfig(r=4, lora_alpha=16, task_type="CAUSAL_LM", **options))
    randomize_trainable(reference)
    reference.save_pretrained(tmp_path / "adapter")
    model = load_adapter(from_pretrained(base_dir), tmp_path / "adapter")
    assert (our_logits(model) - hf_logits(reference)).abs().max() < TOLERANCE


@pytest.mark.parametrize("case", ["lora", "dora"])
def test_load_adapter_accepts_peft_in_memory_names(base_dir, tmp_path, case):
    model = inject_lora(from_pretrained(base_dir), LoRAConfig(r=4, alpha=8, **ADAPTER_CASES[case]))
    randomize_trainable(model)
    save_adapter(model, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    renamed = {
        re.sub(r"(lora_A|lora_B|lora_magnitude_vector)", r"\1.default", k): v for k, v in tensors.items()
    }
    renamed = {
        k.replace("magnitude_vector.default", "magnitude_vector.default.weight"): v
        for k, v in renamed.items()
    }
    save_file(renamed, tmp_path / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight" in renamed
    assert torch.equal(our_logits(load_adapter(from_pretrained(base_dir), tmp_path)), our_logits(model))


@pytest.mark.parametrize("case", ["lora", "dora"])
def test_bf16_base_with_fp32_adapters_matches_peft(base_dir, tmp_path, case):
    model = inject_lora(
        from_pretrained(base_dir, dtype=torch.bfloat16), LoRAConfig(r=4, **ADAPTER_CASES[case])
    )
    randomize_trainable(model)
    save_adapter(model, tmp_path)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16)
    reference = PeftModel.from_pretrained(base, tmp_path)  # PEFT upcasts the adapters to fp32 too
    assert (
        reference.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype
        == torch.float32
    )
    ours, theirs = our_logits(model).float(), hf_logits(reference).float()
    assert (ours - theirs).abs().max() < 2e-2 * theirs.abs().max()  # bf16 rounding, computed in other orders


@pytest.mark.parametrize("base_dir", [("llama", True)], indirect=True)
def test_trained_tied_embeddings_travel_to_peft(base_dir, tmp_path):
    cfg = LoRAConfig(r=4, alpha=8, modules_to_save=("embed_tokens",))
    model = inject_lora(from_pretrained(base_dir), cfg)
    randomize_trainable(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # trained in place, still tied
    save_adapter(model, tmp_path / "adapter")
    reference = PeftModel.from_pretrained(load_transformers(base_dir), tmp_path / "adapter")
    assert (our_logits(model) - hf_logits(reference)).abs().max() < TOLERANCE
    reloaded = load_adapter(from_pretrained(base_dir), tmp_path / "adapter")
    assert torch.equal(our_logits(reloaded), our_logits(model))


def test_adapter_config_agrees_with_what_peft_writes(base_dir, tmp_path):
    cfg = LoRAConfig(
        r=8, alpha=16, dropout=0.1, use_rslora=True, use_dora=True, modules_to_save=("embed_tokens",)
    )
    save_adapter(
        inject_lora(from_pretrained(base_dir), cfg), tmp_path / "ours", base_model_name_or_path=str(base_dir)
    )
    options = dict(r=8, lora_alpha=16, lora_dropout=0.1, use_rslora=True, use_dora=True)
    reference = get_peft_model(
        load_transformers(base_dir),
        LoraConfig(
            **options,
            target_modules=["q_proj", "v_proj"],
            modules_to_save=["embed_tokens"],
            task_type="CAUSAL_LM",
        ),
    )
    reference.peft_config["default"].base_model_name_or_path = str(base_dir)
    reference.save_pretrained(tmp_path / "peft")
    ours = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    theirs = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    theirs["target_modules"] = sorted(theirs["target_modules"])
    assert {key: theirs[key] for key in ours} == ours
    with safe_open(tmp_path / "ours" / "adapter_model.safetensors", "pt") as a:
        with safe_open(tmp_path / "peft" / "adapter_model.safetensors", "pt") as b:
            assert sorted(a.keys()) == sorted(b.keys())
            assert all(a.get_tensor(k).shape == b.get_tensor(k).shape for k in a.keys())


@pytest.mark.parametrize("case", ["lora", "dora"])
def test_merge_then_unmerge_restores_weights_and_merging_keeps_logits(base_dir, case):
    model = inject_lora(from_pretrained(base_dir), LoRAConfig(r=4, alpha=8, **ADAPTER_CASES[case]))
    randomize_trainable(model)
    before = {name: t.clone() for name, t in base_state_dict(model).items()}
    unmerged_logits = our_logits(model)
    merge_lora(merge_lora(model))  # idempotent: a second merge adds nothing
    assert (our_logits(model) - unmerged_logits).abs().max() < TOLERANCE
    assert not torch.equal(
        base_state_dict(model)["model.layers.0.self_attn.q_proj.weight"],
        before["model.layers.0.self_attn.q_proj.weight"],
    )
    unmerge_lora(unmerge_lora(model))
    for name, tensor in base_state_dict(model).items():
        torch.testing.assert_close(tensor, before[name], rtol=0, atol=1e-6)
    assert (
        torch.equal(our_logits(model), unmerged_logits)
        or (our_logits(model) - unmerged_logits).abs().max() < 1e-5
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["lora", "dora-all-linear"])
def test_step_zero_equals_base_model_exactly(base_dir, dtype, case):
    base = from_pretrained(base_dir, dtype=dtype)
    expected = our_logits(base)
    model = inject_lora(base, LoRAConfig(**ADAPTER_CASES[case]))
    assert torch.equal(our_logits(model), expected)


@pytest.mark.parametrize("base_dir", [("qwen2", True)], indirect=True)
@pytest.mark.parametrize("case", ["lora", "dora-all-linear"])
def test_only_adapters_train_and_base_weights_stay_bit_identical(base_dir, case):
    model = inject_lora(
        from_pretrained(base_dir, dtype=torch.bfloat16), LoRAConfig(r=4, **ADAPTER_CASES[case])
    )
    base_before = {name: t.clone() for name, t in base_state_dict(model).items()}
    adapters_before = {name: t.clone() for name, t in lora_state_dict(model).items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = input_ids()
    for _ in range(2):  # the first step moves only B (A's gradient is B^T ... = 0); the second moves A too
        loss_sum, n_targets = model.train()(ids, targets=ids.roll(-1, dims=1))
        (loss_sum / n_targets).backward()
        for name, param in model.named_parameters():
            assert (param.grad is not None) == any(
                k in name for k in ("lora_A", "lora_B", "lora_magnitude")
            ), name
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.equal(t, base_before[name]) for name, t in base_state_dict(model).items())
    assert all(not torch.equal(t, adapters_before[name]) for name, t in lora_state_dict(model).items())
    assert all(t.dtype == torch.float32 for t in lora_state_dict(model).values())


def test_counts_trainable_parameters_like_peft(base_dir, capsys):
    ours = trainable_parameters_line(
        inject_lora(from_pretrained(base_dir), LoRAConfig(r=4, alpha=8, use_dora=True))
    )
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True, task_type="CAUSAL_LM"
    )
    get_peft_model(load_transformers(base_dir), config).print_trainable_parameters()
    assert ours == capsys.readouterr().out.strip()
    assert ours.startswith("trainable params: ")


def test_unknown_target_lists_the_names_that_exist(base_dir):
    with pytest.raises(
        UserError, match=r"\['qkv_proj'\].*down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"
    ):
        inject_lora(from_pretrained(base_dir), LoRAConfig(targets="q_proj,qkv_proj"))
    with pytest.raises(UserError, match="lm_head"):  # lm_head is never a LoRA target
        inject_lora(from_pretrained(base_dir), LoRAConfig(targets=("lm_head",)))
    with pytest.raises(UserError, match="modules_to_save.*embed_tokens"):
        inject_lora(from_pretrained(base_dir), LoRAConfig(modules_to_save=("embeddings",)))


@pytest.mark.parametrize("bad", [dict(r=0), dict(alpha=0), dict(dropout=1.0), dict(targets="")])
def test_config_validation(bad):
    with pytest.raises(UserError):
        LoRAConfig(**bad)


def test_load_adapter_errors_are_clear(base_dir, tmp_path):
    with pytest.raises(UserError, match="adapter_config.json: not found"):
        load_adapter(from_pretrained(base_dir), tmp_path)
    save_adapter(inject_lora(from_pretrained(base_dir), LoRAConfig(r=4)), tmp_path / "r4")
    config = json.loads((tmp_path / "r4" / "adapter_config.json").read_text())
    (tmp_path / "r4" / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    with pytest.raises(UserError, match=r"lora_A.weight' has shape \(4, 64\), this model needs \(8, 64\)"):
        load_adapter(from_pretrained(base_dir), tmp_path / "r4")
    (tmp_path / "r4" / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["c_attn"]}))
    with pytest.raises(UserError, match=r"\['c_attn'\] are not linear layers"):
        load_adapter(from_pretrained(base_dir), tmp_path / "r4")
    (tmp_path / "r4" / "adapter_config.json").write_text(
        json.dumps({**config, "target_modules": ["q_proj", "v_proj", "k_proj"]})
    )
    with pytest.raises(UserError, match="lacks 4 adapter tensors"):
        load_adapter(from_pretrained(base_dir), tmp_path / "r4")


def quantize_linears(model, quant_type):
    """Replace each decoder-block nn.Linear by a bitsandbytes one holding the same weights (as QLoRA does)."""
    import bitsandbytes as bnb

    for name, linear in list(model.model.layers.named_modules()):
        if isinstance(linear, torch.nn.Linear):
            args = (linear.in_features, linear.out_features, linear.bias is not None)
            if quant_type == "nf4":
                layer = bnb.nn.Linear4bit(*args, compute_dtype=torch.float32, quant_type="nf4")
            else:
                layer = bnb.nn.Linear8bitLt(*args, has_fp16_weights=False)
            layer.load_state_dict(linear.state_dict())
            parent, _, child = name.rpartition(".")
            setattr(model.model.layers.get_submodule(parent), child, layer.to("cpu").requires_grad_(False))
    return model


@pytest.mark.parametrize("quant_type", ["nf4", "int8"])
@pytest.mark.parametrize("case", ["lora", "dora"])
def test_quantized_base_trains_and_merging_dequantizes(base_dir, quant_type, case):
    model = quantize_linears(from_pretrained(base_dir), quant_type)
    assert count_parameters(model)[1] == count_parameters(from_pretrained(base_dir))[1]  # 4-bit: 2 per byte
    # Train mode throughout the first part: an eval forward makes bitsandbytes (CPU, AVX512-BF16) switch to an
    # inference kernel that drops input gradients from then on.
    with torch.no_grad():
        expected = model.train()(input_ids())
    inject_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0, **ADAPTER_CASES[case]))
    with torch.no_grad():
        assert torch.equal(model(input_ids()), expected)  # step 0 is the quantized base
    randomize_trainable(model)
    ids = input_ids()
    loss_sum, _ = model(ids, targets=ids)
    loss_sum.backward()
    assert (
        model.model.layers[0].self_attn.q_proj.lora_A.weight.grad is not None
    )  # reached through 4-bit layers
    unmerged = our_logits(model)
    merge_lora(model)
    assert type(model.model.layers[0].self_attn.q_proj.base_layer) is torch.nn.Linear
    merged = our_logits(model)
    assert (
        merged - unmerged
    ).abs().max() < 1e-2 * unmerged.abs().max()  # bitsandbytes' CPU kernel runs in bf16
    with pytest.raises(UserError, match="cannot unmerge"):
        unmerge_lora(model)


def test_lora_linear_wraps_without_copying_and_keeps_names(base_dir):
    model = from_pretrained(base_dir)
    q_proj = model.model.layers[0].self_attn.q_proj
    inject_lora(model, LoRAConfig())
    wrapper = model.model.layers[0].self_attn.q_proj
    assert isinstance(wrapper, LoRALinear) and wrapper.base_layer is q_proj
    assert set(base_state_dict(model)) == set(Transformer(model.config).state_dict())
    assert "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight" in lora_state_dict(model)


# ---------------------------------------------------------------- every family (tests/families.py)


def family_input_ids():
    """Longer than any family's sliding window."""
    return torch.randint(3, 128, (2, 3 * WINDOW), generator=torch.Generator().manual_seed(3))


# PEFT 0.21 leaves out the adapters of Qwen3-MoE's dense layers when the experts have some (test_moe.py).
FAMILY_PEFT_CASES = [
    pytest.param(family, targets, marks=pytest.mark.xfail(strict=True, reason="PEFT drops the dense MLP's"))
    if (family, targets) == ("qwen3_moe", "all-linear")
    else (family, targets)
    for family in FAMILIES
    for targets in ["q,v", "all-linear"]
]


@pytest.mark.parametrize("family, targets", FAMILY_PEFT_CASES)
def test_family_peft_loads_our_adapter_with_same_logits(family_dir, tmp_path, family, targets):
    base = family_dir(family)
    lora_targets = "all-linear" if targets == "all-linear" else tuple(QV_TARGETS[family])
    # Dropout 0: PEFT refuses adapters on transformers 5's fused experts otherwise (it changes no logits).
    lora_config = LoRAConfig(r=4, alpha=8, dropout=0.0, targets=lora_targets)
    model = inject_lora(from_pretrained(base), lora_config)
    randomize_trainable(model)
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(base))
    reference = PeftModel.from_pretrained(load_transformers(base), tmp_path / "adapter").eval()
    with torch.no_grad():
        mine, expected = model.eval()(family_input_ids()), reference(family_input_ids()).logits
    assert (mine - expected).abs().max() < TOLERANCE


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_merged_export_loads_in_transformers_with_same_logits(family_dir, tmp_path, family):
    base = family_dir(family)
    model = inject_lora(from_pretrained(base), LoRAConfig(r=4, alpha=8, targets="all-linear"))
    randomize_trainable(model)
    with torch.no_grad():
        adapted = model.eval()(family_input_ids())
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(base))
    merge_adapter(base, tmp_path / "adapter", tmp_path / "merged")  # what --merge writes
    with torch.no_grad():
        merged = load_transformers(tmp_path / "merged").eval()(family_input_ids()).logits
    # W + scale B A is rounded to fp32 once per weight (Mixtral has 96 expert linears; Gemma's logits reach
    # ~5, its embedding scaled by sqrt(hidden)): held relative to the logits' size.
    assert (merged - adapted).abs().max() < 2 * TOLERANCE * max(1.0, adapted.abs().max().item())


def test_fused_families_name_their_fused_layers():
    phi3 = ModelConfig.from_hf({**tiny_config().to_hf(), "model_type": "phi3"})
    layers = r"\(down_proj, gate_up_proj, o_proj, qkv_proj\) \(this family fuses q, k, v into qkv_proj"
    with pytest.raises(UserError, match=r"\['q_proj', 'v_proj'\] are not linear layers .*" + layers):
        inject_lora(Transformer(phi3), LoRAConfig(targets=("q_proj", "v_proj")))
