"""Training entry point for every launcher (thin, torchtitan style).

python -m optsel.launch.train CONFIG [key.sub=value ...]             # one process
torchrun --nproc_per_node 2 -m optsel.launch.train CONFIG ...       # torchrun
deepspeed --num_gpus 2 --module optsel.launch.train CONFIG ...      # deepspeed launcher
srun python -m optsel.launch.train CONFIG ...                       # SLURM (see launch/slurm/)
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from optsel import distributed
from optsel.config_loader import ConfigError, mask_log_handlers, mask_secrets
from optsel.monitoring.exposition import PortInUseError
from optsel.pipeline.checkpoint.manager import CheckpointError
from optsel.pipeline.checkpoint.run_lock import RunDirBusyError
from optsel.pipeline.data.shards import ShardError
from optsel.pipeline.files import jsonio
from optsel.pipeline.train.run_config import load_run_config
from optsel.pipeline.train.trainer import Trainer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="optsel train", description="Train with online data selection.")
    parser.add_argument("config", help="run config YAML (see configs/)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. training.num_steps=10")
    parser.add_argument(
        "--resume",
        action="store_const",
        const="auto",
        default=None,
        help="resume from the newest complete checkpoint in checkpoint.dir, or start fresh if there "
        "is none (same as checkpoint.resume=auto)",
    )
    parser.add_argument(
        "--resume-from",
        dest="resume",
        metavar="CHECKPOINT",
        help="resume from this checkpoint folder (same as checkpoint.resume=PATH)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start fresh even if the run folder holds checkpoints: move them (and the run's logs) "
        "aside, deleting nothing (same as checkpoint.overwrite=true)",
    )
    parser.add_argument(
        "--allow-unsigned",
        action="store_true",
        help="resume an HMAC-signed checkpoint although no key is set: file hashes are still checked, "
        "later saves are unsigned (same as checkpoint.allow_unsigned=true)",
    )
    parser.add_argument(
        "--allow-other-data",
        action="store_true",
        help="resume a checkpoint made from another dataset (same as checkpoint.allow_other_data=true)",
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show every warning (the known third-party deprecations optsel hides too) and DEBUG logs",
    )
    parser.add_argument(
        "--local_rank",
        "--local-rank",
        type=int,
        default=None,
        help="set by the deepspeed launcher; the LOCAL_RANK env var is used instead",
    )
    return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.verbose:  # the engines then leave the known third-party warnings alone (common.quiet_known_warning)
        os.environ["OPTSEL_VERBOSE"] = "1"
        warnings.simplefilter("default")  # DeprecationWarnings from libraries too, once per location
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for name in ("filelock", "matplotlib") if args.verbose else ("streaming",):
        # verbose: not filelock's thousands of acquire/release lines; quiet: not streaming's defaults at INFO
        logging.getLogger(name).setLevel(logging.INFO if args.verbose else logging.WARNING)

    mask_log_handlers()  # no log line shows a credential (a data.remote URL's password or signature, an api key)

    try:
        overrides = (
            list(args.overrides)
            + ([f"checkpoint.resume={args.resume}"] if args.resume else [])
            + (["checkpoint.overwrite=true"] if args.overwrite else [])
            + (["checkpoint.allow_unsigned=true"] if args.allow_unsigned else [])
            + (["checkpoint.allow_other_data=true"] if args.allow_other_data else [])
        )
        config = load_run_config(args.config, overrides)
    except ConfigError as err:
        print(f"optsel: {mask_secrets(str(err))}", file=sys.stderr)
        return 2

    trainer = None
    try:
        if config.engine.name == "deepspeed":  # DeepSpeed logs its config (engine.extra too) on its own handler
            from deepspeed.utils import logger as deepspeed_logger  # noqa: PLC0415 - optional dependency: imported when the deepspeed engine runs

            mask_log_handlers(deepspeed_logger)
        trainer = Trainer(config)
        summary = trainer.train()
        if distributed.info().is_main:
            print(jsonio.dumps(summary, indent=2))
            switches = config.training.callbacks
            files = ["config.yaml", "metrics.jsonl"] + [
                name
                for name, on in (
                    ("selections.jsonl", switches.selections_log),
                    ("summary.json", switches.summary),
                    ("loss.png", switches.plot),
                )
                if on
            ]
            print(f"outputs in {summary['run_dir']} ({', '.join(files)})")
            if summary.get("stopped"):
                print(
                    f"optsel: stopped early ({summary['stopped']}) at step {summary['num_steps']} of "
                    f"{summary['target_steps']}; continue with `optsel train --resume {args.config} ...`"
                )
        return 0
    except (CheckpointError, ConfigError, ShardError, RunDirBusyError, PortInUseError) as err:
        print(f"optsel: {mask_secrets(str(err))}", file=sys.stderr)
        return 2
    except Exception as err:
        if distributed.is_peer_failure(err):
            rank = distributed.info().rank
            first = mask_secrets(str(err).splitlines()[0][:300])
            print(
                f"optsel: rank {rank}: lost contact with another rank during a collective ({type(err).__name__}: "
                f"{first}); a rank probably died or its node went away. Ending this rank; "
                f"restart the job with --resume to continue from the last checkpoint.",
                file=sys.stderr,
                flush=True,
            )
            os._exit(1)  # the process group is broken: skip teardown that could wait on the dead peer
        raise
    finally:
        if trainer is not None:
            trainer.close()
        distributed.destroy()


if __name__ == "__main__":
    sys.exit(main())
