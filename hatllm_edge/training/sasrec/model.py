"""SASRec, the model: item and position embeddings, causal self-attention blocks, the shared output table."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from hatllm_edge.core.errors import InputError
from hatllm_edge.ranking.assistant import PAD

_MASKED = -1e9  # additive attention bias of a masked key (finite: no NaN, exact zero weight in fp32)




@dataclass(frozen=True)
class SASRecConfig:
    """The architecture."""

    num_items: int
    max_len: int = 50
    hidden: int = 64
    heads: int = 1
    blocks: int = 2
    dropout: float = 0.2

    def __post_init__(self) -> None:
        if self.num_items < 1 or self.max_len < 1 or self.blocks < 1:
            raise InputError(f"SASRec: num_items, max_len and blocks must be >= 1 ({self})")
        if self.hidden % self.heads:
            raise InputError(f"SASRec: hidden {self.hidden} is not a multiple of heads {self.heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise InputError(f"SASRec: dropout {self.dropout} not in [0, 1)")


class _Block(nn.Module):
    """Pre-LayerNorm causal self-attention + ReLU feed-forward, residual around each."""

    def __init__(self, hidden: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.attn_norm = nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)
        self.ffn_norm = nn.LayerNorm(hidden)
        self.ffn_in = nn.Linear(hidden, hidden)
        self.ffn_out = nn.Linear(hidden, hidden)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, n, h = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        att = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(self.head_dim)) + bias
        att = self.drop(torch.softmax(att, dim=-1))
        y = torch.matmul(att, v).transpose(1, 2).reshape(b, n, h)
        x = x + self.drop(self.out(y))
        return x + self.drop(self.ffn_out(self.drop(F.relu(self.ffn_in(self.ffn_norm(x))))))


class SASRec(nn.Module):
    def __init__(self, cfg: SASRecConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.item_emb = nn.Embedding(cfg.num_items + 1, cfg.hidden, padding_idx=PAD)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.hidden)
        self.emb_drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(_Block(cfg.hidden, cfg.heads, cfg.dropout) for _ in range(cfg.blocks))
        self.norm = nn.LayerNorm(cfg.hidden)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
            if m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()

    def encode(self, item_ids: torch.Tensor) -> torch.Tensor:
        """[B, L] left-padded ids -> [B, L'] hidden states, L' = min(L, max_len) (last columns)."""
        cfg = self.cfg
        seq = item_ids[:, -cfg.max_len :]
        n = seq.shape[1]
        idx = torch.arange(n, device=seq.device)
        pos = idx + (cfg.max_len - n)  # right-aligned: the newest item is always position max_len - 1
        x = self.item_emb(seq) * math.sqrt(cfg.hidden) + self.pos_emb(pos)[None]
        x = self.emb_drop(x)
        # key j visible to query i: j <= i and j is an item; every position sees itself, so a
        # padded row never has all keys masked (its output is unused; real rows never see it)
        keep = (idx[None, :] <= idx[:, None])[None] & (seq != PAD)[:, None, :]
        keep = keep | (idx[None, :] == idx[:, None])[None]
        bias = torch.zeros(keep.shape, dtype=x.dtype, device=x.device).masked_fill(~keep, _MASKED)[:, None]
        for block in self.blocks:
            x = block(x, bias)
        return self.norm(x)

    def item_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., H] -> [..., num_items] (catalog order; the padding row is not a candidate)."""
        return torch.matmul(hidden, self.item_emb.weight[1:].t())

    def next_item_log_probs(self, item_ids: torch.Tensor) -> torch.Tensor:
        """[B, L] left-padded histories -> [B, num_items] log-probabilities of the next item."""
        return torch.log_softmax(self.item_logits(self.encode(item_ids)[:, -1]), dim=-1)

    def forward(self, item_ids: torch.Tensor) -> torch.Tensor:
        return self.next_item_log_probs(item_ids)
