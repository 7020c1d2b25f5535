"""`pneumoclip pretrain`: the pretrained tiny bases that `base_models` installs for `tiny`.

The hub profile fine-tunes LoRA on a pretrained hub base. The tiny profile is the same recipe
in miniature, so its bases are pretrained too: this command pretrains the tiny architectures
(`base_models.tiny_clip`, `base_models.tiny_sd`) from random init on a set of X-rays, once,
and the project ships the result in `bases/tiny/` (fp16 safetensors, in `save_pretrained`
form, with a manifest). It is not a stage of dvc.yaml: its output is committed.

- CLIP: contrastive image-caption pretraining of both towers. Each image is paired with its
  class's captions; the loss is CLIP's symmetric InfoNCE in which every caption of the
  image's class (image side) and every image of the caption's class (caption side) counts as
  a positive (UniCL, Yang et al. 2022): with three classes, plain InfoNCE would push apart
  the many pairs in a batch that share a class. The result classifies zero-shot from
  prompts, as a real CLIP does. Zero-shot macro-F1 on a patient-grouped slice of the
  pretraining rows (`val_fraction`) picks the epoch.
- SD: the tiny VAE as an autoencoder, then the whole tiny UNet with the class captions, on
  sd_lora's diffusion recipe (its captions, caption dropout, min-SNR) with this section's
  sizes, through sd_lora's own training loop (checkpointed, resumable).

Leakage: the rows come from a prepare index (`splits`: a benchmark passes `train` only) less
every patient and image hash found under the `exclude` folders (the bundled sample, whose
test split scores the shipped bases). `images.csv` beside the bases lists every image used.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pneumoclip import distributed, tracking
from pneumoclip.config import BaseModelsParams, PretrainParams, SdLoraParams
from pneumoclip.fsutil import atomic_dir, content_key, sha256_file

PRETRAIN_EXPERIMENT = "pneumoclip-pretrain"
MANIFEST = "manifest.json"
IMAGES = "images.csv"  # every image the bases saw: patient_id, sha256, label, role
IMAGE_COLUMNS = ("patient_id", "sha256", "label", "role")


class PretrainError(RuntimeError):
    """The bases cannot be pretrained (no rows left, unknown classes, missing inputs)."""


# ---------------------------------------------------------------- rows


def excluded_keys(folders: list[str]) -> tuple[set[str], set[str]]:
    """The patient ids and image hashes of every image under the Kermany-layout `folders`."""
    from pneumoclip.prepare import scan

    patients, hashes = set(), set()
    for folder in folders:
        records, _ = scan(Path(folder), [".jpeg", ".jpg", ".png"])
        if not records:
            raise PretrainError(f"--exclude {folder}: no images found in Kermany layout")
        patients |= {r.patient_id for r in records}
        hashes |= {r.sha256 for r in records}
    return patients, hashes


def select_rows(index: str, splits: list[str], exclude: list[str], classes: list[str],
                val_fraction: float, seed: int) -> tuple[list[dict], list[dict], dict]:
    """Pretraining rows: the index's `splits`, less the excluded patients and images, split
    by patient into train and val. Returns (train, val, what was used and left out)."""
    from pneumoclip.prepare import grouped_holdout, read_index

    rows = [r for r in read_index(index) if r["split"] in splits]
    unknown = sorted({r["label"] for r in rows} - set(classes))
    if unknown:
        raise PretrainError(f"labels {unknown} in {index} have no pretrain.clip.captions")
    patients, hashes = excluded_keys(exclude)
    kept = [r for r in rows if r["patient_id"] not in patients and r["sha256"] not in hashes]
    if not kept:
        raise PretrainError(f"no rows of splits {splits} in {index} are left to pretrain on")
    holdout = grouped_holdout([r["label"] for r in kept], [r["patient_id"] for r in kept],
                              val_fraction, seed, "pretraining val")
    train = [r for r, v in zip(kept, holdout, strict=True) if not v]
    val = [r for r, v in zip(kept, holdout, strict=True) if v]
    data = {"index": str(index), "index_sha256": sha256_file(index), "splits": splits,
            "exclude": exclude, "excluded_patients": len(patients),
            "excluded_rows": len(rows) - len(kept), "train_images": len(train),
            "val_images": len(val)}
    return train, val, data


def check_unseen(bases: str | Path, index: str | Path, splits=("val", "test")) -> int:
    """Raise PretrainError if the bases in `bases` were pretrained on any patient or image
    of `splits` of `index` (a benchmark's val and test); returns how many rows were checked."""
    from pneumoclip.prepare import read_index

    with open(Path(bases) / IMAGES, newline="") as fh:
        used = list(csv.DictReader(fh))
    patients, hashes = {u["patient_id"] for u in used}, {u["sha256"] for u in used}
    rows = [r for r in read_index(index) if r["split"] in splits]
    seen = [r["path"] for r in rows if r["patient_id"] in patients or r["sha256"] in hashes]
    if seen:
        raise PretrainError(f"the bases in {bases} were pretrained on {len(seen)} images of "
                            f"the {'/'.join(splits)} split of {index} (e.g. {seen[0]}): "
                            "pretrain bases on the train split (`pneumoclip pretrain "
                            "--splits train`)")
    return len(rows)


# ---------------------------------------------------------------- CLIP


def class_caption_loss(clip, caption_tokens, caption_class, pixel_values, labels):
    """CLIP's symmetric InfoNCE between the batch's images and every caption, with all
    same-class pairs as positives (UniCL)."""
    from pneumoclip.classifier import image_embeddings

    pooled = clip.text_model(**caption_tokens).pooler_output
    text = F.normalize(clip.text_projection(pooled), dim=-1)
    logits = clip.logit_scale.exp().clamp(max=100) * image_embeddings(clip, pixel_values) @ text.T
    same = (labels[:, None] == caption_class[None, :]).float()
    image_side = -(F.log_softmax(logits, 1) * same / same.sum(1, keepdim=True)).sum(1).mean()
    present = same.sum(0) > 0  # captions of a class missing from the batch have no positive
    caption_side = -(F.log_softmax(logits.T[present], 1) * same.T[present]
                     / same.T[present].sum(1, keepdim=True)).sum(1).mean()
    return (image_side + caption_side) / 2


def pretrain_clip(params: PretrainParams, base: BaseModelsParams, train: list[dict],
                  val: list[dict], out: Path, mlflow) -> dict:
    """Build the random-init tiny CLIP into `out` and pretrain it there; returns a summary."""
    from transformers import CLIPModel, CLIPProcessor, get_cosine_schedule_with_warmup

    from pneumoclip.base_models import build_tiny_clip
    from pneumoclip.classifier import tokenize_prompts
    from pneumoclip.train_clip import augment, black_pixel, load_pixels, predict_logits, scores

    cfg = params.clip
    classes = list(cfg.captions)
    build_tiny_clip(base.tiny_clip, params.seed, out)
    clip = CLIPModel.from_pretrained(out)
    processor = CLIPProcessor.from_pretrained(out)
    accelerator = distributed.accelerator(params.mixed_precision, 1)
    device = accelerator.device
    train_x = load_pixels(processor, [r["path"] for r in train], "pretrain clip: train", False)
    val_x = load_pixels(processor, [r["path"] for r in val], "pretrain clip: val", False)
    train_y = torch.tensor([classes.index(r["label"]) for r in train])
    val_y = np.array([classes.index(r["label"]) for r in val])
    captions = [c for k in classes for c in cfg.captions[k]]
    caption_class = torch.tensor([i for i, k in enumerate(classes) for _ in cfg.captions[k]],
                                 device=device)
    caption_tokens = {k: v.to(device) for k, v in processor.tokenizer(
        captions, padding=True, truncation=True, return_tensors="pt").items()}
    prompt_tokens = tokenize_prompts(processor.tokenizer, cfg.captions, device)

    black = black_pixel(processor)
    gen = torch.Generator().manual_seed(params.seed)
    optimizer = torch.optim.AdamW(clip.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = len(train) // cfg.batch_size or 1
    schedule = get_cosine_schedule_with_warmup(
        optimizer, cfg.warmup_epochs * steps_per_epoch, cfg.epochs * steps_per_epoch)
    clip, optimizer = accelerator.prepare(clip, optimizer)
    best, best_state, stale, history = None, None, 0, []
    started = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        clip.train()
        order = torch.randperm(len(train), generator=gen)
        losses = []
        bar = tqdm(range(steps_per_epoch), desc=f"pretrain clip: epoch {epoch}/{cfg.epochs}",
                   unit="batch", disable=None, leave=False)
        for i in bar:
            idx = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            with accelerator.autocast():
                x = augment(train_x[idx], cfg.augment, gen, black=black).to(device)
                loss = class_caption_loss(clip, caption_tokens, caption_class, x,
                                          train_y[idx].to(device))
            losses.append(distributed.update(accelerator, loss, optimizer, schedule))
            bar.set_postfix(loss=f"{np.mean(losses):.3f}", refresh=False)
        clip.eval()
        with accelerator.autocast():
            val_scores = scores(val_y, predict_logits(clip, prompt_tokens, val_x, 256,
                                                      device).float())
        record = {"epoch": epoch, "train_loss": float(np.mean(losses)),
                  "zero_shot_val_accuracy": val_scores["accuracy"],
                  "zero_shot_val_macro_f1": val_scores["macro_f1"]}
        history.append(record)
        mlflow.log_metrics({f"clip_{k}": v for k, v in record.items() if k != "epoch"},
                           step=epoch)
        print(f"pretrain clip: epoch {epoch}/{cfg.epochs} loss {record['train_loss']:.4f} "
              f"zero-shot val acc {val_scores['accuracy']:.3f} "
              f"macro-F1 {val_scores['macro_f1']:.3f}", flush=True)
        if best is None or val_scores["macro_f1"] > best["zero_shot_val_macro_f1"]:
            best, stale = record, 0
            best_state = {k: v.detach().clone() for k, v in clip.state_dict().items()}
        else:
            stale += 1
            if stale >= cfg.patience:
                print(f"pretrain clip: early stop, no zero-shot val gain in {stale} epochs")
                break
    clip = accelerator.unwrap_model(clip)
    clip.load_state_dict(best_state)
    clip.to(device="cpu", dtype=torch.float16).save_pretrained(out)
    return {"best": best, "epochs_run": len(history), "history": history,
            "train_seconds": time.perf_counter() - started}


# ---------------------------------------------------------------- SD


def train_vae(trainer, parts, images: torch.Tensor, cfg, state) -> None:
    """The VAE as an autoencoder (L1 plus a small KL), then SD's latent scaling factor
    measured on the images."""
    from pneumoclip.distributed import local

    vae = parts.vae
    if state and state.phase != "vae":  # the VAE finished before the interruption
        vae.load_state_dict(state.vae)
        vae.register_to_config(scaling_factor=state.scaling_factor)
        return

    def loss_fn(vae, gen):  # the global batch drawn, this rank's slice trained
        x = images[torch.randint(len(images), (trainer.global_batch,), generator=gen)]
        x = local(x, *trainer.part).to(vae.device)
        posterior = vae.encode(x).latent_dist
        eps = torch.randn((trainer.global_batch, *posterior.mean.shape[1:]), generator=gen)
        z = posterior.mean + posterior.std * local(eps, *trainer.part).to(vae.device)
        recon = vae.decode(z).sample
        return F.l1_loss(recon, x.to(recon)) + cfg.vae_kl_weight * posterior.kl().mean()

    vae.requires_grad_(True)
    loss = trainer.loop("vae", cfg.vae_steps, vae, list(vae.parameters()), cfg.vae_lr,
                        loss_fn, state)
    vae.requires_grad_(False)
    mean, _ = trainer.latents(vae, images)  # scaled by the current factor, 1 for a new VAE
    vae.register_to_config(scaling_factor=float(vae.config.scaling_factor / mean.std()))
    trainer.mlflow.log_metrics({"vae_final_l1": loss,
                                "vae_scaling_factor": vae.config.scaling_factor})


def pretrain_sd(params: PretrainParams, base: BaseModelsParams, recipe: SdLoraParams,
                train: list[dict], out: Path, run_id: str, mlflow) -> dict:
    """Build the random-init tiny SD and pretrain its VAE and UNet; saves it into `out`."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    from pneumoclip.base_models import build_tiny_sd
    from pneumoclip.sd_lora import Checkpoints, Trainer, load_images, load_parts

    cfg = params.sd
    sd_params = dataclasses.replace(
        recipe, seed=params.seed, batch_size=cfg.batch_size, grad_accum=1,
        mixed_precision=params.mixed_precision, resolution=base.tiny_sd.resolution)
    classes = list(sd_params.captions)
    build_tiny_sd(base.tiny_sd, params.seed, out)
    accelerator = distributed.accelerator(params.mixed_precision, 1)
    key = content_key([dataclasses.asdict(params), dataclasses.asdict(sd_params),
                       dataclasses.asdict(base.tiny_sd)], folders=[out])
    ckpt = Checkpoints(params.checkpoint_dir, f"sd-{key}-{len(train)}")
    state = ckpt.load()
    if state:
        print(f"pretrain sd: resuming {state.phase} from step {state.step} ({ckpt.dir})")
    parts = load_parts(out, sd_params.resolution, accelerator.device)
    images = load_images([r["path"] for r in train], sd_params.resolution,
                         "pretrain sd: images")
    labels = torch.tensor([classes.index(r["label"]) for r in train])
    trainer = Trainer(sd_params, accelerator, ckpt, run_id, mlflow, classes, "pretrain sd")
    started = time.perf_counter()
    train_vae(trainer, parts, images, cfg, state)
    parts.unet.requires_grad_(True)
    loss = trainer.diffusion_phase(
        "unet", parts, images, labels, cfg.unet_steps, cfg.unet_lr,
        list(parts.unet.parameters()), None, state,
        extra_state={"vae": parts.vae.state_dict(),
                     "scaling_factor": parts.vae.config.scaling_factor})
    parts.unet.requires_grad_(False)
    grid = trainer.sample_grid(parts, "final")
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # "modules to keep in float32: []": there are none
    for model in (parts.vae, parts.unet, parts.text_encoder):
        model.to(device="cpu", dtype=torch.float16)
    diffusers_logging.set_verbosity(verbosity)
    shutil.rmtree(out)
    StableDiffusionPipeline(
        vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
        unet=parts.unet, scheduler=parts.noise_scheduler, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    ).save_pretrained(out)
    grid.save(out.parent / "sd_samples.png")
    ckpt.clear()
    return {"unet_final_loss": loss, "vae_scaling_factor": parts.vae.config.scaling_factor,
            "train_seconds": time.perf_counter() - started}


# ---------------------------------------------------------------- the command


def code_version() -> dict:
    """The package version and a hash of the package's source files."""
    from importlib.metadata import version

    package = Path(__file__).parent
    digest = hashlib.sha256()
    for path in sorted(package.glob("*.py")):
        digest.update(f"{path.name}:{sha256_file(path)}".encode())
    return {"pneumoclip": version("pneumoclip"), "source_sha256": digest.hexdigest(),
            "git_commit": tracking.git_commit()}


def write_images(path: Path, train: list[dict], val: list[dict]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=IMAGE_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for role, rows in (("train", train), ("val", val)):
            for r in sorted(rows, key=lambda r: r["sha256"]):
                writer.writerow({"patient_id": r["patient_id"], "sha256": r["sha256"],
                                 "label": r["label"], "role": role})


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def pretrain(params: PretrainParams, base: BaseModelsParams, recipe: SdLoraParams, index: str,
             splits: list[str], exclude: list[str], parts: tuple[str, ...] = ("clip", "sd"),
             ) -> dict:
    """Pretrain the tiny bases into `params.out_dir` (replaced in one move at the end) and
    log both to one MLflow run; returns the manifest."""
    if not Path(index).is_file():
        raise PretrainError(f"{index} is missing: make it with `pneumoclip prepare`")
    if list(params.clip.captions) != list(recipe.captions):
        raise PretrainError("pretrain.clip.captions and sd_lora.captions must name the same "
                            f"classes in the same order: {list(params.clip.captions)} vs "
                            f"{list(recipe.captions)}")
    torch.manual_seed(params.seed)
    train, val, data = select_rows(index, splits, exclude, list(params.clip.captions),
                                   params.val_fraction, params.seed)
    print(f"pretrain: {len(train)} train and {len(val)} val images from {index} (splits "
          f"{', '.join(splits)}); {data['excluded_rows']} rows of {data['excluded_patients']} "
          f"excluded patients left out", flush=True)
    mlflow = tracking.setup(PRETRAIN_EXPERIMENT)
    with mlflow.start_run(run_name="pretrain-tiny", tags=tracking.run_tags("pretrain")) as run:
        mlflow.log_params(tracking.flatten(dataclasses.asdict(params))
                          | {f"data.{k}": v for k, v in data.items()})
        with atomic_dir(params.out_dir) as out:
            previous = Path(params.out_dir)
            summary = {}
            for name in ("clip", "sd"):
                if name not in parts:  # keep the shipped one, with its sample grid
                    shutil.copytree(previous / name, out / name)
                    for grid in previous.glob(f"{name}_samples.png"):
                        shutil.copyfile(grid, out / grid.name)
                    continue
                (out / name).mkdir()
                if name == "clip":
                    summary["clip"] = pretrain_clip(params, base, train, val, out / "clip",
                                                    mlflow)
                else:
                    summary["sd"] = pretrain_sd(params, base, recipe, train, out / "sd",
                                                run.info.run_id, mlflow)
            write_images(out / IMAGES, train, val)
            manifest = {
                "made_by": "pneumoclip pretrain", "data": data,
                "images_sha256": sha256_file(out / IMAGES), "code": code_version(),
                "params": {"pretrain": dataclasses.asdict(params),
                           "tiny_clip": dataclasses.asdict(base.tiny_clip),
                           "tiny_sd": dataclasses.asdict(base.tiny_sd),
                           "sd_recipe": {k: getattr(recipe, k) for k in (
                               "captions", "caption_dropout", "snr_gamma", "noise_offset",
                               "balance", "warmup_steps")}},
                "results": {k: {kk: vv for kk, vv in v.items() if kk != "history"}
                            for k, v in summary.items()},
                "bytes": {name: folder_bytes(out / name) for name in ("clip", "sd")},
                "mlflow_run_id": run.info.run_id,
            }
            kept = [name for name in ("clip", "sd") if name not in parts]
            if kept and (previous / MANIFEST).is_file():  # the kept base's own results
                before = json.loads((previous / MANIFEST).read_text())["results"]
                manifest["results"] |= {name: before.get(name) for name in kept}
            (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        mlflow.log_artifact(str(Path(params.out_dir) / MANIFEST))
        mlflow.log_metrics({f"{k}_mb": v / 1e6 for k, v in manifest["bytes"].items()})
    total = sum(manifest["bytes"].values()) / 1e6
    print(f"pretrain: wrote {params.out_dir} ({total:.1f} MB; clip "
          f"{manifest['bytes']['clip'] / 1e6:.1f} MB, sd {manifest['bytes']['sd'] / 1e6:.1f} MB)")
    return manifest

