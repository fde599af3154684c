"""What trains, when not everything does: LoRA adapters (Hu et al. 2021, arXiv:2106.09685) and the head-only
mode (--trainable head).

LoRA: y = W x + (alpha / r) B A x with W frozen and only the low-rank A (r, in) and B (out, r) trained. B starts
at zero, so the adapted model starts equal to the base model, and the DPO reference is the same model with its
adapters switched off: no second copy of the weights. test_scale.py checks the merge, the switch and a LoRA run.
"""
import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from data import InputError

LORA_TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # the linear layers of every block


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update:

        y = x W^T + b + (alpha / r) * dropout(x) A^T B^T        W (out, in), A (r, in), B (out, r)

    It keeps the wrapped nn.Linear's own `weight` and `bias` Parameters under the same names, so checkpoint
    keys (h.0.attn.c_attn.weight) do not change; the adapters are `lora_A` and `lora_B`, float32 for bf16 or
    float32 W (float64 for float64 W). A is initialised like an nn.Linear weight (uniform, bound 1/sqrt(in)),
    B to zero (Sec. 4.1)."""

    def __init__(self, linear, rank, alpha, dropout=0.0):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_parameter("weight", linear.weight.requires_grad_(False))
        self.register_parameter("bias", None if linear.bias is None else linear.bias.requires_grad_(False))
        device, dtype = linear.weight.device, torch.promote_types(linear.weight.dtype, torch.float32)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout)
        self.enabled = True  # False: the plain frozen layer (lora_disabled)

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if not self.enabled:
            return y
        a = F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A)  # (..., r)
        return y + (F.linear(a, self.lora_B) * self.scale).to(y.dtype)

    def merged_weight(self):
        """W + (alpha / r) B A, summed in the adapters' dtype (float32 at least), in W's dtype: (out, in)."""
        return (self.weight.to(self.lora_A.dtype) + self.scale * (self.lora_B @ self.lora_A)).to(self.weight.dtype)


def train_only_head(model):
    """Freezes every weight except the output head (lm_head weight, and its bias if any), in place; returns the
    model. With an untied head (the IMDb CPU preset's scratch model) the hidden states then never change, and
    training can only shift each token's logit by a context-dependent amount linear in the (fixed) last hidden
    state. A tied head (GPT-2 checkpoints) is the token embedding, so the hidden states move with it."""
    model.requires_grad_(False)
    model.lm_head.requires_grad_(True)
    return model


def add_lora(model, rank, alpha=None, dropout=0.0, targets=LORA_TARGETS):
    """Freezes every weight of `model` and wraps the `targets` linear layers of every block in LoRALinear
    adapters, in place. alpha defaults to rank (scale 1). Returns the model; only the adapters train."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    model.requires_grad_(False)
    for block in model.h:
        for target in targets:
            parent, name = target.rsplit(".", 1)
            module = block.get_submodule(parent)
            setattr(module, name, LoRALinear(getattr(module, name), rank, rank if alpha is None else alpha, dropout))
    return model


def lora_layers(model):
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def lora_state_dict(model):
    """{name: tensor} of the adapters only (what a LoRA run must save to resume)."""
    return {n: p.detach() for n, p in model.named_parameters() if n.endswith((".lora_A", ".lora_B"))}


def load_lora_state_dict(model, tensors, source="adapters"):
    """Copies saved adapters into a model prepared by add_lora with the same rank; raises InputError on a mismatch."""
    params = lora_state_dict(model)
    if set(tensors) != set(params):
        raise InputError(f"{source}: {len(tensors)} adapter tensors, the model has {len(params)} (e.g. "
                         f"{sorted(set(tensors) ^ set(params))[:2]}); pass the --lora-rank and model it was trained with")
    with torch.no_grad():
        for name, p in params.items():
            if tensors[name].shape != p.shape:
                raise InputError(f"{source}: {name} has shape {tuple(tensors[name].shape)}, the model expects "
                                 f"{tuple(p.shape)}; pass the --lora-rank it was trained with")
            p.copy_(tensors[name])


@contextlib.contextmanager
def lora_disabled(model):
    """Inside the block the model is the frozen base model: every adapter switched off (the DPO reference)."""
    layers = lora_layers(model)
    before = [m.enabled for m in layers]
    for m in layers:
        m.enabled = False
    try:
        yield model
    finally:
        for m, enabled in zip(layers, before):
            m.enabled = enabled


@contextlib.contextmanager
def lora_merged(model, device=None):
    """Inside the block every LoRALinear is replaced by a plain nn.Linear holding W + (alpha / r) B A, so the
    model is an ordinary GPT: save_pretrained writes the merged weights in the Hugging Face layout. The
    adapted layers are put back afterwards, untouched: the merge is a new tensor, never added into W and
    subtracted again (which would round W in bfloat16). device="cpu" builds the merged tensors in host memory."""
    swapped = []
    try:
        for module in list(model.modules()):
            for name, child in list(module.named_children()):
                if isinstance(child, LoRALinear):
                    with torch.device("meta"):
                        plain = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                    with torch.no_grad():
                        merged = child.merged_weight()
                    plain.weight = nn.Parameter(merged.to(device) if device else merged, requires_grad=False)
                    if child.bias is not None:
                        plain.bias = child.bias
                    setattr(module, name, plain)
                    swapped.append((module, name, child))
        yield model
    finally:
        for module, name, child in swapped:
            setattr(module, name, child)