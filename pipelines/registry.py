"""Registry reads shared by publishing, restart and serving: the version behind an alias.

Kept apart from pipelines.publish so that the serving side can read the champion without
importing publish (which imports the served model's module).
"""

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

CHAMPION = "champion"


def get_champion(client: MlflowClient, name: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as exc:
        # An unknown model is RESOURCE_DOES_NOT_EXIST; an unknown alias, INVALID_PARAMETER_VALUE.
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise
