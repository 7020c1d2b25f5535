"""`train_clip@VARIANT` stage: fine-tune CLIP with LoRA as a prompt classifier.

The logits are the scaled cosine similarities between an image and each class's prompt
ensemble; the loss is cross-entropy. Validation macro-F1 alone picks the epoch and stops
training. accelerate owns the device, mixed precision and gradient accumulation, so the same
code runs a tiny CPU base or a hub CLIP on a GPU.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, f1_score
from tqdm import tqdm

from pneumoclip import tracking
from pneumoclip.classifier import (
    META_FILE,
    class_text_embeddings,
    image_embeddings,
    prompt_logits,
    read_image,
    tokenize_prompts,
)
from pneumoclip.config import AugmentParams, TrainClipParams
from pneumoclip.fsutil import atomic_dir, sha256_file
from pneumoclip.prepare import read_index


class TrainError(RuntimeError):
    """Training cannot start (unknown variant, missing inputs, bad prompts)."""


# ---------------------------------------------------------------- data


def load_pixels(processor, paths: list[str], desc: str, batch: int = 64) -> torch.Tensor:
    """Decode and preprocess every image once, with the model's own processor."""
    chunks = []
    with tqdm(total=len(paths), desc=desc, unit="img") as bar:
        for i in range(0, len(paths), batch):
            images = [read_image(p) for p in paths[i : i + batch]]
            chunks.append(processor(images=images, return_tensors="pt")["pixel_values"])
            bar.update(len(images))
    return torch.cat(chunks)


def augment(x: torch.Tensor, cfg: AugmentParams, gen: torch.Generator) -> torch.Tensor:
    """Random shift, zoom, rotation, brightness and contrast, as torch ops on a batch."""
    n = x.shape[0]

    def uniform(limit: float) -> torch.Tensor:
        return (torch.rand(n, generator=gen) * 2 - 1) * limit

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
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid.to(x.device), padding_mode="border", align_corners=False)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    contrast = (1 + uniform(cfg.contrast)).view(n, 1, 1, 1).to(x)
    brightness = uniform(cfg.brightness).view(n, 1, 1, 1).to(x)
    return (x - mean) * contrast + mean + brightness


def loader(pixels, labels, params: TrainClipParams, balance: bool, gen: torch.Generator):
    from torch.utils.data import DataLoader, TensorDataset, WeightedRandomSampler

    dataset = TensorDataset(pixels, labels)
    if balance:  # the control: same images, class-balanced draws
        counts = torch.bincount(labels).float()
        weights = (1.0 / counts)[labels]
        sampler = WeightedRandomSampler(weights, len(labels), replacement=True, generator=gen)
        return DataLoader(dataset, batch_size=params.batch_size, sampler=sampler)
    return DataLoader(dataset, batch_size=params.batch_size, shuffle=True, generator=gen)


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


# ---------------------------------------------------------------- the stage


def train_variant(params: TrainClipParams, variant: str) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import CLIPModel, CLIPProcessor, get_cosine_schedule_with_warmup

    if variant not in params.variants:
        raise TrainError(f"unknown variant {variant!r} (params train_clip.variants: "
                         f"{', '.join(params.variants)})")
    settings = params.variants[variant]
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
    if Path(settings.train_data).is_dir():  # a synthesize output: add its kept images
        synthetic_rows, synthetic = read_synthetic(settings.train_data, classes)
        train_rows = train_rows + synthetic_rows  # never val or test
    elif not Path(settings.train_data).is_file():
        raise TrainError(f"train_clip.variants.{variant}.train_data: {settings.train_data} "
                         "is missing (the prepare index, or a synthesize output folder)")

    set_seed(params.seed)
    accelerator = Accelerator(
        mixed_precision=params.mixed_precision, gradient_accumulation_steps=params.grad_accum
    )
    processor = CLIPProcessor.from_pretrained(params.base_dir)
    clip = CLIPModel.from_pretrained(params.base_dir)
    source = json.loads((Path(params.base_dir) / "pneumoclip_source.json").read_text())
    model = add_lora(clip, params)
    n_trainable, n_total = model.get_nb_trainable_parameters()

    label_id = {c: i for i, c in enumerate(classes)}
    train_x = load_pixels(processor, [r["path"] for r in train_rows], f"{variant}: train images")
    val_x = load_pixels(processor, [r["path"] for r in val_rows], f"{variant}: val images")
    train_y = torch.tensor([label_id[r["label"]] for r in train_rows])
    val_y = np.array([label_id[r["label"]] for r in val_rows])
    gen = torch.Generator().manual_seed(params.seed)
    data = loader(train_x, train_y, params, settings.balance, gen)

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=params.lr, weight_decay=params.weight_decay)
    steps_per_epoch = math.ceil(len(data) / params.grad_accum)
    schedule = get_cosine_schedule_with_warmup(
        optimizer, params.warmup_epochs * steps_per_epoch, params.epochs * steps_per_epoch
    )
    model, optimizer, data, schedule = accelerator.prepare(model, optimizer, data, schedule)
    device = accelerator.device
    tokens = tokenize_prompts(processor.tokenizer, params.prompts, device)

    mlflow = tracking.setup(tracking.CLASSIFIER_EXPERIMENT)
    stage = f"train_clip@{variant}"
    config = dataclasses.asdict(params)
    config.pop("variants")
    history, best, best_state, stale = [], None, None, 0
    started = time.perf_counter()
    tags = tracking.run_tags(stage, variant) | {
        "synthetic_dvc_md5": synthetic["dvc_md5"] if synthetic else "none",
        "synthetic_manifest_sha256": synthetic["manifest_sha256"] if synthetic else "none",
    }
    with mlflow.start_run(run_name=variant, tags=tags) as run:
        mlflow.log_params(tracking.flatten(config) | tracking.flatten(
            dataclasses.asdict(settings), "variant."
        ) | {"trainable_params": n_trainable, "total_params": n_total,
             "train_images": len(train_rows), "val_images": len(val_rows),
             "synthetic_images": synthetic["images"] if synthetic else 0})
        for epoch in range(1, params.epochs + 1):
            model.train()
            losses = []
            bar = tqdm(data, desc=f"{variant}: epoch {epoch}/{params.epochs}", unit="batch")
            for pixel_values, labels in bar:
                with accelerator.accumulate(model), accelerator.autocast():
                    x = augment(pixel_values, params.augment, gen)
                    loss = F.cross_entropy(class_logits(clip, tokens, x), labels.to(device))
                    accelerator.backward(loss)
                    optimizer.step()
                    schedule.step()
                    optimizer.zero_grad()
                losses.append(loss.item())
                bar.set_postfix(loss=f"{np.mean(losses):.3f}", refresh=False)
            model.eval()
            with accelerator.autocast():
                val_logits = predict_logits(clip, tokens, val_x, params.batch_size, device)
            val = scores(val_y, val_logits.float())
            record = {"epoch": epoch, "train_loss": float(np.mean(losses)),
                      "val_accuracy": val["accuracy"], "val_macro_f1": val["macro_f1"]}
            history.append(record)
            mlflow.log_metrics({k: v for k, v in record.items() if k != "epoch"}, step=epoch)
            tqdm.write(f"{variant}: epoch {epoch} loss {record['train_loss']:.4f} "
                       f"val acc {val['accuracy']:.3f} macro-F1 {val['macro_f1']:.3f}")
            if best is None or val["macro_f1"] > best["val_macro_f1"]:
                best, stale = record, 0
                best_state = copy.deepcopy(trainable_state(model))
            else:
                stale += 1
                if stale >= params.patience:
                    tqdm.write(f"{variant}: early stop, no val macro-F1 gain in {stale} epochs")
                    break
        train_seconds = time.perf_counter() - started
        load_trainable_state(model, best_state)
        model.eval()
        val_logits = predict_logits(clip, tokens, val_x, params.batch_size, device).float()
        temperature = (
            fit_temperature(val_logits, torch.from_numpy(val_y)) if params.calibrate else 1.0
        )
        summary = {
            "variant": variant, "best_epoch": best["epoch"], "epochs_run": len(history),
            "val_accuracy": best["val_accuracy"], "val_macro_f1": best["val_macro_f1"],
            "temperature": temperature, "train_seconds": train_seconds,
            "trainable_params": n_trainable, "history": history,
        }
        mlflow.log_metrics({"best_epoch": best["epoch"], "best_val_accuracy": best["val_accuracy"],
                            "best_val_macro_f1": best["val_macro_f1"],
                            "temperature": temperature, "train_seconds": train_seconds})
        with atomic_dir(Path(params.out_dir) / variant) as out:
            accelerator.unwrap_model(model).save_pretrained(out)
            processor.save_pretrained(out)
            meta = {
                "classes": classes, "prompts": params.prompts, "label_map": label_id,
                "synthetic": synthetic,
                "base": params.base_dir, "base_source": source["source"],
                "base_revision": source["revision"], "base_is_tiny": source["source"] == "tiny",
                "temperature": temperature, "variant": variant,
            }
            (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
            (out / "val_metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
            info = tracking.log_classifier(
                mlflow, out, tracking.image_bytes(val_rows[0]["path"]), classes
            )
            (out / "mlflow_run.json").write_text(json.dumps({
                "run_id": run.info.run_id, "experiment_id": run.info.experiment_id,
                "model_uri": info.model_uri, "tracking_uri": tracking.tracking_uri(),
            }, indent=2) + "\n")
    return summary


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)
