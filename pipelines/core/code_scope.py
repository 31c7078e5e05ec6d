"""Loading a logged model without changing which `pipelines` this process imports.

MLflow's pyfunc loader puts the model's code dir first on sys.path for good, and log_model loads
the model it logs to check its input example. That code dir holds a `pipelines` package of only
the inference modules, so afterwards a new import in this process, or in a worker it spawns (which
copies sys.path), could find `pipelines.core` there and miss the rest of the project.
"""

import contextlib
import sys


def _project_modules() -> list[str]:
    return [k for k in sys.modules if k == "pipelines" or k.startswith("pipelines.")]


@contextlib.contextmanager
def own_code_scope():
    """Inside: no `pipelines` module is imported, so a model loaded here imports the code it
    carries. Afterwards this process's sys.path and `pipelines` modules are as before; a model
    loaded inside keeps its own."""
    saved_modules = {k: sys.modules[k] for k in _project_modules()}
    saved_path = list(sys.path)
    for key in saved_modules:
        del sys.modules[key]
    try:
        yield
    finally:
        for key in _project_modules():
            del sys.modules[key]
        sys.modules.update(saved_modules)
        sys.path[:] = saved_path
