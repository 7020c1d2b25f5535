"""`sd_lora` stage: fine-tune Stable Diffusion with LoRA on the real training X-rays.

The recipe follows diffusers' text-to-image LoRA example: DDPM noise on VAE latents, a loss
whose target follows the base scheduler's `prediction_type` (the noise, the velocity of a
v-prediction base such as SD 2.x at 768 px, or the sample), optional min-SNR weighting and
noise offset, LoRA on the UNet attention
projections (peft), class captions from params, and some captions dropped so the pipeline
can use classifier-free guidance. By default each class gets its own adapter, trained on that
class's images only (`per_class`); `per_class: false` trains one adapter for all classes.

Only the LoRA trains, on a pretrained base: a hub one, or the shipped tiny one (`pneumoclip
pretrain` made it, with this module's training loop). Each adapter trains for `epochs`
passes over its images, so the sample's run is short and the full set's run is full.

Every phase checkpoints every `checkpoint_every` steps into `checkpoint_dir` (outside the
DVC output, which DVC deletes before a run). A rerun with the same inputs resumes from the
last checkpoint. Each step draws its batch, noise and timesteps from a generator seeded by
(seed, phase, step), so a resumed run ends with the same weights as an uninterrupted one.

On N processes (`accelerate launch`, `torchrun`) each step draws the global batch (N x
`batch_size`) and each rank trains on its slice, through the prepared model, so the ranks
see different images and N processes at `batch_size` B follow one at N x B
(pneumoclip.distributed). The main process alone logs, samples, checkpoints and saves.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import random
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from pneumoclip import distributed, tracking
from pneumoclip.classifier import read_image
from pneumoclip.config import SdLoraParams
from pneumoclip.diffusion import (
    META_FILE,
    SD_EXPERIMENT,
    SHARED,
    generate,
    lora_file,
    lora_sha256,
    make_grid,
    sample_pipeline,
)
from pneumoclip.distributed import Objective, local
from pneumoclip.fsutil import atomic_dir, content_key, load_state, save_state
from pneumoclip.prepare import read_index


class SdLoraError(RuntimeError):
    """Training cannot start (missing inputs, bad captions)."""


# ---------------------------------------------------------------- data


def load_images(paths: list[str], resolution: int, desc: str) -> torch.Tensor:
    """(n, 3, res, res) in [-1, 1]: grayscale replicated to RGB, as the VAE takes it."""
    out = torch.empty(len(paths), 3, resolution, resolution)
    for i, path in enumerate(tqdm(paths, desc=desc, unit="img", disable=None)):
        image = read_image(path).resize((resolution, resolution), Image.Resampling.BICUBIC)
        out[i] = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)
    return out / 127.5 - 1.0


def epoch_steps(epochs: float, images: int, batch: int) -> int:
    """Steps that make `epochs` passes over `images` at `batch` images a step."""
    return max(1, math.ceil(epochs * images / batch))


def step_generator(seed: int, phase: int, step: int) -> torch.Generator:
    """The generator for one step: what a step draws depends only on (seed, phase, step)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + phase * 100_003 + step)


# ---------------------------------------------------------------- adapters


def adapters(params: SdLoraParams) -> dict[str, str]:
    """Class -> adapter name: its own (the class name), or the one shared adapter."""
    return {c: c if params.per_class else SHARED for c in params.captions}


def lora_phase(adapter: str) -> str:
    return "lora" if adapter == SHARED else f"lora_{adapter}"


def draw_batch(labels: torch.Tensor, size: int, balance: bool, gen: torch.Generator):
    if not balance:
        return torch.randint(len(labels), (size,), generator=gen)
    classes = torch.unique(labels)
    picked = classes[torch.randint(len(classes), (size,), generator=gen)]
    out = torch.empty(size, dtype=torch.long)
    for c in classes:
        members = torch.nonzero(labels == c).flatten()
        slots = torch.nonzero(picked == c).flatten()
        out[slots] = members[torch.randint(len(members), (len(slots),), generator=gen)]
    return out


# ---------------------------------------------------------------- diffusion pieces


@torch.no_grad()
def encode_text(tokenizer, text_encoder, captions: list[str]) -> torch.Tensor:
    """Hidden states per caption, padded to the tokenizer's max length as the pipeline does."""
    tokens = tokenizer(captions, padding="max_length", truncation=True,
                       max_length=tokenizer.model_max_length, return_tensors="pt")
    return text_encoder(tokens.input_ids.to(text_encoder.device))[0]


PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def loss_target(scheduler, latents, noise, t) -> torch.Tensor:
    """What the UNet learns to predict, as the base's scheduler defines it."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, t)
    if kind == "sample":
        return latents
    raise SdLoraError(f"the base's scheduler has prediction_type {kind!r}; sd_lora trains "
                      f"{', '.join(PREDICTION_TYPES)}")


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights for the scheduler's prediction type, as diffusers' recipe."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps)
    weights = torch.clamp(snr, max=gamma)
    if scheduler.config.prediction_type == "epsilon":
        return weights / snr
    if scheduler.config.prediction_type == "v_prediction":
        return weights / (snr + 1)
    return weights


def diffusion_loss(unet, scheduler, latents, text, params: SdLoraParams, gen,
                   part: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """The denoising loss of rank `part[0]` of `part[1]`: noise and timesteps are drawn for
    the whole (global) batch of `latents` and `text`, and the rank keeps its slice."""
    noise = torch.randn(latents.shape, generator=gen)
    if params.noise_offset:
        noise += params.noise_offset * torch.randn(latents.shape[:2] + (1, 1), generator=gen)
    t = torch.randint(scheduler.config.num_train_timesteps, (len(latents),), generator=gen)
    latents, noise, t, text = (local(x, *part) for x in (latents, noise, t, text))
    device = unet.device
    latents, noise, t = latents.to(device), noise.to(device), t.to(device)
    noisy = scheduler.add_noise(latents, noise, t)
    pred = unet(noisy, t, text.to(device)).sample
    target = loss_target(scheduler, latents, noise, t)
    loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if params.snr_gamma:
        loss = loss * min_snr_weights(scheduler, t, params.snr_gamma).to(loss)
    return loss.mean()


# ---------------------------------------------------------------- checkpoints


def run_key(params: SdLoraParams) -> str:
    """What decides the result: the params, the index and the base weights."""
    return content_key(dataclasses.asdict(params), [params.index], [params.base_dir])


@dataclasses.dataclass
class ResumeState:
    """Everything a checkpoint holds: where training stood, and the tensors to resume from."""

    phase: str
    step: int
    losses: list[float]
    run_id: str
    done: list[str]  # the phases finished before this one
    model: dict  # the phase's model state_dict
    optimizer: dict
    schedule: dict
    vae: dict | None = None  # a finished VAE (pretrain), saved while the UNet trains
    scaling_factor: float | None = None
    final_losses: dict | None = None  # per adapter, of the LoRA phases already finished


class Checkpoints:
    """`checkpoint_dir/KEY/`: the state of the current phase."""

    def __init__(self, root: str, key: str):
        self.dir = Path(root) / key
        self.state_file = self.dir / "state.pt"

    def load(self) -> ResumeState | None:
        """The saved state, or None; an unreadable one is set aside (kept for a look), not
        fatal, and training starts over."""
        return load_state(self.state_file, "sd_lora", lambda saved: ResumeState(**saved))

    def save(self, state: ResumeState) -> None:
        save_state(self.state_file, dataclasses.asdict(state))

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


# ---------------------------------------------------------------- the stage


@dataclasses.dataclass
class Parts:
    tokenizer: object
    text_encoder: object
    vae: object
    unet: object
    noise_scheduler: object


def load_parts(base_dir: str | Path, resolution: int, device) -> Parts:
    """The base's parts; the frozen text encoder and the VAE on `device` (the model being
    trained goes there when accelerate prepares it). The training scheduler is a DDPM one
    built from the base's scheduler config, so it keeps the base's betas and prediction
    type."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    base_dir = str(base_dir)
    parts = Parts(
        tokenizer=CLIPTokenizer.from_pretrained(base_dir, subfolder="tokenizer"),
        text_encoder=CLIPTextModel.from_pretrained(base_dir, subfolder="text_encoder"),
        vae=AutoencoderKL.from_pretrained(base_dir, subfolder="vae"),
        unet=UNet2DConditionModel.from_pretrained(base_dir, subfolder="unet"),
        noise_scheduler=DDPMScheduler.from_pretrained(base_dir, subfolder="scheduler"),
    )
    native = parts.unet.config.sample_size * 2 ** (len(parts.vae.config.block_out_channels) - 1)
    if resolution != native:
        raise SdLoraError(f"sd_lora.resolution is {resolution} but the base {base_dir} "
                          f"makes {native} px images (unet sample_size "
                          f"{parts.unet.config.sample_size} x the VAE's scale): set "
                          f"sd_lora.resolution to {native}")
    parts.text_encoder.requires_grad_(False).eval().to(device)
    parts.vae.to(device)
    return parts


def train_sd_lora(params: SdLoraParams) -> dict | None:
    """Train the adapters; the main process saves them and returns their metadata, the
    others return None."""
    classes = list(params.captions)
    if not classes or any(not c for c in params.captions.values()):
        raise SdLoraError("sd_lora.captions needs at least one caption template per class")
    if params.per_class and any(not c.isidentifier() for c in classes):
        raise SdLoraError("with sd_lora.per_class each class names its adapter, so class names "
                          f"must be identifiers (letters, digits, _): {classes}")
    for path in (params.index, params.base_dir):
        if not Path(path).exists():
            raise SdLoraError(f"{path} is missing; run `dvc repro` for the stages before")
    rows = [r for r in read_index(params.index) if r["split"] == "train"]
    unknown = sorted({r["label"] for r in rows} - set(classes))
    if unknown:
        raise SdLoraError(f"labels {unknown} in {params.index} have no sd_lora.captions")
    if not rows:
        raise SdLoraError(f"{params.index} has no train rows")

    accelerator = distributed.accelerator(params.mixed_precision, params.grad_accum)
    main = accelerator.is_main_process
    ckpt = Checkpoints(params.checkpoint_dir, run_key(params))
    with accelerator.main_process_first():  # it sets an unreadable checkpoint aside first
        state = ckpt.load()
    if state and main:
        print(f"sd_lora: resuming {state.phase} from step {state.step} ({ckpt.dir})")
    random.seed(params.seed)
    np.random.seed(params.seed)
    torch.manual_seed(params.seed)
    images = load_images([r["path"] for r in rows], params.resolution, "sd_lora: train images")
    labels = torch.tensor([classes.index(r["label"]) for r in rows])

    mlflow, run = None, None
    if main:
        mlflow = tracking.setup(SD_EXPERIMENT)
        run_id = state.run_id if state else None
        run = mlflow.start_run(run_id=run_id, run_name=None if run_id else "sd-lora",
                               tags=None if run_id else tracking.run_tags("sd_lora"))
    started = time.perf_counter()
    try:
        if main and not (state and state.run_id):
            mlflow.log_params(tracking.flatten(dataclasses.asdict(params))
                              | {"train_images": len(rows),
                                 "processes": accelerator.num_processes})
            tracking.log_dataset(mlflow, rows, "kermany-train", tracking.dvc_hash(), "training")
        trainer = Trainer(params, accelerator, ckpt, run.info.run_id if main else None, mlflow,
                          classes)
        device = accelerator.device
        parts = load_parts(params.base_dir, params.resolution, device)
        summary = trainer.train_lora(parts, images, labels, state)
        distributed.in_sync(accelerator, parts.unet, "sd_lora")
        summary["train_seconds"] = time.perf_counter() - started
        meta = save_outputs(params, trainer, parts, summary, run, mlflow) if main else None
    finally:
        if run is not None:
            mlflow.end_run()
    accelerator.wait_for_everyone()
    if main:
        ckpt.clear()
    return meta


def save_outputs(params: SdLoraParams, trainer, parts: Parts,
                 summary: dict, run, mlflow) -> dict:
    """The adapters, their metadata and a final sample grid, written to `out_dir` in one
    move and logged to the MLflow run."""
    classes = list(params.captions)
    files = {c: lora_file(a) for c, a in adapters(params).items()}
    with atomic_dir(params.out_dir) as out:
        for adapter in dict.fromkeys(adapters(params).values()):
            save_lora(parts.unet, out, adapter)
        meta = {
            "base": params.base_dir, "classes": classes, "captions": params.captions,
            "resolution": params.resolution, "lora": dataclasses.asdict(params.lora),
            "per_class": params.per_class, "adapters": files,
            "lora_sha256": lora_sha256(out, files.values()), "run_id": run.info.run_id,
            "tracking_uri": tracking.public_uri(),
        } | summary
        (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        grid = trainer.sample_grid(parts, "final")
        grid.save(out / "samples.png")
    mlflow.log_metric("train_seconds", summary["train_seconds"])
    mlflow.log_artifact(str(Path(params.out_dir) / META_FILE))
    return meta


def save_lora(unet, out: Path, adapter: str) -> None:
    """An adapter in diffusers' LoRA format, loadable with `pipe.load_lora_weights`."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name=adapter))
    StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=layers,
                                              weight_name=lora_file(adapter),
                                              safe_serialization=True)


class Trainer:
    """Runs the phases, each with its checkpoints, progress bar and MLflow curve."""

    def __init__(self, params: SdLoraParams, accelerator, ckpt: Checkpoints, run_id: str,
                 mlflow, classes: list[str], who: str = "sd_lora"):
        self.params, self.accelerator, self.ckpt, self.who = params, accelerator, ckpt, who
        self.run_id, self.mlflow, self.classes = run_id, mlflow, classes
        self.main = accelerator.is_main_process  # it alone logs, samples and checkpoints
        self.part = (accelerator.process_index, accelerator.num_processes)
        self.global_batch = params.batch_size * accelerator.num_processes
        self.adapters = adapters(params)
        self.phases = ["vae", "unet", *map(lora_phase, dict.fromkeys(self.adapters.values()))]

    def loop(self, phase: str, steps: int, model, trainable, lr: float, loss_fn, state,
             sample=None, extra_state=None) -> float:
        """Train `model` for `steps`, resuming from `state` if it is this phase's.

        `loss_fn(model, generator)` is this rank's loss for the step; it runs inside the
        prepared module, so DDP synchronises the gradients."""
        params = self.params
        optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=1e-2)
        warmup = max(1, params.warmup_steps)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: min(1.0, (s + 1) / warmup)
        )
        start, losses = 0, []
        if state and state.phase == phase:
            model.load_state_dict(state.model)
            optimizer.load_state_dict(state.optimizer)
            schedule.load_state_dict(state.schedule)
            start, losses = state.step, state.losses
        objective, optimizer = self.accelerator.prepare(Objective(model, loss_fn), optimizer)
        objective.train()
        bar = tqdm(range(start, steps), desc=f"{self.who}: {phase}", unit="step",
                   initial=start, total=steps, disable=None if self.main else True)
        for step in bar:
            gen = step_generator(params.seed, self.phases.index(phase), step)
            with self.accelerator.accumulate(objective), self.accelerator.autocast():
                loss = objective(gen)
                losses.append(distributed.update(self.accelerator, loss, optimizer, schedule))
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}", refresh=False)
            done = step + 1
            if not self.main:
                continue
            if done % 10 == 0 or done == steps:
                self.mlflow.log_metric(f"{phase}_loss", float(np.mean(losses[-10:])), step=done)
            if sample and params.sample_every and (done % params.sample_every == 0):
                sample(f"{phase}_step{done:05d}")
            if done % params.checkpoint_every == 0 and done < steps:
                self.ckpt.save(ResumeState(
                    phase=phase, step=done, losses=losses, run_id=self.run_id,
                    done=self.phases[: self.phases.index(phase)],
                    model=model.state_dict(),
                    optimizer=optimizer.state_dict(), schedule=schedule.state_dict(),
                    **(extra_state or {})))
        objective.eval()
        final = float(np.mean(losses[-20:])) if losses else float("nan")
        if self.main:  # one line a phase
            print(f"{self.who}: {phase} {steps} steps, loss {final:.4f} (rank 0's)", flush=True)
        return final

    def latents(self, vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and std of every image, once; each step samples from them."""
        means, stds = [], []
        with torch.no_grad():
            for i in range(0, len(images), 256):
                posterior = vae.encode(images[i : i + 256].to(vae.device)).latent_dist
                means.append(posterior.mean.cpu())
                stds.append(posterior.std.cpu())
        scale = vae.config.scaling_factor
        return torch.cat(means) * scale, torch.cat(stds) * scale

    def captions(self, parts: Parts, labels: torch.Tensor, generic: str | None):
        """Text states, and a function drawing one caption index per image (some empty)."""
        params = self.params
        templates = [generic] if generic else [t for c in self.classes for t in params.captions[c]]
        text = encode_text(parts.tokenizer, parts.text_encoder, templates + [""]).cpu()
        owners = [self.classes.index(c) for c in self.classes for _ in params.captions[c]]
        by_class = [torch.tensor([i for i, o in enumerate(owners) if o == k] or [0])
                    for k in range(len(self.classes))]

        def draw(idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
            if generic:
                caption = torch.zeros(len(idx), dtype=torch.long)
            else:
                pick = torch.randint(1_000_000, (len(idx),), generator=gen)
                caption = torch.stack([by_class[c][p % len(by_class[c])]
                                       for c, p in zip(labels[idx].tolist(), pick, strict=True)])
            drop = torch.rand(len(idx), generator=gen) < params.caption_dropout
            caption[drop] = len(templates)  # the empty caption
            return caption

        return text, draw

    def diffusion_phase(self, phase: str, parts: Parts, images, labels, steps: int, lr: float,
                        trainable, generic: str | None, state, extra_state=None) -> float:
        """Noise-prediction training on cached latents, with per-class sample grids."""
        params, unet = self.params, parts.unet
        mean, std = self.latents(parts.vae, images)
        text, draw_captions = self.captions(parts, labels, generic)

        def loss_fn(unet, gen):  # the global batch drawn, this rank's slice trained
            idx = draw_batch(labels, self.global_batch, params.balance, gen)
            z = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)
            return diffusion_loss(unet, parts.noise_scheduler, z, text[draw_captions(idx, gen)],
                                  params, gen, self.part)

        def sample(name):
            self.sample_grid(parts, name, captions={"x-ray": [generic]} if generic else None)

        loss = self.loop(phase, steps, unet, trainable, lr, loss_fn,
                         state if state and state.phase == phase else None,
                         sample=sample, extra_state=extra_state)
        if self.main:
            self.mlflow.log_metric(f"{phase}_final_loss", loss)
        return loss

    def train_lora(self, parts: Parts, images, labels, state) -> dict:
        """Each adapter on its classes' images: one per class, or one shared by all."""
        from peft import LoraConfig

        params, unet = self.params, parts.unet
        unet.requires_grad_(False)
        torch.manual_seed(params.seed)  # the adapters' init, the same on a resumed run
        names = list(dict.fromkeys(self.adapters.values()))
        config = LoraConfig(
            r=params.lora.r, lora_alpha=params.lora.alpha, lora_dropout=params.lora.dropout,
            init_lora_weights="gaussian", target_modules=params.lora.target_modules,
        )
        with warnings.catch_warnings():  # "multiple adapters in the model": one per class, yes
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            for name in names:
                unet.add_adapter(copy.deepcopy(config), adapter_name=name)
        done = state.done if state else []
        final = dict(state.final_losses or {}) if state else {}
        sizes, steps = {}, {}
        for name in names:
            members = [self.classes.index(c) for c, a in self.adapters.items() if a == name]
            trainable = self.activate(unet, name)
            sizes[name] = sum(p.numel() for p in trainable)
            phase = lora_phase(name)
            keep = torch.isin(labels, torch.tensor(members))
            steps[name] = epoch_steps(params.epochs, int(keep.sum()), self.global_batch)
            if phase in done:  # trained before the interruption; the checkpoint holds it
                continue
            final[name] = self.diffusion_phase(
                phase, parts, images[keep], labels[keep], steps[name], params.lr, trainable,
                None, state, extra_state={"final_losses": dict(final)},
            )
        if self.main:
            self.mlflow.log_metric("lora_params", sum(sizes.values()))
        return {"final_loss": float(np.mean(list(final.values()))), "final_losses": final,
                "lora_params": sum(sizes.values()), "steps": steps,
                "adapter_steps": sum(steps.values())}

    @staticmethod
    def activate(unet, name: str) -> list:
        """Make `name` the active adapter and the only trainable weights; returns them."""
        unet.set_adapter(name)
        trainable = []
        for key, p in unet.named_parameters():
            p.requires_grad_(".lora_" in key and f".{name}." in key)
            if p.requires_grad:
                trainable.append(p)
        return trainable

    def sample_grid(self, parts: Parts, name: str, captions=None) -> Image.Image:
        """Fixed-seed samples, one row per class, logged to the MLflow run."""
        params, unet = self.params, parts.unet
        captions = captions or {c: params.captions[c][:1] for c in self.classes}
        pipe = sample_pipeline(parts.vae, parts.text_encoder, parts.tokenizer, unet,
                               parts.noise_scheduler.config)
        n = params.sample_per_class
        training = unet.active_adapters() if getattr(unet, "peft_config", None) else []
        rows = []
        for cls, caption in captions.items():
            if training and cls in self.adapters:
                unet.set_adapter(self.adapters[cls])  # each class row with its own adapter
            rows.append(generate(pipe, [caption[0]] * n, list(range(n)), params.sample_steps,
                                 params.sample_guidance, params.resolution))
        if training:
            self.activate(unet, training[0])
        grid = make_grid(rows, list(captions))
        self.mlflow.log_image(grid, f"samples/{name}.png")
        return grid
