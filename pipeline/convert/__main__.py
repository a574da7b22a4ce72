"""`python -m pipeline.convert SRC OUT --tp N --pp N --dtype D`: the convert stage alone, outside any recipe.

Converts a Hugging Face folder into a TensorRT-LLM checkpoint folder (which must not exist yet; it is written to
OUT.tmp-* and renamed when complete) and prints the time, the rate and this process's peak resident memory.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
from pathlib import Path

from pipeline.convert import convert_checkpoint
from pipeline.errors import PipelineError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.convert", description=__doc__.split("\n\n")[0])
    p.add_argument("source", type=Path)
    p.add_argument("output", type=Path)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"))
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--progress", action="store_true")
    args = p.parse_args(argv)
    if args.output.exists():
        print(f"error: {args.output} exists; choose a new folder", file=sys.stderr)
        return 2
    tmp = args.output.parent / f".tmp-{args.output.name}"
    tmp.mkdir(parents=True)
    try:
        result = convert_checkpoint(args.source, tmp, dtype=args.dtype, tp=args.tp, pp=args.pp, workers=args.workers,
                                    show_progress=args.progress)
    except PipelineError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tmp.rename(args.output)
    peak_kib = next((int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")),
                    resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    peak = peak_kib / 1024**2
    print(f"converted {result.source_bytes / 1e9:.2f} GB in {result.seconds:.1f} s "
          f"({result.source_bytes / result.seconds / 1e6:.0f} MB/s), {len(result.files)} rank file(s), "
          f"peak RSS {peak:.2f} GiB")
    print(f"VmHWM_KiB={peak_kib}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
