"""`python -m segmentation <command> ...`: one entry point for train, eval, predict and demo-data.

Each command is a module with `main(argv) -> int`, imported only when chosen (train does not pay for CRF,
eval does not pay for the solver). Bad input raises CaffeError: one line `error: ...` and exit code 2.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from converter.errors import CaffeError

EXIT_BAD_INPUT = 2

# command -> (module holding main(argv), one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "eval": ("segmentation.evaluate", "score a checkpoint (or saved predictions) on a VOC-layout list: mIoU report"),
    "predict": ("segmentation.predict", "segment any photos: palette label PNGs and overlays"),
    "train": ("segmentation.train", "fine-tune DeepLab-v2 exactly as Caffe's solver did: snapshots, log.csv"),
    "demo-data": ("segmentation.demo_data", "write a small synthetic VOC-layout dataset"),
}

USAGE = "usage: python -m segmentation {" + ",".join(COMMANDS) + "} [options]  (each command has --help)"


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch to the chosen command; returns its exit code (2 for bad input)."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if not arguments or arguments[0] in ("-h", "--help"):
        lines = [USAGE, ""] + [f"  {name:<10} {text}" for name, (_, text) in COMMANDS.items()]
        print("\n".join(lines))
        return 0 if arguments else EXIT_BAD_INPUT
    command, rest = arguments[0], arguments[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}; {USAGE}", file=sys.stderr)
        return EXIT_BAD_INPUT
    module = importlib.import_module(COMMANDS[command][0])
    try:
        return int(module.main(rest) or 0)
    except CaffeError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    raise SystemExit(main())
