"""`python -m bench NAME [options]`: the benchmarks (method and results: bench/README.md).

    pipeline       the whole request path, embedded and Triton, with the naive baseline
    ab             this checkout against a git revision, interleaved
    triton         perf_analyzer against a Triton over model_repository/
    triton-calls   per-model Triton cost as the gateway calls it
    series         one DICOM series end to end
    hostile        worst-case inputs at concurrency 32: gateway memory, every valid request checked
"""

from __future__ import annotations

import importlib
import sys

BENCHES: dict[str, str] = {
    "pipeline": "bench.pipeline",
    "ab": "bench.ab",
    "triton": "bench.triton_perf",
    "triton-calls": "bench.triton_calls",
    "series": "bench.series",
    "hostile": "bench.hostile_memory",
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in BENCHES:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    module = importlib.import_module(BENCHES[argv[0]])
    parser = module.get_args_parser()
    parser.prog = f"python -m bench {argv[0]}"
    return int(module.main(parser.parse_args(argv[1:])) or 0)


raise SystemExit(main(sys.argv[1:]))
