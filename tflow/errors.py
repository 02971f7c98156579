"""Typed exceptions: the library raises these; only the CLI turns them into one line and exit 2."""


class TflowError(Exception):
    """Base of every error tflow raises for a problem the user can fix."""


class DeltaError(TflowError, ValueError):
    """A LoRA delta whose shapes disagree with each other or with the model it patches."""


class TargetError(TflowError, ValueError):
    """A target module name the receiver does not have."""


class PatchError(TflowError, RuntimeError):
    """A patch that cannot be applied now (busy model, batch the delta cannot cover)."""


class RecipeError(TflowError, ValueError):
    """A recipe or override that does not validate; `problems` lists every one as `key.path: message`."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(where + "; ".join(self.problems))


class CheckpointError(TflowError, ValueError):
    """A checkpoint that is missing, unreadable, not safetensors, or made for another receiver."""


class ModelLoadError(TflowError, ValueError):
    """A model or tokenizer that cannot be loaded or cannot serve as an agent."""


class QueryError(TflowError, ValueError):
    """A query or generation setting that cannot be run (empty, too long, bad token budget)."""


class DataError(TflowError, ValueError):
    """A dataset that cannot be loaded or lacks a required field."""


class ChannelError(TflowError, ValueError):
    """A channel that does not exist, or one the team cannot run (weights without a generator)."""


class OutputError(TflowError, OSError):
    """An output folder that cannot be created or written."""


class BenchError(TflowError, ValueError):
    """A benchmark that cannot run as asked: unknown shape, or a GPU-sized shape on CPU unforced."""


class AblationError(TflowError, ValueError):
    """An ablation that does not exist or cannot run here (one sender, one query, an untrained channel)."""


class ServeError(TflowError, ValueError):
    """A server that cannot start as asked: an option out of range, or an address it cannot bind."""


class DeviceError(TflowError, ValueError):
    """Devices and processes that cannot run as asked: a device this machine lacks, a dtype or
    precision it cannot compute in, an unknown strategy, more devices than exist, no node."""


class AggregateError(TflowError, ValueError):
    """Evals that cannot be aggregated: a missing or unreadable report.json, or evals of different setups."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none), for one-line errors."""
    text = str(err).strip()
    return text.splitlines()[0].strip() if text else type(err).__name__
