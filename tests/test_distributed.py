"""The trainer under torchrun: two CPU processes with the gloo backend.

- The recipe's step has the same math on K processes as on one: each rank takes its half
  of the same batch, DistributedDataParallel averages the gradients, and the gradients
  that reach the optimizers equal the single-process ones.
- A whole `train.py --nproc 2` run through the runner: the harness starts torchrun inside
  the trainer's sandbox, rank 0 relays its batches to the other rank, and the run gives
  one result with one line per evaluation, judged ok by the runner's checks.
"""

import json
import os
import socket
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from agent.runner import RunSpec, run

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 512


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def step_gradients(world: int, rank: int = 0) -> dict[str, torch.Tensor]:
    """The gradients that reach the optimizers in one train_step of cpu-tiny on a fixed
    batch of which this rank takes its rows, in micro-batches of 4 (so accumulation and
    DDP's no_sync are both exercised)."""
    import model.recipe

    model.recipe.cpu_has_bf16 = lambda: False  # fp32: equal up to summation order
    torch.manual_seed(0)
    recipe = model.recipe.build_recipe("cpu-tiny", torch.device("cpu"), VOCAB, compile=False)
    recipe.hp = replace(recipe.hp, micro_batch_size=4)
    with torch.no_grad():  # no zero-initialised weights: every gradient is non-zero
        for p in recipe.model.parameters():
            p.normal_(0.0, 0.05)
    names = {p: n for n, p in recipe.model.named_parameters()}
    grads = {}
    for opt in recipe.optimizers:
        def step(real=opt.step, opt=opt):
            for group in opt.param_groups:
                grads.update({names[p]: p.grad.clone() for p in group["params"]})
            return real()

        opt.step = step
    g = torch.Generator().manual_seed(1)
    batch_size, seq_len = recipe.batch_shape(0.0)
    x = torch.randint(0, VOCAB, (batch_size, seq_len), generator=g)
    y = torch.randint(0, VOCAB, (batch_size, seq_len), generator=g)
    rows = slice(rank * batch_size // world, (rank + 1) * batch_size // world)
    recipe.train_step(x[rows], y[rows], 0.5)
    return grads


def _rank(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        state = step_gradients(world, rank)
        if rank == 0:
            torch.save(state, out)
    finally:
        dist.destroy_process_group()


def test_a_step_on_two_processes_has_the_gradients_of_one(tmp_path):
    out = tmp_path / "two.pt"
    mp.spawn(_rank, args=(2, free_port(), str(out)), nprocs=2, join=True)
    two, one = torch.load(out), step_gradients(1)
    assert two.keys() == one.keys()
    for name, grad in one.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(two[name], grad, rtol=1e-4, atol=1e-7, msg=name)


@pytest.fixture()
def locks(tmp_path, monkeypatch):
    monkeypatch.setenv("SPEEDLOOP_LOCKS", str(tmp_path / "locks"))


def test_torchrun_with_two_processes_gives_one_result(tmp_path, data_cache, locks):
    spec = RunSpec(
        worktree=ROOT,
        preset="cpu-tiny",
        seed=3,
        out_path=tmp_path / "r.json",
        log_path=tmp_path / "r.log",
        timeout_s=600,
        extra_args=["--budget-tokens", "8192"],
        nproc=2,
        env={"SPEEDLOOP_DATA": str(data_cache)},
    )
    outcome = run(spec)
    log = Path(outcome.log_path).read_text()
    assert outcome.status == "ok", (outcome.error, log[-3000:])
    result = outcome.result
    assert result["world_size"] == 2 and result["tokens"] == 8192
    assert json.loads((tmp_path / "r.json").read_text()) == result
    # The harness alone reports: one line per evaluation, whatever the trainer's ranks print.
    assert sum(line.startswith("eval ") for line in log.splitlines()) == len(result["curve"])
    assert result["integrity"]["ok"] and result["val_loss"] < 8.0 and result["sandbox"]
