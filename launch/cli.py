"""The ``optsel`` command: ``optsel prepare CONFIG``, ``optsel train CONFIG``, ``optsel launch ...``."""

from __future__ import annotations

import argparse
import sys


def _prepare(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="optsel prepare", description="Write MDS shards for training.")
    parser.add_argument("config", help="prepare config YAML (e.g. configs/prepare_synthetic.yaml)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    args = parser.parse_args(argv)
    import json

    from optsel.launch.config_loader import ConfigError, apply_overrides, from_mapping, load_yaml
    from optsel.pipeline.prepare import PrepareConfig, prepare

    try:
        config = from_mapping(PrepareConfig, apply_overrides(load_yaml(args.config), args.overrides))
        report = prepare(config)
    except (ConfigError, FileExistsError, FileNotFoundError, ValueError) as err:
        print(f"optsel prepare: {err}", file=sys.stderr)
        return 2
    print(json.dumps(report.to_dict() if hasattr(report, "to_dict") else report, indent=2, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"prepare": _prepare, "train": None, "launch": None, "bench": None}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print("usage: optsel {prepare,train,launch,bench} ...\n"
              "  prepare CONFIG [k=v ...]   write MDS shards (bundled synthetic stream or local files)\n"
              "  train CONFIG [k=v ...]     train with online selection (run under torchrun/deepspeed for >1 rank)\n"
              "  launch --nproc N [--launcher torchrun|deepspeed] CONFIG [k=v ...]\n"
              "                             start N local ranks of `train` with the chosen launcher\n"
              "  bench {quality,speed,select_grid,distributed_select} [--quick]   run a benchmark (benchmarks/)",
              file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    command, rest = argv[0], argv[1:]
    if command == "prepare":
        return _prepare(rest)
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
