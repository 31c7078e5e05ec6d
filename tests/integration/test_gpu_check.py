"""benchmarks/gpu_check.sh in its CPU fallback, on tiny data: the GPU check cannot rot unseen on
machines without a GPU."""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

from test_stages import TINY_TRAIN, curated_from_stdlib, tiny_params

from pipelines.stages import tokenize

REPO = Path(__file__).resolve().parents[2]


def test_gpu_check_runs_its_cpu_fallback_and_reports_every_figure(tmp_path):
    params = tiny_params(tmp_path)
    curated_from_stdlib(params, n=40)
    tokenize.run(params)
    data = [f"data.curated_dir={tmp_path}/curated", f"data.tokens_dir={tmp_path}/tokens"]
    tiny = [o for o in TINY_TRAIN if o.startswith("tokenize.")] + data
    env = os.environ | {"PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    args = ["bash", "benchmarks/gpu_check.sh", "--budget-s", "2"] + [a for o in tiny for a in ("-S", o)]
    done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert "no CUDA device: the CPU fallback" in out
    figures = {
        name: float(re.search(rf"^{re.escape(name)}\s+([\d,.]+)", out, re.M).group(1).replace(",", ""))
        for name in ("bf16 matmul peak", "training", "MFU (of the measured peak)", "held-out bits per byte")
    }
    assert (
        figures["bf16 matmul peak"] > 0
        and figures["training"] > 0
        and figures["MFU (of the measured peak)"] >= 0
    )
    assert math.isfinite(figures["held-out bits per byte"]) and 0 < figures["held-out bits per byte"] < 20


def test_gpu_check_without_tokens_says_what_to_run(tmp_path):
    env = os.environ | {"PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    args = ["bash", "benchmarks/gpu_check.sh", "-S", f"data.tokens_dir={tmp_path}/none"]
    done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "dvc repro tokenize" in done.stderr and "Traceback" not in done.stderr
