"""The few exception types Towerline raises on purpose.

Deeper layers raise these; only the CLI (exit status 2, one line per problem) and the HTTP ingress
(4xx with a problem+json body) turn them into user-facing answers, so a message must say what went
wrong, where (file, row, field) and how to fix it.
"""


class TowerlineError(Exception):
    """Base class: anything the user can fix by changing input, config or flags."""


class DataValidationError(TowerlineError):
    """Input data broke its contract. ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class ConfigError(TowerlineError):
    """A configuration value is missing, unknown or impossible; the message names the field."""


class BundleError(TowerlineError):
    """A model bundle is missing an artifact or an artifact fails its checksum."""


class IndexMismatchError(TowerlineError):
    """A FAISS index does not match its manifest (sha256, dim, metric, count) or the model (dim, version)."""
