"""Fault-injection soak: kill a 2-rank run at random steps on random ranks, resume each time, and check
that the finished run equals a straight one.

    python -m benchmarks.soak                         # both engines, M=20 kills each
    python -m benchmarks.soak --engines fsdp2 --kills 5
    python -m benchmarks.soak --quick                 # CI size: fsdp2, 2 kills (one SIGKILL, one SIGTERM)

For each engine: one straight run of S steps under torchrun (2 gloo ranks, CPU), then the same run
(``checkpoint.every_steps=1``, ``--resume``) launched again and again: in each launch, once the run has
logged a randomly chosen step past the checkpoint it resumed from, and after a random extra delay of
up to ``--max-delay`` seconds (so the signal lands anywhere: inside a step, a selection, a checkpoint
save), a random rank's worker gets SIGKILL (a crash: torchrun ends the job) or SIGTERM (preemption:
every rank saves at the step boundary and stops). After M kills the run is left to finish. Checked at
the end, against the straight run: the loss of every step, the drawn (pool) and selected sample ids
and the weights of every step, the eval loss; every step logged exactly once; no sample drawn twice
(S x pool <= the train split, so a repeat would be a resume bug) and none lost (same drawn set).

Outputs in ``--out`` (default results/soak/): soak.json (every kill: launch, step, rank, signal, exit
code, resumed-from) and soak.md (command, date, machine, M and the verdict per engine).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil

from optsel.launch.launchers import build_command, deepspeed_shm_files, remove_files
from optsel.pipeline.files import jsonio

REPO = Path(__file__).resolve().parents[1]
POOL, BUDGET = 16, 4


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache/optsel/torch_extensions"))
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR"):
        env.pop(key, None)
    return env


def prepare(work: Path, num_train: int) -> Path:
    out = work / "data"
    if not (out / "train" / "index.json").is_file():
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "optsel.launch.cli",
                "prepare",
                "configs/prepare_synthetic.yaml",
                f"out_dir={out}",
                f"synthetic.num_train={num_train}",
                "synthetic.num_val=64",
            ],
            cwd=REPO,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=600,
        )
        if done.returncode != 0:
            raise RuntimeError(f"prepare failed:\n{done.stderr[-3000:]}")
    return out


def overrides(data: Path, out: Path, engine: str, steps: int, method: str) -> list[str]:
    return [
        f"data.local={data}",
        f"output_dir={out}",
        "run_name=r",
        "training.progress_bar=false",
        "training.num_eval_samples=16",
        "monitoring.port=0",
        "training.eval_every=4",
        f"engine.name={engine}",
        f"selection.method={method}",
        f"training.num_steps={steps}",
        f"selection.pool_size={POOL}",
        f"selection.budget={BUDGET}",
        "selection.num_target_samples=8",
        "checkpoint.every_steps=1",
        "checkpoint.keep_last=2",
        "engine.collective_timeout_s=60",
    ]


def launch(args: list[str], log: Path) -> subprocess.Popen:
    cmd = build_command("torchrun", 2, "configs/demo.yaml", args)
    cmd.insert(cmd.index("-m", 2), "--monitor_interval=0.2")
    return subprocess.Popen(
        cmd, cwd=REPO, env=_env(), stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
    )


def finish(proc: subprocess.Popen, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:  # torchrun starts its workers in their own sessions: kill them by pid first
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
        except psutil.Error:
            pass
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return -9


def worker(proc: subprocess.Popen, rank: int) -> psutil.Process | None:
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        return None
    for child in children:
        try:
            if child.environ().get("RANK") == str(rank):
                return child
        except psutil.Error:
            continue
    return None


def newest_checkpoint(run_dir: Path) -> int:
    ckpts = [
        int(p.name.split("_")[1])
        for p in (run_dir / "checkpoints").glob("step_*")
        if p.is_dir() and not p.name.endswith(".partial") and (p / "meta.json").is_file()
    ]
    return max(ckpts, default=0)


def logged_steps_since(metrics: Path, since: float) -> int:
    """The highest step logged to metrics.jsonl after unix time ``since`` (0 if none)."""
    if not metrics.is_file():
        return 0
    best = 0
    for line in metrics.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line being written
            continue
        if record.get("time", 0) > since and "train/loss" in record:
            best = max(best, int(record["step"]))
    return best


def records(run_dir: Path) -> dict[str, list]:
    sel = [json.loads(line) for line in (run_dir / "selections.jsonl").read_text().splitlines()]
    met = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {
        "steps": [r["step"] for r in sel],
        "selected": [r["sample_ids"] for r in sel],
        "weights": [r["weights"] for r in sel],
        "drawn": [r["pool_sample_ids"] for r in sel],
        "train_loss": [(m["step"], m["train/loss"]) for m in met if "train/loss" in m],
        "eval_loss": [(m["step"], m["eval/loss"]) for m in met if "eval/loss" in m],
    }


def compare(straight: Path, faulted: Path, steps: int) -> list[str]:
    """Every difference between the straight and the faulted run ([] = identical)."""
    a, b = records(straight), records(faulted)
    problems = []
    if b["steps"] != list(range(1, steps + 1)):
        problems.append(f"steps logged: {b['steps']} (expected 1..{steps} once each)")
    for key in ("selected", "weights", "drawn", "train_loss", "eval_loss"):
        if a[key] != b[key]:
            first = next((i for i, (x, y) in enumerate(zip(a[key], b[key])) if x != y), min(len(a[key]), len(b[key])))
            problems.append(
                f"{key} differs (first at entry {first}: straight "
                f"{a[key][first] if first < len(a[key]) else '<none>'}, faulted "
                f"{b[key][first] if first < len(b[key]) else '<none>'})"
            )
    drawn = [sid for step in b["drawn"] for sid in step]
    if len(drawn) != len(set(drawn)):
        problems.append(f"{len(drawn) - len(set(drawn))} sample(s) drawn twice")
    lost = {sid for step in a["drawn"] for sid in step} - set(drawn)
    if lost:
        problems.append(f"{len(lost)} sample(s) of the straight run never drawn: {sorted(lost)[:10]}")
    return problems


def soak_engine(
    engine: str,
    kills: int,
    steps: int,
    method: str,
    work: Path,
    data: Path,
    rng: random.Random,
    max_delay: float,
    signals: list[str] | None,
    launch_timeout: float,
) -> dict:
    started = time.perf_counter()
    base = work / engine
    straight_out, faulted_out = base / "straight", base / "faulted"
    for folder in (straight_out, faulted_out):
        if folder.exists():
            import shutil

            shutil.rmtree(folder)
        folder.mkdir(parents=True)
    before_shm = deepspeed_shm_files()
    t0 = time.perf_counter()
    # the straight run saves no periodic checkpoints (checkpoint.* may differ between runs; it saves at its end)
    proc = launch(
        overrides(data, straight_out, engine, steps, method) + ["checkpoint.every_steps=0"], straight_out / "log.txt"
    )
    code = finish(proc, launch_timeout)
    straight_s = time.perf_counter() - t0
    if code != 0:
        raise RuntimeError(
            f"{engine}: the straight run failed ({code}):\n{(straight_out / 'log.txt').read_text()[-3000:]}"
        )
    run_dir = faulted_out / "r"
    args = overrides(data, faulted_out, engine, steps, method) + ["checkpoint.resume=auto"]
    events: list[dict] = []
    launches = 0
    while True:
        launches += 1
        resumed = newest_checkpoint(run_dir)
        launch_time = time.time()
        log = faulted_out / f"log_{launches:03d}.txt"
        proc = launch(args, log)
        if sum("signal" in e for e in events) >= kills:  # all kills done: let it finish
            code = finish(proc, launch_timeout)
            if code != 0:
                raise RuntimeError(f"{engine}: the final resumed launch failed ({code}):\n{log.read_text()[-3000:]}")
            break
        target = min(steps - 1, resumed + rng.randint(1, 3))
        deadline = time.monotonic() + launch_timeout
        while proc.poll() is None and logged_steps_since(run_dir / "metrics.jsonl", launch_time) < target:
            if time.monotonic() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                raise RuntimeError(
                    f"{engine}: launch {launches} did not reach step {target}:\n{log.read_text()[-3000:]}"
                )
            time.sleep(0.02)
        if proc.poll() is not None:  # it finished (or failed) before the kill landed
            code = proc.returncode
            if code != 0:
                raise RuntimeError(
                    f"{engine}: launch {launches} ended with {code} before any signal:\n{log.read_text()[-3000:]}"
                )
            events.append({"launch": launches, "note": "finished before the signal", "resumed_from": resumed})
            break
        time.sleep(rng.uniform(0.0, max_delay))
        rank = rng.randrange(2)
        done_so_far = sum("signal" in e for e in events)
        sig_name = signals[done_so_far % len(signals)] if signals else rng.choice(["SIGKILL", "SIGKILL", "SIGTERM"])
        victim = worker(proc, rank)
        at_step = logged_steps_since(run_dir / "metrics.jsonl", launch_time)
        if victim is None or proc.poll() is not None:
            code = finish(proc, launch_timeout)
            events.append(
                {"launch": launches, "note": "finished before the signal", "resumed_from": resumed, "exit_code": code}
            )
            if (
                code == 0
                and (run_dir / "summary.json").is_file()
                and json.loads((run_dir / "summary.json").read_text())["num_steps"] == steps
            ):
                break
            continue
        try:
            victim.send_signal(getattr(signal, sig_name))
        except psutil.NoSuchProcess:
            pass
        code = finish(proc, launch_timeout)
        events.append(
            {
                "launch": launches,
                "resumed_from": resumed,
                "target_step": target,
                "logged_step_at_signal": at_step,
                "rank": rank,
                "signal": sig_name,
                "exit_code": code,
                "newest_checkpoint_after": newest_checkpoint(run_dir),
            }
        )
        print(
            f"[{engine}] kill {len([e for e in events if 'signal' in e])}/{kills}: launch {launches} resumed from "
            f"step {resumed}, {sig_name} to rank {rank} at logged step {at_step}; exit {code}, newest checkpoint "
            f"now step {events[-1]['newest_checkpoint_after']}",
            flush=True,
        )
    remove_files(deepspeed_shm_files() - before_shm)
    done_kills = [e for e in events if "signal" in e]
    summary = json.loads((run_dir / "summary.json").read_text())
    problems = compare(straight_out / "r", run_dir, steps)
    if summary["num_steps"] != steps:
        problems.append(f"the faulted run ended at step {summary['num_steps']}, not {steps}")
    return {
        "engine": engine,
        "method": method,
        "steps": steps,
        "kills_requested": kills,
        "kills": len(done_kills),
        "sigkill": sum(e["signal"] == "SIGKILL" for e in done_kills),
        "sigterm": sum(e["signal"] == "SIGTERM" for e in done_kills),
        "rank0": sum(e["rank"] == 0 for e in done_kills),
        "rank1": sum(e["rank"] == 1 for e in done_kills),
        "launches": launches,
        "passed": not problems and len(done_kills) == kills,
        "problems": problems,
        "straight_seconds": straight_s,
        "wall_seconds": time.perf_counter() - started,
        "events": events,
    }


def write_report(results: list[dict], out: Path, command: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": command,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.python_version()}",
    }
    (out / "soak.json").write_text(jsonio.dumps({"meta": meta, "engines": results}, indent=2) + "\n")
    lines = [
        "# Fault-injection soak",
        "",
        f"Command: `{command}`  ",
        f"Date: {meta['date']}  ",
        f"Machine: {meta['machine']} (2 gloo ranks under torchrun, CPU)",
        "",
        "| engine | method | steps | M (kills) | SIGKILL / SIGTERM | rank 0 / rank 1 | launches | result | wall |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        verdict = (
            "**pass**: losses, drawn and selected ids, weights, eval loss equal the straight run; "
            "no sample lost or repeated"
            if r["passed"]
            else "**FAIL**: " + "; ".join(r["problems"] or ["fewer kills than asked"])
        )
        lines.append(
            f"| {r['engine']} | {r['method']} | {r['steps']} | {r['kills']} of {r['kills_requested']} | "
            f"{r['sigkill']} / {r['sigterm']} | {r['rank0']} / {r['rank1']} | {r['launches']} | {verdict} | "
            f"{r['wall_seconds'] / 60:.1f} min |"
        )
    lines += [
        "",
        "Every kill (launch, the checkpoint step it resumed from, the step logged when the signal was sent, "
        "rank, signal, torchrun's exit code) is in soak.json.",
    ]
    (out / "soak.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="optsel bench soak", description=__doc__.splitlines()[0])
    parser.add_argument("--engines", default="fsdp2,deepspeed")
    parser.add_argument("--kills", type=int, default=20, help="M: kills per engine")
    parser.add_argument("--steps", type=int, default=0, help="S (default 4 M + 8)")
    parser.add_argument("--method", default="ftw")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-delay", type=float, default=0.5, help="random extra delay before a signal, seconds")
    parser.add_argument("--launch-timeout", type=float, default=600.0)
    parser.add_argument("--quick", action="store_true", help="fsdp2, M=2 (one SIGKILL, one SIGTERM), random selector")
    parser.add_argument("--work", default="", help="scratch folder (default: <out>/work, removed at the end)")
    parser.add_argument("--out", default=str(REPO / "results" / "soak"))
    args = parser.parse_args(argv)
    signals = None
    if args.quick:
        args.engines, args.kills, args.method, signals = "fsdp2", 2, "random", ["SIGKILL", "SIGTERM"]
    steps = args.steps or 4 * args.kills + 8
    out = Path(args.out)
    work = Path(args.work) if args.work else out / "work"
    work.mkdir(parents=True, exist_ok=True)
    data = prepare(work, num_train=max(512, steps * POOL + 256))
    rng = random.Random(args.seed)
    results = []
    for engine in [e.strip() for e in args.engines.split(",") if e.strip()]:
        results.append(
            soak_engine(
                engine, args.kills, steps, args.method, work, data, rng, args.max_delay, signals, args.launch_timeout
            )
        )
        print(
            f"[{engine}] {'PASS' if results[-1]['passed'] else 'FAIL'}: {results[-1]['kills']} kills, "
            f"{results[-1]['launches']} launches, {results[-1]['wall_seconds']:.0f} s; "
            f"{results[-1]['problems']}",
            flush=True,
        )
        command = "python -m benchmarks.soak " + " ".join(
            shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
        )
        write_report(results, out, command.strip())
    if not args.work:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    if not all(r["passed"] for r in results):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
