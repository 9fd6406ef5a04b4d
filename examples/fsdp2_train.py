"""Train a small transformer with FSDP2 (``fully_shard``) and a wdopt optimizer.

    torchrun --nproc-per-node 2 examples/fsdp2_train.py                       # CPU: gloo
    torchrun --nproc-per-node 2 examples/fsdp2_train.py --optimizer rotational
    torchrun --nproc-per-node 8 examples/fsdp2_train.py                       # GPUs: nccl, unchanged

FSDP2 makes every parameter a DTensor sharded along dim 0; wdopt's optimizers update each rank's
shard with their fused kernels (no communication of their own) and keep state as DTensors of the
same placement, so ``torch.distributed.checkpoint`` saves and reshards it (``--checkpoint DIR``
saves at the end). The task is synthetic and learnable: each token is (3·previous + 1) mod V, from
a random start, so the loss falls towards 0.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
from torch import nn

import wdopt


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x, mask):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    def __init__(self, vocab: int, d: int, heads: int, layers: int, length: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.position = nn.Parameter(torch.randn(length, d) * 0.02)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, tokens):
        n = tokens.shape[1]
        mask = torch.triu(torch.full((n, n), float("-inf"), device=tokens.device), diagonal=1)
        x = self.embed(tokens) + self.position[:n]
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.norm(x))


def batch(step: int, rank: int, size: int, length: int, vocab: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(100_000 * rank + step)
    t = torch.empty(size, length + 1, dtype=torch.long)
    t[:, 0] = torch.randint(vocab, (size,), generator=g)
    for i in range(1, length + 1):
        t[:, i] = (3 * t[:, i - 1] + 1) % vocab
    return t.to(device)


def main(argv=None) -> list[float]:
    """Train; returns the losses printed (rank 0's view of the mean over ranks). Joins a process
    group already made by the caller (tests/dist_checks.py) instead of making one."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--optimizer", choices=("adamw", "rotational"), default="adamw")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--batch", type=int, default=16, help="sequences per rank")
    parser.add_argument("--backend", default="auto", help="wdopt backend (auto: cpu on CPU, cuda on GPUs)")
    parser.add_argument("--checkpoint", default=None, help="directory to save model and optimizer state in")
    args = parser.parse_args(argv)

    use_cuda = torch.cuda.is_available()
    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    device = torch.device("cuda" if use_cuda else "cpu")

    from torch.distributed.fsdp import fully_shard

    vocab, length = 61, 32  # odd sizes: shards are uneven across ranks, as they are in real models
    torch.manual_seed(0)  # the same initial weights on every rank before sharding
    model = TinyLM(vocab, d=64, heads=4, layers=2, length=length).to(device)
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)

    # Decay (and, for RotationalAdamW, the sphere) for matrices; none for embeddings, gains, biases.
    matrices = [p for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n and "position" not in n]
    others = [p for n, p in model.named_parameters() if not any(p is q for q in matrices)]
    groups = [dict(params=matrices, weight_decay=args.weight_decay), dict(params=others, weight_decay=0.0)]
    if args.optimizer == "adamw":
        opt = wdopt.FusedAdamW(groups, lr=args.lr, backend=args.backend)
    else:
        opt = wdopt.RotationalAdamW(groups, lr=args.lr, backend=args.backend)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))

    start = time.perf_counter()
    losses = []
    for step in range(args.steps):
        tokens = batch(step, rank, args.batch, length, vocab, device)
        logits = model(tokens[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, vocab), tokens[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        schedule.step()
        if step % 50 == 0 or step == args.steps - 1:
            reported = loss.detach().clone()
            dist.all_reduce(reported)
            losses.append(reported.item() / world)
            if rank == 0:
                print(f"step {step:4d}  loss {reported.item() / world:.4f}", flush=True)
    elapsed = time.perf_counter() - start
    if rank == 0:
        print(f"{args.optimizer}: {args.steps} steps on {world} ranks ({device.type}) in {elapsed:.1f} s", flush=True)

    if args.checkpoint:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(model, opt)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=args.checkpoint)
        if rank == 0:
            print(f"saved to {args.checkpoint}")
    if own_group:
        dist.destroy_process_group()
    return losses


if __name__ == "__main__":
    main()
