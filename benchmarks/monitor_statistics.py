"""What recording a step costs: unmonitored, monitored (the four telemetry sums), and monitored with
the direction statistics (``RotationMonitor(statistics=True)``, eight sums).

    python benchmarks/monitor_statistics.py [--iters 40] [--device cpu|cuda] [--backend cpu|triton]

FusedAdamW on two shape sets: many small tensors (2,000 × 64×64) and a few large ones
(4 × 1024×1024). Every step of the monitored arms is recorded (``every=1``), the worst case. The
three arms step in turn within each iteration (interleaved), so a machine's drifting speed falls on
all of them alike; the table gives each arm's median and its ratio to the unmonitored median.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import wdopt

SHAPES = {"many-small (2,000 × 64×64)": [(64, 64)] * 2000, "large (4 × 1024×1024)": [(1024, 1024)] * 4}
ARMS = {"unmonitored": None, "monitored": False, "monitored + statistics": True}


def arm(shapes, device, backend, statistics_wanted):
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g).to(device)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(device)
    opt = wdopt.FusedAdamW(params, lr=1e-3, weight_decay=0.1, backend=backend)
    if statistics_wanted is not None:
        wdopt.RotationMonitor(opt, every=1, keep=2, statistics=statistics_wanted)
    for _ in range(3):
        opt.step()
    return opt


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", default="cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    print(f"torch {torch.__version__}, device {device}, backend {args.backend}, {torch.get_num_threads()} threads, "
          f"{args.iters} interleaved iterations")
    print("| shapes | arm | median ms/step | × unmonitored |\n|---|---|---|---|")
    for name, shapes in SHAPES.items():
        optimizers = {label: arm(shapes, device, args.backend, wanted) for label, wanted in ARMS.items()}
        times = {label: [] for label in optimizers}
        for _ in range(args.iters):
            for label, opt in optimizers.items():
                sync()
                start = time.perf_counter()
                opt.step()
                sync()
                times[label].append(time.perf_counter() - start)
        base = statistics.median(times["unmonitored"])
        for label, values in times.items():
            median = statistics.median(values)
            print(f"| {name} | {label} | {1e3 * median:.2f} | {median / base:.2f} |")


if __name__ == "__main__":
    main()
