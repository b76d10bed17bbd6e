"""The sandboxed side of a run: the one fixed module that imports the research surface.

    python -m bench.worker train   --socket S --preset P --device D --kernels K --vocab V
                                   --seed N --out DIR [--compile]
    python -m bench.worker forward --socket S --preset P --device D --kernels K --vocab V

The harness (train.py) starts each role in its own sandbox (bench/sandbox.py) and talks to
it over a Unix socket (bench/wire.py). The trainer builds the recipe, hands over its initial
weights, warms up on random tokens, restores, and then trains on the batches the harness
sends, one message per step; at each evaluation point and at the end it saves its weights
for the harness. The forward worker builds the same model, loads the weights it is pointed
at, and returns logits for the input batches it is sent: it never receives a target.

Everything this process sends is a claim that the harness checks or only logs: time, data
and loss are measured on the trusted side. Whatever the surface does to this module
(patching it, reading its frames) changes nothing that is measured.
"""

from __future__ import annotations

import argparse
import copy
import os
import socket
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from bench import wire

# Synthetic steps at least (one per distinct batch shape if there are more). Compiled code
# and CUDA need a few to settle; eager code on a CPU runs at full speed from its second
# step (measured on cpu-tiny: the first step ~10% slower, the next ones within 2%).
WARMUP_STEPS = 3
CPU_EAGER_WARMUP_STEPS = 1


class Link:
    """The harness's socket on rank 0; under torchrun, rank 0 relays each message to the
    other ranks (they never talk to the harness)."""

    def __init__(self, path: str | None, rank: int, world: int, device: torch.device):
        self.rank, self.world, self.device = rank, world, device
        self.sock = None
        if rank == 0:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.connect(path)

    def recv(self) -> tuple[dict, list[np.ndarray]]:
        message = wire.recv(self.sock, max_array_bytes=1 << 34) if self.rank == 0 else None
        if self.world > 1:
            box = [message]
            dist.broadcast_object_list(box, src=0)
            message = box[0]
        return message

    def send(self, header: dict, arrays=()) -> None:
        if self.rank == 0:
            wire.send(self.sock, header, arrays)


def state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights, on the CPU, read through torch's own state_dict (CPU tensors as they are:
    a save writes them without a copy first)."""
    return {k: v.detach().cpu() for k, v in torch.nn.Module.state_dict(model).items()}


def save_weights(model: torch.nn.Module, path: Path) -> None:
    if any(p.is_cuda for p in model.parameters()):
        torch.cuda.synchronize()
    tmp = path.with_suffix(".partial")
    torch.save({"state_dict": state_dict(model)}, tmp)
    os.replace(tmp, path)


def warmup(recipe, vocab: int, device: torch.device, world: int, compiled: bool = True) -> int:
    """Run every batch shape the recipe will use on random tokens, outside the clock: it
    compiles and fills caches; random tokens teach the model nothing worth keeping, and
    the state is restored after. Returns the number of steps."""
    shapes = []
    for i in range(21):
        shape = recipe.batch_shape(i / 20)
        if shape not in shapes:
            shapes.append(shape)
    g = torch.Generator().manual_seed(0)
    least = CPU_EAGER_WARMUP_STEPS if device.type == "cpu" and not compiled else WARMUP_STEPS
    steps = max(least, len(shapes))
    for step in range(steps):
        batch_size, seq_len = shapes[step % len(shapes)]
        n = batch_size // world
        tokens = torch.randint(0, vocab, (n, seq_len + 1), generator=g).to(device)
        recipe.train_step(tokens[:, :-1], tokens[:, 1:], min(1.0, step / steps))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return steps


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """int64 token ids on the device. On CUDA through pinned memory and without waiting, so
    the host keeps queueing work ahead of the GPU as the step before returns."""
    t = torch.from_numpy(array).to(torch.int64)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


class Refused(Exception):
    """The run's settings cannot run here; the harness was told why (exit code 2)."""


def resolve_kernels(kernels, requested: str, device: torch.device, link: Link) -> str:
    """Set the kernel backend that will run; a backend that cannot run here is bad input."""
    try:
        backend = kernels.resolve(requested, device.type)
    except (ValueError, RuntimeError) as e:
        link.send({"op": "error", "message": str(e)})
        raise Refused(str(e)) from None
    kernels.set_backend(backend)
    return backend


def train(args, link: Link, device: torch.device) -> None:
    import kernels
    from model import build_recipe

    backend = resolve_kernels(kernels, args.kernels, device, link)
    torch.manual_seed(args.seed)
    recipe = build_recipe(args.preset, device, args.vocab, args.compile)
    out = Path(args.out)
    if link.rank == 0:
        save_weights(recipe.model, out / "init.pt")
    snapshot = (copy.deepcopy(state_dict(recipe.model)),
                [copy.deepcopy(opt.state_dict()) for opt in recipe.optimizers])
    steps = warmup(recipe, args.vocab, device, link.world, args.compile)
    torch.nn.Module.load_state_dict(recipe.model, snapshot[0])
    for opt, state in zip(recipe.optimizers, snapshot[1]):
        opt.load_state_dict(copy.deepcopy(state))
    if link.rank == 0:
        save_weights(recipe.model, out / "start.pt")
    link.send({"op": "ready", "kernels": backend, "warmup_steps": steps,
               "flops_per_token": float(recipe.flops_per_token()),
               "shape": list(recipe.batch_shape(0.0))})
    while True:
        header, arrays = link.recv()
        op = header["op"]
        if op == "step":
            x, y = (to_device(a, device) for a in arrays)
            rows = x.shape[0] // link.world
            mine = slice(link.rank * rows, (link.rank + 1) * rows)
            loss = recipe.train_step(x[mine], y[mine], header["progress"])
            reply = {"op": "want", "shape": list(recipe.batch_shape(header["next_progress"]))}
            if header.get("log"):
                if link.world > 1:
                    dist.all_reduce(loss)
                    loss = loss / link.world
                reply["loss"] = float(loss)
            link.send(reply)
        elif op == "save":
            if link.rank == 0:
                save_weights(recipe.model, out / header["name"])
            peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
            link.send({"op": "saved", "name": header["name"], "peak_memory_bytes": peak})
        elif op == "exit":
            return
        else:
            raise ValueError(f"unknown message {op!r}")


def forward(args, link: Link, device: torch.device) -> None:
    import kernels
    from model import build_recipe

    resolve_kernels(kernels, args.kernels, device, link)
    torch.manual_seed(0)
    recipe = build_recipe(args.preset, device, args.vocab, compile=False)
    recipe.model.eval()
    for param in torch.nn.Module.parameters(recipe.model):
        param.requires_grad_(False)
    shared = None  # a CUDA buffer the harness reads the logits from
    if args.logits_file:  # on the CPU: a file in memory the harness maps too
        shared = torch.from_numpy(np.memmap(args.logits_file, dtype=np.float32, mode="r+"))
    link.send({"op": "ready"})
    while True:
        header, arrays = link.recv()
        op = header["op"]
        if op == "load":
            state = torch.load(header["path"], map_location=device, weights_only=True)
            torch.nn.Module.load_state_dict(recipe.model, state["state_dict"], strict=True)
            link.send({"op": "loaded"})
        elif op == "share":  # the harness's GPU buffer for logits (bench/cuda_share.py)
            from bench.cuda_share import SharedBuffer

            _, fds, _, _ = socket.recv_fds(link.sock, 1, 1)
            try:
                shared = SharedBuffer(header["nbytes"], device, fd=fds[0]).tensor
                link.send({"op": "shared"})
            except Exception as e:  # noqa: BLE001 (the harness falls back to the socket)
                link.send({"op": "shared", "error": str(e)})
            finally:
                os.close(fds[0])
        elif op == "logits":
            x = to_device(arrays[0], device)
            with torch.no_grad():
                logits = recipe.logits(x)
            if shared is not None and logits.numel() <= shared.numel():
                shared[: logits.numel()].copy_(logits.detach().reshape(-1).float())
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                link.send({"op": "logits", "shape": list(logits.shape)})
            else:
                link.send({"op": "logits"}, [logits.detach().float().cpu().numpy()])
        elif op == "exit":
            return
        else:
            raise ValueError(f"unknown message {op!r}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("role", choices=["train", "forward"])
    p.add_argument("--socket", required=True, help="the harness's Unix socket")
    p.add_argument("--preset", required=True)
    p.add_argument("--device", required=True)
    p.add_argument("--kernels", default="auto")
    p.add_argument("--vocab", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="train: the folder the weights are saved to")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: torch's own)")
    p.add_argument("--logits-file", help="forward, CPU: write logits into this mapped file")
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    link = Link(args.socket, rank, world, device)
    try:
        (train if args.role == "train" else forward)(args, link, device)
    except Refused:
        return 2
    finally:
        if world > 1:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
