"""`train_clip@VARIANT` stage: fine-tune CLIP with LoRA as a prompt classifier.

The logits are the scaled cosine similarities between an image and each class's prompt
ensemble; the loss is cross-entropy. Validation macro-F1 alone picks the epoch and stops
training. accelerate owns the device, mixed precision and gradient accumulation, so the same
code runs a tiny CPU base or a hub CLIP on a GPU.

Every epoch ends with a checkpoint in `checkpoint_dir` (outside the DVC output, which DVC
deletes before a run), keyed by what decides the result. A rerun after a kill resumes after
the last finished epoch, on the same MLflow run, and ends with the same weights as an
unbroken run: the checkpoint holds the generator that draws the batches and augmentation,
and torch's global one. SIGTERM, like Ctrl-C, ends the MLflow run as KILLED.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import json
import math
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.metrics import accuracy_score, f1_score
from tqdm import tqdm

from pneumoclip import distributed, tracking
from pneumoclip.classifier import (
    META_FILE,
    class_text_embeddings,
    image_embeddings,
    preprocess,
    prompt_logits,
    read_image,
    tokenize_prompts,
)
from pneumoclip.config import TINY_SOURCES, AugmentParams, TrainClipParams, VariantParams
from pneumoclip.distributed import Objective, in_sync, local
from pneumoclip.fsutil import atomic_dir, content_key, load_state, save_state, sha256_file
from pneumoclip.prepare import read_index


class TrainError(RuntimeError):
    """Training cannot start (unknown variant, missing inputs, bad prompts)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so the run unwinds, and its MLflow run ends as KILLED."""


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """While the block runs, SIGTERM raises `Terminated`; the previous handler comes back
    after. (Python takes signals in the main thread only; elsewhere this does nothing.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: let the unwinding finish
        raise Terminated(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ---------------------------------------------------------------- data


def load_pixels(processor, paths: list[str], desc: str, equalize: bool,
                batch: int = 64) -> torch.Tensor:
    """Decode and preprocess every image once, as the trained model will (preprocess)."""
    chunks = []
    with tqdm(total=len(paths), desc=desc, unit="img", disable=None) as bar:
        for i in range(0, len(paths), batch):
            images = [read_image(p) for p in paths[i : i + batch]]
            chunks.append(preprocess(processor, images, equalize))
            bar.update(len(images))
    return torch.cat(chunks)


def black_pixel(processor) -> torch.Tensor:
    """The model's input value of a black pixel, per channel (what `augment.fill: black`
    fills with)."""
    return processor(images=[Image.new("RGB", (8, 8))], return_tensors="pt")[
        "pixel_values"][0, :, 0, 0]


def augment(x: torch.Tensor, cfg: AugmentParams, gen: torch.Generator, rank: int = 0,
            world: int = 1, black: torch.Tensor | None = None) -> torch.Tensor:
    """Random shift, zoom, rotation, brightness and contrast, as torch ops on a batch.

    What a zoom-out, shift or rotation exposes is filled as `cfg.fill` says: `edge` repeats
    the edge pixels, `black` fills with `black` (the input value of a black pixel per
    channel, `black_pixel`), the margin of an X-ray with a wider field of view.
    Each draw is made for the global batch (`world` x this rank's) and sliced, so N ranks
    augment their images exactly as one process augments the same global batch."""
    n = x.shape[0]

    def uniform(limit: float) -> torch.Tensor:
        return local((torch.rand(n * world, generator=gen) * 2 - 1) * limit, rank, world)

    angle = uniform(math.radians(cfg.rotate))
    scale = 1 + uniform(cfg.scale)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [
            torch.stack([cos, -sin, uniform(2 * cfg.shift)], dim=1),
            torch.stack([sin, cos, uniform(2 * cfg.shift)], dim=1),
        ],
        dim=1,
    ).to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False).to(x.device)
    if cfg.fill == "black":
        if black is None:
            raise ValueError("augment.fill: black needs the input value of a black pixel")
        black = black.view(1, -1, 1, 1).to(x)
        x = F.grid_sample(x - black, grid, padding_mode="zeros", align_corners=False) + black
    else:
        x = F.grid_sample(x, grid, padding_mode="border", align_corners=False)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    contrast = (1 + uniform(cfg.contrast)).view(n, 1, 1, 1).to(x)
    brightness = uniform(cfg.brightness).view(n, 1, 1, 1).to(x)
    return (x - mean) * contrast + mean + brightness


def loader(pixels, labels, params: TrainClipParams, balance: bool, gen: torch.Generator,
           processes: int = 1):
    """Shuffled batches of `params.batch_size` (per process), the last partial one dropped
    when there is a whole global batch: N processes then train on exactly the images of
    one process at N x the batch, step by step (a kept partial batch would be padded with
    repeated images on N processes, and alone on one). Each epoch reshuffles, so every
    image is still seen."""
    from torch.utils.data import DataLoader, TensorDataset, WeightedRandomSampler

    dataset = TensorDataset(pixels, labels)
    drop_last = len(dataset) >= params.batch_size * processes
    if balance:  # the control: same images, class-balanced draws
        counts = torch.bincount(labels).float()
        weights = (1.0 / counts)[labels]
        sampler = WeightedRandomSampler(weights, len(labels), replacement=True, generator=gen)
        return DataLoader(dataset, batch_size=params.batch_size, sampler=sampler,
                          drop_last=drop_last)
    return DataLoader(dataset, batch_size=params.batch_size, shuffle=True, generator=gen,
                      drop_last=drop_last)


def read_synthetic(folder: str, classes: list[str]) -> tuple[list[dict], dict]:
    """The kept images of a synthesize output, as train rows, and what identifies the set."""
    manifest = Path(folder) / "manifest.csv"
    if not manifest.is_file():
        raise TrainError(f"{manifest} is missing: train_data must be the prepare index or a "
                         "synthesize output folder (run `dvc repro synthesize`)")
    with open(manifest, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["kept"] == "1"]
    unknown = sorted({r["class"] for r in rows} - set(classes))
    if unknown:
        raise TrainError(f"synthetic classes {unknown} have no prompts in train_clip.prompts")
    train = [{"path": str(Path(folder) / r["file"]), "label": r["class"], "split": "train",
              "patient": f"synthetic/{r['file']}"} for r in rows]
    info = {"dir": folder, "images": len(train),
            "per_class": {c: sum(r["class"] == c for r in rows) for c in classes},
            "manifest_sha256": sha256_file(manifest), "dvc_md5": tracking.dvc_out_hash(folder)}
    return train, info


# ---------------------------------------------------------------- model


def add_lora(clip, params: TrainClipParams):
    from peft import LoraConfig, get_peft_model

    lora = params.lora
    config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=lora.target_modules, modules_to_save=lora.modules_to_save or None,
    )
    return get_peft_model(clip, config)


def class_logits(clip, tokens, pixel_values):
    text = class_text_embeddings(clip, tokens)
    return prompt_logits(clip, image_embeddings(clip, pixel_values), text)


@torch.no_grad()
def predict_logits(clip, tokens, pixels: torch.Tensor, batch: int, device) -> torch.Tensor:
    text = class_text_embeddings(clip, tokens)
    out = [
        prompt_logits(clip, image_embeddings(clip, pixels[i : i + batch].to(device)), text).cpu()
        for i in range(0, len(pixels), batch)
    ]
    return torch.cat(out)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Post-hoc temperature scaling on validation (does not change any prediction)."""
    log_t = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=100)

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp().clamp(0.05, 20.0))


def scores(labels: np.ndarray, logits: torch.Tensor) -> dict[str, float]:
    pred = logits.argmax(dim=1).numpy()
    return {
        "accuracy": float(accuracy_score(labels, pred)),
        "macro_f1": float(f1_score(labels, pred, average="macro", zero_division=0)),
    }


# ---------------------------------------------------------------- checkpoints

STATE_FILE = "state.pt"


@dataclasses.dataclass
class EpochState:
    """A checkpoint: where training stood after `epoch`, and all it takes to go on exactly.

    Tensors, numbers, strings and containers only, so it loads with `weights_only`.
    """

    epoch: int
    run_id: str  # the MLflow run to continue
    trainable: dict  # the LoRA (and modules_to_save) weights after this epoch
    optimizer: dict
    schedule: dict
    scaler: dict | None  # fp16's gradient scaler, when there is one
    generator: torch.Tensor  # draws the batches and the augmentation
    rng: torch.Tensor  # torch's global generator
    cuda_rng: list  # the CUDA generators; empty without CUDA
    history: list
    best: dict
    best_state: dict
    stale: int  # epochs since the best
    train_seconds: float  # spent in the epoch loop so far, over all attempts


def run_key(params: TrainClipParams, name: str, variant: VariantParams) -> str:
    """What decides the result: the params, the variant's, the index, the base weights and,
    for a variant with synthetic images, that folder's files (its manifest and images)."""
    synthetic = [variant.train_data] if Path(variant.train_data).is_dir() else []
    settings = {"train_clip": dataclasses.asdict(params), "variant": name,
                "variant_params": dataclasses.asdict(variant)}
    return content_key(settings, [params.index], [params.base_dir, *synthetic])


def checkpoint_dir(params: TrainClipParams, name: str, variant: VariantParams) -> Path:
    """`checkpoint_dir/VARIANT-KEY/`: the variant's checkpoint for exactly these inputs."""
    return Path(params.checkpoint_dir) / f"{name}-{run_key(params, name, variant)}"


def metrics_of(record: dict) -> dict[str, float]:
    return {k: v for k, v in record.items() if k != "epoch"}


def log_unlogged_epochs(mlflow, run_id: str, history: list[dict]) -> None:
    """Log the checkpointed epochs that the run lacks: each epoch is saved before it is
    logged, so a kill between the two (or a new run) leaves some out, never one twice."""
    logged = {m.step for m in mlflow.MlflowClient().get_metric_history(run_id, "val_macro_f1")}
    for record in history:
        if record["epoch"] not in logged:
            mlflow.log_metrics(metrics_of(record), step=record["epoch"])


def start_run(mlflow, name: str, tags: dict, run_id: str | None):
    """Continue the checkpoint's MLflow run, or start a new one."""
    if run_id:
        from mlflow.exceptions import MlflowException

        try:
            return mlflow.start_run(run_id=run_id)
        except MlflowException as err:
            print(f"{name}: cannot continue MLflow run {run_id} ({err.message}); "
                  "logging to a new run", flush=True)
    return mlflow.start_run(run_name=name, tags=tags)


# ---------------------------------------------------------------- the stage


@dataclasses.dataclass
class TrainData:
    """What one variant trains and validates on."""

    classes: list[str]
    train_rows: list[dict]
    val_rows: list[dict]
    synthetic: dict | None  # what identifies the synthetic set, for `augmented`


@dataclasses.dataclass
class Fit:
    """The result of the epoch loop: the best epoch's weights are loaded into the model."""

    history: list[dict]
    best: dict
    train_seconds: float
    temperature: float
    # the mean calibrated validation posterior: the class shares this model predicts on data
    # drawn like its training data; prior adaptation (pneumoclip.priors) starts from it
    reference_priors: list[float]


def read_data(params: TrainClipParams, name: str, variant: VariantParams) -> TrainData:
    classes = list(params.prompts)
    if not classes or any(not templates for templates in params.prompts.values()):
        raise TrainError("train_clip.prompts needs at least one template per class")
    rows = read_index(params.index)
    unknown = sorted({r["label"] for r in rows} - set(classes))
    if unknown:
        raise TrainError(
            f"labels {unknown} in {params.index} have no prompts in train_clip.prompts"
        )
    train_rows = [r for r in rows if r["split"] == "train"]
    val_rows = [r for r in rows if r["split"] == "val"]
    if not train_rows or not val_rows:
        raise TrainError(f"{params.index} needs train and val rows")
    synthetic = None
    if Path(variant.train_data).is_dir():  # a synthesize output: add its kept images
        synthetic_rows, synthetic = read_synthetic(variant.train_data, classes)
        train_rows = train_rows + synthetic_rows  # never val or test
    elif not Path(variant.train_data).is_file():
        raise TrainError(f"variants.{name}.train_data: {variant.train_data} is missing "
                         "(the prepare index, or a synthesize output folder)")
    return TrainData(classes, train_rows, val_rows, synthetic)


def fit(params: TrainClipParams, name: str, variant: VariantParams, accelerator, clip,
        processor, data: TrainData, mlflow, run_id: str | None, ckpt: Path,
        resume: EpochState | None) -> tuple[object, Fit]:
    """Train the LoRA, keep the best epoch by validation macro-F1, fit the temperature.

    Runs on every process; `mlflow` is None on all but the main one, which alone logs and
    checkpoints (to `ckpt`, each epoch). With `resume`, training goes on after its epoch.
    Returns the trained model (unwrapped, the best epoch's weights loaded) and the result.
    """
    from accelerate.utils import broadcast_object_list
    from transformers import get_cosine_schedule_with_warmup

    main, rank, world = (accelerator.is_main_process, accelerator.process_index,
                         accelerator.num_processes)
    model = add_lora(clip, params)
    label_id = {c: i for i, c in enumerate(data.classes)}
    train_x = load_pixels(processor, [r["path"] for r in data.train_rows], f"{name}: train",
                          params.equalize)
    val_x = load_pixels(processor, [r["path"] for r in data.val_rows], f"{name}: val",
                        params.equalize)
    train_y = torch.tensor([label_id[r["label"]] for r in data.train_rows])
    val_y = np.array([label_id[r["label"]] for r in data.val_rows])
    gen = torch.Generator().manual_seed(params.seed)
    batches = loader(train_x, train_y, params, variant.balance, gen, world)

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=params.lr, weight_decay=params.weight_decay)
    # in single-process steps: on N processes accelerate steps the schedule N times a step
    steps_per_epoch = math.ceil(len(batches) / params.grad_accum)
    schedule = get_cosine_schedule_with_warmup(
        optimizer, params.warmup_epochs * steps_per_epoch, params.epochs * steps_per_epoch
    )
    if resume:
        load_trainable_state(model, resume.trainable)
        optimizer.load_state_dict(resume.optimizer)
        schedule.load_state_dict(resume.schedule)
    device = accelerator.device
    tokens = tokenize_prompts(processor.tokenizer, params.prompts, device)
    black = black_pixel(processor)

    def loss_fn(peft_model, pixel_values, labels):
        x = augment(pixel_values, params.augment, gen, rank, world, black)
        return F.cross_entropy(class_logits(peft_model, tokens, x), labels)

    step, optimizer, batches, schedule = accelerator.prepare(
        Objective(model, loss_fn), optimizer, batches, schedule
    )
    core = accelerator.unwrap_model(step).model  # the PeftModel, on the device

    epoch, history, best, best_state, stale, seconds = 0, [], None, None, 0, 0.0
    if resume:
        epoch, history, best, stale = resume.epoch, resume.history, resume.best, resume.stale
        best_state, seconds = resume.best_state, resume.train_seconds
        if accelerator.scaler is not None and resume.scaler:
            accelerator.scaler.load_state_dict(resume.scaler)
        # the generators as the epoch boundary left them: the prepared loader draws its
        # order (and worker seed) from `gen` when each epoch's iteration starts, and
        # augment draws from it per batch, so the next epochs draw what they would have
        gen.set_state(resume.generator)
        torch.set_rng_state(resume.rng)
        if resume.cuda_rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(resume.cuda_rng)
        if main:
            log_unlogged_epochs(mlflow, run_id, history)
    started = time.perf_counter()
    while epoch < params.epochs and stale < params.patience:
        epoch += 1
        step.train()
        losses = []
        # a bar on a terminal; in a log (no TTY) only the one line per epoch below
        bar = tqdm(batches, desc=f"{name}: epoch {epoch}/{params.epochs}", unit="batch",
                   disable=None if main else True, leave=False)
        for pixel_values, labels in bar:
            with accelerator.accumulate(step), accelerator.autocast():
                loss = step(pixel_values, labels)
                losses.append(distributed.update(accelerator, loss, optimizer, schedule))
            bar.set_postfix(loss=f"{np.mean(losses):.3f}", refresh=False)
        step.eval()
        with accelerator.autocast():
            val_logits = predict_logits(core, tokens, val_x, params.batch_size, device)
        # the main process's scores decide for all, so the ranks stop together
        val = broadcast_object_list([scores(val_y, val_logits.float())])[0]
        train_loss = float(accelerator.reduce(torch.tensor(np.mean(losses), device=device),
                                              "mean"))
        record = {"epoch": epoch, "train_loss": train_loss,
                  "val_accuracy": val["accuracy"], "val_macro_f1": val["macro_f1"]}
        history.append(record)
        if best is None or val["macro_f1"] > best["val_macro_f1"]:
            best, stale = record, 0
            best_state = copy.deepcopy(trainable_state(core))
        else:
            stale += 1
        if main:
            save_state(ckpt / STATE_FILE, dataclasses.asdict(EpochState(
                epoch=epoch, run_id=run_id, trainable=trainable_state(core),
                optimizer=optimizer.state_dict(), schedule=schedule.state_dict(),
                scaler=(accelerator.scaler.state_dict() if accelerator.scaler is not None
                        else None),
                generator=gen.get_state(), rng=torch.get_rng_state(),
                cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                history=history, best=best, best_state=best_state, stale=stale,
                train_seconds=seconds + time.perf_counter() - started,
            )))
            mlflow.log_metrics(metrics_of(record), step=epoch)
            print(f"{name}: epoch {epoch}/{params.epochs} loss {record['train_loss']:.4f} "
                  f"val acc {val['accuracy']:.3f} macro-F1 {val['macro_f1']:.3f}", flush=True)
            if stale >= params.patience:
                print(f"{name}: early stop, no val macro-F1 gain in {stale} epochs", flush=True)
    train_seconds = seconds + time.perf_counter() - started
    in_sync(accelerator, core, name)
    load_trainable_state(core, best_state)
    core.eval()
    val_logits = predict_logits(core, tokens, val_x, params.batch_size, device).float()
    temperature = (
        fit_temperature(val_logits, torch.from_numpy(val_y)) if params.calibrate else 1.0
    )
    reference = torch.softmax(val_logits / temperature, dim=-1).mean(dim=0)
    return core, Fit(history, best, train_seconds, temperature, reference.tolist())


def save_model(out: Path, params: TrainClipParams, name: str, model, processor,
               data: TrainData, result: Fit, source: dict) -> dict:
    """The adapter, processor, metadata and validation summary, in `out`."""
    model.save_pretrained(out)
    processor.save_pretrained(out)
    meta = {
        "classes": data.classes, "prompts": params.prompts,
        "label_map": {c: i for i, c in enumerate(data.classes)}, "synthetic": data.synthetic,
        "base": params.base_dir, "base_source": source["source"],
        "base_revision": source["revision"], "base_is_tiny": source["source"] in TINY_SOURCES,
        "temperature": result.temperature, "reference_priors": result.reference_priors,
        "equalize": params.equalize,
        "variant": name,
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    n_trainable, _ = model.get_nb_trainable_parameters()
    summary = {
        "variant": name, "best_epoch": result.best["epoch"], "epochs_run": len(result.history),
        "val_accuracy": result.best["val_accuracy"],
        "val_macro_f1": result.best["val_macro_f1"], "temperature": result.temperature,
        "train_seconds": result.train_seconds, "trainable_params": n_trainable,
        "history": result.history,
    }
    (out / "val_metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def train_variant(params: TrainClipParams, variants: dict[str, VariantParams],
                  name: str) -> dict | None:
    """Read the variant's data, fit it, and save and log the model under one MLflow run.

    Under `accelerate launch` or `torchrun` every process trains its share of each batch;
    the main one alone logs, checkpoints and saves, and returns the summary (the others
    return None)."""
    from accelerate.utils import set_seed
    from transformers import CLIPModel, CLIPProcessor

    if name not in variants:
        raise TrainError(f"unknown variant {name!r} (params variants: {', '.join(variants)})")
    variant = variants[name]
    data = read_data(params, name, variant)
    accelerator = distributed.accelerator(params.mixed_precision, params.grad_accum)
    main = accelerator.is_main_process
    set_seed(params.seed)
    processor = CLIPProcessor.from_pretrained(params.base_dir)
    clip = CLIPModel.from_pretrained(params.base_dir)
    source = json.loads((Path(params.base_dir) / "pneumoclip_source.json").read_text())
    ckpt = checkpoint_dir(params, name, variant)
    with accelerator.main_process_first():  # it sets an unreadable checkpoint aside first
        resume = load_state(ckpt / STATE_FILE, name, lambda saved: EpochState(**saved))
    if resume and main:
        print(f"{name}: resuming after epoch {resume.epoch} ({ckpt})", flush=True)

    mlflow, run, summary = None, None, None
    with sigterm_interrupts():
        status = "FAILED"
        try:
            if main:
                mlflow = tracking.setup(tracking.CLASSIFIER_EXPERIMENT)
                synthetic = data.synthetic or {}
                tags = tracking.run_tags(f"train_clip@{name}", name) | {
                    "synthetic_dvc_md5": synthetic.get("dvc_md5", "none"),
                    "synthetic_manifest_sha256": synthetic.get("manifest_sha256", "none"),
                }
                run = start_run(mlflow, name, tags, resume.run_id if resume else None)
            summary = train_in_run(accelerator, mlflow, run, params, name, variant, clip,
                                   processor, data, source, ckpt, resume)
            status = "FINISHED"
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM
            status = "KILLED"
            raise
        finally:
            if run is not None:
                mlflow.end_run(status)
    accelerator.wait_for_everyone()
    if main:
        shutil.rmtree(ckpt, ignore_errors=True)
    return summary


def train_in_run(accelerator, mlflow, run, params: TrainClipParams, name: str,
                 variant: VariantParams, clip, processor, data: TrainData, source: dict,
                 ckpt: Path, resume: EpochState | None) -> dict | None:
    """Fit on every process; on the main one (the one with the MLflow `run`), save and log
    the model in that run (a continued one logs no params or datasets again)."""
    synthetic = data.synthetic or {}
    if run is not None and not (resume and resume.run_id == run.info.run_id):
        mlflow.log_params(tracking.flatten(dataclasses.asdict(params)) | tracking.flatten(
            dataclasses.asdict(variant), "variant."
        ) | {"train_images": len(data.train_rows), "val_images": len(data.val_rows),
             "synthetic_images": synthetic.get("images", 0),
             "processes": accelerator.num_processes})
        n_real = len(data.train_rows) - synthetic.get("images", 0)  # synthetic rows last
        tracking.log_dataset(mlflow, data.train_rows[:n_real], "kermany-train",
                             tracking.dvc_hash(), "training")
        if data.synthetic:
            tracking.log_dataset(mlflow, data.train_rows[n_real:], "synthetic",
                                 synthetic["dvc_md5"], "training")
        tracking.log_dataset(mlflow, data.val_rows, "kermany-val", tracking.dvc_hash(),
                             "validation")
    model, result = fit(params, name, variant, accelerator, clip, processor, data, mlflow,
                        run.info.run_id if run is not None else None, ckpt, resume)
    if run is None:
        return None
    best = result.best
    n_trainable, n_total = model.get_nb_trainable_parameters()
    mlflow.log_params({"trainable_params": n_trainable, "total_params": n_total})
    mlflow.log_metrics({"best_epoch": best["epoch"], "best_val_accuracy": best["val_accuracy"],
                        "best_val_macro_f1": best["val_macro_f1"],
                        "temperature": result.temperature,
                        "train_seconds": result.train_seconds})
    with atomic_dir(Path(params.out_dir) / name) as out:
        summary = save_model(out, params, name, model, processor, data, result, source)
        info = tracking.log_classifier(
            mlflow, out, tracking.image_bytes(data.val_rows[0]["path"]), data.classes
        )
        (out / "mlflow_run.json").write_text(json.dumps({
            "run_id": run.info.run_id, "experiment_id": run.info.experiment_id,
            "model_uri": info.model_uri, "tracking_uri": tracking.public_uri(),
        }, indent=2) + "\n")
    print(f"{name}: saved {Path(params.out_dir) / name} (MLflow run {run.info.run_id})",
          flush=True)
    return summary


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)
