"""The GPT of the research surface: a small, modern nanoGPT.

Rotary position embeddings, RMSNorm without weights, QK-norm, ReLU² MLP, untied
embedding and head, zero-initialised output projections, causal attention through
scaled_dot_product_attention. The norm, rotary, activation and loss go through
`kernels`, whose backend (torch or triton) the harness chooses for the whole run.

The harness never reads the loss from here: it asks for logits and computes the
validation loss itself (bench/evaluator.py).
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels


@dataclass
class GPTConfig:
    vocab_size: int = 4096  # padded up to a multiple of 64 by the model (faster matmuls)
    seq_len: int = 128  # longest sequence the rotary table covers
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128  # head dim = n_embd // n_head
    mlp_ratio: int = 4  # hidden width of the MLP as a multiple of n_embd
    rope_base: float = 10000.0
    logit_softcap: float | None = None  # tanh soft-cap of the logits; None = off


def padded_vocab(vocab_size: int) -> int:
    return (vocab_size + 63) // 64 * 64


class Rotary(nn.Module):
    """cos/sin tables for rotate-halves rotary embeddings, built once, kept in fp32."""

    def __init__(self, head_dim: int, seq_len: int, base: float):
        super().__init__()
        freqs = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), freqs)  # (T, hs/2)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, nh, hs)
        T = x.size(1)
        return kernels.apply_rotary(x, self.cos[:T], self.sin[:T])


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.c_qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.rotary = Rotary(self.head_dim, config.seq_len, config.rope_base)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_qkv(x).view(B, T, 3, self.n_head, self.head_dim).unbind(2)
        # QK-norm keeps attention logits bounded, which allows higher learning rates.
        q, k = kernels.rms_norm(q), kernels.rms_norm(k)
        q, k = self.rotary(q), self.rotary(k)  # (B, T, nh, hs)
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )  # (B, nh, T, hs)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.mlp_ratio * config.n_embd, bias=False)
        self.c_proj = nn.Linear(config.mlp_ratio * config.n_embd, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(kernels.relu_squared(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.attn = CausalSelfAttention(config)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(kernels.rms_norm(x))
        return x + self.mlp(kernels.rms_norm(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        vocab = padded_vocab(config.vocab_size)
        self.wte = nn.Embedding(vocab, config.n_embd)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.lm_head = nn.Linear(config.n_embd, vocab, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                # Uniform with the std of 1/sqrt(fan_in): unit-scale activations.
                bound = 3**0.5 * module.in_features**-0.5
                module.weight.uniform_(-bound, bound)
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, 1.0)
        # Zero-initialised output projections: every block starts as the identity, and
        # the head starts at uniform predictions, so the initial loss is ln(vocab).
        for block in self.blocks:
            block.attn.c_proj.weight.zero_()
            block.mlp.c_proj.weight.zero_()
        self.lm_head.weight.zero_()

    def hidden(self, idx: torch.Tensor) -> torch.Tensor:
        """Final normalised hidden states (B, T, C) for token ids idx (B, T)."""
        x = kernels.rms_norm(self.wte(idx))
        for block in self.blocks:
            x = block(x)
        return kernels.rms_norm(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, vocab_size) in fp32, or the mean training loss when targets are given."""
        x = self.hidden(idx)
        if targets is not None:
            return kernels.cross_entropy(
                self.lm_head(x).flatten(0, 1), targets.flatten(), softcap=self.config.logit_softcap
            )
        logits = self.lm_head(x)[..., : self.config.vocab_size].float()
        if self.config.logit_softcap is not None:
            cap = self.config.logit_softcap
            logits = cap * torch.tanh(logits / cap)
        return logits

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3x forward), as in the PaLM paper:
        6 per matmul weight, plus attention's 12 * n_layer * n_embd * T (causal not halved,
        to stay comparable with nanoGPT and modded-nanogpt's MFU figures)."""
        c = self.config
        matmul_params = self.num_params() - self.wte.weight.numel()
        return 6 * matmul_params + 12 * c.n_layer * c.n_embd * seq_len
