"""wdopt inside torch's distributed engines, on CPU with gloo (issue 10): FSDP2, tensor
parallelism, HSDP, DDP, ZeroRedundancyOptimizer, torch.distributed.checkpoint, GradScaler.

One process group of 2 workers (tests/dist_checks.py) runs every check that needs real ranks,
once for the module: starting a group costs seconds, a check a fraction of one. A group of 3
then resumes the 2-rank group's checkpoints (resharding onto 3 ranks). Each check is one
test here, reading the workers' per-check records. The workers bind to 127.0.0.1 on a free port
and are killed after ``DEADLINE`` seconds, so a hang fails the tests instead of stalling the
suite. Placement errors that need no data run on torch's fake process group, in one process.

Needs torch >= 2.6 (FSDP2's public ``fully_shard``); skipped below with that reason.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
#: Seconds for each group's run (2 ranks: about 30 s on the 2-core CI machine alone; 3 ranks: 10 s).
DEADLINE, DEADLINE3 = 240, 120

_version = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
pytestmark = pytest.mark.skipif(
    _version < (2, 6) or not torch.distributed.is_available(),
    reason="needs torch >= 2.6 with torch.distributed (FSDP2's fully_shard is public from 2.6)")

if _version >= (2, 6) and torch.distributed.is_available():
    sys.path.insert(0, HERE)
    import dist_checks  # noqa: E402

    CHECK_NAMES, CHECK3_NAMES = list(dist_checks.CHECKS), list(dist_checks.CHECKS3)
else:
    CHECK_NAMES = CHECK3_NAMES = []


def _pythonpath() -> str:
    """The workers import the wdopt this process imported (an installed build with its compiled
    extension, or the source tree), not necessarily the source tree's."""
    import wdopt

    where = os.path.dirname(os.path.dirname(os.path.abspath(wdopt.__file__)))
    return os.pathsep.join([where, os.environ.get("PYTHONPATH", "")])


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(rank: int, world: int, port: int, out: str) -> dict:
    env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WDOPT_DIST_OUT=out, OMP_NUM_THREADS="1",
               PYTHONPATH=_pythonpath())
    env.setdefault("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "1"))
    if sys.platform.startswith("linux"):
        env["GLOO_SOCKET_IFNAME"] = "lo"  # gloo's own connections on the loopback interface too
    return env


def _run_group(world: int, out: str, deadline: float) -> dict:
    """Run the checks of a group of ``world`` workers; their records, exit codes and output tails."""
    port = _free_port()
    logs = [open(os.path.join(out, f"world{world}_log{r}.txt"), "w") for r in range(world)]
    start = time.perf_counter()
    workers = [subprocess.Popen([sys.executable, os.path.join(HERE, "dist_checks.py")],
                                env=_env(r, world, port, out), stdout=logs[r], stderr=subprocess.STDOUT, cwd=ROOT)
               for r in range(world)]
    timed_out = False
    try:
        for w in workers:
            w.wait(timeout=max(1.0, deadline - (time.perf_counter() - start)))
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()
        for f in logs:
            f.close()
    results = {}
    for r in range(world):
        path = os.path.join(out, f"world{world}_rank{r}.json")
        if os.path.exists(path):
            with open(path) as f:
                for name, record in json.load(f).items():
                    results.setdefault(name, [None] * world)[r] = record
    tails = []
    for r in range(world):
        with open(os.path.join(out, f"world{world}_log{r}.txt")) as f:
            tails.append(f.read()[-3000:])
    return dict(results=results, timed_out=timed_out, codes=[w.returncode for w in workers], tails=tails, world=world,
                seconds=time.perf_counter() - start)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """Every check on 2 ranks, then the 3-rank checks (resuming the 2-rank group's checkpoints);
    {world: run record}."""
    import wdopt

    if wdopt.backends.unavailable_reason("cpu") is None:
        wdopt.backends.load("cpu")  # built here if needed, not by the workers inside their collectives' timeout
    out = str(tmp_path_factory.mktemp("dist"))
    return {2: _run_group(2, out, DEADLINE), 3: _run_group(3, out, DEADLINE3)}


@pytest.mark.parametrize("world,name", [(2, n) for n in CHECK_NAMES] + [(3, n) for n in CHECK3_NAMES])
def test_on_ranks(records, world, name):
    run = records[world]
    per_rank = run["results"].get(name)
    if per_rank is None or None in per_rank:
        why = f"killed after its deadline (a hang?)" if run["timed_out"] else f"exit codes {run['codes']}"
        pytest.fail(f"{name}: no record from every rank ({why}); last output:\n" + "\n---\n".join(run["tails"]))
    failed = [f"rank {r}:\n{rec['outcome']}" for r, rec in enumerate(per_rank) if rec["outcome"] != "ok"]
    assert not failed, "\n".join(failed)


@pytest.mark.parametrize("world", [2, 3])
def test_workers_exit_cleanly(records, world):
    run = records[world]
    assert not run["timed_out"] and run["codes"] == [0] * world, run["tails"]


_FAKE = r"""
import torch, torch.distributed as dist, wdopt
from torch.testing._internal.distributed.fake_pg import FakeStore
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor, init_device_mesh
from torch.distributed.tensor.placement_types import _StridedShard
dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=4)
mesh = init_device_mesh("cpu", (4,))
mesh2 = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))

def param(shape, placements, m=mesh, seed=0):
    # from_local: no collective (a fake group moves no data); each rank's shard of rows/columns
    local = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return torch.nn.Parameter(DTensor.from_local(local, m, placements, run_check=False))

def refused(make, *words):
    try:
        make()
    except (ValueError, RuntimeError) as error:
        assert all(w in str(error) for w in words), (words, str(error))
        return str(error)
    raise AssertionError(f"accepted, expected an error with {words}")

# Rotational: placements that split rows are refused at construction, naming what works.
refused(lambda: wdopt.RotationalAdamW([param((3, 2), [Shard(1)])]), "parameter 0 of param group 0", "Shard(dim=1)",
        "shard it along dim 0 only")
refused(lambda: wdopt.RotationalAdamW([param((3, 2), [Shard(0)])], per_neuron=False), "Shard(dim=0)", "sphere")
refused(lambda: wdopt.RotationalAdamW([param((3, 2), [_StridedShard(0, split_factor=2), Shard(0)], mesh2)]),
        "_StridedShard(dim=0)", "FSDP2 over tensor parallelism", "shard it along dim 0 only")
# ... and row-whole ones are taken: construction checks and centring on the local rows (this was
# a sharding-propagation error of `nonzero` before), a rank with zero rows included.
for placements in ([Shard(0)], [Replicate()]):
    w = param((3, 4), placements)
    wdopt.RotationalAdamW([w])
    torch.testing.assert_close(w.to_local().mean(dim=1), torch.zeros(3), atol=1e-6, rtol=0)
empty = torch.nn.Parameter(DTensor.from_local(torch.zeros(0, 4), mesh, [Shard(0)], run_check=False, shape=(3, 4),
                                              stride=(4, 1)))  # this rank holds none of the 3 rows
wdopt.RotationalAdamW([empty])
zeros = torch.nn.Parameter(DTensor.from_local(torch.zeros(2, 4), mesh, [Shard(0)], run_check=False))
refused(lambda: wdopt.RotationalAdamW([zeros]), "parameter 0 of param group 0", "row 0 of this rank's shard has zero")

# Gradients placed otherwise than their parameter: refused before any update.
a, b = param((2, 3), [Shard(0)]), param((2, 3), [Shard(0)], seed=1)
opt = wdopt.FusedAdamW([a, b], lr=0.1)
before = (a.to_local().clone(), b.to_local().clone())
a.grad = DTensor.from_local(torch.ones(2, 3), mesh, [Shard(0)], run_check=False)
for bad, words in [(DTensor.from_local(torch.ones(2, 3), mesh, [Shard(1)], run_check=False, shape=(8, 3), stride=(3, 1)),
                    ("Shard(dim=1)", "placements")),
                   (torch.ones(8, 3), ("plain tensor", "DTensor")),
                   (DTensor.from_local(torch.ones(1, 3), mesh, [Shard(0)], run_check=False, shape=(8, 3),
                                       stride=(3, 1)), ("local shape",))]:
    b.grad = bad
    refused(opt.step, "parameter 1 of param group 0", *words)
    assert torch.equal(a.to_local(), before[0]) and torch.equal(b.to_local(), before[1]) and not opt.state
# A DTensor gradient for a plain parameter.
c = torch.nn.Parameter(torch.zeros(8, 3))
opt = wdopt.FusedSGD([c], lr=0.1)
c.grad = DTensor.from_local(torch.ones(2, 3), mesh, [Shard(0)], run_check=False)
refused(opt.step, "parameter 0 of param group 0", "DTensor", "plain tensor")

# Element-wise optimizers take any placement, FSDP2 over tensor parallelism's _StridedShard too: the
# local shard steps as a plain tensor would, and state keeps the parameter's placement.
strided = [_StridedShard(0, split_factor=2), Shard(0)]
for cls, kw in ((wdopt.FusedAdamW, {}), (wdopt.FusedSGD, dict(momentum=0.9)), (wdopt.FusedLion, {})):
    w = param((3, 4), strided, mesh2)
    plain = torch.nn.Parameter(w.to_local().clone())
    opt, ref = cls([w], lr=0.1, weight_decay=0.1, **kw), cls([plain], lr=0.1, weight_decay=0.1, **kw)
    for seed in range(2):
        g = torch.randn(3, 4, generator=torch.Generator().manual_seed(seed))
        w.grad = DTensor.from_local(g.clone(), mesh2, strided, run_check=False)
        plain.grad = g
        opt.step()
        ref.step()
    assert torch.equal(w.to_local(), plain.detach()), cls
    assert len(opt.state[w]) >= 1
    for key, value in opt.state[w].items():
        if key != "step":
            assert value.placements == w.placements and torch.equal(value.to_local(), ref.state[plain][key]), key
print("ok")
"""


def test_placement_errors_on_a_fake_process_group():
    """What needs no data moved (placement and construction errors), on torch's fake process group
    of 4 ranks in one process: rotational placements that split rows (naming the parameter, the
    placement and what works) and gradients placed otherwise than their parameter (nothing changed)."""
    env = dict(os.environ, PYTHONPATH=_pythonpath())
    result = subprocess.run([sys.executable, "-c", _FAKE], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
