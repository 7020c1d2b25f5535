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


@main.command("pretrain")
@params_option
@click.option("--index", required=True, type=click.Path(dir_okay=False),
              help="A prepare index.csv of the images to pretrain on.")
@click.option("--splits", default="train", show_default=True,
              help="Comma-separated splits of the index to use (a benchmark: train only).")
@click.option("--exclude", multiple=True, type=click.Path(file_okay=False),
              help="A Kermany-layout folder whose patients and images are left out "
                   "(the bundled sample, for the shipped bases). Repeatable.")
@click.option("--out-dir", default=None, help="Override pretrain.out_dir.")
@click.option("--only", type=click.Choice(["clip", "sd"]), default=None,
              help="Pretrain one base; the other is kept from out_dir.")
def pretrain_cmd(params_path: str, index: str, splits: str, exclude: tuple[str, ...],
                 out_dir: str | None, only: str | None) -> None:
    """Pretrain the tiny CLIP and SD into bases/tiny/, which `source: tiny` installs."""
    import dataclasses

    from pneumoclip.pretrain import PretrainError, pretrain

    params = section("pretrain", params_path)
    if out_dir:
        params = dataclasses.replace(params, out_dir=out_dir)
    try:
        pretrain(params, section("base_models", params_path), section("sd_lora", params_path),
                 index, [s.strip() for s in splits.split(",") if s.strip()], list(exclude),
                 (only,) if only else ("clip", "sd"))
    except PretrainError as err:
        raise click.ClickException(str(err)) from err


@main.command("train-clip")
@params_option
@click.option("--variant", required=True, help="A key of the variants section (real, control).")
def train_clip_cmd(params_path: str, variant: str) -> None:
    """Stage: fine-tune CLIP with LoRA for one variant into models/clip-lora/VARIANT/."""
    from pneumoclip.train_clip import TrainError, train_variant

    try:
        summary = train_variant(
            section("train_clip", params_path), section("variants", params_path), variant
        )
    except TrainError as err:
        raise click.ClickException(str(err)) from err
    if summary is None:  # not the main process of a multi-process run: it reports
        return
    click.echo(
        f"{variant}: best epoch {summary['best_epoch']}/{summary['epochs_run']}, val accuracy "
        f"{summary['val_accuracy']:.3f}, macro-F1 {summary['val_macro_f1']:.3f}, "
        f"{summary['train_seconds']:.0f} s"
    )


@main.command("sd-lora")
@params_option
def sd_lora_cmd(params_path: str) -> None:
    """Stage: fine-tune SD with LoRA on the training X-rays into models/sd-lora/ (resumable)."""
    from pneumoclip.sd_lora import SdLoraError, train_sd_lora

    try:
        meta = train_sd_lora(section("sd_lora", params_path))
    except SdLoraError as err:
        raise click.ClickException(str(err)) from err
    if meta is None:  # not the main process of a multi-process run
        return
    adapters = len(set(meta["adapters"].values()))
    steps = ", ".join(f"{a} {n}" for a, n in meta["steps"].items())
    click.echo(f"sd_lora: {adapters} LoRA adapter(s), steps {steps}, final loss "
               f"{meta['final_loss']:.4f}, {meta['train_seconds']:.0f} s; "
               f"MLflow run {meta['run_id']}")


@main.command("synthesize")
@params_option
def synthesize_cmd(params_path: str) -> None:
    """Stage: draw the synthetic images into artifacts/synthetic/ and judge their quality."""
    from pneumoclip.synthesize import SynthesizeError, synthesize

    try:
        report = synthesize(section("synthesize", params_path))
    except SynthesizeError as err:
        raise click.ClickException(str(err)) from err
    if report is None:  # not the main process of a multi-process run
        return
    for cls, v in report["per_class"].items():
        real = v["real_consistency"]
        click.echo(f"{cls}: {v['generated']} drawn, class consistency {v['consistency']:.3f} "
                   f"(real val images: {'n/a' if real is None else f'{real:.3f}'}), "
                   f"{v['dropped']} dropped by the filter")
    auroc = report["two_sample_auroc"]
    click.echo("real-vs-synthetic AUROC: " + ("n/a (too few images)" if auroc is None
                                               else f"{auroc:.3f} (0.5 = indistinguishable)"))


@main.command("evaluate")
@params_option
@click.option("--variant", required=True, help="A trained variant in models/clip-lora/.")
def evaluate_cmd(params_path: str, variant: str) -> None:
    """Stage: test metrics, zero-shot reference and plots for one variant into metrics/."""
    from pneumoclip.evaluate import EvaluateError, evaluate_variant

    try:
        metrics = evaluate_variant(section("evaluate", params_path), variant)
    except EvaluateError as err:
        raise click.ClickException(str(err)) from err
    test = metrics["test"]
    recalls = ", ".join(f"{c} {m['recall']:.2f}" for c, m in test["per_class"].items())
    click.echo(
        f"{variant}: test accuracy {test['accuracy']:.3f} {fmt_ci(test['accuracy_ci95'])}, "
        f"macro-F1 {test['macro_f1']:.3f} {fmt_ci(test['macro_f1_ci95'])}, recall {recalls}; "
        f"zero-shot accuracy {metrics['zero_shot']['accuracy']:.3f}, majority "
        f"{metrics['majority_baseline']['accuracy']:.3f}"
    )


def fmt_ci(interval: list[float]) -> str:
    return f"[{interval[0]:.3f}, {interval[1]:.3f}]"


@main.command("predict")
@click.argument("images", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--model", "model_ref", default="models/clip-lora/real", show_default=True,
              help="A models/clip-lora/VARIANT folder or an MLflow models:/ or runs:/ URI.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines instead of a table.")
@click.option("--adapt-priors", is_flag=True,
              help="The IMAGES are one batch from one source (at least 30): re-estimate its "
                   "class shares by EM and adjust the probabilities to them (docs/robustness.md).")
def predict_cmd(images: tuple[str, ...], model_ref: str, as_json: bool,
                adapt_priors: bool) -> None:
    """Classify IMAGES (PNG, JPEG or DICOM files); an unreadable file gets its own error
    line, the rest still run."""
    import json

    from pneumoclip.predict import load, predict_files

    try:
        classifier = load(model_ref)
    except (OSError, ValueError) as err:
        raise click.ClickException(f"cannot load model {model_ref}: {err}") from err
    try:
        results = predict_files(list(images), classifier, adapt_priors)
    except ValueError as err:  # prior adaptation refused the batch
        raise click.ClickException(str(err)) from err
    failed = 0
    if as_json:
        for row in results:
            click.echo(json.dumps(row))
            failed += "error" in row
    else:
        classes = next((list(r["probabilities"]) for r in results if "probabilities" in r), [])
        click.echo("\t".join(["file", "label", *classes]))
        for row in results:
            if "error" in row:
                failed += 1
                click.echo(f"{row['file']}\terror: {row['error']}")
            else:
                probs = [f"{row['probabilities'][c]:.3f}" for c in classes]
                click.echo("\t".join([row["file"], row["label"], *probs]))
    if failed:
        raise SystemExit(2 if failed < len(results) else 1)


@main.command("register")
@params_option
def register_cmd(params_path: str) -> None:
    """Stage: register the best variant (by validation macro-F1); move @champion if it wins."""
    from pneumoclip.register import RegistryError, register

    try:
        result = register(section("register", params_path))
    except RegistryError as err:
        raise click.ClickException(str(err)) from err
    click.echo(
        f"registered {result['model_name']} version {result['version']} ({result['variant']}); "
        f"@{result['alias']} -> version {result['champion_version']}: {result['reason']}"
    )


@main.group("registry")
def registry_group() -> None:
    """Inspect the MLflow Model Registry."""


@registry_group.command("show")
@params_option
def registry_show_cmd(params_path: str) -> None:
    """Print every version of the registered classifier with its aliases and metrics."""
    from pneumoclip.register import RegistryError, show

    name = section("register", params_path).model_name
    try:
        rows = show(name)
    except RegistryError as err:
        raise click.ClickException(str(err)) from err
    click.echo(f"{name}:")
    click.echo("\t".join(rows[0]))
    for row in rows:
        click.echo("\t".join(str(v) for v in row.values()))


@main.group("bento")
def bento_group() -> None:
    """Package the @champion classifier as a Bento."""


@bento_group.command("build")
@params_option
@click.option("--bentofile", default="bentofile.yaml", show_default=True,
              type=click.Path(exists=True, dir_okay=False),
              help="build options; deploy/bentofile-gpu.yaml makes the CUDA image's Bento")
def bento_build_cmd(params_path: str, bentofile: str) -> None:
    """Import models:/NAME@champion into the BentoML store and run `bentoml build`."""
    from pneumoclip.serving import ServingError, build_bento

    try:
        tag = build_bento(section("serve", params_path), Path(bentofile))
    except ServingError as err:
        raise click.ClickException(str(err)) from err
    click.echo(f"built Bento {tag}; serve it with: bentoml serve {tag.split()[0]}")


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
