"""Command line: `python -m harness build | model NAME | report [RESULTS] | bench`.

Progress goes to stderr; the last line of stdout is the result (a directory or a file path).
"""

from __future__ import annotations

import argparse
import sys

from harness.cache import HarnessError


def _build(args: argparse.Namespace) -> str:
    from harness.build import build

    return str(build(cuda=args.cuda).bin_dir)


def _model(args: argparse.Namespace) -> str:
    from harness.build import build
    from harness.models import get_model

    return str(get_model(args.name, build()).path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("build", help="build (or reuse) the patched llama.cpp; prints the bin directory")
    p.add_argument("--cuda", action="store_true", help="add -DGGML_CUDA=ON (offered, not tested by this suite)")
    p.set_defaults(run=_build)
    p = sub.add_parser("model", help="prepare a model; prints the path of its GGUF file")
    p.add_argument("name", help="smollm2-q4_1, smollm2-f32, smollm2-f16, gemma3-270m, user ($FQ_MODEL) or a .gguf path")
    p.set_defaults(run=_model)
    args = parser.parse_args(argv)
    try:
        print(args.run(args))
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
