"""What a SIGKILL at half of training costs: the resumed run against the remaining half alone.

    .venv/bin/python benchmarks/restart_bench.py [-S train.max_steps=200 ...] [--repeats 1]

Run in a project whose data/tokens exist (after `make run` or `trainpipe tokenize`). With the
config of params.yaml (and -S overrides), in a temporary folder (its own checkpoints, model and
MLflow database) it times, as real processes of `python -m pipelines.stages.train`:
  full     an uninterrupted run, start to exit
  killed   a run SIGKILLed as soon as its checkpoint at max_steps/2 is written
  resumed  the same run started again, start to exit
and prints them with "remaining half alone" = full - killed (the same work without the kill)
and whether the resumed weights are byte-identical to the uninterrupted run's.
"""

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from mlflow import MlflowClient

from pipelines.adapters.checkpoint import checkpoint_path
from pipelines.core.model_dir import WEIGHTS_FILE
from pipelines.core.params import PARAMS_FILE, load_params


def train(params_file: Path, env: dict, kill_at: str | None = None) -> float:
    """Seconds from start to exit, or to the SIGKILL once a file matching the glob kill_at
    (relative to the params file's folder) exists: checkpoints live in checkpoints/<run key>/."""
    cmd = [sys.executable, "-m", "pipelines.stages.train", "--params", str(params_file)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if kill_at is None:
        if proc.wait():
            sys.exit(f"training failed with exit code {proc.returncode}")
        return time.perf_counter() - start
    while not any(params_file.parent.glob(kill_at)):
        if proc.poll() is not None:
            sys.exit(f"training ended (code {proc.returncode}) before {kill_at} was written")
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    elapsed = time.perf_counter() - start
    proc.wait()
    return elapsed


def one_round(overrides: list[str], work: Path, env: dict) -> dict:
    params = load_params(PARAMS_FILE, overrides)
    half = params.train.max_steps // 2
    if half % params.train.checkpoint_every:
        sys.exit(f"max_steps/2 = {half} is not a multiple of train.checkpoint_every")
    files = {}
    for name in ("full", "killed"):
        mine = params.model_copy(deep=True)
        mine.train.checkpoint_dir = str(work / name / "ckpt")
        mine.train.model_dir = str(work / name / "models")
        mine.train.reports_dir = str(work / name / "reports")
        (work / name).mkdir(parents=True)
        files[name] = work / name / "params.yaml"
        files[name].write_text(yaml.safe_dump(mine.model_dump()))
    full = train(files["full"], env)
    killed = train(files["killed"], env, kill_at=f"ckpt/*/{checkpoint_path('', half)}")
    resumed = train(files["killed"], env)
    same = (work / "full/models" / WEIGHTS_FILE).read_bytes() == (
        work / "killed/models" / WEIGHTS_FILE
    ).read_bytes()
    return {"full": full, "killed": killed, "resumed": resumed, "remaining": full - killed, "same": same}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--repeats", type=int, default=1, help="rounds (medians reported)")
    args = parser.parse_args()
    params = load_params(PARAMS_FILE, args.set)
    if not (Path(params.data.tokens_dir) / "train.bin").exists():
        sys.exit(f"no {params.data.tokens_dir}/train.bin: run `trainpipe tokenize` first")
    rounds = []
    with tempfile.TemporaryDirectory(prefix="trainpipe-restart-bench-") as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        MlflowClient(uri).search_experiments()  # the database's migrations, outside the timings
        env = dict(os.environ, MLFLOW_TRACKING_URI=uri)
        env.pop("MLFLOW_RUN_ID", None)
        for i in range(args.repeats):
            rounds.append(one_round(args.set, Path(tmp) / f"round{i}", env))
    med = {k: statistics.median(r[k] for r in rounds) for k in ("full", "killed", "resumed", "remaining")}
    t = params.train
    print(
        f"config: {t.max_steps} steps x {t.batch_size} x {t.block_size} tokens, n_layer {t.n_layer}, "
        f"n_embd {t.n_embd}, checkpoint every {t.checkpoint_every}; {os.cpu_count()} CPUs; "
        f"{len(rounds)} round(s), medians"
    )
    print("| what | seconds |")
    print("|---|---|")
    print(f"| uninterrupted run (start to exit) | {med['full']:.1f} |")
    print(f"| run killed after its step-{t.max_steps // 2} checkpoint | {med['killed']:.1f} |")
    print(f"| remaining half alone (uninterrupted - killed) | {med['remaining']:.1f} |")
    print(f"| resumed run (start to exit) | {med['resumed']:.1f} |")
    print(f"| cost of the kill (resumed - remaining half) | {med['resumed'] - med['remaining']:.1f} |")
    print(f"resumed weights byte-identical to the uninterrupted run: {all(r['same'] for r in rounds)}")


if __name__ == "__main__":
    main()
