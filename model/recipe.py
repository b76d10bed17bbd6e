"""The training recipe: model size, optimizers, schedules and the train step, per preset.

Everything here is written against progress in [0, 1] (the fraction of the run's
budget spent so far, whatever the budget's unit), so one recipe serves a token budget,
a time budget and a target loss alike. The harness (train.py) owns the clock, the data
and the evaluation; it calls only what `model/__init__.py` lists.
"""

from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from model.gpt import GPT, GPTConfig
from model.optim import Muon


@dataclass
class Hyperparameters:
    model: GPTConfig
    batch_size: int  # sequences per optimizer step
    micro_batch_size: int  # sequences per forward/backward; accumulation makes up the rest
    seq_len: int  # training sequence length
    embed_lr: float = 0.3  # AdamW, token embedding
    head_lr: float = 0.008  # AdamW, lm_head: small, the head sees every token's gradient
    matrix_lr: float = 0.04  # Muon, every hidden matrix
    adam_betas: tuple[float, float] = (0.8, 0.95)
    muon_momentum: tuple[float, float] = (0.85, 0.95)  # warmed from first to second value
    momentum_warmup: float = 0.15  # fraction of the run over which Muon's momentum warms up
    warmdown: float = 0.4  # final fraction of the run over which the learning rate decays to 0
    weight_decay: float = 0.0  # Muon's decoupled weight decay


# Knobs the sweep proposer may turn, each a field of Hyperparameters or of its GPTConfig: a
# float's range and scale (log for learning rates, linear for fractions of the run), or the
# values an integer may take. The sweep edits the value where the preset takes it from: its
# entry in PRESETS if set there, else the default above. It keeps the head dim when n_embd
# changes and the model's seq_len covering the evaluation's rows when seq_len does.
# Listed in the order the sweep first tries them: at short budgets a smaller model is the
# likeliest win (bench/RESULTS.md).
KNOBS = {
    "n_layer": [1, 2, 3, 4, 6, 8, 12, 16],
    "batch_size": [4, 8, 16, 32, 64, 128, 256, 512],  # sequences per step
    "n_embd": [64, 96, 128, 192, 256, 384, 512, 768, 1024],
    "matrix_lr": (0.005, 0.3, "log"),
    "seq_len": [64, 128, 256, 512, 1024, 2048],
    "embed_lr": (0.03, 3.0, "log"),
    "head_lr": (0.001, 0.1, "log"),
    "warmdown": (0.0, 0.9, "linear"),
    "momentum_warmup": (0.0, 0.5, "linear"),
}

PRESETS = {
    # ~1.8M parameters; trains in ~15 s on two CPU cores.
    "cpu-tiny": Hyperparameters(
        model=GPTConfig(seq_len=128, n_layer=4, n_head=4, n_embd=128),
        batch_size=16,
        micro_batch_size=16,
        seq_len=128,
    ),
    # ~50M parameters with the GPT-2 vocabulary; ~5 minutes on one H100.
    "gpu-small": Hyperparameters(
        model=GPTConfig(seq_len=1024, n_layer=8, n_head=8, n_embd=512),
        batch_size=128,
        micro_batch_size=64,
        seq_len=1024,
    ),
    # GPT-2 small (124M); 512 x 1024 tokens per step as in the NanoGPT speedrun's baseline.
    "gpt2-124m": Hyperparameters(
        model=GPTConfig(seq_len=1024, n_layer=12, n_head=12, n_embd=768),
        batch_size=512,
        micro_batch_size=64,
        seq_len=1024,
        embed_lr=0.6,
        matrix_lr=0.05,
    ),
}


class Recipe:
    """A model, its optimizers and its train step for one preset on one device."""

    def __init__(self, hp: Hyperparameters, device: torch.device, compile: bool):
        self.hp = hp
        self.device = device
        # bf16 matmuls on CUDA, and on CPUs with native bf16 (AVX512-BF16, AMX), where they
        # run about twice as fast as fp32; fp32 on other CPUs, where bf16 is emulated.
        self.use_bf16 = device.type == "cuda" or cpu_has_bf16()
        self.model = GPT(hp.model).to(device)
        self.optimizers = self._build_optimizers()
        self._initial_lrs = [[g["lr"] for g in opt.param_groups] for opt in self.optimizers]
        self._forward = torch.compile(self.model) if compile else self.model
        # Under torchrun each rank gets batch_size / world_size rows of every batch;
        # DistributedDataParallel averages the gradients in backward, so the math of a
        # step does not depend on the number of GPUs.
        self._ddp = None
        self._train_forward = self._forward
        if dist.is_initialized() and dist.get_world_size() > 1:
            ids = [device.index] if device.type == "cuda" else None
            self._ddp = DistributedDataParallel(self.model, device_ids=ids, broadcast_buffers=False)
            self._train_forward = torch.compile(self._ddp) if compile else self._ddp

    def _build_optimizers(self) -> list[torch.optim.Optimizer]:
        hp, model = self.hp, self.model
        matrices = [p for p in model.blocks.parameters() if p.ndim == 2]
        adam = torch.optim.AdamW(
            [
                dict(params=[model.wte.weight], lr=hp.embed_lr),
                dict(params=[model.lm_head.weight], lr=hp.head_lr),
            ],
            betas=hp.adam_betas,
            eps=1e-10,
            weight_decay=0.0,
            fused=self.device.type == "cuda",
        )
        ns_dtype = torch.bfloat16 if self.use_bf16 else torch.float32
        muon = Muon(matrices, lr=hp.matrix_lr, weight_decay=hp.weight_decay, ns_dtype=ns_dtype)
        return [adam, muon]

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16)

    def batch_shape(self, progress: float) -> tuple[int, int]:
        return self.hp.batch_size, self.hp.seq_len

    def _set_schedules(self, progress: float) -> None:
        hp = self.hp
        lr_scale = min(1.0, (1.0 - progress) / hp.warmdown) if hp.warmdown > 0 else 1.0
        for opt, lrs in zip(self.optimizers, self._initial_lrs):
            for group, lr in zip(opt.param_groups, lrs):
                group["lr"] = lr * max(lr_scale, 0.0)
        frac = min(1.0, progress / hp.momentum_warmup) if hp.momentum_warmup > 0 else 1.0
        lo, hi = hp.muon_momentum
        for opt in self.optimizers:  # found by type: the list may grow
            if isinstance(opt, Muon):
                for group in opt.param_groups:
                    group["momentum"] = (1 - frac) * lo + frac * hi

    def train_step(self, x: torch.Tensor, y: torch.Tensor, progress: float) -> torch.Tensor:
        """One optimizer step on the batch (x, y): this rank's rows of it under torchrun.
        Returns the mean loss over the rows, detached."""
        self._set_schedules(progress)
        chunks = list(zip(x.split(self.hp.micro_batch_size), y.split(self.hp.micro_batch_size)))
        total = torch.zeros((), device=self.device)
        for i, (xm, ym) in enumerate(chunks):
            last = i == len(chunks) - 1  # gradients are averaged across ranks once, at the end
            with nullcontext() if last or self._ddp is None else self._ddp.no_sync():
                with self._autocast():
                    loss = self._train_forward(xm, ym) / len(chunks)
                loss.backward()
            total += loss.detach()
        for opt in self.optimizers:
            opt.step()
        self.model.zero_grad(set_to_none=True)
        return total

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 logits (B, T, vocab) for token ids x (B, T)."""
        with self._autocast():
            return self._forward(x).float()

    def flops_per_token(self) -> float:
        return self.model.flops_per_token(self.hp.seq_len)


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (Linux reports it in /proc/cpuinfo)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def build_recipe(preset: str, device: torch.device, vocab_size: int, compile: bool) -> Recipe:
    if preset not in PRESETS:
        raise ValueError(f"model/recipe.py has no hyperparameters for preset '{preset}'")
    hp = PRESETS[preset]
    hp = replace(hp, model=replace(hp.model, vocab_size=vocab_size))
    return Recipe(hp, device, compile)
