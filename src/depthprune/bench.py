"""Compare methods at several depths on one model: every registered method x every ratio, plus dense.

Each (method, ratio) row loads the model fresh (methods prune in place),
plans with :func:`depthprune.methods.make_plan`, applies the plan and
evaluates it: perplexity, lm-eval zero-shot tasks, and optionally speed.
Finished rows are cached one JSON file each under ``OUT/rows/``, so an
interrupted or extended run recomputes only what is missing; a method that
fails becomes a row with its error instead of ending the run.

Calibration windows and perplexity windows are tokenized once and shared by
every row (perplexity is :func:`depthprune.evaluate.perplexity.perplexity_on`
on the windows :func:`~depthprune.evaluate.perplexity.perplexity` would
build), so rows differ only in the model.

Reloading beats copying: from the converted safetensors directory a reload
of SmolLM2-135M takes about 0.3 s once the files are in the page cache (the
same as ``copy.deepcopy``), and it never holds a pristine copy beside the
pruned one, which would double memory for large models.
"""

from __future__ import annotations

import gc
import hashlib
import json
import platform
import re
import time
import traceback
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator, Sequence

from tqdm.auto import tqdm

from .data.calibration import HUB_TEXTS, Calibration, consecutive_windows
from .evaluate.perplexity import PPL_DATASETS, perplexity_on
from .io import write_json
from .models.load import LoadedModel, load_model
from .pipeline import CalibrationSpec, PerplexitySpec, ZeroShotSpec
from .report import format_number, format_params, markdown_table, plot_depth_curves, write_text

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
RESULTS_PLOT = "results.png"
ROWS_DIR = "rows"
DENSE = "dense"


class BenchError(ValueError):
    """Bench input that cannot work; raised before any model is loaded."""


@dataclass
class SpeedSpec:
    """One fixed workload for :func:`depthprune.evaluate.speed.measure_speed`, the same for every row."""

    prompt_len: int = 128
    gen_len: int = 64
    batch_size: int = 1
    warmup: int = 1
    repeats: int = 3

    def run(self, model: Any, tokenizer: Any):
        from .evaluate.speed import measure_speed

        return measure_speed(model, tokenizer, **asdict(self))


@dataclass
class BenchRow:
    """One line of the comparison; ``method == "dense"`` is the unpruned baseline."""

    method: str
    ratio: float | None
    layers: int | None = None
    layers_removed: int | None = None
    params: int | None = None
    perplexity: float | None = None
    tasks: dict[str, float] = field(default_factory=dict)
    task_mean: float | None = None
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
        return DENSE if self.ratio is None else f"{self.method}@{self.ratio:g}"

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
        zs = self.settings.get("zeroshot")
        return list(zs["tasks"]) if zs else []

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

    def markdown(self) -> str:
        """The results table: one row per model, dense first."""
        speed = self.settings.get("speed") is not None
        headers = ["method", "ratio", "layers", "removed / merged", "params", "PPL", *self.tasks]
        many = len(self.tasks) > 1
        if self.tasks:
            headers += (["mean"] if many else []) + ["acc retention"]
        headers += ["PPL ratio"] + (["speedup (ideal)"] if speed else []) + ["note"]
        lines = []
        for row in self.all_rows:
            r = self.derived(row)
            cells: list[Any] = [row.method, "-" if row.ratio is None else f"{row.ratio:g}",
                                row.layers if row.layers is not None else "-", _dropped(row.plan),
                                format_params(row.params),
                                format_number(row.perplexity)]
            cells += [format_number(row.tasks.get(t)) for t in self.tasks]
            if self.tasks:
                cells += ([format_number(row.task_mean)] if many else []) + [_percent(r["accuracy_retention"])]
            cells.append("-" if r["perplexity_ratio"] is None else f"x{format_number(r['perplexity_ratio'])}")
            if speed:
                cells.append("-" if r["speedup"] is None else f"{r['speedup']:.2f}x ({r['ideal_speedup']:.2f}x)")
            cells.append(f"error: {row.error}" if row.error else "")
            lines.append(cells)
        return markdown_table(headers, lines)

    def write(self) -> None:
        """results.json, results.md and the plot, each written atomically."""
        write_json(self.out / RESULTS_JSON, self.to_dict())
        settings = self.settings
        head = (f"# depthprune bench: {settings['model']}\n\n"
                f"{_describe_settings(settings)}\n\n")
        write_text(self.out / RESULTS_MD, head + self.markdown() + f"\n![metrics vs layers removed]({RESULTS_PLOT})\n")
        self.plot(self.out / RESULTS_PLOT)

    def plot(self, path: Path) -> Path:
        curves: dict[str, list[tuple[int, float | None, float | None]]] = {}
        for row in self.rows:
            if row.ok and row.layers_removed is not None:
                curves.setdefault(row.method, []).append((row.layers_removed, row.perplexity, row.task_mean))
        label = "mean accuracy" if len(self.tasks) > 1 else (f"{self.tasks[0]} accuracy" if self.tasks else "")
        return plot_depth_curves(curves, path, dense=(self.dense.perplexity, self.dense.task_mean),
                                 accuracy_label=label, title=str(self.settings["model"]))


def _ranges(indices: Sequence[int]) -> str:
    spans: list[list[int]] = []
    for i in indices:
        if spans and i == spans[-1][1] + 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    return ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in spans)


def _dropped(plan: dict[str, Any] | None) -> str:
    """Which original layers went: removed ones as ranges (``12-17,25``), merges as windows."""
    if not plan:
        return "-"
    parts = [_ranges(plan["remove"])] if plan.get("remove") else []
    parts += [f"merge {m['low']}..{m['high']}" for m in plan.get("merges", [])]
    return "; ".join(parts) or "none"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _percent(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _describe_settings(s: dict[str, Any]) -> str:
    parts = [f"calibration: {s['calibration']['source']}, {s['calibration']['num_windows']} x "
             f"{s['calibration']['seq_len']} tokens, seed {s['calibration']['seed']}"]
    if s.get("perplexity"):
        p = s["perplexity"]
        parts.append(f"PPL: {p['dataset']}, {p['max_windows'] or 'all'} windows x {p['seq_len']} tokens")
    if s.get("zeroshot"):
        z = s["zeroshot"]
        parts.append(f"zero-shot: {', '.join(z['tasks'])} (lm-eval, {z['num_fewshot']}-shot, "
                     f"limit {z['limit'] if z['limit'] is not None else 'none'})")
    if s.get("speed"):
        v = s["speed"]
        parts.append(f"speed: greedy decode {v['gen_len']} tokens after a {v['prompt_len']}-token prompt, "
                     f"batch {v['batch_size']}, median of {v['repeats']}; speedup = decode tokens/s vs dense, "
                     "ideal = L/(L-k)")
    return "; ".join(parts) + "."


def versions() -> dict[str, str]:
    """Versions that change numbers: results are only comparable when these match."""
    import lm_eval
    import torch
    import transformers

    from . import __version__

    return {"depthprune": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "lm_eval": getattr(lm_eval, "__version__", "unknown"), "python": platform.python_version()}


def check_methods(methods: Sequence[str]) -> list[str]:
    from .methods import METHODS

    names = list(dict.fromkeys(m.strip() for m in methods if m.strip()))
    if not names:
        raise BenchError(f"no methods given: pass --methods with some of {', '.join(METHODS)}")
    if DENSE in names:
        raise BenchError(f"'{DENSE}' is the baseline row and always included; leave it out of --methods")
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise BenchError(f"unknown method(s) {', '.join(unknown)} in --methods: use some of {', '.join(METHODS)}")
    return names


def check_ratios(ratios: Sequence[float]) -> list[float]:
    values = list(dict.fromkeys(float(r) for r in ratios))
    if not values:
        raise BenchError("no ratios given: pass --ratios such as 0.2,0.35")
    bad = [r for r in values if not 0.0 < r < 1.0]
    if bad:
        raise BenchError(f"--ratios must be fractions of layers to remove, between 0 and 1 (exclusive); got "
                         f"{', '.join(f'{r:g}' for r in bad)}")
    return values


def check_text_source(source: str, option: str) -> None:
    """A named source or an existing file; anything else is a typo caught before loading the model."""
    if source in ("default", "default-heldout") or source in HUB_TEXTS or source in PPL_DATASETS:
        return
    if not Path(source).expanduser().is_file():
        raise BenchError(f"{option} {source!r} is neither a file nor a known text (default, default-heldout, "
                         f"{', '.join(HUB_TEXTS)}); pass a .txt/.jsonl path")


def _prepare_out(out: str | Path, inputs: Sequence[str | Path]) -> Path:
    """Accept a new or empty directory, or an earlier bench output (to resume); refuse anything else."""
    out = Path(out).expanduser().resolve()
    for src in inputs:
        src_path = Path(src).expanduser()
        if src_path.exists():
            src_path = src_path.resolve()
            if out == src_path or out.is_relative_to(src_path) or src_path.is_relative_to(out):
                raise BenchError(f"--out {out} overlaps the input model {src_path}; choose a new directory")
    if out.exists() and not out.is_dir():
        raise BenchError(f"--out {out} is a file; choose a directory")
    if out.is_dir() and any(out.iterdir()) and not ((out / ROWS_DIR).is_dir() or (out / RESULTS_JSON).is_file()):
        raise BenchError(f"--out {out} is not empty and is not an earlier bench output; choose a new directory")
    return out


def _row_file(out: Path, method: str, ratio: float | None) -> Path:
    stem = DENSE if ratio is None else f"{re.sub(r'[^A-Za-z0-9_.-]', '_', method)}-{ratio:g}"
    return out / ROWS_DIR / f"{stem}.json"


def _settings_key(settings: dict[str, Any]) -> str:
    """Fingerprint of everything that changes a row's numbers; cached rows count only when it matches."""
    relevant = {k: settings[k] for k in ("model_path", "dtype", "device", "calibration", "perplexity",
                                         "zeroshot", "speed", "method_options")}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _load_cached(path: Path, key: str) -> BenchRow | None:
    if not path.is_file():
        return None
    try:
        row = BenchRow.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError):
        return None
    return row if row.ok and row.settings_key == key else None


@contextmanager
def _timed(timings: dict[str, float], step: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[step] = time.perf_counter() - start


class _Session:
    """The model source, shared inputs built once (calibration, PPL windows), and fresh models on demand."""

    def __init__(self, model: str | LoadedModel, dtype: Any, device: str | None, calibration: CalibrationSpec,
                 ppl: PerplexitySpec | None, progress: bool):
        from .models.load import resolve_device, resolve_dtype

        self.given = model if isinstance(model, LoadedModel) else None
        self.source = model.source if isinstance(model, LoadedModel) else model
        self.path = model.path if isinstance(model, LoadedModel) else None
        self.device = device
        self.dtype = resolve_dtype(dtype, resolve_device(device))
        if self.given is not None:
            self.dtype = next(self.given.model.parameters()).dtype
            self.device = "auto" if getattr(self.given.model, "hf_device_map", None) else str(
                next(self.given.model.parameters()).device)
        self.calibration_spec, self.ppl_spec, self.progress = calibration, ppl, progress
        self._calibration: Calibration | None = None
        self._ppl_windows: Calibration | None = None

    def dense(self) -> LoadedModel:
        """The caller's model if one was passed (it is only evaluated), else a fresh load."""
        if self.given is not None:
            return self.given
        return self.fresh()

    def fresh(self) -> LoadedModel:
        from transformers.utils import logging as hf_logging

        gc.collect()
        shown = hf_logging.is_progress_bar_enabled()
        if not self.progress:
            hf_logging.disable_progress_bar()
        try:
            loaded = load_model(self.path or self.source, dtype=self.dtype, device=self.device)
        finally:
            if shown:
                hf_logging.enable_progress_bar()
        self.path = loaded.path
        return loaded

    def calibration(self, tokenizer: Any) -> Calibration:
        if self._calibration is None:
            self._calibration = self.calibration_spec.windows(tokenizer)
        return self._calibration

    def ppl_windows(self, tokenizer: Any) -> Calibration:
        if self._ppl_windows is None:
            spec = self.ppl_spec
            source = PPL_DATASETS.get(spec.dataset, spec.dataset)
            self._ppl_windows = consecutive_windows(tokenizer, source, seq_len=spec.seq_len,
                                                    max_windows=spec.max_windows)
        return self._ppl_windows


def _evaluate(row: BenchRow, loaded: LoadedModel, session: _Session, zeroshot: ZeroShotSpec | None,
              speed: SpeedSpec | None) -> None:
    from .evaluate.speed import count_parameters
    from .models.arch import num_layers

    model, tok = loaded
    row.layers = num_layers(model)
    row.params = count_parameters(model)
    if session.ppl_spec is not None:
        with _timed(row.timings_s, "perplexity"):
            ppl = perplexity_on(model, session.ppl_windows(tok), batch_size=session.ppl_spec.batch_size,
                                progress=False)
        row.perplexity = ppl.perplexity
        row.details["perplexity"] = ppl.to_dict()
    if zeroshot is not None:
        with _timed(row.timings_s, "zeroshot"):
            zs = zeroshot.run(model, tok)
        row.tasks, row.task_mean = zs.metrics, zs.mean
        row.details["zeroshot"] = {"scores": {k: asdict(v) for k, v in zs.scores.items()},
                                   "n_samples": zs.raw.get("n-samples")}
    if speed is not None:
        with _timed(row.timings_s, "speed"):
            sp = speed.run(model, tok)
        row.decode_tokens_per_s, row.prefill_latency_s = sp.decode_tokens_per_s, sp.prefill_latency_s
        row.details["speed"] = sp.to_dict()


def _dense_row(session: _Session, zeroshot: ZeroShotSpec | None, speed: SpeedSpec | None, key: str) -> BenchRow:
    """Errors here end the run: without a baseline there is nothing to compare against."""
    row = BenchRow(DENSE, None, layers_removed=0, settings_key=key)
    start = time.perf_counter()
    with _timed(row.timings_s, "load"):
        loaded = session.dense()
    _evaluate(row, loaded, session, zeroshot, speed)
    row.timings_s["total"] = time.perf_counter() - start
    return row


def _pruned_row(method: str, ratio: float, session: _Session, zeroshot: ZeroShotSpec | None,
                speed: SpeedSpec | None, method_options: dict[str, Any], key: str) -> BenchRow:
    """Plan, apply and evaluate one (method, ratio); any failure becomes the row's error."""
    from .methods import Target, make_plan
    from .surgery import apply_plan

    row = BenchRow(method, ratio, settings_key=key)
    start = time.perf_counter()
    try:
        with _timed(row.timings_s, "load"):
            loaded = session.fresh()
        model, tok = loaded
        with _timed(row.timings_s, "calibration"):
            calibration = session.calibration(tok)
        with _timed(row.timings_s, "plan"):
            plan = make_plan(method, model, calibration, Target(ratio=ratio), progress=False, **method_options)
        plan.model = session.source
        with _timed(row.timings_s, "surgery"):
            apply_plan(model, plan)
        row.layers_removed = len(plan.dropped)
        row.plan = {"summary": plan.summary(), "dropped": plan.dropped, **plan.to_dict()}
        _evaluate(row, loaded, session, zeroshot, speed)
    except Exception as err:  # a broken method must not end a long comparison
        row.error = f"{type(err).__name__}: {err}"
        row.details["traceback"] = traceback.format_exc()
    row.timings_s["total"] = time.perf_counter() - start
    return row


def run_bench(
    model: str | LoadedModel,
    methods: Sequence[str],
    ratios: Sequence[float],
    out: str | Path,
    *,
    calibration: CalibrationSpec | None = None,
    ppl: PerplexitySpec | None = PerplexitySpec(),
    zeroshot: ZeroShotSpec | None = None,
    speed: SpeedSpec | None = None,
    dtype: str | None = None,
    device: str | None = "cpu",
    method_options: dict[str, Any] | None = None,
    resume: bool = True,
    progress: bool = True,
) -> BenchResult:
    """Prune ``model`` with every method at every ratio, evaluate each and the dense model, write ``out``.

    ``model`` is a source for :func:`depthprune.load_model` or an already
    loaded, unpruned :class:`LoadedModel` (used as is for the dense row; each
    pruned row reloads from its ``path``).  Inputs are checked before any
    model is loaded.  With ``resume`` (the default), rows already in
    ``out/rows/`` that were computed with the same settings are reused.
    ``method_options`` go to every method (e.g. ``batch_size``); methods ignore
    options they don't take.  Writes ``results.json``, ``results.md`` and
    ``results.png`` into ``out``.
    """
    t0 = time.perf_counter()
    methods, ratios = check_methods(methods), check_ratios(ratios)
    calibration = calibration or CalibrationSpec()
    check_text_source(calibration.source, "--calib")
    if ppl is not None:
        check_text_source(ppl.dataset, "--ppl-data")
    if zeroshot is not None:
        zeroshot.check()
    if ppl is None and zeroshot is None and speed is None:
        raise BenchError("nothing to measure: enable perplexity, zero-shot tasks or speed")
    out = _prepare_out(out, [model.path if isinstance(model, LoadedModel) else model])
    session = _Session(model, dtype, device, calibration, ppl, progress)
    if session.path is None:
        from .models.load import resolve_source

        session.path = str(resolve_source(session.source))
    (out / ROWS_DIR).mkdir(parents=True, exist_ok=True)
    settings = {
        "model": session.source, "model_path": session.path, "dtype": str(session.dtype),
        "device": session.device, "methods": methods, "ratios": ratios, "calibration": asdict(calibration),
        "perplexity": asdict(ppl) if ppl else None, "zeroshot": asdict(zeroshot) if zeroshot else None,
        "speed": asdict(speed) if speed else None, "method_options": dict(method_options or {}),
    }
    key = _settings_key(settings)
    todo: list[tuple[str, float | None]] = [(DENSE, None)] + [(m, r) for m in methods for r in ratios]
    done: dict[tuple[str, float | None], BenchRow] = {}
    cached: list[str] = []
    with tqdm(todo, desc="bench", unit="row", disable=not progress) as bar:
        for method, ratio in bar:
            path = _row_file(out, method, ratio)
            row = _load_cached(path, key) if resume else None
            if row is not None:
                cached.append(row.name)
                bar.set_postfix_str(f"{row.name} (cached)")
            else:
                bar.set_postfix_str(method if ratio is None else f"{method}@{ratio:g}")
                row = (_dense_row(session, zeroshot, speed, key) if ratio is None else
                       _pruned_row(method, ratio, session, zeroshot, speed, dict(method_options or {}), key))
                write_json(path, row.to_dict())
                if row.error:
                    tqdm.write(f"{row.name} failed: {row.error}")
            done[(method, ratio)] = row
    result = BenchResult(out, done[(DENSE, None)], [done[t] for t in todo[1:]], settings, versions(),
                         time.perf_counter() - t0, cached)
    result.write()
    return result


def summary_line(result: BenchResult) -> str:
    failed = sum(not r.ok for r in result.rows)
    return (f"{len(result.rows) - failed} pruned rows ok, {failed} failed, {len(result.cached)} reused from "
            f"{result.out / ROWS_DIR}; wrote {RESULTS_JSON}, {RESULTS_MD} and {RESULTS_PLOT} in {result.out} "
            f"({result.wall_time_s:.0f} s)")
