"""`make bench`: every benchmark section in one run on the same tiny base and data; tables on stdout and in
bench/results.md (with the machine's description). What each section measures: docs/benchmarks.md.

    python scripts/bench_all.py [--only trl,profile,full,packing,estimate,flops,scale,data] [--repeats N] [--threads T]
        [--workdir DIR]

Each section is also a script of its own (scripts/bench_trl.py, bench_profile.py, bench_full.py, bench_packing.py, bench_estimate.py,
bench_flops.py, bench_scale.py, bench_data.py). Every training run is a child process measured from outside
(scripts/bench_common.py); the sections run one after another so that no two runs share the cores. ~35 minutes on 2
busy cores (the data section ~15, full ~6, scale ~5).
"""

from __future__ import annotations

import sys
import time

import bench_data
import bench_estimate
import bench_flops
import bench_full
import bench_packing
import bench_profile
import bench_scale
import bench_trl
from bench_common import ROOT, Workdir, check_tiny_base, common_args, machine_description, progress, timed

# name -> (module, default repeats). Order: cheapest signal first.
SECTIONS = {
    "trl": (bench_trl, bench_trl.DEFAULT_REPEATS),
    "profile": (bench_profile, 1),  # ~40 s: where a LoRA step's time goes, tunekit and plain TRL under cProfile
    "full": (bench_full, bench_full.DEFAULT_REPEATS),  # ~6 min: full FT, stage auto vs plain TRL vs ZeRO-3
    "packing": (bench_packing, bench_packing.DEFAULT_REPEATS),
    "estimate": (bench_estimate, bench_estimate.DEFAULT_REPEATS),
    "flops": (bench_flops, bench_flops.DEFAULT_REPEATS),
    "scale": (bench_scale, bench_scale.DEFAULT_REPEATS),  # ~5 min: LoRA and full on the 27M model, vs plain and bare
    "data": (bench_data, bench_data.DEFAULT_REPEATS),  # ~15 min: a 200k-row cold preparation, four ways
}
RESULTS = ROOT / "bench" / "results.md"


def main(argv: list[str] | None = None) -> int:
    parser = common_args(__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections to run")
    parser.add_argument("--out", default=str(RESULTS), help="markdown file for the results")
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in names if name not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    check_tiny_base()

    started = time.perf_counter()
    header = [
        "# tunekit benchmarks",
        "",
        f"Run {time.strftime('%Y-%m-%d %H:%M %Z')} with `make bench` (scripts/bench_all.py); how to read these tables: "
        "docs/benchmarks.md. Timings on a shared machine are noisy: medians of repeated runs, and ratios of runs "
        "made back to back.",
        "",
        machine_description(args.threads),
        "",
    ]
    print("\n".join(header), flush=True)
    parts = []
    with Workdir(args.workdir) as workdir:
        for name in names:
            module, repeats = SECTIONS[name]
            progress(f"section {name}")
            section_dir = workdir / name
            section_dir.mkdir(parents=True, exist_ok=True)
            section = timed(module.run_section, section_dir, args.repeats or repeats, args.threads)
            parts.append(section.markdown())
            print(parts[-1], flush=True)
    total = time.perf_counter() - started
    footer = f"_total: {total / 60:.1f} min_\n"
    print(footer)
    out = ROOT / args.out  # an absolute --out stays as it is
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(header) + "\n" + "\n".join(parts) + "\n" + footer)
    progress(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
