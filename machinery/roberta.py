"""The RoBERTa sequence classifier (Liu et al. 2019, arXiv:1907.11692): a bidirectional, post-LayerNorm encoder
with a classification head on the first token <s>, as transformers' RobertaForSequenceClassification. It is
used for one thing: the paper's IMDb ground-truth reward, siebert/sentiment-roberta-large-english, scored by
eval.RobertaReward under `python dpo.py --task imdb --reward siebert`.

It is built from model.py's Attention and MLP (imported from model); what differs from GPT-2 is here:
learned positions offset by pos_offset, a token-type embedding, a LayerNorm on the embeddings, no causal mask,
LayerNorm after each residual sum (EncoderBlock), and the head out_proj(tanh(dense(h_0))) instead of an
output head. Checkpoints are read and written by machinery/hf.py (ROBERTA_KEYS: our parameter names are GPT-2's
plus wtt, ln_e, cls_dense, cls_proj). test_arch.py (test_logits_match_transformers and its round trip through
save_pretrained, on the "roberta" fixture) and test_tokenizers.py (test_roberta_reward_matches_transformers)
check logits and hidden states against transformers on random-initialised checkpoints.
"""
import dataclasses
from typing import ClassVar

import torch
import torch.nn as nn

from model import Attention, MLP


@dataclasses.dataclass
class EncoderConfig:
    """A RoBERTa classifier's shape. The defaults are roberta-base with two labels; config_from_hf
    (machinery/hf.py) reads them from config.json. The class constants are what model.Attention and
    model.MLP read, and the facts of the architecture (machinery/memory.py's count_params reads them too)."""
    vocab_size: int = 50265
    block_size: int = 514           # learned position table size (pos_offset included)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_inner: int | None = None      # MLP width; None means 4 * n_embd
    dropout: float = 0.0            # used as a frozen reward: no dropout
    layer_norm_eps: float = 1e-5
    activation: str = "gelu"        # exact GELU ("gelu_new" for the tanh approximation)
    type_vocab_size: int = 1        # token-type (segment) table; type 0 is added to every token
    pos_offset: int = 2             # learned position of token t is t + pos_offset (padding_idx + 1)
    pad_token_id: int | None = 1    # classify() masks this token when no attention_mask is given
    num_labels: int = 2
    labels: tuple = ()              # optional names of the num_labels classes (Hugging Face id2label)

    model_type: ClassVar[str] = "roberta"  # the Hugging Face layout save_pretrained writes
    causal: ClassVar[bool] = False          # bidirectional attention
    post_layernorm: ClassVar[bool] = True   # LayerNorm after each residual sum, no final LayerNorm
    embedding_layernorm: ClassVar[bool] = True
    bias: ClassVar[bool] = True             # biases everywhere (MLP and LayerNorms read this)
    attn_bias: ClassVar[bool] = True        # (Attention reads this)
    rotary_interleaved: ClassVar[bool] = False  # (Attention reads this; no rotary embeddings here)

    def __post_init__(self):
        def need(ok, msg):
            if not ok:
                raise ValueError(msg)
        need(self.n_embd % self.n_head == 0, f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        need(self.activation in ("gelu_new", "gelu"),
             f"activation {self.activation!r} is not supported ('gelu_new' or 'gelu')")
        need(0 <= self.pos_offset < self.block_size, f"pos_offset {self.pos_offset} must lie in [0, block_size)")
        need(self.num_labels >= 1, f"num_labels {self.num_labels} must be >= 1")
        self.labels = tuple(self.labels)
        need(not self.labels or len(self.labels) == self.num_labels,
             f"{len(self.labels)} labels for num_labels {self.num_labels}")


class EncoderBlock(nn.Module):
    """Post-LayerNorm (BERT/RoBERTa): x = ln_1(x + attn(x)); x = ln_2(x + mlp(x))."""

    def __init__(self, config, layer):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)  # after the attention sum
        self.attn = Attention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)  # after the MLP sum
        self.mlp = MLP(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x, mask):
        x = self.ln_1(x + self.drop(self.attn(x, mask)))
        return self.ln_2(x + self.drop(self.mlp(x)))


class RobertaClassifier(nn.Module):
    lm_head = None  # an encoder has no language-model head: classify() is its output

    def __init__(self, config):
        super().__init__()
        self.config = c = config
        C = c.n_embd
        self.wte = nn.Embedding(c.vocab_size, C)
        self.wpe = nn.Embedding(c.block_size, C)
        self.wtt = nn.Embedding(c.type_vocab_size, C)  # token types; only type 0 is used
        self.ln_e = nn.LayerNorm(C, eps=c.layer_norm_eps)
        self.drop = nn.Dropout(c.dropout)
        self.h = nn.ModuleList(EncoderBlock(c, i) for i in range(c.n_layer))
        self.cls_dense = nn.Linear(C, C)  # classification head, see classify
        self.cls_proj = nn.Linear(C, c.num_labels)
        for m in self.modules():  # BERT's init (checkpoints overwrite it)
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, idx, attention_mask=None, return_hidden=False):
        """The encoder's final hidden states (B, T, C) for idx (B, T), with return_hidden=True (GPT.forward's
        flag: this model has no logits per token). attention_mask (B, T), 1 = real token, 0 = padding: padded keys
        are masked and positions count real tokens only (pos_offset + 0 for the first), as transformers counts them."""
        if not return_hidden:
            raise ValueError("this model has a classification head, not a language-model head: use classify(), "
                             "or forward(..., return_hidden=True) for the hidden states")
        B, T = idx.shape
        c = self.config
        if T + c.pos_offset > c.block_size:
            raise ValueError(f"sequence of {T} tokens exceeds block_size {c.block_size} - pos_offset {c.pos_offset}")
        if attention_mask is not None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
        else:
            position_ids = torch.arange(T, device=idx.device).unsqueeze(0)  # (1, T)
        x = self.wte(idx) + self.wtt.weight[0] + self.wpe(position_ids + c.pos_offset)  # (B, T, C)
        x = self.drop(self.ln_e(x))
        mask = False  # no mask: every token sees every token
        if attention_mask is not None:
            # padded keys masked; every query keeps itself, so a padded query never has an all-masked row
            eye = torch.eye(T, dtype=torch.bool, device=idx.device)
            mask = (attention_mask[:, None, None, :].bool() | eye).expand(B, 1, T, T)
        for block in self.h:
            x = block(x, mask)
        return x

    def classify(self, idx, attention_mask=None):
        """Sequence-classification logits (B, num_labels) from the first token (<s>) of each row of idx (B, T):
        out_proj(tanh(dense(h_0))), as RobertaForSequenceClassification. Pad on the right; attention_mask
        (B, T) masks the padding as keys (default: idx != config.pad_token_id)."""
        if attention_mask is None and self.config.pad_token_id is not None:
            attention_mask = (idx != self.config.pad_token_id).long()
        first = self(idx, attention_mask=attention_mask, return_hidden=True)[:, 0]  # (B, C) the hidden state of <s>
        return self.cls_proj(self.drop(torch.tanh(self.cls_dense(self.drop(first)))))  # (B, num_labels)
