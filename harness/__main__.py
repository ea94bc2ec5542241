"""Command line: `python -m harness build | model NAME | targets NAME | archs | results | report | bench`.

Progress goes to stderr; the last line of stdout is the result (a directory or a file path).
"""

from __future__ import annotations

import argparse
import sys

from harness.build import BACKEND_FLAGS
from harness.cache import HarnessError


def _build(args: argparse.Namespace) -> str:
    from harness.build import build

    return str(build(args.backend).bin_dir)


def _model(args: argparse.Namespace) -> str:
    from harness.build import build
    from harness.models import get_model

    return str(get_model(args.name, build()).path)


def _results(args: argparse.Namespace) -> str:
    """Every group of every experiment model (measured now, or from the cache) and the verdicts."""
    from harness import matrix
    from harness.build import build
    from harness.corpus import load_corpus
    from harness.runner import ModelSession
    from harness.verdicts import write_results

    fingerprint = build().fingerprint
    corpus = load_corpus()
    sessions = {name: ModelSession(name, build(), corpus) for name in matrix.experiment_models()}
    try:
        path = write_results(sessions, fingerprint, {"name": corpus.name, "sha256": corpus.sha256,
                                                     "n_chars": len(corpus.text)})
    finally:
        for session in sessions.values():
            session.close()
    return str(path)


def _report(args: argparse.Namespace) -> str:
    from pathlib import Path

    from harness.report import render
    from harness.verdicts import results_path

    results = Path(args.results) if args.results else results_path()
    index = render(results, Path(args.out) if args.out else results.parent)
    print(f"[harness] report written: {index}", file=sys.stderr)
    return str(index)


def _archs(args: argparse.Namespace) -> str:
    """Every architecture's tiny model: every name, native vs reference; the table as the result."""
    from harness.archs import check_all, table, update_readme
    from harness.build import build

    text = table(check_all(build()))
    if args.readme:
        update_readme(text)
    return text


def _targets(args: argparse.Namespace) -> str:
    """The fake-quant targets of a model's graphs (libllama's llama_fake_quant_list)."""
    from harness.build import build
    from harness.driver import Model
    from harness.models import get_model

    b = build()
    model = Model(get_model(args.name, b).path, b)
    ctx = model.context(args.n_ctx)
    try:
        rows = [f"{t.graph}\t{t.name}\t{','.join(map(str, t.layers)) or '-'}\t{'x'.join(map(str, t.shape))}\t{t.count}"
                for t in ctx.fake_quant_targets()]
    finally:
        ctx.close()
        model.close()
    return "graph\tname\tlayers\tshape\tcount\n" + "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("build", help="build (or reuse) the patched llama.cpp; prints the bin directory")
    p.add_argument("--backend", choices=sorted(BACKEND_FLAGS), default="cpu",
                   help="a backend beside the CPU: vulkan (tested on Mesa lavapipe) or cuda (offered, not tested)")
    p.set_defaults(run=_build)
    p = sub.add_parser("model", help="prepare a model; prints the path of its GGUF file")
    p.add_argument("name", help="smollm2-q4_1, smollm2-f32, smollm2-f16, gemma3-270m, user ($FQ_MODEL) or a .gguf path")
    p.set_defaults(run=_model)
    p = sub.add_parser("results", help="measure (or reuse) every group of the matrix; prints the results file")
    p.set_defaults(run=_results)
    p = sub.add_parser("report", help="render a results file into index.md + PNG plots; prints index.md's path")
    p.add_argument("--results", help="results file (default: $FQ_RESULTS or report/results.json)")
    p.add_argument("--out", help="report directory (default: the results file's directory)")
    p.set_defaults(run=_report)
    p = sub.add_parser("targets", help="list the names fake quantization can target in a model's graphs")
    p.add_argument("name", help="a model name as for `model`, or a .gguf path")
    p.add_argument("--n-ctx", type=int, default=512, help="tokens of the pp graph (default 512)")
    p.set_defaults(run=_targets)
    p = sub.add_parser("archs", help="every architecture's tiny model: every name, native vs reference")
    p.add_argument("--readme", action="store_true", help="also rewrite the generated table in native/README.md")
    p.set_defaults(run=_archs)
    sub.add_parser("bench", help="benchmarks (python -m harness bench --help)", add_help=False)
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its options are bench.py's own
        from harness.bench import main_bench

        return main_bench(argv[1:])
    args = parser.parse_args(argv)
    try:
        print(args.run(args))
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
