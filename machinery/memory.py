"""Memory planning (`python dpo.py --estimate-memory --model ...`): what a DPO run holds on each GPU, by arithmetic
from the model's shape and the flags alone, before anything is loaded or downloaded.

    python dpo.py --estimate-memory --model gpt2-large,EleutherAI/pythia-2.8b,EleutherAI/gpt-j-6b

test_scale.py checks count_params against built models and each term against the flags; on an H100 the
estimate for gpt2-large (30.7 GiB) met the measured peak (30.6 GiB), see the README.
"""
import argparse
import dataclasses
import os
import sys

from data import InputError
from machinery.hf import config_from_hf, random_config
from model import GPTConfig

KNOWN_SHAPES = {  # from the models' config.json, so that the estimate needs no download
    "EleutherAI/pythia-2.8b": dict(n_layer=32, n_embd=2560, n_head=32, vocab_size=50304, n_inner=10240,
                                   pos_embedding="rotary", parallel_residual=True, tie_word_embeddings=False),
    "EleutherAI/gpt-j-6b": dict(n_layer=28, n_embd=4096, n_head=16, vocab_size=50400, n_inner=16384,
                                pos_embedding="rotary", parallel_residual=True, shared_layernorm=True,
                                attn_bias=False, lm_head_bias=True, tie_word_embeddings=False),
}
CARDS_GB = (24, 40, 80)  # GPU memory sizes (GiB) the verdicts are given for
GiB = 2 ** 30


def model_shape(spec):
    """The shape of --model without loading or downloading anything: a GPT-2 size (gpt2, gpt2-medium,
    gpt2-large, gpt2-xl, with or without openai-community/), a KNOWN_SHAPES name (with or without the
    EleutherAI/ prefix), random:L,H,C, or a local folder or config.json (config_from_hf).
    Returns a GPTConfig, or for KNOWN_SHAPES a namespace with the same field names."""
    name = spec.removeprefix("openai-community/")
    if name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"):
        return GPTConfig.named(name)
    for known, shape in KNOWN_SHAPES.items():
        if spec in (known, known.split("/")[1]):
            return argparse.Namespace(**shape)
    if spec.startswith("random:"):
        return random_config(spec)
    path = spec if spec.endswith(".json") else os.path.join(spec, "config.json")
    if os.path.exists(path):
        return config_from_hf(path)
    raise InputError(f"--estimate-memory --model {spec}: no shape known without a download; use gpt2, gpt2-medium, "
                     f"gpt2-large, gpt2-xl, {', '.join(KNOWN_SHAPES)}, random:L,H,C or a folder with config.json")


def count_params(c):
    """Parameters of GPT(c), counted from the shape (equal to GPT(c).num_params(), tested): token (and
    learned position) embeddings, per block the LayerNorm(s), attention (c_attn C x 3C, c_proj C x C) and
    MLP (c_fc C x I, c_proj I x C) with their biases, the final LayerNorm and an untied output head; for an
    EncoderConfig, RobertaClassifier(c)'s (machinery/roberta.py: token types, embedding LayerNorm, no final
    LayerNorm, a classification head). Reads flags with getattr, so a namespace of the main shape fields is enough."""
    C, L, V = c.n_embd, c.n_layer, c.vocab_size
    I = getattr(c, "n_inner", None) or 4 * C
    bias = getattr(c, "bias", True)
    attn_bias = bias if getattr(c, "attn_bias", None) is None else c.attn_bias
    ln = 2 * C if bias else C                                              # LayerNorm weight (+ bias)
    block = (1 if getattr(c, "shared_layernorm", False) else 2) * ln
    block += 4 * C * C + (4 * C if attn_bias else 0)                       # attention
    block += 2 * C * I + (I + C if bias else 0)                            # MLP
    n = V * C + L * block                                                  # token embedding, blocks
    if getattr(c, "pos_embedding", "learned") == "learned":
        n += getattr(c, "block_size", 1024) * C                            # learned positions
    n += getattr(c, "type_vocab_size", 0) * C + (ln if getattr(c, "embedding_layernorm", False) else 0)
    n += 0 if getattr(c, "post_layernorm", False) else ln                  # final LayerNorm
    labels = getattr(c, "num_labels", 0)
    if labels:                                                             # classification head instead of lm_head
        n += C * C + C + C * labels + labels
    elif not getattr(c, "tie_word_embeddings", True):
        n += V * C + (V if getattr(c, "lm_head_bias", False) else 0)       # untied output head
    return n


def estimate_memory(model, cfg, world_size=1):
    """Bytes a DPO run holds on each GPU at its peak, by arithmetic. model: a GPTConfig (or namespace) or a
    --model spec for model_shape; cfg: a TrainConfig. Returns a dict of the terms (bytes), "total", and
    "fits" {card GiB: bool}. Assumptions, stated so that they can be checked against a measurement:

      weights      every parameter in --weights-dtype (LoRA adds its float32 adapters)
      gradients    one per trained parameter, in its dtype (LoRA: the float32 adapters only)
      optimizer    RMSprop 1 state tensor per trained parameter (square_avg), AdamW 2 (exp_avg, exp_avg_sq),
                   in the trained parameters' dtype: torch keeps optimiser state in the parameter's dtype
      reference    a second model, unless --precompute-ref (one pass, then freed) or LoRA (the adapters off)
      autocast     bf16 copies of float32 matmul weights, kept for backward (with --grad-checkpoint: one block)
      activations  per block and token, the tensors backward needs: 8C + 2I values (LayerNorm inputs and
                   outputs, q, k, v, the attention output, MLP input, pre- and post-GELU), 2 bytes under bf16
                   autocast; attention scores are not stored (fused attention on a GPU). --grad-checkpoint
                   keeps each block's input (C values) plus one block recomputed in backward
      head         logits only on response tokens, at most max_length - max_prompt_length per row of a
                   truncated pair: float32 log-softmax input and its float32 gradient plus the bf16 output
      FSDP         weights, gradients, optimiser state and reference divided by the processes, plus two
                   gathered blocks (the running one and the prefetched one)
    Not counted: the CUDA context and allocator slack (a card "fits" when the total is <= 90% of it)."""
    c = model_shape(model) if isinstance(model, str) else model
    L, C, V = c.n_layer, c.n_embd, c.vocab_size
    I = getattr(c, "n_inner", None) or 4 * C
    P = count_params(c)
    lora = cfg.lora_rank > 0
    trainable = L * cfg.lora_rank * (8 * C + 2 * I) if lora else P  # A (r, in) + B (out, r) on the 4 projections
    w = 2 if cfg.weights_dtype == "bfloat16" else 4
    t = 4 if lora else w                                   # bytes of a trained parameter (and its grad and state)
    a = 4 if cfg.dtype == "float32" else 2                 # activations: bf16 autocast on a GPU ("auto")
    shards = world_size if cfg.fsdp else 1
    states = 2 if cfg.optimizer == "adamw" else 1
    block_matmul = 4 * C * C + 2 * C * I                   # weights of one block that go through a matmul
    rows, T = 2 * cfg.micro_batch_size, cfg.max_length
    response = cfg.max_length - cfg.max_prompt_length
    per_layer = rows * T * (8 * C + 2 * I) * a
    est = {
        "params": P, "trainable": trainable,
        "weights": P * w / shards + (trainable * 4 if lora else 0),
        "gradients": trainable * t / (1 if lora else shards),
        "optimizer": states * trainable * t / (1 if lora else shards),
        "reference": 0 if cfg.precompute_ref or lora else P * w / shards,
        "autocast": 0 if a >= w else 2 * ((1 if cfg.grad_checkpoint else L) * block_matmul + V * C),
        "activations": (L * rows * T * C * a + per_layer) if cfg.grad_checkpoint else L * per_layer,
        "head": rows * response * V * (4 + 4 + a),
        "fsdp_gathered": 2 * (P - V * C) / L * w if cfg.fsdp and world_size > 1 else 0,
        "per_layer": per_layer, "optimizer_dtype": "float32" if t == 4 else "bfloat16", "states": states,
    }
    est["total"] = sum(est[k] for k in ("weights", "gradients", "optimizer", "reference", "autocast", "activations",
                                        "head", "fsdp_gathered"))
    est["fits"] = {gb: est["total"] <= 0.9 * gb * GiB for gb in CARDS_GB}
    return est


def describe_shape(c):
    I = getattr(c, "n_inner", None) or 4 * c.n_embd
    tied = "tied" if getattr(c, "tie_word_embeddings", True) else "untied"
    return (f"{c.n_layer} layers, {c.n_embd} channels, {c.n_head} heads, MLP {I}, vocabulary {c.vocab_size}, "
            f"{tied} head: {count_params(c) / 1e9:.3f}B parameters")


def main(cfg, check_config):
    """`python dpo.py --estimate-memory ...`: the flags checked (dpo.check_config, passed in), then the report."""
    try:
        check_config(dataclasses.replace(cfg, device="auto"))
        print(memory_report(cfg))
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def memory_report(cfg):
    """The --estimate-memory text: every term for --model and these flags, then the settings table.
    A comma-separated --model gives the table alone, one block of rows per model. Under WORLD_SIZE=N
    (with --fsdp) the per-GPU figures are for N processes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    specs = [s.strip() for s in cfg.model.split(",") if s.strip()]
    if len(specs) > 1:
        return memory_table(specs, cfg, world)
    c = model_shape(specs[0])
    e = estimate_memory(c, cfg, world)
    other = estimate_memory(c, dataclasses.replace(cfg, grad_checkpoint=not cfg.grad_checkpoint), world)
    g = lambda x: f"{x / GiB:8.2f} GiB"  # noqa: E731
    opt = "RMSprop" if cfg.optimizer == "rmsprop" else "AdamW"
    act = "float32" if cfg.dtype == "float32" else "bfloat16 autocast"
    fsdp = f", sharded over {world} processes (FSDP)" if cfg.fsdp and world > 1 else ""
    lines = [f"memory per GPU for {specs[0]} (arithmetic, not a measurement){fsdp}",
             f"  shape        {describe_shape(c)}",
             f"  weights      {g(e['weights'])}  {cfg.weights_dtype}"
             + (f" + {e['trainable'] / 1e6:.1f}M float32 LoRA parameters (rank {cfg.lora_rank})" if cfg.lora_rank else ""),
             f"  gradients    {g(e['gradients'])}  one per trained parameter, {e['optimizer_dtype']}",
             f"  optimizer    {g(e['optimizer'])}  {opt}: {e['states']} state tensor{'s' * (e['states'] > 1)} per "
             f"trained parameter, "
             f"{e['optimizer_dtype']} (torch keeps the state in the parameter's dtype)",
             f"  reference    {g(e['reference'])}  " + ("the policy with its LoRA adapters off" if cfg.lora_rank else
                                                        "--precompute-ref: one pass, then freed" if cfg.precompute_ref
                                                        else "a second model"),
             f"  autocast     {g(e['autocast'])}  bfloat16 copies of float32 weights kept for backward",
             f"  activations  {g(e['activations'])}  {2 * cfg.micro_batch_size} rows x {cfg.max_length} tokens, "
             f"{e['per_layer'] / 2**20:.0f} MiB a block ({act})"
             + (", --grad-checkpoint: block inputs + one block" if cfg.grad_checkpoint else f" x {c.n_layer} blocks")
             + f" ({'without' if cfg.grad_checkpoint else 'with'} --grad-checkpoint: {other['activations'] / GiB:.2f} GiB)",
             f"  output head  {g(e['head'])}  {2 * cfg.micro_batch_size} rows x {cfg.max_length - cfg.max_prompt_length} "
             f"response tokens x {c.vocab_size} logits"]
    if e["fsdp_gathered"]:
        lines.append(f"  FSDP         {g(e['fsdp_gathered'])}  two gathered blocks")
    lines.append(f"  total        {g(e['total'])}  " + " | ".join(
        f"{gb} GB: {'fits' if ok else 'too big'}" for gb, ok in e["fits"].items()) + "  (fits: <= 90% of the card)")
    if cfg.weights_dtype == "bfloat16" and not cfg.lora_rank:
        lines.append("  note: full fine-tuning of bfloat16 weights rounds away updates below ~0.4% of a weight "
                     f"(lr {cfg.lr:g}); --lora-rank trains float32 adapters instead")
    return "\n".join(lines) + "\n\n" + memory_table(specs, cfg, world)


MEMORY_SETTINGS = (  # from the plainest to the most frugal
    ("float32 weights, reference model", dict()),
    ("float32, --precompute-ref --grad-checkpoint", dict(precompute_ref=True, grad_checkpoint=True)),
    ("bfloat16, --precompute-ref --grad-checkpoint",
     dict(weights_dtype="bfloat16", precompute_ref=True, grad_checkpoint=True)),
    ("LoRA r16 on bfloat16, --grad-checkpoint", dict(weights_dtype="bfloat16", lora_rank=16, grad_checkpoint=True)),
)


def memory_table(specs, cfg, world_size=1):
    """A markdown table: for each model, the total per GPU under each of MEMORY_SETTINGS (which set the weights
    dtype, reference, checkpointing and LoRA; the rest of cfg as given: optimiser, micro-batch, lengths) and
    whether it fits a 24, 40 and 80 GB card."""
    lines = [f"{cfg.optimizer}, micro-batch {cfg.micro_batch_size} pairs ({2 * cfg.micro_batch_size} rows) x "
             f"{cfg.max_length} tokens, {cfg.max_length - cfg.max_prompt_length} response tokens a row, bf16 autocast:",
             "", "| model | parameters | settings | GiB per GPU | " + " | ".join(f"{gb} GB" for gb in CARDS_GB) + " |",
             "|---|---|---|---|" + "---|" * len(CARDS_GB)]
    for spec in specs:
        c = model_shape(spec)
        for label, change in MEMORY_SETTINGS:
            plain = dict(weights_dtype="float32", precompute_ref=False, grad_checkpoint=False, lora_rank=0)
            e = estimate_memory(c, dataclasses.replace(cfg, **{**plain, **change}), world_size)
            lines.append(f"| {spec} | {count_params(c) / 1e9:.2f}B | {label} | {e['total'] / GiB:.1f} | "
                         + " | ".join("yes" if ok else "no" for ok in e["fits"].values()) + " |")
    return "\n".join(lines)
