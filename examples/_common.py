"""The training loop and command line shared by the composite examples (cnn_lstm, seq2seq, transformer).

An example module provides CONFIGS (name -> Config with batch, lr, steps), Model(cfg, impl),
make_batch(cfg, batch, generator), loss_fn(model, *batch), accuracy(model, *batch) and FORWARD_ARGS (how
many of make_batch's tensors Model.forward takes).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from dataclasses import asdict

import torch

import fusenn
import fusenn.info


def load(name: str):
    """An example as a module, for the tests and the benchmarks."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(os.path.dirname(__file__), f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def train(example, impl: str, cfg, steps: int, device: torch.device, seed: int) -> dict:
    torch.manual_seed(seed)
    model = example.Model(cfg, impl).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    data = torch.Generator(device).manual_seed(seed)  # data made on the device: no host work in the timing
    held_out = example.make_batch(cfg, 4 * cfg.batch, torch.Generator(device).manual_seed(seed + 1))
    losses = []
    for step in range(steps):
        if step == 1:  # step 0 compiles the Triton kernels: the speed counts from step 1 on
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        loss = example.loss_fn(model, *example.make_batch(cfg, cfg.batch, data))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
        if step % max(1, steps // 10) == 0 or step == steps - 1:
            print(f"{impl:6s} step {step:5d} loss {loss.item():.4f}", flush=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    speed = cfg.batch * (steps - 1) / (time.perf_counter() - start) if steps > 1 else None
    model.eval()
    with torch.no_grad():
        acc = example.accuracy(model, *held_out)
    return {"losses": torch.stack(losses).tolist(), "accuracy": acc, "samples_per_sec": speed}


def main(example, name: str, accuracy_label: str, argv=None) -> dict:
    parser = argparse.ArgumentParser(description=example.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impl", choices=("fusenn", "torch"), default="fusenn")
    parser.add_argument("--compare", action="store_true", help="train with both impls from the same seed")
    parser.add_argument("--size", choices=sorted(example.CONFIGS), default="toy")
    parser.add_argument("--steps", type=int, help="override the config's step count")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log", help="write the log as JSON here")
    args = parser.parse_args(argv)

    cfg = example.CONFIGS[args.size]
    device = torch.device(args.device)
    log = {"example": name, "size": args.size, "config": asdict(cfg), "device": str(device),
           "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
           "torch": torch.__version__, "fusenn": fusenn.__version__, "runs": {}}
    impls = ("fusenn", "torch") if args.compare else (args.impl,)
    print(fusenn.info.summary(device, " and ".join(impls)), flush=True)
    for impl in impls:
        run = log["runs"][impl] = train(example, impl, cfg, args.steps or cfg.steps, device, args.seed)
        speed = f", {run['samples_per_sec']:.0f} samples/s" if run["samples_per_sec"] else ""
        print(f"{impl:6s} loss {run['losses'][0]:.3f} -> {run['losses'][-1]:.3f}, "
              f"{accuracy_label} {run['accuracy']:.3f}{speed}", flush=True)
    if args.log:
        with open(args.log, "w") as f:
            json.dump(log, f, indent=1)
    return log
