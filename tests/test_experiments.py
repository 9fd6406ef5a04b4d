"""The experiments (``wdopt <experiment> --quick``): output files and their schema, the equilibrium
numbers recomputed from the saved weights independently of the telemetry, and bitwise determinism.

Each experiment runs in-process through ``wdopt.cli.main`` once per module (cached), plus one
rerun each of equilibrium and rotational for the determinism check."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from wdopt.cli import main
from wdopt.experiments import EXPERIMENTS

# Keys every row of summary.json must have, per experiment.
ROW_KEYS = {
    "equilibrium": {"optimizer", "layer", "scale_invariant", "predicted_norm", "measured_norm",
                    "predicted_angular_update", "measured_angular_update"},
    "rotational": {"optimizer", "warmup", "layer_cv_mean", "layer_cv_early", "neuron_cv_mean", "neuron_cv_early",
                   "time_to_equilibrium", "time_to_equilibrium_max", "final_loss", "test_accuracy"},
    "sphere": {"run", "method", "init_scale", "layer", "initial_norm", "final_norm", "predicted_norm",
               "effective_lr_final", "effective_lr_predicted", "final_loss", "test_accuracy"},
    "lr-wd": {"optimizer", "lr", "weight_decay", "lr_times_wd", "final_loss", "test_accuracy",
              "conv_angle_final", "predicted_angle"},
    "why-wd": {"part", "run", "weight_decay"},
}
WHY_WD_PART_KEYS = {"a": {"final_loss", "spikes", "diverged_at", "decay_sum"},
                    "b": {"train_size", "epochs", "one_pass", "test_error", "train_error"},
                    "c": {"final_loss", "spikes", "diverged_at", "decay_sum"}}
PNGS = {"equilibrium": {"angles.png", "norms.png"}, "rotational": {"imbalance.png", "loss.png"},
        "sphere": {"sphere.png"}, "lr-wd": {"lr_wd.png"}, "why-wd": {"lm_loss.png", "data_size.png"}}
CONV = ("conv1.weight", "conv2.weight", "conv3.weight")


@pytest.fixture(autouse=True)
def _restore_torch_settings():
    """The experiments set torch's thread count and deterministic mode; give them back."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


def _run(name: str, out: Path, *extra: str) -> Path:
    assert main([name, "--quick", "--no-progress", "--out", str(out), *extra]) == 0
    return out


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    cache = {}

    def get(name: str) -> Path:
        if name not in cache:
            threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
            try:
                cache[name] = _run(name, tmp_path_factory.mktemp(name.replace("-", "_")))
            finally:
                torch.set_num_threads(threads)
                torch.use_deterministic_algorithms(deterministic)
        return cache[name]

    return get


def test_registry():
    assert list(EXPERIMENTS) == ["equilibrium", "rotational", "sphere", "lr-wd", "why-wd"]


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_outputs_schema(name, outputs):
    out = outputs(name)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["experiment"] == name
    assert isinstance(summary["rows"], list) and summary["rows"]
    for row in summary["rows"]:
        missing = ROW_KEYS[name] - set(row)
        assert not missing, f"{name} row lacks {missing}"
        if name == "why-wd":
            assert not WHY_WD_PART_KEYS[row["part"]] - set(row)
    with (out / "metrics.csv").open() as f:
        reader = csv.reader(f)
        header = next(reader)
        body = list(reader)
    assert "run" in header and "step" in header and body
    assert all(len(r) == len(header) for r in body)
    assert set(summary["plots"]) == PNGS[name]
    for png in PNGS[name]:
        data = (out / png).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 1000
    weights = torch.load(out / "weights.pt", weights_only=True)
    assert isinstance(weights, dict) and weights


def _rms_norm(w: torch.Tensor) -> torch.Tensor:
    return w.flatten(1).norm(dim=1).pow(2).mean().sqrt()


def test_equilibrium_recomputed_from_weights(outputs):
    out = outputs("equilibrium")
    summary = json.loads((out / "summary.json").read_text())
    weights = torch.load(out / "weights.pt", weights_only=True)
    rows = {(r["optimizer"], r["layer"]): r for r in summary["rows"]}
    assert {name for name, _ in rows} == {"adamw", "sgd", "lion"}
    for (name, layer), row in rows.items():
        assert row["scale_invariant"] == (layer in CONV)
        if layer not in CONV:
            continue
        run = weights[name]
        w = run["before_last_step"][layer].double().flatten(1)
        d = run["final"][layer].double().flatten(1) - w
        w2, wd, d2 = (w * w).sum(1), (w * d).sum(1), (d * d).sum(1)
        angle = torch.atan2(torch.sqrt(torch.clamp(w2 * d2 - wd * wd, min=0)), w2 + wd).mean().item()
        norm = w2.mean().sqrt().item()
        assert math.isclose(angle, row["last_step_angular_update"], rel_tol=1e-6), (name, layer)
        assert math.isclose(norm, row["last_step_norm"], rel_tol=1e-6), (name, layer)
        final_norm = _rms_norm(run["final"][layer].double()).item()
        assert abs(row["measured_norm"] / final_norm - 1) < 0.10, (name, layer)
        if name == "adamw":
            assert abs(row["measured_norm"] / row["predicted_norm"] - 1) < 0.25, (name, layer)
            assert abs(row["measured_angular_update"] / row["predicted_angular_update"] - 1) < 0.25, (name, layer)
    control = {c["layer"]: c for c in summary["control"]}
    for layer in CONV:
        assert control[layer]["growth"] > 1.02, layer


def test_sphere_projected_keeps_the_norm(outputs):
    summary = json.loads((outputs("sphere") / "summary.json").read_text())
    projected = [r for r in summary["rows"] if r["method"] == "projected"]
    assert projected and all(math.isclose(r["final_norm"], r["initial_norm"], rel_tol=1e-5) for r in projected)
    scales = sorted({r["init_scale"] for r in summary["rows"]})
    assert len(scales) == 3


def test_why_wd_parts(outputs):
    summary = json.loads((outputs("why-wd") / "summary.json").read_text())
    parts = {r["part"] for r in summary["rows"]}
    assert parts == {"a", "b", "c"}
    sizes = [r for r in summary["rows"] if r["part"] == "b"]
    assert max(sizes, key=lambda r: r["train_size"])["one_pass"]
    assert min(sizes, key=lambda r: r["train_size"])["epochs"] > 1


@pytest.mark.parametrize("name", ["equilibrium", "rotational"])
def test_bitwise_deterministic(name, outputs, tmp_path):
    first = outputs(name)
    second = _run(name, tmp_path / "again")
    assert (first / "metrics.csv").read_bytes() == (second / "metrics.csv").read_bytes()
