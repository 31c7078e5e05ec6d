"""Adapters: the only code that talks to MLflow (registry.py), DVC (dvc_repo.py), torch.distributed
(ranks.py), checkpoint files and the workspace lock."""
