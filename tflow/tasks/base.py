"""Examples and the Task interface: load a dataset, prompt for an item, extract and score a reply."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tflow.errors import DataError

# local files are read by the `datasets` builder named for their extension (gzipped text too)
_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv",
             ".json.gz": "json", ".jsonl.gz": "json", ".csv.gz": "csv"}


@dataclass(frozen=True)
class Example:
    """One item: the question, its gold final answer, per-sender private contexts and extra fields."""

    question: str
    answer: str
    contexts: dict[str, str] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


def required(example: Example, *keys: str) -> list[Any]:
    """The values of `keys` in `example.meta`.

    Raises:
        DataError: a key is missing (the example was not loaded with the task's fields).
    """
    missing = [key for key in keys if key not in example.meta]
    if missing:
        raise DataError(f"example lacks meta field(s) {missing}; meta has {sorted(example.meta)}")
    return [example.meta[key] for key in keys]


class Task:
    """A benchmark: where its data lives, how to prompt for an item, and how to score a reply.

    `fields` maps each role the task reads ("question", "answer", and task-specific ones such
    as "choices" or "test") to a dataset column; roles other than question and answer land in
    `Example.meta` under the role name; `meta` also keeps every column but the question's (the
    raw answer column holds the worked solution where the dataset has one).
    """

    name: str = ""
    default_source: str | None = None
    default_config: str | None = None
    instruction: str = ""
    fields: Mapping[str, str] = {"question": "question", "answer": "answer"}

    def load(
        self,
        source: str | Path | None = None,
        *,
        config: str | None = None,
        split: str = "test",
        limit: int | None = None,
        fields: Mapping[str, str] | None = None,
    ) -> list[Example]:
        """Examples from a hub dataset id (default `default_source`) or a local json/jsonl/parquet/csv
        file (json, jsonl and csv may be gzipped).

        `split` and `config` apply to hub datasets; a local file is one split. `fields`
        overrides part of the role-to-column mapping.

        Raises:
            DataError: the dataset cannot be loaded, `limit` is negative, `fields` names an
                unknown role, or a mapped column is missing.
        """
        if limit is not None and limit < 0:
            raise DataError(f"limit must be >= 0, got {limit}")
        mapping = {**self.fields, **(fields or {})}
        unknown = sorted(set(mapping) - set(self.fields))
        if unknown:
            raise DataError(f"task {self.name!r} has no field(s) {unknown}; fields: {sorted(self.fields)}")
        examples = []
        for where, rows, extra in self._datasets(source, config, split):
            missing = [f"{role!r} (column {col!r})" for role, col in mapping.items() if col not in rows.column_names]
            if missing:
                raise DataError(f"{where}: missing field {', '.join(missing)}; columns: {rows.column_names}")
            if limit is not None:
                rows = rows.select(range(min(limit - len(examples), len(rows))))
            examples += [self._example(row, mapping, extra) for row in rows]
            if limit is not None and len(examples) >= limit:
                break
        return examples

    def gold(self, raw: Any) -> str:
        """The gold final answer from the raw answer field."""
        return str(raw).strip()

    def target(self, example: Example, answer_column: str = "answer") -> str:
        """What a receiver learns to write: the raw answer column (a worked solution) if kept, else the gold."""
        return str(example.meta.get(answer_column, example.answer))

    def prompt(self, example: Example) -> str:
        """The user message asking `example`'s question."""
        return f"{example.question.strip()}\n\n{self.instruction}"

    def extract(self, text: str, example: Example | None = None) -> str:
        """The predicted final answer in a reply; `example`, when given, lets a task read it as
        `score` does (a choice named by its text, the candidates of the example's documents)."""
        return text.strip()

    def score(self, text: str, example: Example) -> bool:
        """Whether the reply `text` answers `example` correctly."""
        return self.extract(text) == example.answer

    def configs(self, source: str, config: str | None) -> list[str | None]:
        """The hub configs to read for `config` (one, unless a task reads several when None)."""
        return [config]

    def _example(self, row: dict[str, Any], mapping: Mapping[str, str], extra: dict[str, Any]) -> Example:
        meta = {col: value for col, value in row.items() if col != mapping["question"]}
        meta.update({role: row[col] for role, col in mapping.items() if role not in ("question", "answer")})
        answer = self.gold(row[mapping["answer"]])
        return Example(question=str(row[mapping["question"]]), answer=answer, meta={**meta, **extra})

    def _datasets(
        self, source: str | Path | None, config: str | None, split: str
    ) -> Iterator[tuple[str, Any, dict[str, Any]]]:
        """Yield (where, datasets.Dataset, extra meta) for each part of the source to read."""
        import datasets

        datasets.disable_progress_bars()  # stderr is for errors and the command's own progress
        if source is None:
            if self.default_source is None:
                raise DataError(f"task {self.name!r} has no default source; pass a file or hub id")
            source, config = self.default_source, config or self.default_config
        path = Path(source)
        builder = _BUILDERS.get("".join(path.suffixes[-2:]).lower()) or _BUILDERS.get(path.suffix.lower())
        try:
            if builder is not None:
                if not path.is_file():
                    raise DataError(f"data file {path} does not exist")
                yield str(path), datasets.load_dataset(builder, data_files=str(path), split="train"), {}
                return
            names = self.configs(str(source), config)
            for name in names:
                rows = datasets.load_dataset(str(source), name, split=split)
                where = f"{source}" + (f" ({name})" if name else "") + f" split {split!r}"
                yield where, rows, ({"config": name} if name else {})
        except DataError:
            raise
        except Exception as err:  # datasets raises many unrelated types for an unreadable source
            raise DataError(f"cannot load {source!r} for task {self.name!r}: {err}") from err
