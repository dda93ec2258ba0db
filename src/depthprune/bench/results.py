"""What a bench run produces: one :class:`BenchRow` per model (dense first) and the :class:`BenchResult` that
holds them, with the ratios against dense derived from them; the names of the files it is written to."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
RESULTS_PLOT = "results.png"
ROWS_DIR = "rows"
REFERENCE_FILE = "reference.safetensors"
DENSE = "dense"


@dataclass
class BenchRow:
    """One line of the comparison; ``method == "dense"`` is the unpruned baseline."""

    method: str
    ratio: float | None
    compensation: str = "none"
    layers: int | None = None
    layers_removed: int | None = None
    params: int | None = None
    perplexity: float | None = None
    kl: float | None = None
    top1: float | None = None
    tasks: dict[str, float] = field(default_factory=dict)
    task_mean: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    """Every value measured, by name: per held-out text (``kl/code``) beside the means, and ``gen_*``."""
    decode_tokens_per_s: float | None = None
    prefill_latency_s: float | None = None
    plan: dict[str, Any] | None = None
    details: dict[str, Any] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    settings_key: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def name(self) -> str:
        if self.ratio is None:
            return DENSE
        return f"{self.method}{'' if self.compensation == 'none' else '+' + self.compensation}@{self.ratio:g}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BenchRow":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class BenchResult:
    """Every row of a bench run and where it was written."""

    out: Path
    dense: BenchRow
    rows: list[BenchRow]
    settings: dict[str, Any]
    versions: dict[str, str]
    wall_time_s: float
    cached: list[str] = field(default_factory=list)

    @property
    def all_rows(self) -> list[BenchRow]:
        return [self.dense, *self.rows]

    @property
    def tasks(self) -> list[str]:
        zs = self.settings["evaluation"].get("zeroshot")
        return list(zs["tasks"]) if zs else []

    @property
    def domains(self) -> list[str]:
        """The held-out texts measured one by one (empty for a single text)."""
        names = [name.partition("/")[2] for row in self.all_rows for name in row.metrics if "/" in name]
        return list(dict.fromkeys(names))

    def derived(self, row: BenchRow) -> dict[str, float | None]:
        """Retention against dense: mean task score ratio, perplexity ratio, decode speedup, ideal speedup."""
        d = self.dense
        return {
            "accuracy_retention": _ratio(row.task_mean, d.task_mean),
            "perplexity_ratio": _ratio(row.perplexity, d.perplexity),
            "speedup": _ratio(row.decode_tokens_per_s, d.decode_tokens_per_s),
            "ideal_speedup": _ratio(d.layers, row.layers),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.settings.get("model"),
            "settings": self.settings,
            "versions": self.versions,
            "wall_time_s": self.wall_time_s,
            "cached_rows": self.cached,
            "rows": [{**r.to_dict(), **self.derived(r)} for r in self.all_rows],
        }


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None
