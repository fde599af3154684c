"""Hugging Face checkpoints by hand: config.json dialects (GPT-2, GPT-J, GPT-NeoX/Pythia, RoBERTa), the key tables
from their parameter names to ours, and the loaders that build a GPT (for RoBERTa, machinery/roberta.py's
RobertaClassifier) from a checkpoint folder or hub name and write one back. No `transformers` import:
test_model.py and test_arch.py compare our logits with transformers' on random-initialised checkpoints saved
by its save_pretrained, and ours load back in transformers.

    python -c "from machinery.hf import from_pretrained; print(from_pretrained('gpt2').config)"

Reached from the scripts through from_pretrained, save_pretrained and load_model; model.py imports none of it.
"""
import dataclasses
import json
import os
import re
import shutil

import torch

from data import InputError
from machinery.hub import WEIGHT_FILES, read_json, resolve_checkpoint
from machinery.integrity import check_finite, verify_digest, write_digest
from machinery.roberta import EncoderConfig, RobertaClassifier
from machinery.safetensors import load_safetensors, save_safetensors
from model import GPT, GPTConfig


def from_pretrained(name_or_dir, dtype=torch.float32, device="cpu", fix=None):
    """Loads a GPT-2, GPT-J, GPT-NeoX (Pythia) or RoBERTa-classifier checkpoint in the Hugging Face layout.

    name_or_dir: a local folder with config.json and model.safetensors (or a sharded
    model.safetensors.index.json, or pytorch_model.bin and its index), or a hub name such as
    'gpt2' or 'openai-community/gpt2-large', downloaded once into $DPO_CACHE/hub. The weights are
    read shard by shard from a memory map straight into `dtype` on `device`, so a checkpoint is
    never held in memory twice. Returns a GPT, or a RobertaClassifier (machinery/roberta.py) for model_type roberta.
    A folder we wrote carries digest.json: a changed byte, or a non-finite weight, is refused in one line ending in
    `fix`, what to do.
    """
    folder = resolve_checkpoint(name_or_dir)
    fix = fix or f"delete {folder} (a rerun of its stage computes it again) or restore it from a good copy"
    verify_digest(folder, fix)
    config = config_from_hf(os.path.join(folder, "config.json"))
    with torch.device("meta"):
        model = RobertaClassifier(config) if isinstance(config, EncoderConfig) else GPT(config)
    model.to_empty(device=device)
    if dtype != torch.float32:
        model._apply(lambda t: t.to(dtype) if t.is_floating_point() else t)  # still empty: no copy of weights
    if isinstance(config, GPTConfig) and config.tie_word_embeddings:
        model.lm_head.weight = model.wte.weight  # to_empty/_apply allocate each name separately: tie again
    expected = dict(model.named_parameters())  # the tied lm_head.weight appears once, as wte.weight
    loaded = {}  # our name -> elements copied (GPT-J's q, k, v each fill a third of c_attn)
    for file in checkpoint_files(folder):
        for hf_name, tensor in read_tensors(file).items():
            name, kind = hf_to_ours(hf_name, config, file)
            if name is None:
                continue
            param = expected[name]
            target = param.chunk(3)["qkv".index(kind)] if kind in ("q", "k", "v") else param  # a view
            tensor = tensor.t() if kind == "T" else tensor
            if tuple(tensor.shape) != tuple(target.shape):
                raise InputError(f"{file}: {hf_name} has shape {tuple(tensor.shape)} but the model built "
                                 f"from config.json expects {tuple(target.shape)}: the checkpoint and "
                                 f"config.json belong to different models")
            with torch.no_grad():
                target.copy_(_hf_layout(tensor, kind, config.n_head, to_hf=False) if kind == "qkv_heads" else tensor)
            loaded[name] = loaded.get(name, 0) + tensor.numel()
    missing = [n for n, p in expected.items() if loaded.get(n, 0) < p.numel()]
    if missing:
        raise InputError(f"{folder}: checkpoint lacks {len(missing)} weights, e.g. {', '.join(missing[:3])}; the "
                         f"download is incomplete or the checkpoint is not a {ARCHS[config.model_type][0]} model")
    check_finite(model.named_parameters(), folder, fix)
    return model.eval()

def save_pretrained(model, folder):
    """config.json + model.safetensors in the Hugging Face layout of config.model_type (GPT2LMHeadModel,
    GPTJForCausalLM, GPTNeoXForCausalLM or RobertaForSequenceClassification loads it).
    Atomic: written into a temporary folder that replaces `folder` at the end, with digest.json (integrity.py)
    written last and checked by from_pretrained."""
    config_json = config_to_hf(model.config, next(model.parameters()).dtype)  # first: raises on a bad config
    tmp, old = folder.rstrip("/") + ".tmp", folder.rstrip("/") + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    tensors = {hf_name: t for name, p in model.named_parameters() for hf_name, t in ours_to_hf(name, p, model.config)}
    save_safetensors(tensors, os.path.join(tmp, "model.safetensors"))
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(config_json, f, indent=2)
    write_digest(tmp)
    if os.path.exists(folder):
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def random_config(spec):
    """GPTConfig of a random:LAYERS,HEADS,CHANNELS model spec."""
    try:
        n_layer, n_head, n_embd = (int(v) for v in spec[len("random:"):].split(","))
    except ValueError:
        raise InputError(f"--model {spec}: write random:LAYERS,HEADS,CHANNELS, e.g. random:2,2,64") from None
    if min(n_layer, n_head, n_embd) < 1 or n_embd % n_head:
        raise InputError(f"--model {spec}: layers, heads and channels must be >= 1 and the channels a multiple "
                         f"of the heads, e.g. random:2,2,64")
    return GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd)


def load_model(spec, device, seed=0, dtype=torch.float32):
    """A hub name, a folder, or random:L,H,C (random weights, seeded), with its weights in `dtype` on `device`.
    Checkpoints are read shard by shard straight into `dtype` (GPT.from_pretrained): never a float32 copy."""
    if spec.startswith("random:"):
        config = random_config(spec)
        torch.manual_seed(seed)
        return GPT(config).to(device=device, dtype=dtype)
    return from_pretrained(spec, dtype=dtype, device=device)


def checkpoint_files(folder):
    """The weight files of a checkpoint folder, in the order Hugging Face prefers them."""
    for weights in WEIGHT_FILES:
        path = os.path.join(folder, weights)
        if os.path.exists(path):
            if weights.endswith(".index.json"):
                return [os.path.join(folder, s) for s in sorted(set(read_json(path)["weight_map"].values()))]
            return [path]
    raise InputError(f"{folder}: no model.safetensors or pytorch_model.bin (or their .index.json); "
                     f"copy the weights from the model's hub page into this folder")


def read_tensors(path):
    """{name: tensor} of one weight file (.safetensors by hand, .bin with torch.load weights_only)."""
    if not os.path.exists(path):
        raise InputError(f"{path}: shard listed in the index is missing; download it again")
    if path.endswith(".safetensors"):
        return load_safetensors(path)
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as e:
        raise InputError(f"{path}: cannot read PyTorch checkpoint ({str(e).splitlines()[0]}); download it again") from None


def config_from_hf(path):
    """GPTConfig from a Hugging Face config.json of model_type gpt2, gptj or gpt_neox (GPT-NeoX, Pythia); an
    EncoderConfig (machinery/roberta.py) for roberta (RobertaForSequenceClassification). Unsupported settings
    raise InputError naming the file."""
    hf = read_json(path)
    if not isinstance(hf, dict):
        raise InputError(f"{path}: expected a JSON object of settings; copy config.json from the model's hub page")
    if hf.get("model_type") not in ARCHS:
        raise InputError(f"{path}: model_type {hf.get('model_type')!r} is not supported; pass a GPT-2 checkpoint "
                         f"(model_type gpt2) or a GPT-J (gptj), GPT-NeoX/Pythia (gpt_neox) or RoBERTa classifier (roberta) one")
    try:
        return _config_from_dict(hf, path)
    except InputError:
        raise
    except ValueError as e:  # the config's own checks, e.g. rotary_dim larger than the head
        raise InputError(f"{path}: {e}") from None


def _config_from_dict(hf, path):
    def ints(*keys):
        missing = [k for k in keys if not isinstance(hf.get(k), int)]
        if missing:
            raise InputError(f"{path}: no integer {', '.join(missing)}; copy config.json from the model's hub page")
        return [hf[k] for k in keys]

    def unsupported(bad, what, allowed=""):
        if bad:
            raise InputError(f"{path}: {what} is not supported" + (f" ({allowed})" if allowed else ""))

    def activation(key, default):
        act = hf.get(key, default)
        unsupported(act not in ("gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast"), f"{key} {act!r}", "gelu or gelu_new")
        return "gelu" if act == "gelu" else "gelu_new"  # the others are the same tanh approximation

    mt = hf["model_type"]
    if mt == "gpt2":
        unsupported(hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"),
                    "scale_attn_by_inverse_layer_idx/reorder_and_upcast_attn")
        V, L, H, C = ints("vocab_size", "n_layer", "n_head", "n_embd")
        return GPTConfig(vocab_size=V, block_size=hf.get("n_positions", 1024), n_layer=L, n_head=H, n_embd=C,
                         n_inner=hf.get("n_inner"), layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                         activation=activation("activation_function", "gelu_new"),
                         tie_word_embeddings=hf.get("tie_word_embeddings", True))
    if mt == "gptj":  # rotary (interleaved pairs) on rotary_dim dims, one LayerNorm for a parallel block
        V, L, H, C = ints("vocab_size", "n_layer", "n_head", "n_embd")
        return GPTConfig(model_type=mt, vocab_size=V, block_size=hf.get("n_positions", 2048), n_layer=L, n_head=H,
                         n_embd=C, n_inner=hf.get("n_inner"), layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                         activation=activation("activation_function", "gelu_new"), pos_embedding="rotary",
                         rotary_dim=hf.get("rotary_dim", 64), rotary_interleaved=True, parallel_residual=True,
                         shared_layernorm=True, attn_bias=False, lm_head_bias=True,
                         tie_word_embeddings=hf.get("tie_word_embeddings", False))
    if mt == "gpt_neox":  # rotary (rotate-half pairs) on rotary_pct of each head, fused per-head qkv
        V, L, H, C, inner = ints("vocab_size", "num_hidden_layers", "num_attention_heads", "hidden_size",
                                 "intermediate_size")
        # transformers >= 5 writes rope_parameters {rope_theta, partial_rotary_factor} (it wins, as in transformers);
        # older files have rotary_emb_base and rotary_pct
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        kind = rope.get("rope_type", rope.get("type", "default"))
        unsupported(kind != "default", f"rope_type {kind!r}", "only unscaled rotary embeddings")
        unsupported(hf.get("head_dim") not in (None, C // H),
                    f"head_dim {hf.get('head_dim')} != hidden_size / num_attention_heads")
        theta = rope.get("rope_theta", hf.get("rotary_emb_base", hf.get("rope_theta", 10000)))
        pct = rope.get("partial_rotary_factor", hf.get("rotary_pct", hf.get("partial_rotary_factor", 0.25)))
        return GPTConfig(model_type=mt, vocab_size=V, block_size=hf.get("max_position_embeddings", 2048), n_layer=L,
                         n_head=H, n_embd=C, n_inner=inner, layer_norm_eps=hf.get("layer_norm_eps", 1e-5),
                         activation=activation("hidden_act", "gelu"), pos_embedding="rotary",
                         rotary_dim=int(C // H * pct), rotary_base=float(theta),
                         parallel_residual=hf.get("use_parallel_residual", True), attn_bias=hf.get("attention_bias", True),
                         tie_word_embeddings=hf.get("tie_word_embeddings", False))
    # roberta: a bidirectional post-LayerNorm encoder with a classification head on <s>
    archs = hf.get("architectures") or ["RobertaForSequenceClassification"]
    unsupported(archs != ["RobertaForSequenceClassification"], f"architectures {archs}",
                "only RobertaForSequenceClassification")
    unsupported(hf.get("is_decoder") or hf.get("add_cross_attention"), "a RoBERTa decoder (is_decoder, add_cross_attention)")
    unsupported(hf.get("position_embedding_type", "absolute") != "absolute",
                f"position_embedding_type {hf.get('position_embedding_type')!r}", "only absolute")
    V, L, H, C, inner, pad = ints("vocab_size", "num_hidden_layers", "num_attention_heads", "hidden_size",
                                  "intermediate_size", "pad_token_id")
    id2label = hf.get("id2label") or {}
    labels = tuple(str(id2label[k]) for k in sorted(id2label, key=int))
    num_labels = hf.get("num_labels") or len(labels) or 2  # transformers' default is 2
    return EncoderConfig(vocab_size=V, block_size=hf.get("max_position_embeddings", 512), n_layer=L, n_head=H,
                         n_embd=C, n_inner=inner, layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
                         activation=activation("hidden_act", "gelu"), type_vocab_size=hf.get("type_vocab_size", 2),
                         pos_offset=pad + 1, pad_token_id=pad, num_labels=num_labels,
                         labels=labels if len(labels) == num_labels else ())


def config_to_hf(config, dtype=torch.float32):
    """The config.json of config.model_type's Hugging Face layout. Raises ValueError when the flags are not
    that architecture's (e.g. a GPT-2 with parallel_residual): transformers would load it as a different model."""
    c, hs = config, config.n_embd // config.n_head
    drop, dt = c.dropout, str(dtype).removeprefix("torch.")
    tied = getattr(c, "tie_word_embeddings", False)  # an EncoderConfig has no output head to tie
    if isinstance(c, EncoderConfig):
        labels = c.labels or tuple(f"LABEL_{i}" for i in range(c.num_labels))
        hf = {"architectures": ["RobertaForSequenceClassification"], "model_type": "roberta", "vocab_size": c.vocab_size,
              "max_position_embeddings": c.block_size, "num_hidden_layers": c.n_layer, "num_attention_heads": c.n_head,
              "hidden_size": c.n_embd, "intermediate_size": c.n_inner or 4 * c.n_embd, "hidden_act": c.activation,
              "layer_norm_eps": c.layer_norm_eps, "type_vocab_size": c.type_vocab_size, "pad_token_id": c.pad_token_id,
              "bos_token_id": 0, "eos_token_id": 2, "position_embedding_type": "absolute",
              "id2label": dict(enumerate(labels)), "label2id": {n: i for i, n in enumerate(labels)},
              "hidden_dropout_prob": drop, "attention_probs_dropout_prob": drop, "torch_dtype": dt}
    elif c.model_type in ("gpt2", "gptj"):  # GPT-J's config.json is GPT-2's, plus rotary_dim
        gptj = c.model_type == "gptj"
        hf = {"architectures": ["GPTJForCausalLM" if gptj else "GPT2LMHeadModel"], "model_type": c.model_type,
              "vocab_size": c.vocab_size, "n_positions": c.block_size, "n_layer": c.n_layer, "n_head": c.n_head,
              "n_embd": c.n_embd, "n_inner": c.n_inner, "activation_function": c.activation,
              "layer_norm_epsilon": c.layer_norm_eps, "resid_pdrop": drop, "embd_pdrop": drop, "attn_pdrop": drop,
              "tie_word_embeddings": tied, "bos_token_id": 50256, "eos_token_id": 50256, "torch_dtype": dt,
              **({"rotary_dim": c.rotary_dim} if gptj else {"n_ctx": c.block_size})}
    elif c.model_type == "gpt_neox":
        pct = (c.rotary_dim or 0) / hs
        hf = {"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "vocab_size": c.vocab_size,
              "max_position_embeddings": c.block_size, "num_hidden_layers": c.n_layer,
              "num_attention_heads": c.n_head, "hidden_size": c.n_embd, "intermediate_size": c.n_inner or 4 * c.n_embd,
              "hidden_act": c.activation, "layer_norm_eps": c.layer_norm_eps, "use_parallel_residual": c.parallel_residual,
              "attention_bias": c.attn_bias, "rope_parameters": {"rope_type": "default", "rope_theta": c.rotary_base,
                                                                 "partial_rotary_factor": pct},
              "rotary_pct": pct, "rotary_emb_base": c.rotary_base,  # the keys of transformers < 5
              "attention_dropout": drop, "hidden_dropout": drop, "tie_word_embeddings": tied, "torch_dtype": dt}
    # the file must describe this very model: read it back and compare (dropout and label names aside)
    def norm(x):
        x = dataclasses.replace(x, dropout=0.0, n_inner=x.n_inner or 4 * x.n_embd)
        return dataclasses.replace(x, labels=()) if isinstance(x, EncoderConfig) else x
    try:
        back = _config_from_dict(hf, "config")
    except ValueError as e:
        raise ValueError(f"cannot write a {c.model_type} config.json: {e}") from None
    diff = [f"{f.name}={getattr(c, f.name)!r}" for f in dataclasses.fields(c)
            if getattr(norm(back), f.name) != getattr(norm(c), f.name)]
    if diff:
        raise ValueError(f"a {c.model_type} checkpoint cannot express {', '.join(diff)}: set model_type to the "
                         f"architecture these flags describe")
    return hf


# Key tables: Hugging Face name pattern -> (our name pattern, kind), "{}" standing for the layer index. Our names
# follow GPT-2's (llm.c's approach). kind: "" copy; "T" transpose (GPT-2 stores Linears as Conv1D, weight (in, out));
# "q", "k", "v" a third of our fused c_attn rows [q; k; v]; "qkv_heads" GPT-NeoX's fused rows, ordered (nh, 3, hs).
def _keys(*rows):
    def expand(hf, ours, params="weight bias", kind=""):
        return {f"{hf}.{p}": (f"{ours}.{p}", kind) for p in params.split()}
    return {k: v for row in rows for k, v in expand(*row).items()}


GPT2_KEYS = _keys(
    ("transformer.wte", "wte", "weight"), ("transformer.wpe", "wpe", "weight"), ("transformer.ln_f", "ln_f"),
    ("lm_head", "lm_head", "weight"),  # only in untied checkpoints
    ("transformer.h.{}.ln_1", "h.{}.ln_1"), ("transformer.h.{}.ln_2", "h.{}.ln_2"),
    *[(f"transformer.h.{{}}.{lin}", f"h.{{}}.{lin}", p, kind)  # Conv1D weights: transposed
      for lin in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj") for p, kind in (("weight", "T"), ("bias", ""))])
GPTJ_KEYS = _keys(
    ("transformer.wte", "wte", "weight"), ("transformer.ln_f", "ln_f"), ("lm_head", "lm_head"),
    ("transformer.h.{}.ln_1", "h.{}.ln_1"),
    *[(f"transformer.h.{{}}.attn.{x}_proj", "h.{}.attn.c_attn", "weight", x) for x in "qkv"],
    ("transformer.h.{}.attn.out_proj", "h.{}.attn.c_proj", "weight"),
    ("transformer.h.{}.mlp.fc_in", "h.{}.mlp.c_fc"), ("transformer.h.{}.mlp.fc_out", "h.{}.mlp.c_proj"))
NEOX_KEYS = _keys(
    ("gpt_neox.embed_in", "wte", "weight"), ("gpt_neox.final_layer_norm", "ln_f"), ("embed_out", "lm_head", "weight"),
    ("gpt_neox.layers.{}.input_layernorm", "h.{}.ln_1"), ("gpt_neox.layers.{}.post_attention_layernorm", "h.{}.ln_2"),
    ("gpt_neox.layers.{}.attention.query_key_value", "h.{}.attn.c_attn", "weight bias", "qkv_heads"),
    ("gpt_neox.layers.{}.attention.dense", "h.{}.attn.c_proj"),
    ("gpt_neox.layers.{}.mlp.dense_h_to_4h", "h.{}.mlp.c_fc"), ("gpt_neox.layers.{}.mlp.dense_4h_to_h", "h.{}.mlp.c_proj"))
ROBERTA_KEYS = _keys(
    ("roberta.embeddings.word_embeddings", "wte", "weight"), ("roberta.embeddings.position_embeddings", "wpe", "weight"),
    ("roberta.embeddings.token_type_embeddings", "wtt", "weight"), ("roberta.embeddings.LayerNorm", "ln_e"),
    *[(f"roberta.encoder.layer.{{}}.attention.self.{n}", "h.{}.attn.c_attn", "weight bias", x)
      for n, x in (("query", "q"), ("key", "k"), ("value", "v"))],
    ("roberta.encoder.layer.{}.attention.output.dense", "h.{}.attn.c_proj"),
    ("roberta.encoder.layer.{}.attention.output.LayerNorm", "h.{}.ln_1"),  # post-LN: after the attention sum
    ("roberta.encoder.layer.{}.intermediate.dense", "h.{}.mlp.c_fc"),
    ("roberta.encoder.layer.{}.output.dense", "h.{}.mlp.c_proj"), ("roberta.encoder.layer.{}.output.LayerNorm", "h.{}.ln_2"),
    ("classifier.dense", "cls_dense"), ("classifier.out_proj", "cls_proj"))
_BUFFERS = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)$")  # causal-mask buffers of old GPT-2/GPT-J checkpoints
# model_type -> (name in messages, prefix a base-model checkpoint omits, key table, keys deliberately skipped)
ARCHS = {
    "gpt2": ("GPT-2", "transformer.", GPT2_KEYS, _BUFFERS),
    "gptj": ("GPT-J", "transformer.", GPTJ_KEYS, _BUFFERS),
    "gpt_neox": ("GPT-NeoX", "gpt_neox.", NEOX_KEYS,
                 re.compile(r"layers\.\d+\.attention\.(bias|masked_bias|rotary_emb\.inv_freq)$")),
    "roberta": ("RoBERTa", "roberta.", ROBERTA_KEYS,  # the pooler is unused by the classifier (transformers drops it too)
                re.compile(r"embeddings\.position_ids$|pooler\.dense\.(weight|bias)$")),
}


def hf_to_ours(hf_name, config, file="checkpoint"):
    """Maps one checkpoint key to (our name, kind); (None, None) for keys we deliberately skip; raises on unknown ones."""
    arch, prefix, table, skipped = ARCHS[config.model_type]
    m = re.search(r"\.(\d+)\.", hf_name)
    pattern = f"{hf_name[:m.start()]}.{{}}.{hf_name[m.end():]}" if m else hf_name
    pattern = pattern if pattern in table else prefix + pattern  # GPT2Model-style files lack "transformer."
    if skipped.search(hf_name):
        return None, None
    if pattern not in table or (m and int(m.group(1)) >= config.n_layer):
        raise InputError(f"{file}: unknown key {hf_name!r} for a {config.n_layer}-layer {arch}; "
                         f"the checkpoint is from another architecture or config.json does not match it")
    ours, kind = table[pattern]
    if ours == "lm_head.weight" and config.tie_word_embeddings:
        return None, None  # a tied head is the token embedding; its copy in the file is not loaded
    return (ours.format(m.group(1)) if m else ours), kind


def ours_to_hf(name, tensor, config):
    """[(Hugging Face name, tensor in its layout)] for one of our parameters: three for a GPT-J/RoBERTa c_attn."""
    m = re.match(r"h\.(\d+)\.(.*)$", name)
    pattern = f"h.{{}}.{m.group(2)}" if m else name
    out = [(hf.format(m.group(1)) if m else hf, _hf_layout(tensor, kind, config.n_head, to_hf=True))
           for hf, (ours, kind) in ARCHS[config.model_type][2].items() if ours == pattern]
    if not out:
        raise KeyError(name)
    return out


def _hf_layout(t, kind, n_head, to_hf):
    """A tensor moved between the Hugging Face layout and ours (see the key tables for `kind`)."""
    if kind == "T":
        return t.t()
    if kind == "qkv_heads":  # rows (nh, 3, hs) in the file, (3, nh, hs) in our c_attn
        return t.unflatten(0, (3, n_head, -1) if to_hf else (n_head, 3, -1)).transpose(0, 1).reshape(t.shape)
    if kind in ("q", "k", "v") and to_hf:
        return t.chunk(3)["qkv".index(kind)]
    return t
