"""`python -m bench [batch latency ingest catalog queue] [--quick] [sizes]`: run benchmarks, print
their figures and write each one's section of docs/performance.md.

Sizes default to the issue's (100 clips, 100,000 sources, 1,000 queued requests); every size can
be given as a flag or as an environment variable (`ERGOT_BENCH_CLIPS=20 make bench`). `--quick`
takes small sizes, for trying the harness.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from bench.common import DOCS, BenchError, Section, print_section, write_section

NAMES = ("batch", "latency", "ingest", "catalog", "queue")

# flag: (environment variable, full size, quick size, type, what it sizes)
SIZES: dict[str, tuple[str, object, object, type, str]] = {
    "clips": ("ERGOT_BENCH_CLIPS", 100, 4, int, "batch: clips"),
    "clip_seconds": ("ERGOT_BENCH_CLIP_SECONDS", 10.0, 2.0, float, "batch, ingest: clip length"),
    "clip_size": ("ERGOT_BENCH_CLIP_SIZE", "1280x720", "320x180", str, "batch, ingest: frame"),
    # Two repetitions of each side keep a full batch run near 25 minutes on 2 cores.
    "repeats": ("ERGOT_BENCH_REPEATS", 2, 1, int, "batch: repetitions (ingest takes 3 or more)"),
    "requests": ("ERGOT_BENCH_LATENCY_REQUESTS", 20, 3, int, "latency: requests per backend"),
    "files": ("ERGOT_BENCH_INGEST_FILES", 100, 4, int, "ingest: files"),
    "sources": ("ERGOT_BENCH_SOURCES", 100_000, 200, int, "catalog: sources"),
    "queued": ("ERGOT_BENCH_QUEUED", 1000, 12, int, "queue: requests"),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    # `[]` among the choices: argparse checks an empty default against them.
    parser.add_argument(
        "names",
        nargs="*",
        choices=[*NAMES, []],
        metavar="NAME",
        default=[],
        help=f"benchmarks to run, of {', '.join(NAMES)} (default all)",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, to try the harness")
    parser.add_argument("--docs", type=Path, default=None, help=f"document (default {DOCS})")
    parser.add_argument("--workdir", type=Path, default=None, help="where planes and media go")
    parser.add_argument(
        "--no-postgres", action="store_true", help="leave out the PostgreSQL measurements"
    )
    parser.add_argument("--profile", action="store_true", help="latency: profile a run worker")
    for flag, (env, full, _, kind, what) in SIZES.items():
        parser.add_argument(
            f"--{flag.replace('_', '-')}",
            type=kind,
            default=None,
            help=f"{what}; default {full} (env {env})",
        )
    return parser


def _size(args: argparse.Namespace, flag: str) -> object:
    env, full, quick, kind, _ = SIZES[flag]
    given = getattr(args, flag)
    if given is not None:
        return given
    if os.environ.get(env):
        return kind(os.environ[env])
    return quick if args.quick else full


def _runners(args: argparse.Namespace) -> dict[str, Callable[[], Section]]:
    def batch() -> Section:
        from bench import batch

        return batch.run(
            batch.BatchSizes(
                clips=_size(args, "clips"),
                duration_s=_size(args, "clip_seconds"),
                size=_size(args, "clip_size"),
                repeats=_size(args, "repeats"),
            ),
            args.workdir,
        )

    def latency() -> Section:
        from bench import latency

        return latency.run(
            requests=_size(args, "requests"),
            postgres=not args.no_postgres,
            profile=args.profile,
            workdir=args.workdir,
        )

    def ingest() -> Section:
        from bench import ingest

        return ingest.run(
            files=_size(args, "files"),
            duration_s=_size(args, "clip_seconds"),
            size=_size(args, "clip_size"),
            repeats=max(_size(args, "repeats"), 3 if not args.quick else 1),
            workdir=args.workdir,
        )

    def catalog() -> Section:
        from bench import catalog

        return catalog.run(sources=_size(args, "sources"), workdir=args.workdir)

    def queue() -> Section:
        from bench import drain

        return drain.run(queued=_size(args, "queued"), workdir=args.workdir)

    return {
        "batch": batch,
        "latency": latency,
        "ingest": ingest,
        "catalog": catalog,
        "queue": queue,
    }


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    docs: Path = args.docs or DOCS
    names = args.names or list(NAMES)
    runners = _runners(args)
    failed = []
    for name in names:
        print(f"-- {name} ...", flush=True)
        started = time.monotonic()
        try:
            section = runners[name]()
        except BenchError as exc:
            print(f"bench {name}: {exc}", file=sys.stderr)
            failed.append(name)
            continue
        except Exception:
            traceback.print_exc()
            failed.append(name)
            continue
        write_section(docs, section)
        print_section(section)
        print(f"   ({time.monotonic() - started:.0f} s; written to {docs})", flush=True)
    if failed:
        print(f"bench: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
