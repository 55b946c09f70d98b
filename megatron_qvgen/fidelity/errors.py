"""The one error type of the evaluation tool: its message is one line that names the offending path or value."""


class EvaluationError(ValueError):
    """Bad input to the evaluation (missing teacher, unusable student, mismatched models)."""
