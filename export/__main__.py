"""`python -m export`: the model lifecycle (train, export, evaluate, dataset audit).

    python -m export train classifier|unet|maskrcnn [options]
    python -m export export classifier|unet|maskrcnn|tiny|decision [options]
    python -m export evaluate classifier|unet|maskrcnn|service [options]
    python -m export data audit [options]

Each module is imported only when used: TensorFlow and torchvision must never
meet in one process, and `--help` should stay fast.
"""

from __future__ import annotations

import importlib
import sys

# (command, model) → (module exposing get_args_parser() and main(args), whether the model name is passed on)
COMMANDS: dict[tuple[str, str], tuple[str, bool]] = {
    ("train", "classifier"): ("export.train_classifier", False),
    ("train", "unet"): ("export.train_unet", False),
    ("train", "maskrcnn"): ("export.train_maskrcnn", False),
    ("export", "classifier"): ("export.export_keras", True),
    ("export", "unet"): ("export.export_keras", True),
    ("export", "maskrcnn"): ("export.export_maskrcnn", False),
    ("export", "tiny"): ("export.tiny", False),
    ("export", "decision"): ("export.calibrate_decision", False),
    ("evaluate", "classifier"): ("export.evaluate_keras", True),
    ("evaluate", "unet"): ("export.evaluate_keras", True),
    ("evaluate", "maskrcnn"): ("export.evaluate_maskrcnn", False),
    ("evaluate", "service"): ("export.evaluate_service", False),
    ("data", "audit"): ("export.audit", False),
}


def main(argv: list[str]) -> int:
    if len(argv) < 2 or (argv[0], argv[1]) not in COMMANDS:
        print(__doc__.strip().split("\n\n")[1], file=sys.stderr)
        return 2
    module_name, pass_model = COMMANDS[(argv[0], argv[1])]
    module = importlib.import_module(module_name)
    parser = module.get_args_parser()
    # A module that takes the model as its own positional argument shows it in its usage line.
    parser.prog = f"python -m export {argv[0]}" if pass_model else f"python -m export {argv[0]} {argv[1]}"
    return int(module.main(parser.parse_args(argv[1:] if pass_model else argv[2:])) or 0)


raise SystemExit(main(sys.argv[1:]))
