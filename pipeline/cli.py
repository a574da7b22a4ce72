"""`trtllm-pipeline <command>` (or `python -m pipeline <command>`): the recipe-level commands.

    ls                      the recipes, one line each
    show RECIPE [a.b=v]     the fully resolved recipe (after extends and overrides), as YAML
    validate RECIPE [a.b=v] every problem at once, including checks against the model's config
    build RECIPE [a.b=v]    fetch -> convert (-> engine), cached by content; --dry-run prints the plan
    plan RECIPE [a.b=v]     each stage, its cache key, hit or miss, and the command it would run
    verify DIR [--run]      re-hash an artifact against its manifest (and check golden tokens with --run)
    gc [--keep-gb N]        remove artifacts no build record refers to (or beyond a size budget)
    eval RECIPE [a.b=v]     perplexity, top-1 agreement and KL against Hugging Face float32
    bench RECIPE [a.b=v]    latency and throughput, with transformers as the baseline
    schema                  every recipe field, its default and what it means
    shapes                  the named shapes of model.random
    world-size [RECIPE]     ranks a build needs (for `mpirun -n`)
    run [RECIPE] [FLAGS]    run a build (the recipe's latest, else the latest of any) on as many ranks as it needs
    serve RECIPE [a.b=v]    build if needed, then an OpenAI-compatible server on as many ranks as the build needs
    bench-serve --url URL   serving benchmark against OpenAI-compatible servers (Poisson rates, TTFT/TPOT/ITL)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml

from pipeline.errors import PipelineError


def _recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="a name in recipes/ (or a path to a .yaml file)")
    p.add_argument("overrides", nargs="*", help="a.b=value overrides, e.g. parallel.tp=2")


# Each command's help is its line in the module docstring (one place to keep it).
HELP = {line.split()[0]: line[28:].strip() for line in __doc__.splitlines()
        if line.startswith("    ") and len(line) > 28 and not line[4].isspace()}


def _prog() -> str:
    return "trtllm-pipeline" if os.path.basename(sys.argv[0]) == "trtllm-pipeline" else "python -m pipeline"


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=_prog(), description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add = sub.add_parser

    def add_parser(name: str, **kw) -> argparse.ArgumentParser:
        return _add(name, help=HELP[name], description=HELP[name], **kw)

    sub.add_parser = add_parser
    sub.add_parser("ls")
    for name in ("show", "validate", "plan"):
        _recipe_args(sub.add_parser(name))
    b = sub.add_parser("build")
    _recipe_args(b)
    b.add_argument("--dry-run", action="store_true", help="print the plan (and trtllm-build command) only")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    v = sub.add_parser("verify")
    v.add_argument("artifact", type=Path)
    v.add_argument("--run", action="store_true", help="also generate the recipe's golden prompts and compare tokens")
    g = sub.add_parser("gc")
    g.add_argument("--keep-gb", type=float, help="also remove referenced artifacts, oldest first (never the latest "
                                                 "build), until the stage folders fit in this many GB")
    g.add_argument("--dry-run", action="store_true")
    e = sub.add_parser("eval")
    _recipe_args(e)
    e.add_argument("--precisions", help="evaluate the recipe at each of these precisions (comma-separated: "
                                        "fp32,fp16,bf16,fp8,int8wo,int4wo) and print one table")
    e.add_argument("--out", type=Path, help="also write the results as JSON (and a .md table beside it)")
    bench = sub.add_parser("bench")
    _recipe_args(bench)
    bench.add_argument("--batch-sizes", default=None, help="comma-separated, e.g. 1,8,32")
    bench.add_argument("--input-len", type=int, default=None)
    bench.add_argument("--output-len", type=int, default=None)
    bench.add_argument("--no-baseline", action="store_true", help="skip the transformers baseline")
    bench.add_argument("--device-random", action="store_true",
                       help="random weights made on the GPU (model.random recipes), instead of building the artifact")
    bench.add_argument("--repeats", type=int, default=3)
    bench.add_argument("--input-spread", type=float, default=0.0,
                       help="draw prompt lengths uniformly within +-this fraction of --input-len")
    bench.add_argument("--output-spread", type=float, default=0.0,
                       help="draw each request's output length uniformly within +-this fraction of --output-len")
    bench.add_argument("--variants", default="all", help="decode paths to compare at batch 1 (labels, or all)")
    bench.add_argument("--batched-variants", default="auto",
                       help="decode paths for batches > 1, the fastest reported (labels; auto: the fastest compiled "
                            "batch-1 path)")
    bench.add_argument("--out", help="folder for the results (default: beside the artifact)")
    bench.add_argument("--watchdog", type=float, default=0.0,
                       help="seconds without progress after which a rank prints where it waits and exits (0: off)")
    s = sub.add_parser("serve")
    _recipe_args(s)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--serve-args", default="", help="more options for python -m pipeline.serve, e.g. "
                                                    "\"--max-waiting 64 --step-timeout-s 30\"")
    s.add_argument("--mpirun-args", default="", help="more options for mpirun, e.g. \"--hostfile hosts --map-by "
                                                     "ppr:8:node\" to place the ranks on several nodes")
    from pipeline.bench_serve import add_arguments

    add_arguments(sub.add_parser("bench-serve"))
    sub.add_parser("schema")
    sub.add_parser("shapes")
    w = sub.add_parser("world-size")
    w.add_argument("recipe", nargs="?", help="a recipe (default: the latest build)")
    r = sub.add_parser("run", epilog="FLAGS are python -m pipeline.run's (--prompt, --max-new-tokens, --json, ...; "
                                     "python -m pipeline.run --help lists them).")
    r.add_argument("recipe", nargs="?", help="run this recipe's latest build (default: the latest build)")
    r.add_argument("flags", nargs=argparse.REMAINDER, help="passed to python -m pipeline.run")
    r.add_argument("--mpirun-args", default="", help="more options for mpirun, e.g. \"--hostfile hosts\"")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["run"] and argv[1:2] not in (["-h"], ["--help"]):
        args = _run_args(argv[1:])  # its flags belong to python -m pipeline.run, which checks them
    else:
        args = make_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args) or 0
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def cmd_ls(args) -> int:
    from pipeline.recipe import list_recipes, load_recipe, recipes_dir

    if not list_recipes():
        raise PipelineError(f"no recipes in {recipes_dir()}; set PIPELINE_RECIPES to a folder of recipe .yaml files")
    for path in list_recipes():
        try:
            r = load_recipe(path)
            source = r.model.hub or r.model.local or f"random:{r.model.random}"
            print(f"{path.stem:<28} tp={r.parallel.tp} pp={r.parallel.pp} {r.precision.dtype:<9} "
                  f"{r.precision.quantization.quant:<17} {source}")
        except PipelineError as exc:
            print(f"{path.stem:<28} INVALID: {str(exc).splitlines()[0]}")
    return 0


def cmd_show(args) -> int:
    from pipeline.recipe import load_recipe

    r = load_recipe(args.recipe, args.overrides)
    print(yaml.safe_dump(r.to_dict(), sort_keys=False, width=110), end="")
    return 0


def cmd_validate(args) -> int:
    from pipeline.build import validate_with_model
    from pipeline.recipe import load_recipe

    r = load_recipe(args.recipe, args.overrides)
    validate_with_model(r)
    print(f"{r.name}: valid (world size {r.world_size}: tp={r.parallel.tp} pp={r.parallel.pp})")
    return 0


def cmd_build(args) -> int:
    from pipeline.build import Builder
    from pipeline.recipe import load_recipe

    r = load_recipe(args.recipe, args.overrides)
    if args.dry_run:
        return cmd_plan(args)
    Builder(r, show_progress=not args.quiet and sys.stderr.isatty()).run()
    return 0


def cmd_plan(args) -> int:
    from pipeline.plan import print_plan
    from pipeline.recipe import load_recipe

    print_plan(load_recipe(args.recipe, args.overrides))
    return 0


def cmd_verify(args) -> int:
    from pipeline.verify import verify_command

    return verify_command(args.artifact, run=args.run)


def cmd_gc(args) -> int:
    from pipeline.gc import gc_command

    return gc_command(keep_gb=args.keep_gb, dry_run=args.dry_run)


def cmd_eval(args) -> int:
    from pipeline.eval_precisions import eval_command
    from pipeline.recipe import load_recipe

    precisions = args.precisions.split(",") if args.precisions else None
    return eval_command(load_recipe(args.recipe, args.overrides), precisions, args.out)


def cmd_bench(args) -> int:
    from pipeline.bench import bench_command
    from pipeline.recipe import load_recipe

    return bench_command(load_recipe(args.recipe, args.overrides), args)


def cmd_schema(args) -> int:
    from pipeline.recipe import schema_lines

    print("\n".join(schema_lines()))
    return 0


def cmd_shapes(args) -> int:
    from pipeline.architectures import by_hf_config
    from pipeline.shapes import SHAPES

    for name, hf in SHAPES.items():
        a = by_hf_config(hf).describe(hf)
        window = f" window={a.sliding_window}" if a.sliding_window else ""
        print(f"{name:<16} {a.model_type:<8} layers={a.num_layers:<3} hidden={a.hidden_size:<5} heads={a.num_heads:<3} "
              f"kv_heads={a.num_kv_heads:<3} vocab={a.vocab_size}{window}")
    return 0


def cmd_world_size(args) -> int:
    if args.recipe:
        from pipeline.recipe import load_recipe

        print(load_recipe(args.recipe).world_size)
    else:
        from pipeline.build import read_build_record

        print(read_build_record(None)["world_size"])
    return 0


def _run_args(rest: list[str]) -> argparse.Namespace:
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--mpirun-args", default="")
    known, flags = own.parse_known_args(rest)
    recipe = flags.pop(0) if flags and not flags[0].startswith("-") else None
    return argparse.Namespace(command="run", recipe=recipe, flags=flags, mpirun_args=known.mpirun_args)


def cmd_run(args) -> int:
    """mpirun -n <the ranks the build needs> python -m pipeline.run, with Open MPI's as-root variables set."""
    import subprocess

    from pipeline.build import read_build_record, recipe_for
    from pipeline.dist import mpirun_command, mpirun_env

    flags = list(args.flags)
    given = argparse.ArgumentParser(add_help=False)
    given.add_argument("--recipe")
    given.add_argument("--engine", type=Path)
    known, _ = given.parse_known_args(flags)
    recipe = args.recipe or known.recipe
    if args.recipe and known.recipe and args.recipe != known.recipe:
        raise PipelineError(f"run: recipe '{args.recipe}' and --recipe {known.recipe} disagree; give one of them")
    if known.engine:
        parallel = recipe_for(known.engine).get("parallel", {})
        world_size = parallel.get("tp", 1) * parallel.get("pp", 1)
    else:
        world_size = read_build_record(recipe)["world_size"]
        if args.recipe and not known.recipe:
            flags = ["--recipe", args.recipe, *flags]
    module_args = ["-m", "pipeline.run", *flags]
    if world_size == 1 and not args.mpirun_args:
        cmd = [sys.executable, *module_args]
    else:
        cmd = mpirun_command(world_size, module_args)
        cmd[1:1] = args.mpirun_args.split()
    return subprocess.run(cmd, env=mpirun_env()).returncode


def cmd_serve(args) -> int:
    from pipeline.build import Builder
    from pipeline.recipe import load_recipe
    from pipeline.serve import launch

    recipe = load_recipe(args.recipe, args.overrides)
    artifact = Builder(recipe, show_progress=sys.stderr.isatty()).run().artifact
    return launch(artifact, recipe.world_size, ["--host", args.host, "--port", str(args.port),
                                                 "--served-model-name", recipe.name, *args.serve_args.split()],
                  args.mpirun_args.split())


def cmd_bench_serve(args) -> int:
    from pipeline.bench_serve import bench_serve_command

    return bench_serve_command(args)


COMMANDS = {
    "ls": cmd_ls, "show": cmd_show, "validate": cmd_validate, "build": cmd_build, "plan": cmd_plan,
    "verify": cmd_verify, "gc": cmd_gc, "eval": cmd_eval, "bench": cmd_bench, "schema": cmd_schema,
    "shapes": cmd_shapes, "world-size": cmd_world_size, "serve": cmd_serve, "bench-serve": cmd_bench_serve, "run": cmd_run,
}
