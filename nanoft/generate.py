"""Generate text with a KV cache: spot-check a fine-tuned model (or adapter) against its base.

    python -m nanoft.generate --prompt "What is the capital of France?" --chat --greedy
    python -m nanoft.generate --model DIR --adapter ADAPTER --prompt "Hi" --chat --temperature 0.7 --top-p 0.9

Only the generated text goes to stdout (logs go to stderr), so the output can be diffed between models.
From Python:

    ids = generate(model, tokenizer, prompt_ids, max_new_tokens=64)                 # greedy
    rows = generate_batch(model, tokenizer, [ids_a, ids_b], max_new_tokens=64, temperature=0.7, top_p=0.9)

Decoding stops at any of the tokenizer's `eos_ids`; the stop token is not returned.
"""

import contextlib
import sys
import time

import torch

from nanoft.config import OneLineErrorParser
from nanoft.default_model import resolve_model
from nanoft.errors import UserError, exit_on_user_error
from nanoft.model import KVCache
from nanoft.tokenizer import Tokenizer
from nanoft.weights import from_pretrained


def next_token(logits, temperature: float, top_p: float, generator=None):
    """(B, V) logits -> (B,) ids: argmax when temperature is 0, else nucleus (top-p) sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest set of most likely tokens whose mass reaches top_p; the first one always stays.
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # multinomial renormalises


@torch.no_grad()
def generate_batch(
    model,
    tokenizer,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature=0.0,
    top_p=1.0,
    generator=None,
) -> list[list[int]]:
    """New tokens for each prompt; prompts of different lengths are left-padded into one batch.

    The model runs in eval mode (no dropout) and goes back to the mode it was in, so a training loop can
    call this for a spot check.
    """
    was_training = model.training
    model.eval()
    try:
        return decode_with_kv_cache(model, tokenizer, prompts, max_new_tokens, temperature, top_p, generator)
    finally:
        model.train(was_training)


def decode_with_kv_cache(model, tokenizer, prompts, max_new_tokens, temperature, top_p, generator):
    if not prompts or min(len(prompt) for prompt in prompts) == 0:
        raise UserError("generation needs at least one non-empty prompt")
    device = model.lm_head.weight.device
    batch_size, longest = len(prompts), max(len(prompt) for prompt in prompts)
    input_ids = torch.full((batch_size, longest), tokenizer.pad_id, dtype=torch.long, device=device)
    attention_mask = torch.zeros((batch_size, longest), dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):  # left padding: every prompt's last token is in the last column
        input_ids[row, longest - len(prompt) :] = torch.tensor(prompt, device=device)
        attention_mask[row, longest - len(prompt) :] = 1
    padded = not bool(attention_mask.all())  # without padding, no mask keeps SDPA's causal fast path
    position_ids = (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)  # each prompt counts from 0
    cache = KVCache(model.config, batch_size, longest + max_new_tokens, model.lm_head.weight.dtype, device)
    stop_ids = torch.tensor(sorted(tokenizer.eos_ids), device=device)

    logits = model(
        input_ids,
        position_ids=position_ids,
        attention_mask=attention_mask if padded else None,
        kv_cache=cache,
    )[:, -1]  # (B, V)
    steps, finished = [], torch.zeros(batch_size, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        token = next_token(logits, temperature, top_p, generator)  # (B,)
        steps.append(token)
        finished |= torch.isin(token, stop_ids)
        if finished.all() or step == max_new_tokens - 1:
            break
        position_ids = position_ids[:, -1:] + 1
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch_size, 1)], dim=1)
        logits = model(
            token[:, None],
            position_ids=position_ids,
            attention_mask=attention_mask if padded else None,
            kv_cache=cache,
        )[:, -1]

    rows = torch.stack(steps, dim=1).tolist() if steps else [[] for _ in prompts]
    stops = set(tokenizer.eos_ids)
    return [row[: next((i for i, token in enumerate(row) if token in stops), len(row))] for row in rows]


def generate(
    model, tokenizer, prompt_ids: list[int], max_new_tokens: int, temperature=0.0, top_p=1.0, generator=None
) -> list[int]:
    """New tokens after `prompt_ids` (greedy when temperature is 0), up to max_new_tokens or a stop token."""
    return generate_batch(model, tokenizer, [prompt_ids], max_new_tokens, temperature, top_p, generator)[0]


def import_lora():
    try:
        import lora  # lora.py sits at the repository root, next to train.py
    except ModuleNotFoundError as error:
        if error.name != "lora":
            raise
        raise UserError(
            "--adapter needs lora.py from the nanoft checkout; run from the repository root"
        ) from None
    return lora


def model_for(args) -> tuple:
    """(model directory, what to say about it): --model, else the base the adapter names, else built-in."""
    if args.model or not args.adapter:
        return resolve_model(args.model), ""
    base = import_lora().adapter_base_model(args.adapter)  # a UserError naming it when it is not here
    return base, f" (the base model named in {args.adapter}/adapter_config.json; --model overrides it)"


def parse_args(argv=None):
    parser = OneLineErrorParser(
        prog="python -m nanoft.generate",
        description="Generate text from a model; only the new text goes to stdout.",
    )
    parser.add_argument(
        "--model",
        default="",
        help="Hugging Face model directory (default: the adapter's base_model_name_or_path with --adapter, "
        "else the built-in SmolLM2-135M)",
    )
    parser.add_argument(
        "--adapter", default="", help="PEFT-format LoRA adapter directory to load on the model"
    )
    parser.add_argument("--prompt", required=True, help="the prompt text (a user message with --chat)")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    sampling = parser.add_mutually_exclusive_group()
    sampling.add_argument(
        "--greedy", action="store_true", help="always take the most likely token (the default)"
    )
    sampling.add_argument("--temperature", type=float, default=0.0, help="sample at this temperature (> 0)")
    parser.add_argument("--top-p", type=float, default=1.0, help="with --temperature: nucleus sampling mass")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="stop after this many new tokens")
    parser.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    args = parser.parse_args(argv)
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.max_new_tokens < 1:
        parser.error("need --temperature >= 0, 0 < --top-p <= 1 and --max-new-tokens >= 1")
    if args.top_p < 1 and args.temperature == 0:
        parser.error("--top-p needs --temperature > 0 (greedy decoding ignores it)")
    return args


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    model_dir, model_source = model_for(args)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tokenizer = Tokenizer.from_pretrained(model_dir)
    model = from_pretrained(model_dir, dtype=dtype, device=device)
    if args.adapter:
        with contextlib.redirect_stdout(sys.stderr):  # stdout is for the answer only; lora.py reports counts
            model = import_lora().load_adapter(model, args.adapter).to(device)
    adapter = f" + adapter {args.adapter}" if args.adapter else ""
    print(f"nanoft: {model_dir}{model_source} on {device} ({dtype}){adapter}", file=sys.stderr)

    if args.chat:
        messages = [{"role": "user", "content": args.prompt}]
        prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    else:
        prompt_ids = tokenizer.encode(args.prompt, add_special_tokens=True)
    context = model.config.max_position_embeddings
    if len(prompt_ids) + args.max_new_tokens > context:
        print(
            f"nanoft: warning: the prompt ({len(prompt_ids)} tokens) + --max-new-tokens "
            f"{args.max_new_tokens} exceeds the model's context of {context} positions; "
            f"text past position {context} is unreliable",
            file=sys.stderr,
        )
    generator = torch.Generator(device).manual_seed(args.seed)
    start = time.perf_counter()
    new_ids = generate(
        model, tokenizer, prompt_ids, args.max_new_tokens, args.temperature, args.top_p, generator
    )
    seconds = time.perf_counter() - start
    print(tokenizer.decode(new_ids), flush=True)
    print(
        f"nanoft: {len(new_ids)} tokens in {seconds:.1f} s ({len(new_ids) / seconds:.1f} tokens/s)",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
