"""The `pneumoclip` command: one subcommand per pipeline stage, plus helpers."""

from __future__ import annotations

import shutil
from pathlib import Path

import click

from pneumoclip.config import ParamsError, load_section

params_option = click.option(
    "--params", "params_path", default="params.yaml", show_default=True,
    type=click.Path(dir_okay=False), help="Settings file (one section per stage).",
)


def section(name: str, path: str):
    try:
        return load_section(name, path)
    except ParamsError as err:
        raise click.ClickException(str(err)) from err


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """pneumoclip: chest X-ray NORMAL / BACTERIA / VIRUS with CLIP LoRA and SD LoRA.

    Each stage reads its own section of params.yaml; `dvc repro` runs them in order.
    """


@main.command("base-models")
@params_option
def base_models_cmd(params_path: str) -> None:
    """Stage: build (tiny) or fetch (hub id) the SD and CLIP bases into models/base/."""
    from pneumoclip.base_models import build_base_models

    build_base_models(section("base_models", params_path))


@main.command("prepare")
@params_option
@click.option("--data-dir", default=None, help="Override prepare.data_dir.")
@click.option("--out-dir", default=None, help="Override prepare.out_dir.")
def prepare_cmd(params_path: str, data_dir: str | None, out_dir: str | None) -> None:
    """Stage: index data/ into patient-disjoint train/val/test splits."""
    import dataclasses

    from pneumoclip.prepare import PrepareError, prepare, render_report

    params = section("prepare", params_path)
    overrides = {k: v for k, v in (("data_dir", data_dir), ("out_dir", out_dir)) if v}
    params = dataclasses.replace(params, **overrides)
    try:
        report = prepare(params)
    except PrepareError as err:
        raise click.ClickException(str(err)) from err
    click.echo(render_report(report).split("\nDuplicates")[0])
    click.echo(
        f"duplicates dropped: {len(report['duplicates_dropped'])}, "
        f"files rejected: {len(report['rejected'])} (see {params.out_dir}/report.md)"
    )


SAMPLE_DIR = Path(__file__).resolve().parents[2] / "sample"


@main.command("sample")
@click.argument("dest", default="data", type=click.Path(file_okay=False))
@click.option("--source", default=str(SAMPLE_DIR), show_default=True,
              type=click.Path(file_okay=False), help="The bundled sample.")
def sample_cmd(dest: str, source: str) -> None:
    """Put the bundled real sample into DEST (data/), unless DEST already holds data."""
    dest_path, source_path = Path(dest), Path(source)
    if not (source_path / "chest_xray").is_dir():
        raise click.ClickException(f"no bundled sample at {source_path}/chest_xray")
    if dest_path.exists() and any(dest_path.iterdir()):
        click.echo(f"{dest} already holds data; leaving it as it is")
        return
    shutil.copytree(source_path, dest_path, dirs_exist_ok=True)
    n = sum(1 for p in dest_path.rglob("*.jpeg"))
    click.echo(f"copied the bundled sample ({n} images) into {dest}/")


if __name__ == "__main__":
    main()
