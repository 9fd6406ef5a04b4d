"""Experiments that check the theory on real training (``wdopt <experiment>``; EXPERIMENTS.md).

Each module defines NAME, HELP, ``add_arguments(parser)`` and ``run(args) -> summary``, and
shares ``harness`` (options, outputs, determinism, the training helpers), ``data`` (nothing is
downloaded) and ``models``.
"""

from __future__ import annotations

import importlib

#: subcommand -> module, in the order the help lists them.
EXPERIMENTS = {
    "equilibrium": "wdopt.experiments.equilibrium",
    "equilibrium-sweep": "wdopt.experiments.equilibrium_sweep",
    "rotational": "wdopt.experiments.rotational",
    "sphere": "wdopt.experiments.sphere",
    "lr-wd": "wdopt.experiments.lr_wd",
    "why-wd": "wdopt.experiments.why_wd",
    "precision": "wdopt.experiments.precision",
}


def load(name: str):
    return importlib.import_module(EXPERIMENTS[name])
