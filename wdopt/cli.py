"""The ``wdopt`` command. One subcommand per job; the experiments add theirs here.

    wdopt demo      train a small model twice, with torch.optim.AdamW and with wdopt.FusedAdamW,
                    and show the two runs follow the same trajectory
    wdopt env       versions and available backends (as ``python -m wdopt.env``)
    wdopt bench     the kernel benchmark (as ``python -m wdopt.bench``; its options follow)
    wdopt equilibrium, rotational, sphere, lr-wd, why-wd, precision
                    the experiments (wdopt/experiments/, EXPERIMENTS.md)
    wdopt report    rerun the experiments and regenerate EXPERIMENTS.md (wdopt/experiments/report.py)
"""

from __future__ import annotations

import argparse
import sys
import time

import torch


def _demo_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(32, 256), torch.nn.LayerNorm(256), torch.nn.GELU(),
        torch.nn.Linear(256, 256), torch.nn.LayerNorm(256), torch.nn.GELU(),
        torch.nn.Linear(256, 10),
    )


def _teacher_data(seed: int, n: int = 4096):
    """Synthetic classification: labels from a fixed random teacher network, with label noise."""
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, 32, generator=g)
    teacher = torch.randn(32, 10, generator=g)
    y = (torch.tanh(x @ teacher) + 0.5 * torch.randn(n, 10, generator=g)).argmax(dim=1)
    return x, y


def _train(make_optimizer, steps: int, seed: int, batch: int = 128):
    model = _demo_model(seed)
    opt = make_optimizer(model.parameters())
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    x, y = _teacher_data(seed)
    losses, step_time = [], 0.0
    for step in range(steps):
        idx = torch.arange(step * batch, (step + 1) * batch) % x.shape[0]
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        t0 = time.perf_counter()
        opt.step()
        step_time += time.perf_counter() - t0
        sched.step()
        losses.append(loss.item())
    return model, losses, step_time / steps


def fail(command: str, message: str) -> None:
    """One line on stderr and exit status 2 (argparse's status for bad options), no traceback."""
    print(f"wdopt {command}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _torch_fused_supported() -> bool:
    """Whether torch's fused AdamW runs on CPU tensors here (torch ≥ 2.4)."""
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.zeros(2)
    try:
        torch.optim.AdamW([p], fused=True).step()
    except (RuntimeError, ValueError, TypeError):
        return False
    return True


def demo(args: argparse.Namespace) -> int:
    import wdopt
    from wdopt.backends import BACKEND_CHOICES, auto_backend, unavailable_reason

    # Checked before the first (torch) run trains, not when wdopt's run constructs its optimizer.
    if args.backend not in BACKEND_CHOICES:
        fail("demo", f"--backend {args.backend!r} is unknown; choose one of {', '.join(BACKEND_CHOICES)}")
    if args.backend != "auto" and unavailable_reason(args.backend, "cpu") is not None:
        fail("demo", f"--backend {args.backend} cannot run on cpu: {unavailable_reason(args.backend, 'cpu')}")
    hyper = dict(lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.95))
    # The fair speed comparison is torch's fastest CPU AdamW, its fused one (torch's default is foreach).
    fused = _torch_fused_supported()
    torch_name = "torch.optim.AdamW(fused=True)" if fused else "torch.optim.AdamW (foreach; no fused CPU AdamW here)"
    torch_impl = {"fused": True} if fused else {"foreach": True}
    print(f"Training a 3-layer MLP on synthetic teacher data for {args.steps} steps, twice: with {torch_name} and "
          "with wdopt.FusedAdamW")
    torch_model, torch_losses, torch_time = _train(lambda p: torch.optim.AdamW(p, **hyper, **torch_impl), args.steps,
                                                   args.seed)
    wd_model, wd_losses, wd_time = _train(lambda p: wdopt.FusedAdamW(p, backend=args.backend, **hyper), args.steps, args.seed)
    column = "torch fused AdamW" if fused else "torch AdamW"
    print(f"\n{'step':>6} {column:>18} {'wdopt.FusedAdamW':>18}")
    for step in sorted({0, *range(args.steps // 5 - 1, args.steps, max(1, args.steps // 5))}):
        print(f"{step + 1:>6} {torch_losses[step]:>18.6f} {wd_losses[step]:>18.6f}")
    diff = max((a - b).abs().max().item() for a, b in zip(torch_model.parameters(), wd_model.parameters()))
    scale = max(a.abs().max().item() for a in torch_model.parameters())

    backend = auto_backend("cpu") if args.backend == "auto" else args.backend
    print(f"\nlargest parameter difference after {args.steps} steps: {diff:.3g} (largest parameter {scale:.3g})")
    print(f"mean optimizer step: {torch_name} {torch_time * 1e3:.2f} ms, wdopt.FusedAdamW ({backend} backend) "
          f"{wd_time * 1e3:.2f} ms (CPU, small model: timing is indicative only; see benchmarks/)")
    same = diff <= 1e-4 * max(scale, 1.0)
    print("The two runs follow the same trajectory." if same else "The runs diverged: please report this.")
    return 0 if same else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # the benchmark parses its own options
        from .bench import main as bench_main

        return bench_main(argv[1:], prog="wdopt bench")
    parser = argparse.ArgumentParser(prog="wdopt", description="Fused optimizers with decoupled weight decay.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="swap torch.optim.AdamW for wdopt.FusedAdamW in a short training run")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="auto")
    p.set_defaults(func=demo)
    sub.add_parser("bench", help="the kernel benchmark (python -m wdopt.bench --help for its options)")
    from . import experiments

    for name in experiments.EXPERIMENTS:
        module = experiments.load(name)
        p = sub.add_parser(name, help=module.HELP, description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(func=module.run)
    from .experiments import report

    p = sub.add_parser("report", help=report.HELP, description=report.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    report.add_arguments(p)
    p.set_defaults(func=report.run)
    p = sub.add_parser("env", help="versions and available backends")
    p.set_defaults(func=lambda args: print(__import__("wdopt.env").env.report()) or 0)
    args = parser.parse_args(argv)
    result = args.func(args)
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
