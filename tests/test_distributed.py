"""fusenn.LSTM trains under DistributedDataParallel: two CPU processes (gloo), each on half of a fixed
global batch, end with equal parameters and gradients, equal to one process training on the whole batch."""

import datetime
import faulthandler
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fusenn

WORLD = 2
STEPS = 3
LR = 0.5
DEADLINE = 180  # seconds

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available in this torch build")


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = fusenn.LSTM(5, 7, num_layers=2, bidirectional=True, batch_first=True)
        self.head = nn.Linear(14, 3)

    def forward(self, x):
        return self.head(self.lstm(x)[0].mean(1))


def train(model, x, y):
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    for _ in range(STEPS):
        optimizer.zero_grad()
        # A mean over each rank's equal half: DDP's gradient average is then the full batch's mean gradient.
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()


def grads(model):
    return {name: p.grad for name, p in model.named_parameters()}


def train_rank(rank, state, x, y, out_dir):
    model = Model()
    model.load_state_dict(state)
    ddp = nn.parallel.DistributedDataParallel(model)
    train(ddp, x.chunk(WORLD)[rank], y.chunk(WORLD)[rank])
    torch.save((model.state_dict(), grads(model)), os.path.join(out_dir, f"rank{rank}.pt"))


def worker(rank, backend, store, state, x, y, out_dir):
    # If a worker hangs, its stacks land in a file that the test shows, and it exits.
    faulthandler.dump_traceback_later(DEADLINE - 30, exit=True,
                                      file=open(os.path.join(out_dir, f"stacks{rank}.txt"), "w"))
    torch.set_num_threads(1)  # two processes share the machine
    fusenn.set_backend(backend)
    # A file store rather than a TCP port: concurrent test runs on one machine cannot meet by mistake.
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        # DDP lives in its own frame: freeing its reducer after destroy_process_group hung gloo now and
        # then (about one run in ten on this machine).
        train_rank(rank, state, x, y, out_dir)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", ["reference", "triton"])  # triton: the kernels, interpreted on CPU
def test_ddp_matches_single_process(tmp_path, backend):
    torch.manual_seed(0)
    state = Model().state_dict()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 6, 5, generator=gen)
    y = torch.randn(8, 3, generator=gen)

    workers = mp.spawn(worker, args=(backend, str(tmp_path / "store"), state, x, y, str(tmp_path)), nprocs=WORLD,
                       join=False)
    deadline = time.monotonic() + DEADLINE
    try:
        while not workers.join(timeout=5):
            if time.monotonic() > deadline:
                for process in workers.processes:
                    process.kill()
                raise TimeoutError(f"the DDP workers did not finish within {DEADLINE} s")
    except Exception as exc:  # noqa: BLE001 - any worker failure is reported with the stacks it left
        stacks = "\n".join(p.read_text() for p in sorted(tmp_path.glob("stacks*.txt")))
        pytest.fail(f"{exc}\nworker stacks (empty if none hung):\n{stacks}")

    single = Model()
    single.load_state_dict(state)
    with fusenn.set_backend(backend):
        train(single, x, y)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for name, want in single.state_dict().items():
        assert not torch.equal(want, state[name]), f"{name} did not train"
        torch.testing.assert_close(ranks[1][0][name], ranks[0][0][name], rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(ranks[0][0][name], want, rtol=0, atol=1e-5, msg=lambda m: f"{name}: {m}")
    # The last step's gradients: DDP's all-reduced average equals the whole batch's gradient.
    for name, want in grads(single).items():
        torch.testing.assert_close(ranks[1][1][name], ranks[0][1][name], rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(ranks[0][1][name], want, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
