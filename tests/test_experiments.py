"""The experiments (``wdopt <experiment> --quick``): output files and their schema, the equilibrium
numbers recomputed from the saved weights independently of the telemetry, bitwise determinism,
the verdicts and their "not at equilibrium yet" note, failures before training, ``wdopt report``
and the demo/bench command lines.

Each experiment runs in-process through ``wdopt.cli.main`` once per module (cached), plus one
rerun each of equilibrium and rotational for the determinism check. The other tests train
nothing (or a 5-step demo)."""

from __future__ import annotations

import contextlib
import csv
import io
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
                    "predicted_angular_update", "measured_angular_update", "refined_norm", "refined_angular_update",
                    "measured_angle_rms"},
    "equilibrium-sweep": {"optimizer", "setting", "seed", "layer", "neuron_size", "norm_error", "refined_norm_error",
                          "angle_rms_error", "refined_angle_error", "at_equilibrium"},
    "rotational": {"optimizer", "warmup", "layer_cv_mean", "layer_cv_early", "neuron_cv_mean", "neuron_cv_early",
                   "time_to_equilibrium", "time_to_equilibrium_max", "final_loss", "test_accuracy"},
    "sphere": {"run", "method", "init_scale", "layer", "initial_norm", "final_norm", "predicted_norm",
               "effective_lr_final", "effective_lr_predicted", "final_loss", "test_accuracy"},
    "lr-wd": {"optimizer", "lr", "weight_decay", "lr_times_wd", "final_loss", "test_accuracy",
              "conv_angle_final", "predicted_angle"},
    "why-wd": {"part", "run", "weight_decay", "decays", "seed"},
}
WHY_WD_PART_KEYS = {"a": {"final_loss", "spikes", "diverged_at", "decay_sum"},
                    "b": {"train_size", "epochs", "one_pass", "test_error", "train_error"},
                    "c": {"final_loss", "spikes", "diverged_at", "decay_sum"}}
PNGS = {"equilibrium": {"angles.png", "norms.png"}, "equilibrium-sweep": {"sweep.png"}, "rotational": {"imbalance.png", "loss.png"},
        "sphere": {"sphere.png"}, "lr-wd": {"lr_wd.png"}, "why-wd": {"lm_loss.png", "sweep.png"}}
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
                out = tmp_path_factory.mktemp(name.replace("-", "_"))
                printed = io.StringIO()
                with contextlib.redirect_stdout(printed):
                    cache[name] = _run(name, out)
                (out / "stdout.txt").write_text(printed.getvalue())
            finally:
                torch.set_num_threads(threads)
                torch.use_deterministic_algorithms(deterministic)
        return cache[name]

    return get


def test_registry():
    assert list(EXPERIMENTS) == ["equilibrium", "equilibrium-sweep", "rotational", "sphere", "lr-wd", "why-wd",
                                 "precision"]


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
    # Every experiment ends with a verdict in words, printed and in summary.json.
    assert summary["verdict"] and all(isinstance(v, str) and v for v in summary["verdict"])
    printed = (out / "stdout.txt").read_text()
    assert "\nverdict:\n" in printed and all(v in printed for v in summary["verdict"])


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


def test_refined_prediction_recomputed_from_statistics(outputs):
    """The refined predictions of the equilibrium table, recomputed from the window statistics
    saved in summary.json with the formulas written out here (docs/theory.md section 2.4), not
    wdopt.theory's code."""
    summary = json.loads((outputs("equilibrium") / "summary.json").read_text())
    rows = {(r["optimizer"], r["layer"]): r for r in summary["rows"]}
    checked = 0
    for key, stats in summary["statistics"].items():
        label, layer = key.split(":")
        if stats["optimizer"] not in ("adamw", "sgd") or layer not in CONV:
            continue
        row = rows[(stats["optimizer"], layer)]
        lr, d = stats["lr"], stats["lr"] * stats["weight_decay"]
        power = torch.tensor(stats["power"], dtype=torch.float64)
        correlation = power * (sum(stats["correlation"]) / sum(stats["power"]))
        radial = torch.tensor(stats["radial"], dtype=torch.float64)
        if stats["optimizer"] == "adamw":
            q = power + 2 * 0.9 / 0.1 * correlation
            # 2d·x + 2η·radial·sqrt(x) = η²·Q, a quadratic in sqrt(x)
            r = (-lr * radial + torch.sqrt((lr * radial) ** 2 + 2 * d * lr * lr * q)) / (2 * d)
            angle = lr * torch.sqrt(0.1 / 1.9 * q) / r
        else:
            q = power + 2 * 0.9 * correlation
            x = (-lr * radial + torch.sqrt((lr * radial) ** 2 + 2 * d * lr * lr * q / 0.1)) / (2 * d)
            r, angle = x.sqrt(), lr * torch.sqrt(q / (1 - 0.81)) / x
        if not torch.isfinite(r).all():
            assert row["refined_norm"] is None or math.isnan(row["refined_norm"])
            continue
        assert math.isclose(r.pow(2).mean().sqrt().item(), row["refined_norm"], rel_tol=1e-9), key
        assert math.isclose(angle.pow(2).mean().sqrt().item(), row["refined_angular_update"], rel_tol=1e-9), key
        assert math.isclose(row["refined_norm_error"], row["measured_norm"] / row["refined_norm"] - 1, rel_tol=1e-9)
        checked += 1
    assert checked >= 4


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
    # Part c in three precisions (wdopt precision's arms, with their optimizer options), each at
    # the preset's D points; the others against bf16 to nearest at the same D and seed.
    c = [r for r in summary["rows"] if r["part"] == "c"]
    options = {r["precision"]: r["options"] for r in c}
    assert options == {"bf16-nearest": {"stochastic_rounding": False}, "bf16-stochastic": {"stochastic_rounding": True},
                       "bf16-master24-states8": {"master_weight_bits": 24, "state_bits": 8, "stochastic_rounding": True}}
    assert all(r["dtype"] == "bfloat16" for r in c)
    assert {p["label"]: p["decays"] for p in summary["precisions"]} == {
        "bf16-nearest": [0.0, 10.0], "bf16-stochastic": [10.0], "bf16-master24-states8": [10.0]}
    for name in ("bf16-stochastic", "bf16-master24-states8"):
        line = next(v for v in summary["verdict"] if v.startswith(f"c, {name}: final loss minus bf16-nearest's"))
        mine = {r["seed"]: r["final_loss"] for r in c if r["precision"] == name}
        nearest = {r["seed"]: r["final_loss"] for r in c if r["precision"] == "bf16-nearest" and r["decays"] == 10.0}
        changes = [mine[s] - nearest[s] for s in summary["seeds"]]
        assert f"{sum(changes) / len(changes):+.4f} [" in line and "at D = 10" in line


def test_why_wd_sweeps_decay_time_constants(outputs):
    """λ is chosen so that the run spans D decay time constants (Σ_t η_t·λ = D; SGD in part b:
    Σ_t η_t·λ/(1 − μ)), measured back from the lrs the run used; every seed runs every point, and
    each point's paired changes are recomputed here from the rows."""
    from wdopt.experiments import why_wd

    summary = json.loads((outputs("why-wd") / "summary.json").read_text())
    rows, seeds = summary["rows"], summary["seeds"]
    assert len(seeds) >= 2
    for r in rows:
        if r["part"] in ("a", "c") and r["diverged_at"] is None:
            assert r["decay_sum"] == pytest.approx(r["decays"], rel=1e-9, abs=1e-12)
        assert {q["seed"] for q in rows if q["part"] == r["part"] and q["decays"] == r["decays"]
                and q.get("train_size") == r.get("train_size") and q.get("precision") == r.get("precision")} == set(seeds)
    for point in summary["points"]:
        def group(r):  # part c: each precision against its own λ = 0
            return (r["part"], r.get("train_size", 0), r.get("precision")) == (
                point["part"], point.get("train_size", 0), point.get("precision"))

        same = [r for r in rows if group(r) and r["decays"] == point["decays"]]
        base = {r["seed"]: r for r in rows if group(r) and r["decays"] == 0}
        assert same and [r["seed"] for r in same] == point["seeds"]
        metric = point["metric"]

        def value(r):
            return math.inf if r.get("diverged_at") else r[metric]

        assert point["changes"] == pytest.approx([value(r) - value(base[r["seed"]]) for r in same if base])
        assert (point["vs_no_decay"] == "—") == (point["decays"] == 0 or not base)  # no λ = 0 run: nothing paired
    b = next(r for r in rows if r["part"] == "b" and r["decays"] > 0)
    total = why_wd.schedule_sum(b["steps"]) * b["lr"]
    assert b["weight_decay"] * total / (1 - why_wd.MOMENTUM) == pytest.approx(b["decays"])


def test_why_wd_verdict_judges_every_seed():
    """A claim holds at a point only when weight decay helped for every seed, is reversed only when
    it hurt for every seed; one seed the other way makes it seed noise."""
    from wdopt.experiments.why_wd import _judge, verdict_sentences

    assert _judge([-0.1, -0.01]) == "holds" and _judge([0.1, 0.2]) == "reversed"
    assert _judge([-0.1, 0.01]) == "noise" and _judge([0.0, -0.1]) == "noise" and _judge([]) == "noise"
    points = [dict(part="a", decays=0.0, changes=[], vs_no_decay="—", norm_ratio=1.0),
              dict(part="a", decays=1.0, changes=[-0.2, -0.1], vs_no_decay="-0.15", norm_ratio=0.5),
              dict(part="a", decays=3.0, changes=[-0.2, 0.1], vs_no_decay="-0.05", norm_ratio=0.3),
              dict(part="a", decays=10.0, changes=[0.2, 0.1], vs_no_decay="+0.15", norm_ratio=0.1)]
    first = verdict_sentences(points)[0]
    assert "every seed at D ∈ {1}" in first and "raised it for every seed at D ∈ {10}" in first
    assert "seeds disagreed at D ∈ {3}" in first


@pytest.mark.parametrize("name", ["equilibrium", "rotational"])
def test_bitwise_deterministic(name, outputs, tmp_path):
    first = outputs(name)
    second = _run(name, tmp_path / "again")
    assert (first / "metrics.csv").read_bytes() == (second / "metrics.csv").read_bytes()


# ---------------------------------------------------------------------- verdicts


def test_equilibrium_quick_verdict_says_not_at_equilibrium(outputs):
    """--quick's Lion (ηλ = 9e-3 ≈ 1 − β2, norms still moving) is reported as not at equilibrium,
    in the table and the verdict, instead of as −50% errors of the theory; the classifier is
    named as not scale-invariant; AdamW and SGD get their error bounds."""
    out = outputs("equilibrium")
    summary = json.loads((out / "summary.json").read_text())
    printed = (out / "stdout.txt").read_text()
    lion = [r for r in summary["rows"] if r["optimizer"] == "lion" and r["scale_invariant"]]
    assert lion and not any(r["at_equilibrium"] for r in lion)
    assert all(r["note"] == "not at equilibrium yet" for r in lion)
    verdict = {v.split(":")[0]: v for v in summary["verdict"]}
    assert "not at equilibrium yet" in verdict["lion"] and "not a test of the theory" in verdict["lion"]
    assert "fc.weight is not scale-invariant and not expected to match" in printed
    for name in ("adamw", "sgd"):
        assert any(v.startswith(f"{name}:") and "norm within" in v for v in summary["verdict"]), name
    # "still growing" only where the control's norm grew.
    for c in summary["control"]:
        assert ("still growing" in printed.split(c["layer"] + ": RMS")[1].split("\n")[0]) == (c["growth"] > 1.01)


def _row(name, layer, norm_error, angle_error, span=8.0, drift=0.0, reasons=()):
    return {"optimizer": name, "layer": layer, "scale_invariant": layer in CONV, "norm_error": norm_error,
            "angle_error": angle_error, "relaxation_times": span, "norm_drift": drift,
            "at_equilibrium": not reasons, "not_at_equilibrium_because": list(reasons)}


def test_equilibrium_verdict_words_match_numbers():
    from wdopt.experiments import equilibrium

    rows = [_row("adamw", "conv1.weight", 0.085, -0.095), _row("adamw", "conv2.weight", -0.02, 0.01),
            _row("adamw", "fc.weight", 1.8, -0.6)]
    control = [{"layer": layer, "growth": g} for layer, g in zip(CONV, (1.05, 1.10, 1.12))]
    verdict = equilibrium.verdict_sentences(rows, control)
    assert verdict[0].startswith("adamw: scale-invariant layers: norm within 9%, angle within 10% of the prediction")
    assert verdict[1].startswith("fc.weight is not scale-invariant and not expected to match")
    assert "still growing" in verdict[2] and "×1.050–1.120" in verdict[2]
    # A control whose norm did not grow is not "still growing".
    flat = equilibrium.verdict_sentences(rows, [{"layer": layer, "growth": g} for layer, g in zip(CONV, (1.0, 0.98, 1.004))])
    assert "still growing" not in flat[-1] and "shrinking" in flat[-1]


def test_too_short_run_is_not_at_equilibrium():
    """A run shorter than 5 relaxation times (wdopt.theory's) is flagged, whatever its errors."""
    from wdopt import theory
    from wdopt.experiments import equilibrium

    tau = theory.adamw_equilibrium(3e-3, 3e-3 * 0.5, 9).time_constant  # 333 steps
    assert equilibrium.equilibrium_status("adamw", 3e-3, 0.5, 4000, tau, 0.0) == []
    reasons = equilibrium.equilibrium_status("adamw", 3e-3, 0.5, 1000, tau, 0.0)
    assert reasons and "relaxation times" in reasons[0]
    assert equilibrium.equilibrium_status("adamw", 3e-3, 0.5, 4000, tau, 0.05)  # still drifting 5%
    assert equilibrium.equilibrium_status("lion", 3e-3, 3.0, 4000, 1 / (2 * 9e-3), 0.0)  # ηλ ≈ 1 − β2
    verdict = equilibrium.verdict_sentences(
        [_row("adamw", layer, -0.4, 0.5, span=3.0, reasons=reasons) for layer in CONV], [])
    assert "not at equilibrium yet (the run spans 3 relaxation times (< 5))" in verdict[0]
    assert "within" not in verdict[0]


# ---------------------------------------------------------------------- failures before training


def _fails_with_one_line(capsys, argv) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert captured.out == ""  # nothing trained, nothing printed
    return lines[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_device_cuda_without_gpu_fails_before_training(capsys, tmp_path):
    line = _fails_with_one_line(capsys, ["equilibrium", "--quick", "--device", "cuda", "--out", str(tmp_path / "o")])
    assert line.startswith("wdopt equilibrium: error: --device cuda") and "no CUDA device" in line
    assert not (tmp_path / "o").exists()


def test_unwritable_out_fails_before_training(capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")  # a folder cannot be made under a file, even as root
    line = _fails_with_one_line(capsys, ["sphere", "--quick", "--out", str(blocker / "out")])
    assert line.startswith("wdopt sphere: error: --out") and "cannot write" in line


def test_unknown_backend_fails_before_training(capsys, tmp_path):
    line = _fails_with_one_line(capsys, ["lr-wd", "--quick", "--backend", "nope", "--out", str(tmp_path / "o")])
    assert "--backend 'nope' is unknown" in line
    line = _fails_with_one_line(capsys, ["why-wd", "--quick", "--optimizer", "sgd", "--out", str(tmp_path / "o")])
    assert line.startswith("wdopt why-wd: error: parts a and c")
    line = _fails_with_one_line(capsys, ["demo", "--backend", "nope"])
    assert line.startswith("wdopt demo: error: --backend 'nope' is unknown")


# ---------------------------------------------------------------------- demo, bench, report


def test_demo_compares_with_torch_fused(capsys):
    assert main(["demo", "--steps", "5"]) == 0
    out = capsys.readouterr().out
    speed = next(line for line in out.splitlines() if line.startswith("mean optimizer step"))
    assert "torch.optim.AdamW(fused=True)" in speed and "wdopt.FusedAdamW" in speed
    assert "The two runs follow the same trajectory." in out


def test_bench_help_names_wdopt_bench(capsys):
    with pytest.raises(SystemExit) as info:
        main(["bench", "--help"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("usage: wdopt bench")


def test_bench_plot_marks_noisy_ratios(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from wdopt import bench

    def row(shape_set, competitor, median, p10, p90):
        return bench.Row("adamw", "float32", shape_set, 1, 1, competitor, 1, 10, median, median, p10, p90, 16, 1.0,
                         baseline="torch fused", ratio=median / 1.0)

    rows = [row("gpt2", "torch fused", 1.0, 0.9, 1.1), row("gpt2", "wdopt cpu", 0.5, 0.45, 0.55),
            row("resnet50", "torch fused", 1.0, 0.9, 1.1), row("resnet50", "wdopt cpu", 0.02, 0.01, 0.9)]
    figures = []
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig))
    assert bench.plot_ratios(rows, tmp_path / "r.png").startswith("wrote")
    ax = figures[0].axes[0]
    marks = [t for t in ax.texts if t.get_text() == "~"]
    assert len(marks) == 1 and marks[0].xy[1] == pytest.approx(0.02)  # only the noisy resnet50 bar
    assert any("noisy" in t.get_text() for t in ax.get_legend().get_texts())


def test_report_renders_every_run_with_its_torch_version(outputs):
    from wdopt.experiments import report

    out = outputs("equilibrium")
    summary = json.loads((out / "summary.json").read_text())
    text = (out / "stdout.txt").read_text()
    template = "# E\n<!-- overview -->\n<!-- seeds -->\n<!-- run: equilibrium -->\n"
    md = report.render(template, {"equilibrium": (summary, text)}, {0: summary})
    assert "<!--" not in md
    assert md.count(f"torch {torch.__version__}") >= 2  # beside the table and the seed spread
    assert all(f"- {v}" in md for v in summary["verdict"])
    assert "| conv1.weight |" in md and "×" in md  # the λ = 0 growth range


# ---------------------------------------------------------------------- precision (bf16 storage)

ROW_KEYS["precision"] = {"arm", "dtype", "eta_r", "d", "lr", "weight_decay", "steps", "relaxation_times",
                         "predicted_angular_update", "measured_angular_update", "angle_error", "computed_update",
                         "stored_update", "rounding_factor", "model_rounding_factor", "norm_ratio", "norm_error",
                         "at_equilibrium", "unchanged_fraction", "grad_power", "final_loss", "test_accuracy"}
PNGS["precision"] = {"precision.png", "quality.png"}


def test_precision_numbers_recomputed(outputs):
    """wdopt precision --quick: every arm at every point; η_r, the predicted norms and the errors
    recomputed with AdamW's formulas written out here (docs/theory.md section 2.2), the rounding
    factor from the fp32 row, and the unchanged fraction from the weights saved around the last
    step; then the science that --quick can already show at η_r = 2^-10: stochastic rounding
    inflates the stored update (the element model says ×1.4), and fp32 changes every element."""
    out = outputs("precision")
    summary = json.loads((out / "summary.json").read_text())
    weights = torch.load(out / "weights.pt", weights_only=True)
    rows, layers = summary["rows"], summary["layers"]
    arms = ["fp32", "bf16-nearest", "bf16-stochastic", "bf16-master24", "bf16-master24-stochastic",
            "bf16-master24-states8"]
    exponents = sorted({r["exponent"] for r in rows})
    assert exponents == pytest.approx([5.0, 10.0])
    assert sorted((r["arm"], round(r["exponent"])) for r in rows) == sorted((a, k) for a in arms for k in (5, 10))
    beta1 = 0.9
    for row in rows:
        d = row["lr"] * row["weight_decay"]
        eta_r = math.sqrt(2 * d * (1 - beta1) / (1 + beta1))
        assert row["d"] == pytest.approx(d, rel=1e-12)
        assert row["eta_r"] == pytest.approx(eta_r, rel=1e-12) == pytest.approx(2.0 ** -row["exponent"], rel=1e-9)
        assert row["predicted_angular_update"] == pytest.approx(eta_r, rel=1e-12)
        assert row["angle_error"] == pytest.approx(row["measured_angular_update"] / eta_r - 1, rel=1e-9)
        assert row["relaxation_times"] == pytest.approx(row["steps"] * 2 * d, rel=1e-9)
        mine = [r for r in layers if r["arm"] == row["arm"] and r["exponent"] == row["exponent"]]
        assert [r["layer"] for r in mine] == list(CONV)
        for r in mine:
            assert r["predicted_norm"] == pytest.approx(row["lr"] * math.sqrt(r["neuron_size"] / (2 * d)), rel=1e-12)
        errors = [r["measured_norm"] / r["predicted_norm"] - 1 for r in mine]
        assert row["norm_error"] == pytest.approx(sum(errors) / len(errors), rel=1e-9)
        angles = [r["measured_angular_update"] for r in mine]
        assert row["measured_angular_update"] == pytest.approx(sum(angles) / len(angles), rel=1e-12)
        base = next(r for r in rows if r["arm"] == "fp32" and r["exponent"] == row["exponent"])
        assert row["rounding_factor"] == pytest.approx(
            (row["stored_update"] / row["computed_update"]) / (base["stored_update"] / base["computed_update"]), rel=1e-9)
        saved = weights[f"{row['arm']} 2^-{row['exponent']:.3g}"]
        same = sum((saved["final"][n] == saved["before_last_step"][n]).sum().item() for n in CONV)
        total = sum(saved["final"][n].numel() for n in CONV)
        assert row["unchanged_fraction"] == pytest.approx(same / total, abs=1e-12)
        assert saved["final"]["conv1.weight"].dtype == (torch.float32 if row["arm"] == "fp32" else torch.bfloat16)
    small = {r["arm"]: r for r in rows if r["exponent"] == 10.0}
    assert small["fp32"]["unchanged_fraction"] < 0.01 < small["bf16-nearest"]["unchanged_fraction"]
    assert small["bf16-stochastic"]["rounding_factor"] > 1.2
    assert small["bf16-stochastic"]["model_rounding_factor"] > 1.2
    assert any(v.startswith("bf16-stochastic:") for v in summary["verdict"])
    # A 24-bit master weight stores the update the kernel computed (its rounding is 2^-8 of bf16's).
    for arm in ("bf16-master24", "bf16-master24-stochastic", "bf16-master24-states8"):
        assert abs(small[arm]["rounding_factor"] - 1) < 0.05, (arm, small[arm]["rounding_factor"])


def test_precision_element_model_against_the_rounding_spec():
    """The element model's stored/computed factor against a Monte Carlo of the real roundings:
    torch's round-to-nearest bf16 cast and wdopt.reference.rounding's stochastic rounding with
    random words; and SR's |u| ≪ ulp limit sqrt(1 + 2^-7/(π ln 2)/η_r) (docs/theory.md section 6)."""
    from wdopt.experiments.precision import element_model
    from wdopt.reference import rounding as R

    g = torch.Generator().manual_seed(123)
    n = 1 << 18
    for eta_r in (2.0 ** -6, 2.0 ** -9, 2.0 ** -11):
        w = torch.randn(n, generator=g).to(torch.bfloat16).float()
        u = eta_r * torch.randn(n, generator=g)
        x = w + u
        bits = torch.randint(0, 2 ** 32, (n,), generator=g, dtype=torch.int64)
        stored = {"nearest": x.to(torch.bfloat16).float(), "stochastic": R.stochastic_round(x, torch.bfloat16, bits).float()}
        for rounding, s in stored.items():
            empirical = math.sqrt(((s - w).double().pow(2).mean() / u.double().pow(2).mean()).item())
            assert element_model(eta_r, rounding, samples=n) == pytest.approx(empirical, rel=0.04), (eta_r, rounding)
    limit = math.sqrt(1 + 2.0 ** -7 / (math.pi * math.log(2)) / 2.0 ** -13)
    assert element_model(2.0 ** -13, "stochastic") == pytest.approx(limit, rel=0.05)
    assert element_model(2.0 ** -4, "nearest") == pytest.approx(1.0, abs=0.01)
    assert element_model(2.0 ** -12, "nearest") < 0.6


def test_precision_quality_part(outputs):
    """wdopt precision --quick's part quality (issue #11's target, in small): every arm, model and
    seed ran; the table's means, spreads and relative differences (of the means, and per seed
    against fp32 of the same seed) and the target's verdict recomputed from the runs; the runs'
    configuration read from why-wd's and the equilibrium experiment's presets."""
    from wdopt.experiments import equilibrium, precision, why_wd

    out = outputs("precision")
    summary = json.loads((out / "summary.json").read_text())
    quality = summary["quality"]
    runs, seeds = quality["runs"], quality["seeds"]
    arms = ["fp32", "bf16-nearest", "bf16-master24-states8", "bf16-master32-states8"]
    assert summary["parts"] == ["sweep", "quality"] and len(seeds) == 2
    assert sorted((r["model"], r["arm"], r["seed"]) for r in runs) == sorted(
        (m, a, s) for m in ("tinygpt", "convnet") for a in arms for s in seeds)
    assert {a["label"]: a["bytes_per_parameter"] for a in quality["arms"]} == pytest.approx(
        {"fp32": 12, "bf16-nearest": 6, "bf16-master24-states8": 5 + 1 / 32, "bf16-master32-states8": 6 + 1 / 32})
    for row in quality["table"]:
        model = {"TinyGPT": "tinygpt", "ConvNet": "convnet"}[row["model"]]
        mine = {r["seed"]: r["final_loss"] for r in runs if r["model"] == model and r["arm"] == row["arm"]}
        fp32 = {r["seed"]: r["final_loss"] for r in runs if r["model"] == model and r["arm"] == "fp32"}
        mean, base = sum(mine.values()) / len(mine), sum(fp32.values()) / len(fp32)
        assert row["final_loss"] == pytest.approx(mean, rel=1e-12)
        assert (row["loss_min"], row["loss_max"]) == (min(mine.values()), max(mine.values()))
        if row["arm"] == "fp32":
            assert row["relative_to_fp32"] is None and row["target"] == "—"
            continue
        assert row["relative_to_fp32"] == pytest.approx(mean / base - 1, rel=1e-9)
        assert row["paired_relative"] == pytest.approx([mine[s] / fp32[s] - 1 for s in seeds], rel=1e-9)
        assert row["within_target"] == (abs(mean / base - 1) <= 0.01)
    target = next(v for v in summary["verdict"] if v.startswith("quality: issue #11's target"))
    assert "bf16-master24-states8, 5.03 bytes a parameter" in target
    assert any(v.startswith("quality: bf16-nearest in the same runs") for v in summary["verdict"])
    printed = (out / "stdout.txt").read_text()
    assert "quality (issue #11's target):" in printed and "bf16-master32-states8" in printed
    # The fixed runs: why-wd's TinyGPT at λ = 0.1, the equilibrium experiment's ConvNet.
    default = precision.PRESETS["default"]["quality"]
    lm, conv = default["tinygpt"], default["convnet"]
    assert (lm["lm"], lm["steps"], lm["lr"], lm["weight_decay"]) == (
        why_wd.PRESETS["default"]["lm"], why_wd.PRESETS["default"]["steps"], why_wd.PRESETS["default"]["lr"], 0.1)
    eq = equilibrium.PRESETS["default"]
    assert (conv["width"], conv["batch"], conv["steps"], (conv["lr"], conv["weight_decay"])) == (
        eq["width"], eq["batch"], eq["steps"], eq["adamw"])
    assert default["seeds"] == 3


def test_precision_quality_verdict_says_missed():
    """The target's verdict follows the numbers: a mean outside 1% is 'missed', a diverged run
    counts as infinitely worse, and per-seed differences beyond 1% under a mean within it are named."""
    from wdopt.experiments.precision import QUALITY_ARMS, quality_table, quality_verdict

    losses = {("tinygpt", "fp32"): (2.0, 2.2), ("tinygpt", "bf16-nearest"): (2.1, 2.3),
              ("tinygpt", "bf16-master24-states8"): (2.03, 2.17), ("tinygpt", "bf16-master32-states8"): (2.0, 2.2),
              ("convnet", "fp32"): (1.0, 1.0), ("convnet", "bf16-nearest"): (1.0, None),
              ("convnet", "bf16-master24-states8"): (1.03, 1.01), ("convnet", "bf16-master32-states8"): (1.0, 1.0)}
    runs = [{"model": m, "arm": a, "seed": s, "final_loss": v if v is not None else 0.5,
             "diverged_at": None if v is not None else 7} for (m, a), vs in losses.items() for s, v in enumerate(vs)]
    table = quality_table(runs, QUALITY_ARMS)
    verdict = quality_verdict({"table": table, "target": 0.01, "subject": "bf16-master24-states8", "seeds": [0, 1]})
    target = next(v for v in verdict if v.startswith("quality: issue #11's target"))
    assert "met on TinyGPT (" in target and "missed on ConvNet (+2.00%)" in target
    assert any("single seeds of TinyGPT differ by more than 1%" in v for v in verdict)
    nearest = next(v for v in verdict if v.startswith("quality: bf16-nearest in the same runs"))
    assert "TinyGPT +4.76% (outside 1% of fp32's)" in nearest and "ConvNet diverged (outside 1%" in nearest
