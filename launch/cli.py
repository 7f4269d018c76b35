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
    from optsel.pipeline.run_config import load_prepare_config
    from optsel.pipeline.prepare import prepare

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
        prog="optsel configs", description="The files shipped with optsel: built-in configs (usable by name, e.g. "
        "`optsel train demo`), DeepSpeed JSONs, SLURM templates, the Grafana dashboard and the alert rules.")
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("list", help="every bundled file's name and path")
    for action, text in (("show", "print a bundled file"), ("path", "print a bundled file's path")):
        sub.add_parser(action, help=text).add_argument("name", help="e.g. demo, deepspeed/zero3.json, "
                                                                     "grafana/optsel-dashboard.json")
    args = parser.parse_args(argv)
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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"prepare": _prepare, "train": None, "launch": None, "bench": None, "configs": _configs}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print("usage: optsel {prepare,train,launch,configs,bench} ...\n"
              "  CONFIG is a YAML file or a built-in config's name (demo, prepare_synthetic, ...)\n"
              "  prepare CONFIG [k=v ...]   write MDS shards (bundled synthetic stream or local files)\n"
              "  train CONFIG [k=v ...]     train with online selection (run under torchrun/deepspeed for >1 rank)\n"
              "  launch --nproc N [--launcher torchrun|deepspeed] CONFIG [k=v ...]\n"
              "                             start N local ranks of `train` with the chosen launcher\n"
              "  configs {list,show,path} [NAME]   the bundled configs, DeepSpeed JSONs, SLURM templates,\n"
              "                             Grafana dashboard and alert rules\n"
              "  bench {quality,speed,select_grid,distributed_select} [--quick]   run a benchmark (benchmarks/)",
              file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    command, rest = argv[0], argv[1:]
    if command in ("prepare", "configs"):
        return commands[command](rest)
    if command == "train":
        from optsel.launch.train import main as train_main

        return train_main(rest)
    if command == "launch":
        from optsel.launch.launchers import main as launch_main

        return launch_main(rest)
    from optsel.launch.bench import main as bench_main

    return bench_main(rest)


if __name__ == "__main__":
    sys.exit(main())
