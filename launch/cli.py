"""The ``optsel`` command: ``optsel prepare CONFIG``, ``optsel train CONFIG``, ``optsel launch ...``."""

from __future__ import annotations

import argparse
import sys


def _prepare(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="optsel prepare", description="Write MDS shards for training.")
    parser.add_argument("config", help="prepare config YAML, or a built-in name (e.g. prepare_synthetic)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    args = parser.parse_args(argv)
    import json

    from optsel.config_loader import ConfigError, mask_secrets
    from optsel.pipeline.data.prepare import prepare
    from optsel.pipeline.train.run_config import load_prepare_config

    try:
        config = load_prepare_config(args.config, args.overrides)
        report = prepare(config)
    except (ConfigError, FileExistsError, FileNotFoundError, ValueError) as err:
        print(f"optsel prepare: {mask_secrets(str(err))}", file=sys.stderr)
        return 2
    print(json.dumps(report.to_dict() if hasattr(report, "to_dict") else report, indent=2, default=str))
    return 0


def _configs(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="optsel configs",
        description="The files shipped with optsel: built-in configs (usable by name, e.g. "
        "`optsel train demo`), DeepSpeed JSONs, SLURM templates, the Grafana dashboard and the alert rules.",
    )
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("list", help="every bundled file's name and path")
    for action, text in (("show", "print a bundled file"), ("path", "print a bundled file's path")):
        sub.add_parser(action, help=text).add_argument(
            "name", help="e.g. demo, deepspeed/zero3.json, grafana/optsel-dashboard.json"
        )
    keys = sub.add_parser("keys", help="every config key: type, default, allowed values, meaning")
    keys.add_argument("which", nargs="?", choices=("run", "prepare"), help="one config (default: both)")
    keys.add_argument("--markdown", action="store_true", help="as markdown (both: docs/configuration.md)")
    args = parser.parse_args(argv)
    if args.action == "keys":
        from optsel.pipeline import config_reference as ref

        if args.markdown and args.which is None:
            sys.stdout.write(ref.reference_markdown())
        else:
            render = ref.render_table if args.markdown else ref.render_text
            for which in (args.which,) if args.which else ("run", "prepare"):
                sys.stdout.write(render(ref.run_keys() if which == "run" else ref.prepare_keys()))
        return 0
    from optsel import resources

    if args.action == "list":
        files = resources.builtin_files()
        width = max(map(len, files))
        for name, path in files.items():
            print(f"{name:<{width}}  {path}")
        return 0
    try:
        path = resources.builtin_path(args.name)
    except FileNotFoundError as err:
        print(f"optsel configs: {err}", file=sys.stderr)
        return 2
    if args.action == "path":
        print(path)
    else:
        sys.stdout.write(path.read_text())
    return 0


def _export(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="optsel export",
        description="Write a Hugging Face save_pretrained folder (safetensors, config, "
        "tokenizer) from a run's checkpoint (deepspeed or fsdp2), verified like a resume.",
    )
    parser.add_argument("run_dir", help="the run folder (<output_dir>/<run_name>) or one checkpoint folder")
    parser.add_argument("--out", required=True, help="folder to write (must not exist or be empty)")
    parser.add_argument(
        "--checkpoint",
        default="latest",
        metavar="STEP|latest",
        help="which checkpoint: a step number, or the newest complete one (default)",
    )
    parser.add_argument(
        "--lora",
        choices=("merge", "adapter"),
        default="merge",
        help="LoRA runs: merge the adapters into the weights (default) or write peft's adapter folder",
    )
    parser.add_argument(
        "--tokenizer",
        default="",
        metavar="DIR",
        help="tokenizer folder to write instead of the run's <data.local>/tokenizer",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="move a non-empty --out aside to OUT.replaced-<time> (deletes nothing)"
    )
    parser.add_argument(
        "--allow-unsigned",
        action="store_true",
        help="accept an HMAC-signed checkpoint although no key is set (file hashes are still checked)",
    )
    args = parser.parse_args(argv)
    import dataclasses
    import json
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from optsel.config_loader import ConfigError, mask_secrets
    from optsel.pipeline.checkpoint.manager import CheckpointError
    from optsel.pipeline.export import ExportOptions, export

    try:
        report = export(
            ExportOptions(
                run_dir=args.run_dir,
                out=args.out,
                checkpoint=args.checkpoint,
                lora=args.lora,
                tokenizer=args.tokenizer,
                overwrite=args.overwrite,
                allow_unsigned=args.allow_unsigned,
            )
        )
    except (CheckpointError, ConfigError, OSError, ValueError) as err:  # OSError: --out cannot be written, ...
        print(f"optsel export: {mask_secrets(str(err))}", file=sys.stderr)
        return 2
    print(json.dumps(dataclasses.asdict(report), indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    defined_here = {"prepare": _prepare, "configs": _configs, "export": _export}  # the others: lazy imports below
    commands = {*defined_here, "train", "launch", "bench", "compare"}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print(
            "usage: optsel {prepare,train,launch,configs,export,compare,bench} ...\n"
            "  CONFIG is a YAML file or a built-in config's name (demo, prepare_synthetic, ...)\n"
            "  prepare CONFIG [k=v ...]   write MDS shards (bundled synthetic stream or local files)\n"
            "  train CONFIG [k=v ...]     train with online selection (run under torchrun/deepspeed for >1 rank)\n"
            "  launch --nproc N [--launcher torchrun|deepspeed] CONFIG [k=v ...]\n"
            "                             start N local ranks of `train` with the chosen launcher\n"
            "  configs {list,show,path} [NAME]   the bundled configs, DeepSpeed JSONs, SLURM templates,\n"
            "                             Grafana dashboard and alert rules\n"
            "  configs keys [run|prepare] [--markdown]   every config key (docs/configuration.md)\n"
            "  export RUN_DIR --out DIR [--checkpoint STEP|latest] [--lora merge|adapter]\n"
            "                             a checkpoint as a Hugging Face save_pretrained folder\n"
            "  compare RUN_DIR RUN_DIR ... [--plot PNG]   finished runs side by side (final target loss, EM)\n"
            "  bench {quality,speed,select_grid,distributed_select} [--quick]   run a benchmark (benchmarks/)",
            file=sys.stderr,
        )
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    command, rest = argv[0], argv[1:]
    if command in defined_here:
        return defined_here[command](rest)
    if command == "train":
        from optsel.launch.train import main as train_main

        return train_main(rest)
    if command == "launch":
        from optsel.launch.launchers import main as launch_main

        return launch_main(rest)
    if command == "compare":
        from optsel.launch.compare import main as compare_main

        return compare_main(rest)
    from optsel.launch.bench import main as bench_main

    return bench_main(rest)


if __name__ == "__main__":
    sys.exit(main())
