"""quant.py: 4-bit / 8-bit bases, their bytes and errors, QLoRA training, adapters, optimizers.

    python -m pytest tests/test_quant.py -q

A tiny Llama (hidden 128, 3 layers, byte vocabulary) with Gaussian weights (std 0.02, Hugging Face's
initializer_range) is written to disk once and loaded through quant.load_quantized, so every test goes through
the same streaming loader users do. References: a plain-torch NF4 quantizer, the fp32/bf16 model, torch AdamW.
"""

import math
import subprocess
import sys

import pytest
import torch
from families import FAMILIES
from torch import nn

from lora import LoRAConfig, dense_weight, inject_lora, load_adapter, save_adapter
from nanoft.errors import UserError
from nanoft.merge import merge_adapter
from nanoft.model import ModelConfig, Transformer
from nanoft.weights import from_pretrained, save_pretrained
from quant import (
    QuantConfig,
    bitsandbytes_error,
    load_quantized,
    make_optimizer,
    quantize_linears,
    quantized_weight_bytes,
)

bnb = pytest.importorskip("bitsandbytes")

TINY = dict(
    vocab_size=256, hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, tie_word_embeddings=False, max_position_embeddings=512,
)  # fmt: skip
# Real text to memorise, one byte per token (the opening of the Python tutorial).
TEXT = (
    "Python is an easy to learn, powerful programming language. It has efficient high-level data structures "
    "and a simple but effective approach to object-oriented programming."
)
# The 16 NF4 levels of the QLoRA paper (normal quantiles, rescaled to [-1, 1]), as bitsandbytes holds them.
NF4_CODE = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices gain nothing from a second thread, and on a busy machine OpenMP workers wait for each
    other: 0.12 s per QLoRA step on one thread, 4 s on two, measured at load average 10 on 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = ModelConfig(**TINY)
    model = Transformer(config)
    for name, parameter in model.named_parameters():
        # Embeddings and lm_head at 0.1 give logits of std ~1, so adapters on a frozen random base can make
        # confident predictions; at 0.02 the logits' std is 0.2 and LoRA alone cannot memorise anything.
        if parameter.dim() == 2:
            nn.init.normal_(
                parameter, std=0.1 if name in ("model.embed_tokens.weight", "lm_head.weight") else 0.02
            )
    path = tmp_path_factory.mktemp("tiny_llama")
    save_pretrained(model.state_dict(), config, path)  # fp32, as released checkpoints often are
    return path


def text_batch():
    tokens = torch.tensor(list(TEXT.encode()))[None]  # (1, T+1)
    return tokens[:, :-1], tokens[:, 1:]


def mean_loss(model, inputs, targets):
    loss_sum, n_targets = model(inputs, targets)
    return loss_sum / n_targets


def linear_layers(model, kind):
    return [(name, m) for name, m in model.named_modules() if type(m).__name__ == kind]


def nf4_reference(weight: torch.Tensor, blocksize=64) -> torch.Tensor:
    """Plain-torch NF4: scale each block of 64 by its absmax, round to the nearest level, scale back."""
    code = torch.tensor(NF4_CODE)
    blocks = weight.float().reshape(-1, blocksize)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    nearest = (blocks / absmax)[..., None].sub(code).abs().argmin(dim=-1)
    return (code[nearest] * absmax).reshape(weight.shape)


def relative_error(value, reference):
    return ((value.float() - reference.float()).norm() / reference.float().norm()).item()


def test_quantized_weight_bytes_at_most_035_of_bf16(tiny_dir):
    model = load_quantized(tiny_dir)
    weights = quantized_weight_bytes(model)
    print(f"tiny model: {weights.stored} bytes stored vs {weights.bf16} in bf16, ratio {weights.ratio:.4f}")
    assert weights.ratio <= 0.35
    assert quantized_weight_bytes(from_pretrained(tiny_dir, dtype=torch.bfloat16)).ratio == 1.0
    # Every 4-bit layer to the byte: packed 4-bit weights, an 8-bit absmax per block of 64, an fp32 absmax
    # per 256 blocks, the 16-level NF4 code and the 256-level code of the nested absmax, an fp32 offset.
    for name, layer in linear_layers(model, "Linear4bit"):
        n = layer.in_features * layer.out_features
        blocks = math.ceil(n / 64)
        expected = n // 2 + blocks + 4 * math.ceil(blocks / 256) + 4 * 16 + 4 * 256 + 4
        assert quantized_weight_bytes(layer).stored == expected, name


def test_nf4_matches_a_plain_torch_quantizer(tiny_dir):
    # The loader quantizes from the compute dtype, as transformers does from torch_dtype=bf16.
    weight = from_pretrained(tiny_dir).model.layers[0].mlp.up_proj.weight.detach().bfloat16()
    reference = nf4_reference(weight).bfloat16()
    packed, state = bnb.functional.quantize_4bit(weight, compress_statistics=False, quant_type="nf4")
    assert torch.equal(bnb.functional.dequantize_4bit(packed, state), reference)
    # Double quantization stores each block's absmax in 8 bits too: a small extra error on top (0.3%).
    layer = load_quantized(tiny_dir).model.layers[0].mlp.up_proj
    dequantized = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert relative_error(dequantized, reference) < 0.01


def test_per_layer_output_error_is_the_expected_nf4_error(tiny_dir):
    """NF4 with blocks of 64 on Gaussian weights loses 0.092 of the weight's norm (measured for layers from
    64 x 64 to 4096 x 1024: 0.087-0.095, tighter as layers grow); for random inputs the output error equals
    the weight error in expectation, and bf16 compute adds 0.003. So each layer's output error must lie
    within 0.08-0.11, and match within 15% the error the plain-torch quantizer predicts for that weight.
    FP4 (0.122 measured) must be worse on these weights, int8 (0.0075) far better."""
    exact = from_pretrained(tiny_dir)
    quantized = {quant: load_quantized(tiny_dir, quant=quant) for quant in ("nf4", "fp4", "int8")}
    torch.manual_seed(0)
    for name, linear in exact.named_modules():
        if not isinstance(linear, nn.Linear) or name == "lm_head":
            continue
        x = torch.randn(64, linear.in_features)
        reference = linear(x)
        errors = {
            q: relative_error(m.get_submodule(name)(x.bfloat16()), reference) for q, m in quantized.items()
        }
        predicted = relative_error(nf4_reference(linear.weight.detach()), linear.weight)
        print(f"{name}: nf4 {errors['nf4']:.4f} (predicted {predicted:.4f}), fp4 {errors['fp4']:.4f}, "
              f"int8 {errors['int8']:.4f}")  # fmt: skip
        assert 0.08 < errors["nf4"] < 0.11
        assert abs(errors["nf4"] - predicted) < 0.15 * predicted
        assert errors["fp4"] > errors["nf4"]
        assert errors["int8"] < 0.02


def test_storage_and_compute_dtypes(tiny_dir):
    inputs, _ = text_batch()
    with torch.no_grad():
        exact = from_pretrained(tiny_dir)(inputs)
        logits = load_quantized(tiny_dir)(inputs)
        # bf16 storage (what FSDP1 needed to shard the packed bytes) holds the same bits: identical outputs.
        bf16_storage = load_quantized(tiny_dir, quant_storage=torch.bfloat16)
        assert bf16_storage.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
        assert torch.equal(bf16_storage(inputs), logits)
        # Every compute dtype sees the same NF4 error (0.15 of the logits' norm through 2 layers, measured).
        error = relative_error(logits, exact)
        for compute_dtype in (torch.float16, torch.float32):
            model = load_quantized(tiny_dir, compute_dtype=compute_dtype)
            assert model.model.embed_tokens.weight.dtype == compute_dtype
            assert model(inputs).dtype == compute_dtype
            assert abs(relative_error(model(inputs), exact) - error) < 0.1 * error
    # Layers named in skip stay full precision; lm_head always stays (the loss reads its weight).
    model = load_quantized(tiny_dir, skip=("lm_head", "down_proj"))
    assert type(model.model.layers[0].mlp.down_proj) is nn.Linear
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    with pytest.raises(UserError, match="lm_head"):
        load_quantized(tiny_dir, skip=())
    with pytest.raises(UserError, match="nf4, fp4, int8"):
        QuantConfig(quant="nf3")


def test_quantizing_a_loaded_model_equals_quantizing_while_loading(tiny_dir):
    model = from_pretrained(tiny_dir, dtype=torch.bfloat16)
    names = quantize_linears(model, QuantConfig())
    assert len(names) == 3 * 7 and "lm_head" not in names
    inputs, _ = text_batch()
    with torch.no_grad():
        assert torch.equal(model(inputs), load_quantized(tiny_dir)(inputs))


def snapshot_quantized_bytes(model):
    """Packed weights and every quantization-state tensor of every 4-bit layer, copied."""
    saved = {}
    for name, layer in linear_layers(model, "Linear4bit"):
        state = layer.weight.quant_state
        saved[name] = [layer.weight.data.clone(), state.absmax.clone(), state.state2.absmax.clone()]
    return saved


@pytest.fixture(scope="module")
def qlora_run(tiny_dir, tmp_path_factory):
    """30 steps of QLoRA (NF4 base, LoRA r=8 on every linear) memorising TEXT; the adapter saved."""
    torch.manual_seed(0)
    model = inject_lora(
        load_quantized(tiny_dir), LoRAConfig(r=8, alpha=16, dropout=0.0, targets="all-linear")
    )
    before = snapshot_quantized_bytes(model)
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], "adamw", lr=1e-2)
    inputs, targets = text_batch()
    losses, first_layer_grads = [], []
    for step in range(30):
        loss = mean_loss(model, inputs, targets)
        loss.backward()
        first_layer_grads.append(model.model.layers[0].self_attn.q_proj.lora_B.weight.grad.norm().item())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step == 10:  # a validation pass in the middle, as the trainer does
            model.eval()
            with torch.no_grad():
                mean_loss(model, inputs, targets)
            model.train()
    adapter_dir = tmp_path_factory.mktemp("qlora_adapter")
    save_adapter(model, adapter_dir)
    return model.eval(), losses, first_layer_grads, before, adapter_dir


def test_qlora_loss_falls_and_gradients_reach_every_adapter(qlora_run):
    """Memorised, not counted: below 1.68 nats, the text's own entropy of a byte given the byte before it."""
    model, losses, first_layer_grads, _, _ = qlora_run
    print(f"QLoRA loss: {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[-1] < 1.68 < 0.5 * losses[0]
    # Gradients reach the first layer's adapters at every step, also after the eval pass at step 10
    # (bitsandbytes' CPU inference repacking would cut them off; quant.py turns it off).
    assert all(g > 0 for g in first_layer_grads)
    for name, parameter in model.named_parameters():
        assert parameter.requires_grad == ("lora_" in name), name


def test_qlora_steps_leave_the_4bit_weights_bit_identical(qlora_run):
    model, _, _, before, _ = qlora_run
    after = snapshot_quantized_bytes(model)
    assert before.keys() == after.keys() and len(after) == 3 * 7
    for name in before:
        assert all(torch.equal(a, b) for a, b in zip(before[name], after[name], strict=True)), name


def test_adapter_loads_onto_fresh_4bit_and_bf16_bases(tiny_dir, qlora_run):
    trained, losses, _, _, adapter_dir = qlora_run
    inputs, targets = text_batch()
    with torch.no_grad():
        trained_logits = trained(inputs)
        # Quantization is deterministic: a freshly quantized base + the adapter is the trained model.
        fresh = load_adapter(load_quantized(tiny_dir), adapter_dir).eval()
        assert torch.equal(fresh(inputs), trained_logits)
        # On the bf16 base the adapter meets the weights before quantization: close, not equal; the
        # logits differ by about the NF4 error carried through the model (0.15 for this one, measured).
        bf16_base = from_pretrained(tiny_dir, dtype=torch.bfloat16)
        base_loss = mean_loss(bf16_base, inputs, targets).item()
        on_bf16 = load_adapter(bf16_base, adapter_dir).eval()
        logits_gap = relative_error(on_bf16(inputs), trained_logits)
        adapted_loss = mean_loss(on_bf16, inputs, targets).item()
    print(f"bf16 base + adapter: logits {logits_gap:.3f} off the 4-bit model's; loss {base_loss:.3f} without "
          f"the adapter, {adapted_loss:.3f} with it ({losses[-1]:.3f} on the 4-bit base)")  # fmt: skip
    assert logits_gap < 0.2
    assert adapted_loss < 1.68  # the memorisation carries over


def test_merged_exports_are_the_4bit_model_dequantized_or_the_original_base_plus_adapter(
    tiny_dir, qlora_run, tmp_path
):
    _, _, _, _, adapter_dir = qlora_run
    model = load_adapter(load_quantized(tiny_dir), adapter_dir).eval()
    inputs, _ = text_batch()
    with torch.no_grad():
        qlora_logits = model(inputs)
        merge_adapter(tiny_dir, adapter_dir, tmp_path / "quantized", "quantized", QuantConfig("nf4"))
        merged = from_pretrained(tmp_path / "quantized", dtype=torch.bfloat16)
        assert not linear_layers(merged, "Linear4bit")
        # The only difference left is bf16 rounding of the merged weights.
        assert relative_error(merged(inputs), qlora_logits) < 0.02
        on_original = load_adapter(from_pretrained(tiny_dir, dtype=torch.bfloat16), adapter_dir).eval()
        merge_adapter(tiny_dir, adapter_dir, tmp_path / "original")
        merged = from_pretrained(tmp_path / "original", dtype=torch.bfloat16)
        assert relative_error(merged(inputs), on_original(inputs)) < 0.02


def test_int8_base_trains_on_cpu_and_stays_fixed(tiny_dir):
    model = inject_lora(load_quantized(tiny_dir, quant="int8"), LoRAConfig(r=4, dropout=0.0))
    before = {name: layer.weight.data.clone() for name, layer in linear_layers(model, "Linear8bitLt")}
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], "adamw", lr=1e-2)
    inputs, targets = text_batch()
    for _ in range(2):
        mean_loss(model, inputs, targets).backward()
        assert model.model.layers[0].self_attn.q_proj.lora_B.weight.grad.norm() > 0
        optimizer.step()
        optimizer.zero_grad()
    assert all(
        torch.equal(layer.weight.data, before[name]) for name, layer in linear_layers(model, "Linear8bitLt")
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_qlora_step_on_cuda_matches_cpu(tiny_dir):
    model = load_quantized(tiny_dir, device="cuda")
    inputs, targets = (t.cuda() for t in text_batch())
    with torch.no_grad():
        cpu_logits = load_quantized(tiny_dir)(inputs.cpu())
        assert relative_error(model(inputs).cpu(), cpu_logits) < 0.02  # same 4-bit weights, other kernels
    model = inject_lora(model, LoRAConfig(r=4, dropout=0.0))
    before = snapshot_quantized_bytes(model)
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], "adamw", lr=1e-2)
    assert optimizer.defaults["fused"]
    mean_loss(model, inputs, targets).backward()
    assert model.model.layers[0].self_attn.q_proj.lora_B.weight.grad.norm() > 0
    optimizer.step()
    after = snapshot_quantized_bytes(model)
    assert all(torch.equal(a, b) for name in before for a, b in zip(before[name], after[name], strict=True))


@pytest.mark.parametrize("name", ["adamw8bit", "paged_adamw8bit"])
def test_8bit_optimizers_follow_adamw(name):
    """Same steps as torch AdamW on the same gradients; 8-bit moments stay within a few % of the update."""
    torch.manual_seed(0)
    start = torch.randn(128, 64)  # 8192 elements: above bitsandbytes' 4096 threshold for 8-bit state
    params = {key: nn.Parameter(start.clone()) for key in ("adamw", name)}
    optimizers = {key: make_optimizer([p], key, lr=1e-2, weight_decay=0.01) for key, p in params.items()}
    for _ in range(10):
        grad = torch.randn(128, 64)
        for key, optimizer in optimizers.items():
            params[key].grad = grad.clone()
            optimizer.step()
    state = optimizers[name].state[params[name]]
    assert state["state1"].dtype == torch.uint8  # the first moment really is 8-bit
    moved = params["adamw"].detach() - start
    assert relative_error(params[name].detach() - start, moved) < 0.05


def test_unknown_optimizer_is_a_user_error():
    with pytest.raises(UserError, match="adamw, adamw8bit, paged_adamw8bit"):
        make_optimizer([nn.Parameter(torch.zeros(2))], "sgd")


def test_missing_bitsandbytes_message_says_what_to_install_or_drop():
    # A real ImportError, from a module that does not exist, through the function quant.py raises with.
    try:
        import bitsandbytes_not_installed_here  # noqa: F401
    except ImportError as error:
        message = str(bitsandbytes_error(error, "--quant nf4"))
    assert "\n" not in message
    assert "pip install bitsandbytes" in message and "drop --quant nf4" in message
    message = str(bitsandbytes_error(RuntimeError("no kernel for this device"), "--optim adamw8bit"))
    assert "\n" not in message and "drop --optim adamw8bit" in message


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_loads_in_nf4_and_its_adapters_train(family_dir, family):
    """Each family's every block linear (fused qkv_proj and gate_up_proj, experts too) but routers becomes NF4
    and computes what the full-precision model computes with the dequantized weights, and LoRA on all of them
    (all-linear leaves the routers out) gets gradients."""
    inputs = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    model = load_quantized(family_dir(family), compute_dtype=torch.float32)
    block_linears = {name: m for name, m in model.named_modules() if name.startswith("model.layers.")}
    block_linears = {name: m for name, m in block_linears.items() if isinstance(m, nn.Linear)}
    # A mixture of experts' routers stay as they were; the experts are 4-bit like any linear.
    routers = {name: block_linears.pop(name) for name in list(block_linears) if name.endswith(".gate")}
    assert all(type(m) is nn.Linear for m in routers.values())
    assert bool(routers) == (family in ("mixtral", "qwen3_moe"))
    assert block_linears and all(type(m).__name__ == "Linear4bit" for m in block_linears.values())
    dequantized = from_pretrained(family_dir(family))
    with torch.no_grad():
        for name, layer in block_linears.items():
            dequantized.get_submodule(name).weight.copy_(dense_weight(layer))
        assert relative_error(model(inputs), dequantized(inputs)) < 1e-5
    inject_lora(model, LoRAConfig(r=4, targets="all-linear"))
    mean_loss(model.train(), inputs, inputs).backward()
    adapters = [p for name, p in model.named_parameters() if "lora_B" in name]  # A gets none while B = 0
    assert len(adapters) == len(block_linears)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapters)


def test_bitsandbytes_optional_kernel_notice_does_not_reach_the_user():
    notice = "Failed to load CPU gemm_4bit_forward from kernels-community"
    bare = subprocess.run([sys.executable, "-c", "import bitsandbytes"], capture_output=True, text=True)
    if notice not in bare.stderr:
        pytest.skip("this CPU (no AVX512-BF16) or bitsandbytes version prints no such notice")
    ours = subprocess.run(
        [
            sys.executable,
            "-c",
            "import quant, bitsandbytes, logging; logging.getLogger('bitsandbytes').warning('x')",
        ],
        capture_output=True,
        text=True,
    )
    assert notice not in ours.stderr and ours.stderr.strip() == "x"  # its other warnings still show


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_int8_base_is_quantized_while_loading_on_cuda(tiny_dir):
    """Int8Params quantizes only when moved off the CPU: every int8 weight must arrive on the GPU as int8, and
    the load must never hold the model's 16-bit linears there."""
    torch.cuda.reset_peak_memory_stats()
    model = load_quantized(tiny_dir, quant="int8", device="cuda")
    layers = linear_layers(model, "Linear8bitLt")
    assert layers and all(
        layer.weight.dtype == torch.int8 and layer.weight.device.type == "cuda" for _, layer in layers
    )
    bf16_linears = sum(2 * layer.in_features * layer.out_features for _, layer in layers)
    assert torch.cuda.max_memory_allocated() < quantized_weight_bytes(model).stored + bf16_linears / 4
