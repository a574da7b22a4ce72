"""Typed errors for user mistakes. Each message says what failed, where, expected versus found, and the fix.

The CLI prints these without a traceback and exits non-zero; anything else is a bug and keeps its traceback.
"""


class PipelineError(Exception):
    """Base class for errors caused by input the user can fix."""

    exit_code = 2


class RecipeError(PipelineError):
    """A recipe is malformed or inconsistent with the model it names."""

    def __init__(self, problems: list[str], source: str = "recipe"):
        self.problems = list(problems)
        head = f"{source}: {len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}"
        super().__init__(head + "\n" + "\n".join(f"  - {p}" for p in self.problems))


class FetchError(PipelineError):
    """Weights or tokenizer could not be obtained (Hub unreachable, missing folder, ...)."""


class CheckpointError(PipelineError):
    """A checkpoint file is missing, corrupt or inconsistent with its config."""


class WeightMapError(PipelineError):
    """A source checkpoint does not match the weight map of its architecture."""


class RunError(PipelineError):
    """The runner cannot start: wrong world size, no build, artifact mismatch, ..."""


class BuildError(PipelineError):
    """A build stage failed (for example the TensorRT-LLM builder)."""


class GateError(PipelineError):
    """An accuracy gate declared by the recipe was missed."""
