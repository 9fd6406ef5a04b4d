"""``wdopt report`` (or ``python -m wdopt.experiments.report``): rerun the experiments and write
EXPERIMENTS.md from their summaries, in one command.

    wdopt report                        # every experiment at its default size, seeds 0 1 2 for the
                                        # equilibrium spread; writes docs/experiments/ and EXPERIMENTS.md
    wdopt report --only sphere lr-wd    # rerun these, reuse the others' saved outputs
    wdopt report --no-run               # only rebuild EXPERIMENTS.md from docs/experiments/
    wdopt report --quick --out /tmp/r --markdown /tmp/r/EXPERIMENTS.md   # a smoke test

Each experiment writes its folder (summary.json and the plots; the report deletes metrics.csv
and weights.pt, which are large and regenerable, and summary.json holds every reported number)
and ``<name>.txt``, its printed output. EXPERIMENTS.md is the template
``docs/experiments/EXPERIMENTS.template.md`` with each ``<!-- run: NAME -->`` marker replaced by
that run's command, environment (torch version, CPU, threads, date, git commit), printed table
and verdict, ``<!-- seeds -->`` by the equilibrium spread over seeds and ``<!-- overview -->`` by
one line per experiment. The template's prose is written by hand and reads the numbers through
the verdicts, so that a rerun on another machine or torch cannot leave stale numbers in it.

Only the numbers of the machine and torch that produced them are claimed: the runs are bitwise
deterministic for a seed on one machine and torch build, not across CPUs or torch versions (a
different vector width or library changes the rounding, and training amplifies it).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

from . import EXPERIMENTS

HELP = "rerun the experiments and regenerate EXPERIMENTS.md from their summaries"
ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "docs" / "experiments" / "EXPERIMENTS.template.md"
SEEDS = (0, 1, 2)
CONV = ("conv1.weight", "conv2.weight", "conv3.weight")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "experiments",
                        help="folder for the outputs (default docs/experiments/)")
    parser.add_argument("--markdown", type=Path, default=ROOT / "EXPERIMENTS.md", help="the file to write")
    parser.add_argument("--template", type=Path, default=TEMPLATE)
    parser.add_argument("--only", nargs="+", choices=list(EXPERIMENTS), default=None,
                        help="rerun only these; the others' saved outputs are reused")
    parser.add_argument("--no-run", action="store_true", help="rerun nothing: rebuild the markdown only")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS),
                        help="seeds of the equilibrium AdamW + λ = 0 spread (default 0 1 2; seed 0 is the main run)")
    parser.add_argument("--quick", action="store_true", help="--quick sizes (a smoke test, not for EXPERIMENTS.md)")


def _git_commit() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "wdopt", "csrc"], cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout.strip()
        return commit + (" + uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_one(argv: list[str], out: Path, text_file: Path | None) -> dict:
    """One ``wdopt`` experiment in this process; its printed output goes to ``text_file`` too."""
    from ..cli import main

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = main([*argv, "--no-progress", "--out", str(out)])
    sys.stdout.write(buffer.getvalue())
    if code:
        raise SystemExit(f"wdopt report: `wdopt {' '.join(argv)}` exited with {code}")
    summary = json.loads((out / "summary.json").read_text())
    summary.setdefault("environment", {})["git"] = _git_commit()
    summary["command"] = "wdopt " + " ".join(argv)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    # Large and regenerable: not part of the record (summary.json has every reported number).
    for name in ("metrics.csv", "weights.pt"):
        (out / name).unlink(missing_ok=True)
    if text_file is not None:
        text_file.write_text(_strip_paths(buffer.getvalue(), out))
    return summary


def _strip_paths(text: str, out: Path) -> str:
    return text.replace(str(out) + "/", out.name + "/")


def load(out: Path, name: str) -> tuple[dict, str]:
    summary = json.loads((out / name / "summary.json").read_text())
    text_path = out / f"{name}.txt"
    return summary, text_path.read_text() if text_path.exists() else ""


def environment_line(summary: dict) -> str:
    env = summary.get("environment", {})
    config = summary.get("config", {})
    return (f"torch {env.get('torch', '?')}, Python {env.get('python', '?')}, {env.get('cpu', env.get('machine', '?'))}, "
            f"{env.get('threads', '?')} torch thread(s), device {config.get('device', '?')}, backend "
            f"{config.get('backend', '?')}, seed {config.get('seed', '?')}, preset {config.get('preset', '?')}, wdopt "
            f"{env.get('wdopt', '?')} at git {env.get('git', '?')}, {env.get('date', '?')}, {summary.get('seconds', '?')} s")


def run_block(name: str, summary: dict, text: str) -> str:
    """A run as EXPERIMENTS.md shows it: command, environment, printed output, plots, verdict."""
    command = summary.get("command", f"wdopt {name}")
    lines = ["```bash", command, "```", "", f"*{environment_line(summary)}*", "", "```", text.strip("\n"), "```", ""]
    for png in summary.get("plots", []):
        lines.append(f"![{name} {png}](docs/experiments/{name}/{png})")
    lines += ["", "**Verdict** (generated from the table above):", ""]
    lines += [f"- {sentence}" for sentence in summary.get("verdict", [])] or ["- (no verdict recorded)"]
    return "\n".join(lines)


def seeds_block(summaries: dict[int, dict]) -> str:
    """The equilibrium experiment's AdamW rows and λ = 0 control over seeds: min–max per layer."""
    if not summaries:
        return "(no seed runs recorded)"
    seeds = sorted(summaries)
    env = summaries[seeds[0]].get("environment", {})
    lines = [f"*AdamW and its λ = 0 control, seeds {', '.join(map(str, seeds))}; torch {env.get('torch', '?')}, "
             f"{env.get('cpu', '?')}; `wdopt equilibrium --optimizer adamw --seed S`*", "",
             "| layer | AdamW norm error | AdamW angle error | λ = 0 norm growth over the last 20% |",
             "|---|---|---|---|"]
    for layer in CONV:
        norms, angles, growths = [], [], []
        for s in seeds:
            summary = summaries[s]
            row = next((r for r in summary["rows"] if r["optimizer"] == "adamw" and r["layer"] == layer), None)
            if row is not None:
                norms.append(row["norm_error"])
                angles.append(row["angle_error"])
            control = next((c for c in summary.get("control", []) if c["layer"] == layer), None)
            if control is not None:
                growths.append(control["growth"])

        def span(values, percent=True):
            if not values:
                return "—"
            lo, hi = min(values), max(values)
            return f"{100 * lo:+.1f}% … {100 * hi:+.1f}%" if percent else f"×{lo:.3f} … ×{hi:.3f}"

        lines.append(f"| {layer} | {span(norms)} | {span(angles)} | {span(growths, percent=False)} |")
    return "\n".join(lines)


def overview(results: dict[str, tuple[dict, str]]) -> str:
    lines = ["| experiment | torch | verdict (generated) |", "|---|---|---|"]
    for name, (summary, _) in results.items():
        verdict = "<br>".join(summary.get("verdict", [])) or "—"
        lines.append(f"| `{name}` | {summary.get('environment', {}).get('torch', '?')} | {verdict} |")
    return "\n".join(lines)


def render(template: str, results: dict[str, tuple[dict, str]], seed_summaries: dict[int, dict]) -> str:
    text = template.replace("<!-- overview -->", overview(results))
    text = text.replace("<!-- seeds -->", seeds_block(seed_summaries))
    for name, (summary, printed) in results.items():
        text = text.replace(f"<!-- run: {name} -->", run_block(name, summary, printed))
    return text


def run(args) -> int:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    names = list(EXPERIMENTS)
    rerun = [] if args.no_run else (args.only or names)
    size = ["--quick"] if args.quick else []
    for name in rerun:
        run_one([name, *size], out / name, out / f"{name}.txt")
    seed_dir = out / "equilibrium-seeds"
    if "equilibrium" in rerun:
        for seed in args.seeds:
            if seed != 0:
                seed_out = seed_dir / f"seed{seed}"
                run_one(["equilibrium", *size, "--optimizer", "adamw", "--seed", str(seed)], seed_out, None)
                for png in seed_out.glob("*.png"):  # only the spread's numbers are shown
                    png.unlink()
    results = {name: load(out, name) for name in names if (out / name / "summary.json").exists()}
    seed_summaries = {}
    if "equilibrium" in results:
        seed_summaries[0] = results["equilibrium"][0]
    for seed in args.seeds:
        path = seed_dir / f"seed{seed}" / "summary.json"
        if seed != 0 and path.exists():
            seed_summaries[seed] = json.loads(path.read_text())
    args.markdown.write_text(render(args.template.read_text(), results, seed_summaries))
    print(f"wrote {args.markdown} from {', '.join(results)} ({out}/)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wdopt.experiments.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
