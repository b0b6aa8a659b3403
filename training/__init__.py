"""Two-tower retrieval and ranking models, their Lightning systems, evaluation and MLflow tracking."""
