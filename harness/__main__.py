"""Command line: `python -m harness build | model NAME | targets NAME | archs | results | report | bench |
atlas | advise | cache [prune] | measurement | pack`.

Progress goes to stderr; the last line of stdout is the result (a directory or a file path).
Measuring commands take `--backend cpu|vulkan|cuda` and `--gpu-layers N` ($FQ_BACKEND, $FQ_GPU_LAYERS;
default the CPU; a GPU backend offloads every layer unless told): docs/gpu.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator

from harness.build import BACKEND_FLAGS, offload
from harness.cache import HarnessError
from harness.formats import TABLE
from harness.source import SOURCE_ENV


def _build(args: argparse.Namespace) -> str:
    from harness.build import build

    if args.source:  # for this process and every one it starts (harness.source.locate reads it)
        os.environ[SOURCE_ENV] = args.source
    return str(build(args.backend).bin_dir)


def _pack(args: argparse.Namespace) -> str:
    from pathlib import Path

    from harness.pack import make_pack

    return str(make_pack(Path(args.out), args.source))


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

    backend, layers = offload(args.backend, args.gpu_layers)
    b = build(backend)
    corpus = load_corpus()
    sessions = {name: ModelSession(name, b, corpus, gpu_layers=layers) for name in matrix.experiment_models()}
    try:
        path = write_results(sessions, b.fingerprint, {"name": corpus.name, "sha256": corpus.sha256,
                                                       "n_chars": len(corpus.text)})
    finally:
        for session in sessions.values():
            session.close()
    return str(path)


def _cache(args: argparse.Namespace) -> str:
    """The cache by kind and size; `prune` deletes entries of other builds and measurement versions."""
    from harness.cache_entries import describe, human, inventory, prune

    entries = inventory()
    if args.action == "list":
        return describe(entries)
    gone = prune(entries, dry_run=args.dry_run)
    verb = "would delete" if args.dry_run else "deleted"
    for e in gone:
        print(f"[harness] {verb} {e.kind}/{e.path.name} ({human(e.bytes)}): {e.stale}", file=sys.stderr)
    return f"{verb} {len(gone)} entries, {human(sum(e.bytes for e in gone))}"


def _measurement(args: argparse.Namespace) -> str:
    """The declared measurement versions and whether the code they were confirmed on is the code now."""
    from harness import measurement

    lines = []
    for part in measurement.ROOTS:
        last = measurement.latest(part)
        state = "confirmed" if last.fingerprint == measurement.fingerprint(part) else "CHANGED since confirmed"
        lines.append(f"{part}: version {measurement.version(part)}, code {measurement.fingerprint(part)} ({state}; "
                     f"{len(measurement.modules(part))} modules)")
    if args.action == "verify":
        from harness.verify import verify

        outcome = verify(args.model, args.sample, args.sample, args.max_chunks, *offload(args.backend, args.gpu_layers))
        if outcome.differing:
            raise HarnessError(outcome.text())
        lines.append(outcome.text())
    problems = measurement.unconfirmed()
    if problems:
        lines += ["to confirm, add to harness/measurement.py CONFIRMATIONS (bump the version if results may change):",
                  *(measurement.confirmation_line(p) for p in measurement.ROOTS)]
    return "\n".join(lines)


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

    backend, layers = offload(args.backend, args.gpu_layers)
    if args.readme and backend != "cpu":
        raise HarnessError("--readme rewrites native/README.md's table of the CPU build: run it without --backend")
    where = f", {backend} build with {layers} layers offloaded" if backend != "cpu" else ""
    text = table(check_all(build(backend), args.workers, layers, _names(args.only) or ()), where)
    if args.readme:
        update_readme(text)
    return text


def _targets(args: argparse.Namespace) -> str:
    """The fake-quant targets of a model's graphs (libllama's llama_fake_quant_list)."""
    from harness.build import build
    from harness.driver import Model
    from harness.models import get_model

    backend, layers = offload(args.backend, args.gpu_layers)
    b = build(backend)
    model = Model(get_model(args.name, b).path, b, n_gpu_layers=layers)
    ctx = model.context(args.n_ctx)
    try:
        rows = [f"{t.graph}\t{t.name}\t{','.join(map(str, t.layers)) or '-'}\t{'x'.join(map(str, t.shape))}\t{t.count}"
                for t in ctx.fake_quant_targets()]
    finally:
        ctx.close()
        model.close()
    return "graph\tname\tlayers\tshape\tcount\n" + "\n".join(rows)


def _names(values: list[str] | None) -> list[str] | None:
    """A list option given as separate words or comma-separated (or both)."""
    return [n for v in values for n in v.split(",") if n] if values else None


def _budget(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"budget {text!r} is not a number: give a KLD >= 0 in nats, "
                                         "e.g. 1e-5") from None
    if not (value >= 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"budget {text!r} is not allowed: give a finite KLD >= 0 in nats")
    return value


@contextlib.contextmanager
def _cluster(args: argparse.Namespace) -> Iterator:
    """A Dask client for --workers or --scheduler (harness.atlas_cluster), else None: points measured here."""
    if args.workers is None and args.scheduler is None:
        yield None
        return
    from harness.atlas_cluster import connect

    with connect(args.workers, args.scheduler) as client:
        yield client


@contextlib.contextmanager
def _model_atlas(name: str, corpus, max_chunks: int | None, client, build_key: str | None = None,
                 backend: str = "cpu", gpu_layers: int = 0) -> Iterator:
    """One model's ModelAtlas: on the cluster (a worker loads the model) or on a session in this process."""
    from harness.atlas import MAX_CHUNKS, ModelAtlas

    max_chunks = MAX_CHUNKS if max_chunks is None else max_chunks
    if client is not None:
        from harness.atlas_cluster import ClusterAtlas

        yield ClusterAtlas.open(client, name, corpus, max_chunks, build_key=build_key, backend=backend,
                                gpu_layers=gpu_layers)
        return
    from harness.build import build
    from harness.runner import ModelSession

    session = ModelSession(name, build(backend), corpus, gpu_layers=gpu_layers)
    try:
        yield ModelAtlas.of(session, max_chunks)
    finally:
        session.close()


def _atlas(args: argparse.Namespace) -> str:
    """Every model's atlas (measured now, or from the point cache), atlas.json, then atlas.md and its plots."""
    import json
    from pathlib import Path

    from harness import matrix
    from harness.atlas import measure_atlas, provenance
    from harness.atlas_report import render_atlas
    from harness.corpus import load_corpus

    names = _names(args.models) or list(matrix.experiment_models())
    backend, layers = offload(args.backend, args.gpu_layers)
    corpus = load_corpus()
    parts, prov = [], None
    backend, layers = offload(args.backend, args.gpu_layers)
    with _cluster(args) as client:
        for name in names:
            # on a cluster, every model's points are measured with the first model's build
            with _model_atlas(name, corpus, args.max_chunks, client, prov and prov["build"]["key"],
                              backend, layers) as atlas:
                prov = prov or provenance(atlas.facts)
                part, measured = measure_atlas(atlas, _names(args.positions), args.layers, _names(args.formats))
            print(f"[harness] {name}: {measured} points measured, {len(part['points']) - measured} from the cache",
                  file=sys.stderr)
            parts.append(part)
    out = Path(args.out)
    (out / "atlas").mkdir(parents=True, exist_ok=True)
    data_path = out / "atlas" / "atlas.json"
    data_path.write_text(json.dumps({"provenance": prov, "models": parts}, indent=1))
    return str(render_atlas(data_path, out))


def _advise(args: argparse.Namespace) -> str:
    """The largest set of sites that fits the budget, measured; the flags that reproduce it."""
    from harness.atlas import advise_atlas, check_advice, non_finite_text
    from harness.corpus import load_corpus
    from harness.records import NonFinitePoint
    from harness.report import num, with_ci

    check_advice(args.format, args.budget)  # before the model loads
    backend, layers = offload(args.backend, args.gpu_layers)
    with _cluster(args) as client, _model_atlas(args.model, load_corpus(), args.max_chunks, client, None,
                                                backend, layers) as atlas:
        a = advise_atlas(atlas, args.format, args.budget, _names(args.positions), args.layers)
    lines = [f"model {a.model}, {a.fmt}, budget {num(a.budget)}: {len(a.sites)} of {a.candidates} "
             f"sites fit (smallest KLD first; that maximizes the count)"]
    if a.non_finite:
        lines.append(f"left out, non-finite logits alone ({a.fmt} exceeds the values' range): "
                     + ", ".join(f"{p}" + ("" if il is None else f"@{il}") for p, il in a.non_finite))
    if not a.sites:
        return "\n".join(lines + [f"no site fits: the smallest single-site KLD is {num(a.smallest)}"])
    m = a.measured
    measured = (f"measured: {non_finite_text(m)}" if isinstance(m, NonFinitePoint) else
                f"measured KLD: {with_ci(m.kld_ci)} (95 % CI, {m.tokens.n_tokens} "
                f"tokens, {m.chunks} chunk{'s' * (m.chunks != 1)}); measured - predicted = {num(a.prediction_error)}")
    lines += [
        "sites: " + ", ".join(f"{p}" + ("" if il is None else f"@{il}") for p, il in a.sites),
        f"predicted KLD (sum of single-site means): {num(a.predicted)}",
        measured,
        f"budget {num(a.budget)}: {a.held.verdict}",
        f"llama-completion -m {a.model_path} {a.flags} -p PROMPT",
        f"llama-perplexity -m {a.model_path} {a.flags} -f TEXT",
    ]
    return "\n".join(lines)


def _workers(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"--workers {text!r} is not allowed: give a number of worker processes >= 1")
    return value


def _cluster_options(p: argparse.ArgumentParser) -> None:
    """--workers / --scheduler: measure the points still missing as tasks on a Dask cluster (docs/distributed.md)."""
    where = p.add_mutually_exclusive_group()
    where.add_argument("--workers", type=_workers, metavar="N",
                       help="measure the points on a local Dask cluster of N worker processes (llama.cpp threads: "
                            "cores // N each); prints the Dask dashboard's address")
    where.add_argument("--scheduler", metavar="ADDRESS",
                       help="measure the points on a running Dask cluster (tcp://host:8786); its workers need this "
                            "harness and a harness cache (docs/distributed.md)")


def _gpu_layers(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"gpu layers {text!r} is not an integer >= 0") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"gpu layers {text!r} is negative (allowed: 0 or more; 999 offloads all)")
    return value


def _offload_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=sorted(BACKEND_FLAGS),
                   help="the build to run on: cpu (default, or $FQ_BACKEND), vulkan or cuda")
    p.add_argument("--gpu-layers", type=_gpu_layers,
                   help="layers on the GPU backend's device (default: every one, or $FQ_GPU_LAYERS)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("build", help="build (or reuse) the patched llama.cpp; prints the bin directory")
    p.add_argument("--backend", choices=sorted(BACKEND_FLAGS), default="cpu",
                   help="a backend beside the CPU: vulkan (tested on Mesa lavapipe) or cuda (docs/gpu.md; "
                        "architectures from $FQ_CUDA_ARCHITECTURES or this machine's GPUs)")
    p.add_argument("--source", help=f"the pinned sdist file or a trimmed tree made by `pack` (as ${SOURCE_ENV}; "
                                    "default: download the sdist)")
    p.set_defaults(run=_build)
    p = sub.add_parser("pack", help="one archive with what an offline GPU node needs: the trimmed llama.cpp, "
                                    "the pure-Python dependencies, the project; prints its path")
    p.add_argument("--out", default="dist/ffn-fake-quant-offline.tar.gz", help="the archive (default: %(default)s)")
    p.add_argument("--source", help=f"the pinned sdist file (as ${SOURCE_ENV}; default: download it)")
    p.set_defaults(run=_pack)
    p = sub.add_parser("model", help="prepare a model; prints the path of its GGUF file")
    p.add_argument("name", help="smollm2-q4_1, smollm2-f32, smollm2-f16, gemma3-q4_k_m, gemma3-f32, user ($FQ_MODEL) "
                                "or a .gguf path")
    p.set_defaults(run=_model)
    p = sub.add_parser("results", help="measure (or reuse) every group of the matrix; prints the results file")
    _offload_options(p)
    p.set_defaults(run=_results)
    p = sub.add_parser("report", help="render a results file into index.md + PNG plots; prints index.md's path")
    p.add_argument("--results", help="results file (default: $FQ_RESULTS or report/results.json)")
    p.add_argument("--out", help="report directory (default: the results file's directory)")
    p.set_defaults(run=_report)
    p = sub.add_parser("targets", help="list the names fake quantization can target in a model's graphs")
    p.add_argument("name", help="a model name as for `model`, or a .gguf path")
    p.add_argument("--n-ctx", type=int, default=512, help="tokens of the pp graph (default 512)")
    _offload_options(p)
    p.set_defaults(run=_targets)
    p = sub.add_parser("archs", help="every architecture's tiny model: every name, native vs reference")
    p.add_argument("--readme", action="store_true", help="also rewrite the generated table in native/README.md")
    p.add_argument("--workers", type=int, default=2, help="models checked at once, a process each (default 2)")
    p.add_argument("--only", nargs="+", help="model file names starting with these (e.g. llama-dense qwen3-moe)")
    _offload_options(p)
    p.set_defaults(run=_archs)
    p = sub.add_parser("atlas", help="the precision atlas: every position x layer x format; writes atlas.md")
    p.add_argument("--models", nargs="+", help="model names (default: the experiment models, $FQ_EXPERIMENT_MODELS)")
    p.add_argument("--positions", nargs="+", help="positions (names of the pp graph; default: every one)")
    p.add_argument("--layers", help="layers of the single-layer points: -1 (all, default), N, A-B, A,B, or none "
                                    "(every layer at once only)")
    p.add_argument("--formats", nargs="+", help=f"formats of docs/formats.md: {' '.join(TABLE)} (default: all; "
                   "single layers for those of harness.atlas.SINGLE_FORMATS, docs/atlas.md)")
    p.add_argument("--max-chunks", type=int,
                   help="most corpus chunks a point measures (default: harness.atlas.MAX_CHUNKS)")
    p.add_argument("--out", default="report", help="report directory (default: report; PNGs and atlas.json in atlas/)")
    _cluster_options(p)
    _offload_options(p)
    p.set_defaults(run=_atlas)
    p = sub.add_parser("advise", help="the largest set of (position, layer) sites whose predicted KLD fits a budget")
    p.add_argument("--model", required=True, help="a model name as for `model`, or a .gguf path")
    p.add_argument("--format", required=True, help="any format of docs/formats.md (bf16, fp8_e4m3, mxfp4, nvfp4, ...)")
    p.add_argument("--budget", required=True, type=_budget, help="the KLD budget in nats (>= 0)")
    p.add_argument("--positions", nargs="+", help="candidate positions (default: every one)")
    p.add_argument("--layers", help="candidate layers: -1 (all, default), N, A-B, A,B")
    p.add_argument("--max-chunks", type=int,
                   help="most corpus chunks a point measures (default: harness.atlas.MAX_CHUNKS; cached per value)")
    _cluster_options(p)
    _offload_options(p)
    p.set_defaults(run=_advise)
    p = sub.add_parser("cache", help="what the cache holds by kind and size; `prune` drops what no current "
                                     "build or measurement version uses")
    p.add_argument("action", nargs="?", choices=("list", "prune"), default="list")
    p.add_argument("--dry-run", action="store_true", help="with prune: list what would be deleted, delete nothing")
    p.set_defaults(run=_cache)
    p = sub.add_parser("measurement", help="the declared measurement versions that key cached results, and "
                                           "whether the measurement code changed since they were confirmed; "
                                           "`verify` re-measures cached groups and atlas points and compares")
    p.add_argument("action", nargs="?", choices=("show", "verify"), default="show")
    p.add_argument("--model", default="smollm2-f32", help="with verify: the model (default smollm2-f32)")
    p.add_argument("--sample", type=int, default=4, help="with verify: groups and points re-measured, each (default 4)")
    p.add_argument("--max-chunks", type=int, default=1,
                   help="with verify: the atlas store whose points are re-measured (default 1, the cheapest)")
    _offload_options(p)
    p.set_defaults(run=_measurement)
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
