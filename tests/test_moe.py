"""nanoft/moe.py against transformers on tiny Mixtral and Qwen3-MoE checkpoints written by transformers
(tests/families.py): which experts the router picks, the load-balancing loss and the training loss it joins,
their gradients, dense layers among the experts, saving, and the MoE variants nanoft refuses. Logits with
padding and packing, KV-cache decoding, generation, PEFT and train.py run for them with every family."""

import json
import re

import pytest
import torch
import transformers
from families import WINDOW, reference_gradients
from peft import PeftModel
from safetensors import safe_open
from test_lora import randomize_trainable
from test_model import left_padded_batch

from lora import LoRAConfig, LoRALinear, inject_lora, peft_expert_adapters_caveat, save_adapter
from nanoft.errors import UserError
from nanoft.memory import count_parameters
from nanoft.model import ModelConfig
from nanoft.moe import SparseMoE
from nanoft.monitor import matmul_weights
from nanoft.weights import from_pretrained, save_pretrained

MOE_FAMILIES = ["mixtral", "qwen3_moe"]
T = 3 * WINDOW


def pair(path, tmp_path=None, **config_changes):
    """Our model and transformers' from the checkpoint at `path`, config.json changed as given (then saved
    beside a link to the weights in tmp_path)."""
    if config_changes:
        config = json.loads((path / "config.json").read_text()) | config_changes
        (tmp_path / "config.json").write_text(json.dumps(config))
        (tmp_path / "model.safetensors").symlink_to(path / "model.safetensors")
        path = tmp_path
    reference = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return from_pretrained(path), reference


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_router_picks_the_experts_transformers_picks(family_dir, family):
    ours, reference = pair(family_dir(family))
    ours.eval(), reference.eval()
    ours_routes, their_routes = [], []
    for layer in ours.model.layers:
        block = getattr(layer, layer.feed_forward_name)
        if isinstance(block, SparseMoE):
            block.gate.register_forward_hook(
                lambda m, i, logits, b=block: ours_routes.append(b.route(logits))
            )
    for layer in reference.model.layers:
        if hasattr(layer.mlp, "experts"):  # (logits, top-k weights, top-k experts)
            layer.mlp.gate.register_forward_hook(lambda m, i, out: their_routes.append(out[1:]))
    input_ids, attention_mask, position_ids = left_padded_batch()
    with torch.no_grad():
        ours(input_ids, attention_mask=attention_mask, position_ids=position_ids)
        reference(input_ids, attention_mask=attention_mask, position_ids=position_ids)
    expected_moe_layers = 4 if family == "mixtral" else 3  # Qwen3-MoE's layer 1 is dense
    assert len(ours_routes) == len(their_routes) == expected_moe_layers
    real = attention_mask.flatten().bool()  # padding's hidden states differ (it attends to nothing real)
    for (weights, experts), (their_weights, their_experts) in zip(ours_routes, their_routes, strict=True):
        assert torch.equal(experts[real], their_experts[real])
        torch.testing.assert_close(weights[real], their_weights[real].float(), atol=1e-6, rtol=1e-5)
        assert len(experts.unique()) == 8  # every expert is used: the dispatch is exercised for each
    sums = ours_routes[0][0].sum(-1)
    renormalised = torch.allclose(sums, torch.ones_like(sums))
    assert renormalised == (family == "mixtral")  # Qwen3-MoE with norm_topk_prob false keeps the raw ones


def test_qwen3_moe_renormalises_top_k_when_its_config_says_so(family_dir, tmp_path):
    ours, reference = pair(family_dir("qwen3_moe"), tmp_path, norm_topk_prob=True)
    input_ids, _, _ = left_padded_batch()
    with torch.no_grad():
        assert (ours.eval()(input_ids) - reference.eval()(input_ids).logits).abs().max() <= 1e-4
    ours_without, _ = pair(family_dir("qwen3_moe"))
    with torch.no_grad():
        assert (ours_without.eval()(input_ids) - reference(input_ids).logits).abs().max() > 1e-2


@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_aux_loss_loss_and_gradients_equal_transformers(family_dir, family, padded, tmp_path):
    """With output_router_logits the training loss is cross-entropy + router_aux_loss_coef x the
    load-balancing loss, as in transformers, padding left out of the balance when there is a mask; the
    coefficient is raised so that a wrong aux loss shows in the loss and the router's gradients."""
    ours, reference = pair(family_dir(family), tmp_path, output_router_logits=True, router_aux_loss_coef=0.5)
    ours.train(), reference.train()
    input_ids, attention_mask, position_ids = left_padded_batch()
    if not padded:
        attention_mask, position_ids = None, None
    labels = input_ids.clone()
    if padded:  # nor the first real token: the last padding position would predict it
        labels[0, :6] = -100
    targets = torch.cat([labels[:, 1:], torch.full((2, 1), -100)], dim=1)
    loss_sum, n_targets = ours(input_ids, targets, position_ids=position_ids, attention_mask=attention_mask)
    loss = loss_sum / n_targets
    expected = reference(input_ids, attention_mask=attention_mask, position_ids=position_ids, labels=labels)
    assert abs(ours.router_aux_loss.item() - expected.aux_loss.item()) <= 1e-6
    assert expected.aux_loss.item() > 1.01  # 1 is perfectly even load: this one is not
    assert abs(loss.item() - expected.loss.item()) <= 1e-5 * expected.loss.item()
    loss.backward()
    expected.loss.backward()
    theirs = reference_gradients(reference)
    for name, parameter in ours.named_parameters():
        torch.testing.assert_close(parameter.grad, theirs[name], atol=1e-5, rtol=1e-4, msg=name)


def test_padding_is_left_out_of_the_balance(family_dir, tmp_path):
    """The same tokens with padding after them (marked in real_tokens, as nanoft/data_batches.py marks it)
    give the same aux loss as without it."""
    ours, _ = pair(family_dir("mixtral"), tmp_path, output_router_logits=True)
    ours.train()
    input_ids = torch.randint(3, 128, (1, T), generator=torch.Generator().manual_seed(4))
    targets = torch.roll(input_ids, -1, dims=1)
    ours(input_ids, targets)
    alone = ours.router_aux_loss
    padded = torch.cat([input_ids, torch.zeros(1, 7, dtype=torch.long)], dim=1)
    padded_targets = torch.cat([targets, torch.full((1, 7), -100)], dim=1)
    real_tokens = torch.arange(T + 7)[None] < T
    ours(padded, padded_targets, real_tokens=real_tokens)
    torch.testing.assert_close(ours.router_aux_loss, alone)
    ours(padded, padded_targets)  # without a mask the padding is routed and counted
    assert (ours.router_aux_loss - alone).abs() > 1e-4


def test_eval_loss_is_the_plain_cross_entropy(family_dir, tmp_path):
    ours, _ = pair(family_dir("mixtral"), tmp_path, output_router_logits=True, router_aux_loss_coef=0.5)
    input_ids = torch.randint(3, 128, (2, T), generator=torch.Generator().manual_seed(5))
    targets = torch.roll(input_ids, -1, dims=1)
    with torch.no_grad():
        training = ours.train()(input_ids, targets)[0]
        evaluating = ours.eval()(input_ids, targets)[0]
        ours.config.output_router_logits = False
        plain = ours.train()(input_ids, targets)[0]
    assert torch.equal(evaluating, plain)
    assert training > plain


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_saved_checkpoint_has_transformers_names_and_loads_there(family_dir, family, tmp_path):
    ours = from_pretrained(family_dir(family)).eval()
    save_pretrained(ours.state_dict(), ours.config, tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as saved:
        names = set(saved.keys())
    on_disk = (
        ["model.layers.0.block_sparse_moe.gate.weight", "model.layers.3.block_sparse_moe.experts.7.w2.weight"]
        if family == "mixtral"
        else ["model.layers.0.mlp.gate.weight", "model.layers.1.mlp.gate_proj.weight"]
    )
    assert set(on_disk) <= names
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    input_ids, attention_mask, position_ids = left_padded_batch()
    with torch.no_grad():
        mine = ours(input_ids, attention_mask=attention_mask, position_ids=position_ids)
        expected = reference(input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    real = attention_mask.bool()
    assert (mine[real] - expected[real]).abs().max() <= 1e-4


@pytest.mark.parametrize(
    "model_type", ["qwen2_moe", "deepseek_v3", "gpt_oss", "olmoe", "mixtral_with_bad_top_k"]
)
def test_unsupported_mixture_of_experts_is_one_line(model_type):
    if model_type == "mixtral_with_bad_top_k":
        with pytest.raises(UserError, match=r"num_experts_per_tok \(9\) must be between 1 and num_experts"):
            ModelConfig.from_hf({"model_type": "mixtral", "num_local_experts": 8, "num_experts_per_tok": 9})
        return
    with pytest.raises(UserError, match=f"model_type '{model_type}' is not supported; nanoft supports"):
        ModelConfig.from_hf({"model_type": model_type})


# ---------------------------------------------------------------- LoRA on experts and routers


def test_expert_adapters_load_in_peft_on_transformers_fused_experts(family_dir, tmp_path):
    """PEFT 0.21 turns per-expert adapters (w1, w2, w3 on every expert) into adapters on transformers 5's
    fused 3-D expert parameters: the logits are ours, when the caveats below do not apply."""
    base = family_dir("mixtral")
    model = inject_lora(from_pretrained(base), LoRAConfig(r=4, alpha=8, dropout=0.0, targets="w1,w2,w3"))
    assert peft_expert_adapters_caveat(model) is None
    randomize_trainable(model)
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(base))
    reference = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    reference = PeftModel.from_pretrained(reference, tmp_path / "adapter").eval()
    input_ids, _, _ = left_padded_batch()
    with torch.no_grad():
        mine, expected = model.eval()(input_ids), reference(input_ids).logits
        base_logits = from_pretrained(base).eval()(input_ids)
    assert (mine - expected).abs().max() < 1e-4
    assert (mine - base_logits).abs().max() > 0.1  # the expert adapters changed the logits


@pytest.mark.parametrize(
    "family, targets, dropout, caveat",
    [
        ("mixtral", "q_proj,v_proj", 0.05, None),
        ("mixtral", "w1,w2,w3", 0.05, r"lora_dropout is 0.05 \(train with --lora-dropout 0\)"),
        ("mixtral", "w1,w2", 0.0, "name both w1 and w3"),
        ("qwen3_moe", "all-linear", 0.0, r"leaves the dense layers' MLP \(mlp_only_layers\) without"),
    ],
)
def test_adapters_peft_cannot_load_are_named_in_one_line(family_dir, family, targets, dropout, caveat):
    model = inject_lora(from_pretrained(family_dir(family)), LoRAConfig(dropout=dropout, targets=targets))
    line = peft_expert_adapters_caveat(model)
    if caveat is None:
        assert line is None
    else:
        assert "\n" not in line and re.search(caveat, line)


def test_routers_get_adapters_only_when_named_and_train_as_modules_to_save(family_dir):
    base = family_dir("mixtral")
    everything = inject_lora(from_pretrained(base), LoRAConfig(targets="all-linear"))
    adapted = {name for name, m in everything.named_modules() if isinstance(m, LoRALinear)}
    assert "model.layers.0.block_sparse_moe.experts.7.w2" in adapted
    assert not [name for name in adapted if name.endswith(".gate")]
    named = inject_lora(from_pretrained(base), LoRAConfig(targets="gate"))
    assert isinstance(named.model.layers[0].block_sparse_moe.gate, LoRALinear)
    saved = inject_lora(from_pretrained(base), LoRAConfig(modules_to_save=("gate",))).train()
    input_ids, _, _ = left_padded_batch()
    saved(input_ids, torch.roll(input_ids, -1, dims=1))[0].backward()
    assert saved.model.layers[3].block_sparse_moe.gate.weight.grad.abs().sum() > 0
    assert saved.model.layers[3].block_sparse_moe.experts[0].w1.weight.grad is None  # frozen


def test_mfu_counts_the_experts_a_token_passes_through(family_dir):
    model = from_pretrained(family_dir("mixtral"))
    frozen, trainable = matmul_weights(model)
    params, config = count_parameters(model.config), model.config
    routers = config.num_hidden_layers * config.num_experts * config.hidden_size
    assert frozen + trainable == params.block_linear_active + routers + params.lm_head
    assert params.block_linear_active < params.block_linear
