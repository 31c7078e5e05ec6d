"""Serving latency and throughput: in-process predict against the HTTP endpoint, KV cache against none.

    .venv/bin/python benchmarks/serve_bench.py [--quick] [--promotion]

In a temporary folder with its own MLflow registry (SQLite), it publishes a model of the default
architecture (params.yaml's train section; block_size raised to 512 so that 256 new tokens fit
after a prompt) with random weights and a byte-level BPE tokenizer trained on stdlib sources
(without an end-of-text token, so every completion is exactly the new tokens asked for). Then,
side by side in one run, one prompt per request, sampled (temperature 0.8, top_k 50):
  in-process  mlflow.pyfunc.load_model("models:/<name>/1").predict, from a thread pool
  endpoint    `trainpipe serve --port P` (a subprocess), POST /invocations over HTTP
  no cache    in-process with the model's KV cache off (the reference path). The endpoint has no
              switch for it: a request parameter would let a client ask for the slow path.
for 32 and 256 new tokens at concurrency 1, 4 and 16, printing p50/p99 latency and completions/s
per cell (p99 of a few requests is their maximum; at concurrency 1 the paths take turns request
by request, so that the machine's load falls on each alike), then the goals: the endpoint adds at most
20% at concurrency 1; the cache is at least 5x faster at 256 new tokens.

--promotion registers a second version and, under a steady load on the endpoint, runs
`trainpipe promote 2`: it counts non-2xx answers and records which model_version each answer
named, to show whether the endpoint switched with no failed request. The server stops (its
process group) at the end either way.
"""

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import requests
import torch

REPO = Path(__file__).resolve().parents[1]
NAME = "trainpipe-code-completion"  # publish.model_name's default: the temp folder has no params.yaml
PROMPTS = [
    "def fibonacci(n):",
    "import os\n\n\ndef list_files(path):\n",
    "class Point:\n    def __init__(self, x, y):\n",
    "for i in range(10):\n",
]
BLOCK_SIZE = 512
TEMPERATURE, TOP_K = 0.8, 50


def make_model_dir(model_dir: Path) -> dict:
    """Random weights of the default architecture and a tokenizer, as the train stage writes them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from pipelines.core.data import TOKENIZER_FILE
    from pipelines.core.model import GPT, GPTConfig
    from pipelines.core.model_dir import save_model_dir
    from pipelines.core.params import load_params

    model_dir.mkdir(parents=True)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [p.read_text(errors="replace") for p in sorted(stdlib.glob("*.py"))[:150]]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    params = load_params(REPO / "params.yaml")
    train = params.train
    trainer = trainers.BpeTrainer(
        vocab_size=params.tokenize.vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.save(str(model_dir / TOKENIZER_FILE))
    config = GPTConfig(tokenizer.get_vocab_size(), BLOCK_SIZE, train.n_layer, train.n_head, train.n_embd)
    torch.manual_seed(0)
    model = GPT(config)
    save_model_dir(model_dir, model)  # the tokenizer is in place already
    return {**config.to_dict(), "params_m": model.num_params() / 1e6}


def write_metrics(reports_dir: Path, model_dir: Path, bpb: float) -> None:
    """A metrics.json and evaluation.json as evaluate writes them for these weights (the score is
    made up: the gate only has to order the versions)."""
    from pipelines.core.data import sha256_file, write_json
    from pipelines.core.model_dir import WEIGHTS_FILE
    from pipelines.stages.evaluate import (
        EVALUATION_FILE,
        METRICS_FILE,
        PER_DOCUMENT_FILE,
        score_key,
        scoring_code_sha256,
    )

    settings = {
        "val_set_sha256": "0" * 64,
        "score_max_tokens": None,
        "score_context": BLOCK_SIZE,
        "score_bf16": False,
        "scoring_code_sha256": scoring_code_sha256(),
    }
    evaluation = {
        "weights_sha256": sha256_file(model_dir / WEIGHTS_FILE),
        **settings,
        "score_key": score_key(settings),
    }
    write_json(reports_dir / METRICS_FILE, {"val_bits_per_byte": bpb, "val_documents": 1})
    write_json(reports_dir / EVALUATION_FILE, evaluation)
    # the promotion gate pairs per-document scores: one document, at the same rate
    document = {"path": "bench.py", "sha256": "0" * 64, "bits": bpb * 1000, "bytes": 1000}
    write_json(
        reports_dir / PER_DOCUMENT_FILE,
        {
            "weights_sha256": evaluation["weights_sha256"],
            "score_key": evaluation["score_key"],
            "documents": [document],
        },
    )


def publish(work: Path, bpb: float, seed: int = 0) -> str:
    from pipelines.commands.promotion import publish_model
    from pipelines.core.params import Params

    if seed:  # another version: other weights in the same model dir
        from pipelines.core.model import GPT, GPTConfig
        from pipelines.core.model_dir import CONFIG_FILE, save_model_dir

        config = GPTConfig(**json.loads((work / "models" / CONFIG_FILE).read_text()))
        torch.manual_seed(seed)
        save_model_dir(work / "models", GPT(config))
    write_metrics(work / "reports", work / "models", bpb)
    return publish_model(Params())["version"]


# --- load ----------------------------------------------------------------------------------


def timed(call, new_tokens: int, i: int) -> tuple[float, int]:
    started = time.perf_counter()
    status = call(PROMPTS[i % len(PROMPTS)], new_tokens, i)
    return time.perf_counter() - started, status


def summary(results: list[tuple[float, int]], wall: float) -> dict:
    latencies = sorted(r[0] for r in results)
    return {
        "p50": statistics.median(latencies),
        "p95": latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))],
        "p99": latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))],
        "per_s": len(results) / wall,
        "failed": sum(1 for r in results if not 200 <= r[1] < 300),
        "n": len(results),
    }


def run_cell(call, new_tokens: int, concurrency: int, num_requests: int) -> dict:
    """num_requests calls, concurrency at a time."""
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda i: timed(call, new_tokens, i), range(num_requests)))
    return summary(results, time.perf_counter() - started)


def run_interleaved(calls: dict, new_tokens: int, counts: dict) -> dict:
    """One call at a time, the paths taking turns (A B C A B C ...), so that a change in the
    machine's load falls on every path alike: the concurrency-1 cells, which the goals compare."""
    results = {name: [] for name in calls}

    def take_turns() -> None:
        for i in range(max(counts.values())):
            for name, call in calls.items():
                if i < counts[name]:
                    results[name].append(timed(call, new_tokens, i))

    # In a worker thread, as the scoring server runs predict (asyncio.to_thread) and as run_cell
    # does: with 2 torch threads on the loaded 2-core machine, generation from the main thread
    # measured 3-4x slower than from a worker thread.
    with ThreadPoolExecutor(1) as pool:
        pool.submit(take_turns).result()
    return {name: summary(r, sum(t for t, _ in r)) for name, r in results.items()}


def in_process_call(model, use_cache: bool):
    python_model = model.unwrap_python_model()

    def call(prompt: str, new_tokens: int, seed: int) -> int:
        python_model.use_cache = use_cache  # the paths take turns on one loaded model
        params = {"max_new_tokens": new_tokens, "temperature": TEMPERATURE, "top_k": TOP_K, "seed": seed}
        model.predict(pd.DataFrame({"prompt": [prompt]}), params=params)
        return 200

    return call


def http_call(url: str):
    local = threading.local()  # one kept-alive session per client thread

    def call(prompt: str, new_tokens: int, seed: int) -> int:
        if not hasattr(local, "session"):
            local.session = requests.Session()
        body = {
            "dataframe_records": [{"prompt": prompt}],
            "params": {
                "max_new_tokens": new_tokens,
                "temperature": TEMPERATURE,
                "top_k": TOP_K,
                "seed": seed,
            },
        }
        return local.session.post(f"{url}/invocations", json=body, timeout=600).status_code

    return call


# --- the endpoint --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def trainpipe(*args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "trainpipe"), *args]


def start_endpoint(work: Path, env: dict, port: int) -> subprocess.Popen:
    log = (work / "serve.log").open("w")
    # A session of its own: the server runs uvicorn through a shell; the whole group goes at the end.
    proc = subprocess.Popen(
        trainpipe("serve", "--port", str(port)), cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    return wait_for_ping(proc, port, work / "serve.log", "trainpipe serve")


def wait_for_ping(proc: subprocess.Popen, port: int, log_path: Path, what: str) -> subprocess.Popen:
    """proc once its /ping answers; exit with its log's tail if it stops or does not answer in 120 s."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{what} exited {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if requests.get(f"http://127.0.0.1:{port}/ping", timeout=1).status_code == 200:
                return proc
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    stop(proc)
    sys.exit(f"{what}: no /ping within 120 s:\n{log_path.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def promotion_under_load(url: str, work: Path, env: dict, version: str, before_s: float, after_s: float):
    """A steady load (4 clients, 32 new tokens); `trainpipe promote <version>` after before_s; the
    load goes on for after_s after the promote returned (the alias has moved by then).
    Returns the answers (seconds since the promote returned, latency, status, model_version),
    the promote's exit code and its duration."""
    answers, lock, stop_at = [], threading.Lock(), [float("inf")]

    def client() -> None:
        session, i = requests.Session(), 0
        while time.monotonic() < stop_at[0]:
            body = {
                "dataframe_records": [{"prompt": PROMPTS[i % len(PROMPTS)]}],
                "params": {"max_new_tokens": 32, "seed": i},
            }
            started = time.monotonic()
            try:
                r = session.post(f"{url}/invocations", json=body, timeout=60)
                status, named = r.status_code, None
                if r.ok:
                    named = r.json()["predictions"][0].get("model_version")
            except (requests.RequestException, ValueError) as exc:
                status, named = type(exc).__name__, None
            now = time.monotonic()
            with lock:
                answers.append((now, now - started, status, named))
            i += 1

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(before_s)
    started = time.monotonic()
    code = subprocess.run(trainpipe("promote", version), cwd=work, env=env, capture_output=True).returncode
    promoted = time.monotonic()
    stop_at[0] = promoted + after_s
    for t in threads:
        t.join()
    return [(t - promoted, lat, s, v) for t, lat, s, v in answers], code, promoted - started


# --- continuous batching -------------------------------------------------------------------

BATCH_NEW_TOKENS = 128
CLIENTS = (1, 4, 16, 64)


def forward_ceiling(model, batch_sizes, position: int, steps: int = 40) -> dict[int, float]:
    """Tokens/s of the model's batched decode step alone, in-process (no sampling, no server):
    what the endpoint could give at best at each batch size."""
    from pipelines.core.decode import SlotCache

    python_model = model.unwrap_python_model()
    gpt = python_model.model
    torch.set_num_threads(
        python_model.batcher.threads
    )  # the decode loop's threads (this is a worker thread too)
    out = {}
    with torch.inference_mode():
        for size in batch_sizes:
            cache = SlotCache(gpt.config, size)
            positions = torch.full((size,), position)
            tokens = torch.zeros(size, dtype=torch.long)
            for _ in range(5):
                cache.begin_step(positions)
                gpt.step_rows(tokens, positions, cache)
            started = time.perf_counter()
            for _ in range(steps):
                cache.begin_step(positions)
                gpt.step_rows(tokens, positions, cache)
            out[size] = size * steps / (time.perf_counter() - started)
    return out


def batched_predict(model, batching: bool, threads: int | None = None):
    """In-process predict, batched or not (the path before continuous batching: GPT.generate in
    the request's thread, with torch's threads, or with `threads` set in that thread)."""
    python_model = model.unwrap_python_model()

    def call(prompt: str, new_tokens: int, seed: int, prompts: int = 1) -> int:
        python_model.batching = batching  # the paths take turns on one loaded model
        params = {"max_new_tokens": new_tokens, "temperature": TEMPERATURE, "top_k": TOP_K, "seed": seed}
        inherited = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            model.predict(pd.DataFrame({"prompt": [prompt] * prompts}), params=params)
        finally:
            torch.set_num_threads(inherited)
        return 200

    return call


def http_prompts_call(url: str, prompts: int):
    def call(prompt: str, new_tokens: int, seed: int) -> int:
        body = {
            "dataframe_records": [{"prompt": prompt}] * prompts,
            "params": {
                "max_new_tokens": new_tokens,
                "temperature": TEMPERATURE,
                "top_k": TOP_K,
                "seed": seed,
            },
        }
        return requests.post(f"{url}/invocations", json=body, timeout=600).status_code

    return call


def start_mlflow_serve(work: Path, env: dict, port: int, uri: str) -> subprocess.Popen:
    from pipelines.core.params import Params
    from pipelines.serving.serve import serve_command

    log = (work / "mlflow-serve.log").open("w")
    proc = subprocess.Popen(
        serve_command(Params(), uri, port), cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    return wait_for_ping(proc, port, work / "mlflow-serve.log", "mlflow models serve")


def batching_round(model, url: str, mlflow_url: str, quick: bool) -> dict:
    """One round of every cell, side by side; the table takes medians over rounds."""
    new = BATCH_NEW_TOKENS
    cells = {}
    # concurrency 1: batched and unbatched in-process and the endpoint, taking turns
    paths = {
        "in-process batched": batched_predict(model, True),
        "in-process unbatched": batched_predict(model, False),
        "unbatched, 1 thread": batched_predict(model, False, threads=1),
        "endpoint": http_call(url),
    }
    turns = run_interleaved(paths, new, dict.fromkeys(paths, 3 if quick else 6))
    for name, r in turns.items():
        cells[name, 1] = r
    for clients in CLIENTS[1:]:
        cells["endpoint", clients] = run_cell(http_call(url), new, clients, clients * (2 if quick else 3))
    cells["mlflow models serve", 16] = run_cell(http_call(mlflow_url), new, 16, 32 if quick else 48)
    unbatched = batched_predict(model, False)
    cells["in-process unbatched", 16] = run_cell(unbatched, new, 16, 16 if quick else 32)
    # one request of 16 prompts against one of 1, taking turns
    by_prompts = run_interleaved(
        {"1 prompt": http_prompts_call(url, 1), "16 prompts": http_prompts_call(url, 16)},
        new,
        {"1 prompt": 3, "16 prompts": 3},
    )
    return {"cells": cells, "prompts": by_prompts}


def print_batching(rounds: list[dict], ceiling: dict[int, float], cpu_hour_usd: float) -> None:  # noqa: C901
    def med(key, field):
        return statistics.median(r["cells"][key][field] for r in rounds)

    new = BATCH_NEW_TOKENS
    print(
        f"\ncontinuous batching: {new} new tokens per completion, sampled, one client per thread; medians of {len(rounds)} rounds"
    )
    print(
        f"{'path':<22} {'clients':>7} {'compl/s':>8} {'tok/s':>7} {'p50 ms':>7} {'p95 ms':>7} {'errors':>6} {'ceiling tok/s':>13}"
    )
    keys = sorted(rounds[0]["cells"], key=lambda k: (k[0] != "endpoint", k[0], k[1]))
    for key in keys:
        name, clients = key
        per_s = med(key, "per_s")
        errors = sum(r["cells"][key]["failed"] for r in rounds)
        ceiling_cell = (
            f"{ceiling[clients]:>13,.0f}" if name == "endpoint" and clients in ceiling else f"{'':>13}"
        )
        print(
            f"{name:<22} {clients:>7} {per_s:>8.2f} {per_s * new:>7,.0f} {med(key, 'p50') * 1000:>7,.0f} "
            f"{med(key, 'p95') * 1000:>7,.0f} {errors:>6} {ceiling_cell}"
        )
    one, sixteen = ("endpoint", 1), ("endpoint", 16)
    gain = med(sixteen, "per_s") / med(one, "per_s")
    latency = med(sixteen, "p50") / med(one, "p50")
    errors16 = sum(r["cells"][sixteen]["failed"] for r in rounds)
    print("goals:")
    print(
        f"  16 clients against 1: {gain:.1f}x the completions/s (>= 10x: {'met' if gain >= 10 else 'NOT met'}); "
        f"p50 {latency:.2f}x one client's (<= 2x: {'met' if latency <= 2 else 'NOT met'}); {errors16} errors"
    )
    t1 = statistics.median(r["prompts"]["1 prompt"]["p50"] for r in rounds)
    t16 = statistics.median(r["prompts"]["16 prompts"]["p50"] for r in rounds)
    print(
        f"  a 16-prompt request in {t16 * 1000:,.0f} ms against {t1 * 1000:,.0f} ms for 1 prompt: {t16 / t1:.2f}x (<= 2x: {'met' if t16 / t1 <= 2 else 'NOT met'})"
    )
    b1, u1 = med(("in-process batched", 1), "p50"), med(("in-process unbatched", 1), "p50")
    o1 = med(("unbatched, 1 thread", 1), "p50")
    print(
        f"  concurrency 1, in-process, batched against unbatched: p50 {b1 * 1000:,.0f} against {u1 * 1000:,.0f} ms "
        f"({b1 / u1 - 1:+.0%}); against unbatched on one torch thread, as the loop runs: {o1 * 1000:,.0f} ms ({b1 / o1 - 1:+.0%})"
    )
    for clients in CLIENTS:
        got = med(("endpoint", clients), "per_s") * new
        print(
            f"  endpoint at {clients} clients: {got:,.0f} tokens/s, {got / ceiling[clients]:.0%} of the forward alone at batch {clients}"
        )
    unbatched_tps = med(("in-process unbatched", 1), "per_s") * new
    best = max(CLIENTS, key=lambda c: med(("endpoint", c), "per_s"))
    batched_tps = med(("endpoint", best), "per_s") * new
    from pipelines.core.ledger import usd_per_million_tokens
    from pipelines.core.params import CostParams

    def usd(tokens_per_s: float) -> float:
        return usd_per_million_tokens(tokens_per_s, "cpu", CostParams(cpu_hour_usd=cpu_hour_usd))

    print(
        f"  ledger $/Mtok at cpu_hour_usd {cpu_hour_usd}: {usd(unbatched_tps):.3f} one sequence at a time "
        f"({unbatched_tps:,.0f} tokens/s), {usd(batched_tps):.4f} batched at {best} clients ({batched_tps:,.0f} tokens/s)"
    )


# --- main ----------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="fewer requests per cell; no cache at concurrency 1 only"
    )
    parser.add_argument("--promotion", action="store_true", help="also promote a second version under load")
    parser.add_argument(
        "--batching",
        action="store_true",
        help="only the continuous batching table: 1 to 64 clients, 128 new tokens, against the forward alone",
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the batching table (medians)")
    parser.add_argument(
        "--promotion-only", action="store_true", help="only the promotion under load, not the latency table"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads here and in the server (default: torch's own)",
    )
    args = parser.parse_args()
    concurrencies = (1, 4, 16)
    requests_per_cell = {1: 4, 4: 8, 16: 16} if args.quick else {1: 10, 4: 20, 16: 32}
    no_cache_concurrencies = (1,) if args.quick else concurrencies

    work = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    env = dict(os.environ)
    env.update(
        MLFLOW_TRACKING_URI=f"sqlite:///{work / 'mlflow.db'}",
        MLFLOW_DISABLE_TELEMETRY="true",
        MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false",
        PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
    )
    if args.threads:
        torch.set_num_threads(args.threads)
        env["OMP_NUM_THREADS"] = str(args.threads)  # read by torch when the server starts
    os.environ.update({k: env[k] for k in ("MLFLOW_TRACKING_URI", "MLFLOW_DISABLE_TELEMETRY")})
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    os.chdir(work)
    server = None
    try:
        t0 = time.perf_counter()
        config = make_model_dir(work / "models")
        v1 = publish(work, bpb=2.0)
        import mlflow.pyfunc

        model = mlflow.pyfunc.load_model(f"models:/{NAME}/{v1}", model_config={"model_version": v1})
        port = free_port()
        server = start_endpoint(work, env, port)
        url = f"http://127.0.0.1:{port}"
        setup_s = time.perf_counter() - t0
        print(
            f"model {config['n_layer']} layers x {config['n_embd']}, {config['n_head']} heads, block {BLOCK_SIZE}, "
            f"vocab {config['vocab_size']} ({config['params_m']:.2f} M params); torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs; setup {setup_s:.0f} s"
        )
        print(
            f"requests per cell at concurrency 1/4/16: {'/'.join(str(requests_per_cell[c]) for c in concurrencies)}"
            f" (p99 of so few is their maximum); one prompt per request, temperature {TEMPERATURE}, top_k {TOP_K}"
        )
        if args.batching:
            mlflow_port = free_port()
            mlflow_server = start_mlflow_serve(work, env, mlflow_port, f"models:/{NAME}/{v1}")
            try:
                mlflow_url = f"http://127.0.0.1:{mlflow_port}"
                for call in (
                    batched_predict(model, True),
                    batched_predict(model, False),
                    http_call(url),
                    http_call(mlflow_url),
                ):
                    call(PROMPTS[0], 8, 0)  # warm-up: first calls pay one-off costs
                prompt_tokens = len(model.unwrap_python_model().prompt_ids(PROMPTS[0], BATCH_NEW_TOKENS))
                with ThreadPoolExecutor(
                    1
                ) as pool:  # a worker thread, as the decode loop runs (see run_interleaved)
                    ceiling = pool.submit(
                        forward_ceiling, model, CLIENTS, prompt_tokens + BATCH_NEW_TOKENS // 2
                    ).result()
                rounds = []
                for i in range(args.rounds):
                    rounds.append(batching_round(model, url, mlflow_url, args.quick))
                    print(f"round {i + 1} of {args.rounds} done", flush=True)
            finally:
                stop(mlflow_server)
            from pipelines.core.params import load_params

            print_batching(rounds, ceiling, load_params(REPO / "params.yaml").cost.cpu_hour_usd)
        elif not args.promotion_only:
            paths = {
                "in-process": in_process_call(model, use_cache=True),
                "endpoint": http_call(url),
                "no cache": in_process_call(model, use_cache=False),
            }
            for call in paths.values():  # warm-up: first calls pay one-off costs
                call(PROMPTS[0], 8, 0)
            print(
                f"{'path':<11} {'new':>4} {'conc':>4} {'reqs':>4} {'p50 ms':>8} {'p99 ms':>8} {'compl/s':>8}"
            )
            results = {}
            for new_tokens in (32, 256):
                for c in concurrencies:  # the paths of a cell one after the other: the same machine state
                    cells = [name for name in paths if name != "no cache" or c in no_cache_concurrencies]
                    counts = {
                        name: requests_per_cell[c] if name != "no cache" or new_tokens == 32 else max(c, 3)
                        for name in cells
                    }
                    if c == 1:
                        cell_results = run_interleaved({n: paths[n] for n in cells}, new_tokens, counts)
                    else:
                        cell_results = {n: run_cell(paths[n], new_tokens, c, counts[n]) for n in cells}
                    for name, r in cell_results.items():
                        results[name, new_tokens, c] = r
                        failed = f"  {r['failed']} failed" if r["failed"] else ""
                        print(
                            f"{name:<11} {new_tokens:>4} {c:>4} {r['n']:>4} {r['p50'] * 1000:>8.0f} "
                            f"{r['p99'] * 1000:>8.0f} {r['per_s']:>8.2f}{failed}",
                            flush=True,
                        )
            print("goals:")
            for new_tokens in (32, 256):
                over = (
                    results["endpoint", new_tokens, 1]["p50"] / results["in-process", new_tokens, 1]["p50"]
                    - 1
                )
                verdict = "met" if over <= 0.20 else "NOT met"
                print(
                    f"  endpoint over in-process, p50 at concurrency 1, {new_tokens} new tokens: {over:+.1%} (<= +20%: {verdict})"
                )
            speedup = results["no cache", 256, 1]["p50"] / results["in-process", 256, 1]["p50"]
            verdict = "met" if speedup >= 5 else "NOT met"
            print(
                f"  KV cache speedup, p50 at concurrency 1, 256 new tokens: {speedup:.1f}x (>= 5x: {verdict})"
            )

        if args.promotion or args.promotion_only:
            v2 = publish(work, bpb=3.0, seed=1)  # worse: stays @challenger until promoted by hand
            answers, code, took = promotion_under_load(url, work, env, v2, before_s=5, after_s=20)
            bad = [a for a in answers if not (isinstance(a[2], int) and 200 <= a[2] < 300)]
            print(
                f"promotion under load (4 clients, 32 new tokens): `trainpipe promote {v2}` exit {code} "
                f"after {took:.1f} s; {len(answers)} answers, {len(bad)} non-2xx (goal 0: "
                f"{'met' if not bad else 'NOT met'}); latency p50 {statistics.median(a[1] for a in answers) * 1000:.0f} ms, "
                f"max {max(a[1] for a in answers) * 1000:.0f} ms"
            )
            named = {}
            for t, _, _, v in answers:
                named.setdefault(v, []).append(t)
            for v, times in sorted(named.items(), key=lambda kv: min(kv[1])):
                print(
                    f"  model_version {v}: {len(times)} answers, {min(times):+.1f} s to {max(times):+.1f} s "
                    "from the promote's return"
                )
            if v2 in named:
                print(
                    f"  first answer from v{v2} {max(0.0, min(named[v2])):.1f} s after the promote returned (goal: 15 s)"
                )
            else:
                print(f"  v{v2} never answered within 20 s: the endpoint did not follow @champion")
    finally:
        if server is not None:
            stop(server)
        os.chdir(REPO)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
