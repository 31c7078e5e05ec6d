"""The code that travels inside a logged model: the served model's file and what it imports.

publish logs `MODEL_FILE` as the model itself (MLflow "models from code", no pickle) and
`code_dir()` as its code_paths: a package `pipelines` holding only `INFERENCE_MODULES`, so no stage,
tracking or registry code travels with a model. A test loads a logged model in a fresh process and
checks that these are all it imported of the project.
"""

import shutil
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding the package `pipelines`
MODEL_FILE = Path(__file__).with_name("completion.py")
# What completion.py imports of the project, as paths under PACKAGE_ROOT.
INFERENCE_MODULES = ("pipelines/core/model.py", "pipelines/core/decode.py", "pipelines/core/scheduler.py")


def code_dir(work_dir: Path) -> Path:
    """A folder holding a package `pipelines` with only INFERENCE_MODULES (and the __init__ files
    that make them importable): the code_paths of a logged model."""
    package = work_dir / "code" / "pipelines"
    for name in INFERENCE_MODULES:
        target = work_dir / "code" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(PACKAGE_ROOT / name, target)
        for folder in target.relative_to(work_dir / "code").parents[:-1]:
            (work_dir / "code" / folder / "__init__.py").touch()
    (package / "__init__.py").write_text('"""trainpipe inference code, as logged with a model."""\n')
    return package
