"""``depthprune export``: hand a pruned model to other tools (a mergekit recipe, the Hugging Face Hub)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .app import app

export_app = typer.Typer(help="Hand a pruned model to other tools: a mergekit recipe, or the Hugging Face Hub.",
                         no_args_is_help=True, rich_markup_mode=None)
app.add_typer(export_app, name="export")


@export_app.command("mergekit")
def mergekit_cmd(
    plan_dir: Annotated[Path, typer.Argument(
        help="A pruned checkpoint directory or a depthprune_plan.json file (a removal-only plan).")],
    out: Annotated[Optional[str], typer.Option(help="Write the YAML here (.yaml); default: print it.")] = None,
    base_model: Annotated[Optional[str], typer.Option(
        help="The model mergekit should read (hub id or directory); default: the source model in the "
        "checkpoint's run record.")] = None,
    dtype: Annotated[Optional[str], typer.Option(
        help="dtype for mergekit; default: the checkpoint's own (config.json), else bfloat16.")] = None,
) -> None:
    """Write a mergekit passthrough YAML reproducing a removal-only plan (layer_range over the original model)."""
    from ..export.mergekit import base_model_name, check_passthrough, mergekit_yaml, per_layer_warning
    from ..io import atomic_write, check_output_file
    from ..models.load import check_plan_depth, local_config
    from ..plan import Plan
    from ..run_record import RunRecord

    target = check_output_file(out, option="--out", suffix=".yaml") if out is not None else None
    plan = Plan.load(plan_dir)
    run = RunRecord.of_checkpoint(plan_dir)
    check_passthrough(plan, run)
    base_model = base_model_name(run, base_model)
    if Path(base_model).expanduser().is_dir():  # a hub id, or a path on the machine mergekit runs on, is not here
        check_plan_depth(plan, base_model, "--base-model")
    config = local_config(str(plan_dir)) if (Path(plan_dir) / "config.json").is_file() else (
        local_config(base_model) if Path(base_model).expanduser().is_dir() else None)
    warning = per_layer_warning(config, plan)
    if warning:
        typer.echo(warning, err=True)
    text = mergekit_yaml(plan, base_model=base_model, dtype=dtype or _checkpoint_dtype(plan_dir) or "bfloat16",
                         run=run)
    if target is None:
        typer.echo(text, nl=False)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, text)
    typer.echo(f"wrote {target} ({plan.num_layers_after} of {plan.num_layers} layers, "
               f"{text.count('layer_range')} slices)")


def _checkpoint_dtype(plan_dir: Path) -> str | None:
    import json

    config = Path(plan_dir) / "config.json"
    if not config.is_file():
        return None
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError):
        return None
    dtype = data.get("dtype") or data.get("torch_dtype")
    return dtype if isinstance(dtype, str) else None


@export_app.command("hub")
def hub_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint directory depthprune wrote.")],
    repo: Annotated[str, typer.Option(help="Hub repository id (owner/name); created if missing.")],
    private: Annotated[bool, typer.Option(help="Create the repository private.")] = False,
    dry_run: Annotated[bool, typer.Option(help="List what would be uploaded and print the card; upload nothing.")]
    = False,
) -> None:
    """Upload a saved checkpoint with its plan, report and a model card (written into it if missing)."""
    from ..errors import InputError
    from ..export.hub import CARD_FILE, check_repo_id, ensure_card, model_card, push_checkpoint, upload_plan
    from ..io import kind_of

    check_repo_id(repo, "--repo")
    if not checkpoint.is_dir() or kind_of(checkpoint) != "checkpoint":
        raise InputError(f"{checkpoint} is not a checkpoint depthprune wrote; `export hub` uploads only those "
                         "(they carry the plan and report the model card is made from)")
    if dry_run:
        files = sorted({*upload_plan(checkpoint), CARD_FILE})
        typer.echo("would upload to " + repo + ":\n" + "\n".join(f"  {f}" for f in files))
        if not (checkpoint / CARD_FILE).exists():
            typer.echo("\n" + model_card(checkpoint, repo=repo))
        return
    if ensure_card(checkpoint, repo=repo):
        typer.echo(f"wrote {checkpoint / CARD_FILE}", err=True)
    pushed = push_checkpoint(checkpoint, repo, private=private)
    typer.echo(f"uploaded {len(pushed.files)} files to {pushed.url}")
