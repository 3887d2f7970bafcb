"""The ``densecap`` command: one entry point, subcommands loaded lazily so ``densecap --help`` stays fast.

Each subcommand lives in its own module and exposes ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Modules are imported only when their command runs.
COMMANDS: dict[str, tuple[str, str]] = {
    "caption": ("densecap_core.commands.caption", "caption images or a folder (boxes, captions, results.json)"),
    "view": ("densecap_core.commands.view", "serve the results viewer for an output folder"),
    "benchmark": ("densecap_core.commands.benchmark", "time each model config and its stages"),
    "synth": ("densecap_core.commands.synth", "write a synthetic scene dataset in Visual Genome format"),
    "preprocess": ("densecap_core.commands.preprocess", "Visual Genome regions + images to one HDF5 file"),
    "train": ("densecap_core.commands.train", "train a model (CPU or CUDA)"),
    "evaluate": ("densecap_core.commands.evaluate", "dense-captioning mAP with METEOR"),
    "extract-features": ("densecap_core.commands.extract_features",
                         "region codes, boxes and captions of each image's top regions, to HDF5"),
    "search": ("densecap_core.commands.search", "find the regions that fit a phrase (open-world detection)"),
    "convert-t7": ("densecap_core.commands.convert_t7", "convert the original Torch7 checkpoint"),
    "submit": ("client.submit", "upload a folder as a bulk job to a gateway and fetch its results"),
    "run": ("densecap_core.commands.run", "start redis, gateway and workers on this machine (what scripts/run does)"),
}


def _available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, str]]:
    parser = argparse.ArgumentParser(prog="densecap", description="Dense image captioning (DenseCap) tools.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = {}
    for name, (module, help_text) in COMMANDS.items():
        try:
            present = _available(module)
        except ModuleNotFoundError:
            present = False
        if not present:
            continue
        modules[name] = module
        sub.add_parser(name, help=help_text, add_help=False)
    return parser, modules


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, modules = build_parser()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in modules:
        if argv and argv[0] not in ("-h", "--help"):
            parser.print_help(sys.stderr)
            print(f"\ndensecap: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        parser.print_help()
        return 0
    name = argv[0]
    mod = importlib.import_module(modules[name])
    sub = argparse.ArgumentParser(prog=f"densecap {name}", description=COMMANDS[name][1])
    mod.add_arguments(sub)
    args = sub.parse_args(argv[1:])
    try:
        return int(mod.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
