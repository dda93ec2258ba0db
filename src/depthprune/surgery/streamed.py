"""Apply a depth plan from disk to disk: the pruned checkpoint is written tensor by tensor.

Nothing holds the whole model. The pruned model's *skeleton* (a meta-device
copy pruned with the in-memory :func:`~depthprune.surgery.inplace.surgery`, so the
config, its per-layer lists and the tensor names are exactly those of
in-memory surgery) says what to write; each tensor is then read from the
input checkpoint, under its original layer index, and written under its new
one. A merged layer's projections are computed with the in-memory merge code
(:func:`~depthprune.surgery.merge.merge_params`) from its member layers'
tensors, one parameter at a time, replaying the plan's merges in order
(a later merge that contains an earlier one takes the earlier result as a
member, as in LaCo).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..backend.checkpoint import TensorInfo
from ..backend.hf import saved_names
from ..backend.streamed import StreamedBackend
from ..models.arch import count_parameters
from ..plan import Plan
from .inplace import surgery
from .merge import check_operator, is_projection, merge_params
from .safetensors_out import plan_shards, write_safetensors

INDEX_FILE = "model.safetensors.index.json"
DEFAULT_SHARD_SIZE = 5 * 10**9


@dataclass
class StreamedSave:
    """What a streamed surgery wrote."""

    files: list[str]
    num_layers: int
    parameters: int
    bytes: int
    dtype: str
    tensors: dict[str, str] = field(default_factory=dict)


class _Sources:
    """The value of every tensor of the pruned model, from the input checkpoint."""

    def __init__(self, sm: StreamedBackend, plan: Plan, dtype: torch.dtype | None,
                 overrides: dict[int, dict[str, torch.Tensor]]):
        self.sm, self.plan, self.dtype, self.overrides = sm, plan, dtype, overrides
        self.layers = sm.spec.layers + "."

    def out_dtype(self, name: str, skeleton_value: torch.Tensor) -> torch.dtype:
        stored = self._stored(name)
        kind = self.sm.checkpoint.tensors[stored].dtype if stored is not None else skeleton_value.dtype
        return self.dtype if self.dtype is not None and kind.is_floating_point else kind

    def _stored(self, name: str) -> str | None:
        try:
            return self.sm.stored_name(self._original(name))
        except KeyError:
            return None

    def _original(self, name: str) -> str:
        """The input model's name of pruned tensor ``name`` (layer j of the output is layer kept[j])."""
        if not name.startswith(self.layers):
            return name
        index, _, rest = name[len(self.layers):].partition(".")
        return f"{self.layers}{self.plan.kept[int(index)]}.{rest}"

    def _read(self, original: str, dtype: torch.dtype) -> torch.Tensor:
        stored = self.sm.stored_name(original)
        return self.sm.checkpoint.read([stored], dtype=dtype)[stored]

    def value(self, name: str, dtype: torch.dtype, skeleton_value: torch.Tensor) -> torch.Tensor:
        if not name.startswith(self.layers):
            if self._stored(name) is None:  # a persistent buffer the checkpoint does not hold
                return skeleton_value.to(dtype)
            return self._read(name, dtype)
        index, _, rest = name[len(self.layers):].partition(".")
        override = self.overrides.get(int(index), {}).get(rest)
        if override is not None:
            return override.to("cpu", dtype)
        return self._layer_value(self.plan.kept[int(index)], rest, len(self.plan.merges), dtype)

    def _layer_value(self, layer: int, rest: str, before: int, dtype: torch.dtype) -> torch.Tensor:
        """Parameter ``rest`` of original layer ``layer`` after the plan's first ``before`` merges."""
        merged_by = [t for t in range(before) if self.plan.merges[t].low == layer]
        if not merged_by:
            return self._read(f"{self.layers}{layer}.{rest}", dtype)
        t = merged_by[-1]
        merge = self.plan.merges[t]
        members = self.plan.merge_members(t)
        if len(members) < 2 or merge.operator == "drop" or not is_projection(rest, self.sm.spec):
            return self._layer_value(layer, rest, t, dtype)
        values = [{rest: self._layer_value(m, rest, t, dtype)} for m in members]
        return merge_params(values, merge.operator, self.sm.spec)[rest]


def pruned_skeleton(sm: StreamedBackend, plan: Plan) -> torch.nn.Module:
    """A meta-device copy of the skeleton pruned by in-memory surgery (config, names and per-layer lists)."""
    plan.check_model_depth(sm.num_layers, f"--model {sm.source}")
    for merge in plan.merges:
        check_operator(merge.operator)
    pruned = copy.deepcopy(sm.model)
    surgery(pruned, plan)
    return pruned


def write_pruned_checkpoint(
    sm: StreamedBackend,
    plan: Plan,
    directory: str | Path,
    *,
    overrides: dict[int, dict[str, torch.Tensor]] | None = None,
    dtype: torch.dtype | None = None,
    max_shard_size: int = DEFAULT_SHARD_SIZE,
    progress: bool = False,
) -> StreamedSave:
    """Write the pruned model (safetensors shards, index, config, generation config, tokenizer) into
    ``directory`` (in a job, the temporary directory of its atomic save; no output checks here).

    ``overrides`` (pruned-model position -> parameter name inside the layer -> value, e.g. compensation folds)
    replace what the plan would write there. ``dtype`` casts floating tensors; by default each keeps the dtype
    it is stored in, so a bfloat16 70B checkpoint stays bfloat16 (in-memory surgery saves the dtype the model
    was loaded in).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pruned = pruned_skeleton(sm, plan)
    sources = _Sources(sm, plan, dtype, overrides or {})
    state = pruned.state_dict()
    names = saved_names(pruned)
    entries, origin = [], {}
    for name, saved in names.items():
        entry = TensorInfo(saved, sources.out_dtype(name, state[name]), tuple(state[name].shape))
        entries.append(entry)
        origin[saved] = name
    shards = plan_shards(entries, max_shard_size)
    files = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    bar = tqdm(total=len(entries), desc="writing pruned checkpoint (streamed)", disable=not progress,
               unit="tensor")

    def produce(entry: TensorInfo) -> torch.Tensor:
        bar.update(1)
        name = origin[entry.name]
        return sources.value(name, entry.dtype, state[name])

    with bar:
        for file, shard in zip(files, shards):
            write_safetensors(directory / file, shard, produce, {"format": "pt"})
    total = sum(e.nbytes() for e in entries)
    weight_map = {e.name: file for file, shard in zip(files, shards) for e in shard}
    if len(shards) > 1:
        index = {"metadata": {"total_parameters": count_parameters(pruned), "total_size": total},
                 "weight_map": weight_map}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    model_dtype = next((e.dtype for e in entries if e.dtype.is_floating_point), torch.float32)
    _write_configs(sm, pruned, directory, model_dtype)
    if sm.tokenizer is not None:
        sm.tokenizer.save_pretrained(directory)
    return StreamedSave(files, len(plan.kept), count_parameters(pruned), total, str(model_dtype).split(".")[1],
                        weight_map)


def _write_configs(sm: StreamedBackend, pruned: torch.nn.Module, directory: Path, dtype: torch.dtype) -> None:
    """config.json and generation_config.json as ``save_pretrained`` writes them for the pruned model."""
    from transformers import GenerationConfig

    pruned.config.dtype = str(dtype).split(".")[1]
    pruned.config.architectures = [type(pruned).__name__]
    pruned.config.save_pretrained(directory)
    if pruned.can_generate():
        source = Path(sm.path)
        generation = (GenerationConfig.from_pretrained(source) if (source / "generation_config.json").is_file()
                      else GenerationConfig.from_model_config(pruned.config))
        generation.save_pretrained(directory)
