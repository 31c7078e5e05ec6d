"""The model directory (train.model_dir, `models/`): its file names and the one pair of functions
that writes and reads it.

    model.safetensors   the weights (safetensors: no pickle, nothing runs at load)
    config.json         the model's GPTConfig
    tokenizer.json      the tokenizer the model was trained with

The train stage writes it (save_model_dir, plus its train.json); evaluate, `trainpipe generate`
and the promotion gate's re-score of a champion read it (load_model_dir); publish logs these files
as the served model's artifacts. The served model (pipelines/serving/completion.py) reads the
logged copies by their artifact keys and imports nothing of this module: only
pipelines/core/model.py travels with a logged model. torch is imported by the functions, not here,
so that code that only names the files (publish) does not import it.
"""

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.core.data import TOKENIZER_FILE, atomic_path, atomic_write_text

if TYPE_CHECKING:
    import torch
    from tokenizers import Tokenizer

    from pipelines.core.model import GPT

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
MODEL_FILES = (WEIGHTS_FILE, CONFIG_FILE, TOKENIZER_FILE)  # what a model dir must hold to be loaded


def save_model_dir(model_dir: str | Path, model: "GPT", tokenizer_file: str | Path | None = None) -> None:
    """Write the model's weights and config into model_dir, and a copy of tokenizer_file, the
    tokenizer it was trained with, when given."""
    from safetensors.torch import save_model

    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    # each file through a temporary file and a rename: a crash never leaves a half-written one
    with atomic_path(model_dir / WEIGHTS_FILE) as tmp:
        save_model(model, str(tmp))
    atomic_write_text(model_dir / CONFIG_FILE, json.dumps(model.config.to_dict(), indent=2) + "\n")
    if tokenizer_file is not None:
        with atomic_path(model_dir / TOKENIZER_FILE) as tmp:
            shutil.copyfile(tokenizer_file, tmp)


def load_model_dir(model_dir: str | Path, device: "str | torch.device" = "cpu") -> tuple["GPT", "Tokenizer"]:
    """(model, tokenizer) from a folder written by save_model_dir: the model in eval mode on device."""
    from safetensors.torch import load_model
    from tokenizers import Tokenizer

    from pipelines.core.model import GPT, GPTConfig

    model_dir = Path(model_dir)
    config = GPTConfig(**json.loads((model_dir / CONFIG_FILE).read_text()))
    model = GPT(config)
    load_model(model, str(model_dir / WEIGHTS_FILE))
    return model.to(device).eval(), Tokenizer.from_file(str(model_dir / TOKENIZER_FILE))
