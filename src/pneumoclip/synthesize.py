"""`synthesize` stage: generate the synthetic X-rays that rebalance the classes, and judge them.

The base plus the SD LoRA (`load_lora_weights`) draws the number of images per class that
params ask for. Each image has its own seed (base seed + its index in the plan) on a CPU
generator, so any one image can be redrawn exactly. Images land first in a work folder keyed
by everything that decides them, so an interrupted run skips what it already drew; the DVC
output `artifacts/synthetic/` is written only at the end, in one move.

The pipeline runs on the accelerator's device when there is one. On N processes
(`accelerate launch`, `torchrun`) the plan's batches are dealt out to the ranks, each batch
drawn whole by one rank exactly as one process draws it, so N processes write the same image
bytes as one; the main process then judges the set and writes the output.

Quality, with no pretrained Inception to lean on:
- class consistency: how often the `real` classifier (which never saw a synthetic image)
  gives a synthetic image the class it was drawn for. Beside it, the same share for the
  real validation images of the class (`real_consistency`): what images as good as real
  ones would score, since the judge misses some real cases too;
- a two-sample test: the cross-validated AUROC of a logistic regression that tells held-out
  real images (the validation split, which neither model trained on) from synthetic ones on
  the `real` classifier's image embeddings. 0.5 means it cannot tell them apart;
- an optional filter that drops images whose own-class probability is under a threshold.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from pneumoclip import distributed, tracking
from pneumoclip.config import SynthesizeParams
from pneumoclip.diffusion import (
    META_FILE,
    SD_EXPERIMENT,
    generate,
    load_adapters,
    lora_sha256,
    make_grid,
)
from pneumoclip.fsutil import atomic_dir, write_json
from pneumoclip.prepare import read_index

MANIFEST = "manifest.csv"
MANIFEST_FIELDS = ["file", "class", "prompt", "negative_prompt", "contrast", "seed", "steps",
                   "guidance", "scheduler", "lora_sha256", "own_class_prob", "predicted",
                   "kept"]
SCHEDULERS = {
    "dpm": "DPMSolverMultistepScheduler",
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "ddpm": "DDPMScheduler",
}


class SynthesizeError(RuntimeError):
    """Synthesis cannot start (missing LoRA, bad counts or scheduler)."""


# ---------------------------------------------------------------- the plan


def plan_counts(params: SynthesizeParams, train_counts: dict[str, int],
                classes: list[str]) -> dict[str, int]:
    """Images to draw per class: up to the largest class, or the explicit mapping."""
    if isinstance(params.counts, str):
        if params.counts != "balance":
            raise SynthesizeError(f"synthesize.counts must be 'balance' or a mapping of class "
                                  f"to count, got {params.counts!r}")
        top = max(train_counts.values())
        return {c: top - train_counts.get(c, 0) for c in classes}
    unknown = sorted(set(params.counts) - set(classes))
    if unknown:
        raise SynthesizeError(f"synthesize.counts names unknown classes {unknown} "
                              f"(the LoRA knows {classes})")
    if any(n < 0 for n in params.counts.values()):
        raise SynthesizeError("synthesize.counts must not be negative")
    return {c: params.counts.get(c, 0) for c in classes}


def check_classes(params: SynthesizeParams, classes: list[str]) -> None:
    """negative_prompts and contrast may name only the LoRA's classes."""
    named = {"negative_prompts": set(params.negative_prompts),
             "contrast": set(params.contrast).union(*params.contrast.values())}
    for key, names in named.items():
        unknown = sorted(names - set(classes))
        if unknown:
            raise SynthesizeError(f"synthesize.{key} names unknown classes {unknown} "
                                  f"(the LoRA knows {classes})")
    for cls, others in params.contrast.items():
        if cls in others:
            raise SynthesizeError(f"synthesize.contrast.{cls} contrasts {cls} with itself")


def contrast_text(params: SynthesizeParams, cls: str) -> str:
    """The manifest's record of a class's contrast, e.g. "BACTERIA:4.5 NORMAL:1.5"."""
    return " ".join(f"{c}:{w:g}" for c, w in params.contrast.get(cls, {}).items())


def image_row(params: SynthesizeParams, cls: str, file: str, prompt: str, seed: int) -> dict:
    return {"file": file, "class": cls, "prompt": prompt,
            "negative_prompt": params.negative_prompts.get(cls, ""),
            "contrast": contrast_text(params, cls), "seed": seed}


def plan(params: SynthesizeParams, counts: dict[str, int], captions: dict[str, list[str]]):
    """One row (file, class, prompt, negative prompt, contrast, seed) per image; the
    templates take turns."""
    check_classes(params, list(captions))
    rows = []
    for cls, n in counts.items():
        for i in range(n):
            rows.append(image_row(params, cls, f"{cls}/{cls}_{i:05d}.png",
                                  captions[cls][i % len(captions[cls])],
                                  params.seed + len(rows)))
    return rows


def probe_plan(params: SynthesizeParams, rows: list[dict], captions: dict[str, list[str]],
               classes: list[str]) -> list[dict]:
    """Extra images, judged but never kept, so every class gets a consistency figure."""
    probe, index = [], len(rows)
    for cls in classes:
        have = sum(r["class"] == cls for r in rows)
        for i in range(max(0, params.probe_per_class - have)):
            probe.append(image_row(params, cls, f"_probe/{cls}/{cls}_{i:05d}.png",
                                   captions[cls][i % len(captions[cls])], params.seed + index))
            index += 1
    return probe


def work_key(params: SynthesizeParams, lora_sha: str, counts: dict[str, int]) -> str:
    """What decides the pixels (not the filter or the judge)."""
    decisive = {k: getattr(params, k)
                for k in ("seed", "steps", "guidance", "scheduler", "negative_prompts",
                         "contrast")}
    blob = json.dumps([decisive, lora_sha, counts], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# ---------------------------------------------------------------- generation


def load_pipeline(params: SynthesizeParams, meta: dict, device):
    """The base pipeline with the LoRA adapters, on `device`; returns it and class ->
    adapter name."""
    import diffusers

    lora_dir = Path(params.lora_dir)
    if params.scheduler not in SCHEDULERS:
        raise SynthesizeError(f"synthesize.scheduler must be one of {', '.join(SCHEDULERS)}, "
                              f"got {params.scheduler!r}")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(
        params.base_dir, safety_checker=None, requires_safety_checker=False
    )
    scheduler_cls = getattr(diffusers, SCHEDULERS[params.scheduler])
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    verbosity = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()  # "no LoRA keys for the text encoder": none
    try:
        names = load_adapters(pipe, lora_dir, meta)
    finally:
        diffusers.utils.logging.set_verbosity(verbosity)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device), names


def draw(pipe, adapters: dict[str, str], rows: list[dict], work: Path,
         params: SynthesizeParams, resolution: int, captions: dict[str, list[str]],
         rank: int = 0, world: int = 1) -> None:
    """Draw the planned images that the work folder lacks, in batches of one prompt, each
    with its class's adapter (and the other classes' ones where `contrast` asks).

    The batches are the plan's, whatever is already drawn, and rank `rank` of `world`
    draws every world-th one, so each image comes out of the same batch (the same
    arithmetic, the same bytes) on any number of processes and after any interruption."""
    mine = [b for i, b in enumerate(batches(rows, params.batch_size)) if i % world == rank]
    total = sum(map(len, mine))
    todo = [b for b in mine if not all((work / r["file"]).is_file() for r in b)]
    have = total - sum(map(len, todo))
    if have and rank == 0:
        print(f"synthesize: {have} of {total} images already drawn ({work}), drawing the "
              f"other {total - have}")
    with tqdm(total=total, initial=have, desc="synthesize", unit="img",
              disable=None if rank == 0 else True) as bar:
        for batch in todo:
            cls = batch[0]["class"]
            pipe.set_adapters(adapters[cls])
            args = ([r["prompt"] for r in batch], [r["seed"] for r in batch], params.steps,
                    params.guidance, resolution, [r["negative_prompt"] for r in batch])
            others = [(adapters[c], captions[c][0], w)
                      for c, w in params.contrast.get(cls, {}).items()]
            images = (generate_contrast(pipe, adapters[cls], others, *args) if others
                      else generate(pipe, *args))
            for row, image in zip(batch, images, strict=True):
                target = work / row["file"]
                if target.is_file():
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_suffix(".tmp")
                image.save(tmp, format="PNG")
                os.replace(tmp, target)  # a kill never leaves half a PNG behind
            bar.update(len(batch))


def generate_contrast(pipe, own: str, others: list[tuple[str, str, float]],
                      prompts: list[str], seeds: list[int], steps: int, guidance: float,
                      resolution: int, negative: list[str]) -> list[Image.Image]:
    """`generate` with class-contrast guidance, in the pipeline's own steps.

    Classifier-free guidance as usual with the class's adapter (`own`), plus, per other
    class, weight * (own prediction - that class's adapter's prediction for its caption):
    the other classes' adapters say what the image should not look like. With every weight
    at 0 this draws what `generate` draws."""
    gens = [torch.Generator().manual_seed(s) for s in seeds]  # on the CPU, as in `generate`
    n = len(prompts)
    device = pipe.device
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(prompts, device, 1, True,
                                          negative if any(negative) else None)
        texts = [pipe.encode_prompt([caption] * n, device, 1, False)[0]
                 for _, caption, _ in others]
        pipe.scheduler.set_timesteps(steps, device=device)
        latents = pipe.prepare_latents(n, pipe.unet.config.in_channels, resolution,
                                       resolution, cond.dtype, device, gens)
        extra = pipe.prepare_extra_step_kwargs(gens, 0.0)
        for t in pipe.scheduler.timesteps:
            x = pipe.scheduler.scale_model_input(latents, t)
            pipe.set_adapters(own)
            free, mine = pipe.unet(torch.cat([x, x]), t, torch.cat([uncond, cond])).sample.chunk(2)
            noise = free + guidance * (mine - free)
            for (adapter, _, weight), text in zip(others, texts, strict=True):
                pipe.set_adapters(adapter)
                noise = noise + weight * (mine - pipe.unet(x, t, text).sample)
            latents = pipe.scheduler.step(noise, t, latents, **extra).prev_sample
        pipe.set_adapters(own)
        images = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
        images = pipe.image_processor.postprocess(images, output_type="np")
    return [Image.fromarray((im.mean(axis=-1) * 255).round().astype(np.uint8), mode="L")
            for im in images]


def batches(rows: list[dict], size: int):
    """Batches that never mix classes or prompts (one adapter, one text encoding per batch)."""

    def key(row: dict) -> tuple:
        return row["class"], row["prompt"], row["negative_prompt"]

    current: list[dict] = []
    for row in rows:
        if current and (len(current) == size or key(row) != key(current[0])):
            yield current
            current = []
        current.append(row)
    if current:
        yield current


# ---------------------------------------------------------------- quality


def judge(classifier, paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and image embeddings of the `real` classifier."""
    from pneumoclip.classifier import image_embeddings, read_image

    probs, embeds = [], []
    for i in tqdm(range(0, len(paths), 128), desc="synthesize: judging", unit="batch",
                  disable=None):
        pixels = classifier.pixel_values([read_image(p) for p in paths[i : i + 128]])
        with torch.no_grad():
            probs.append(torch.softmax(classifier.logits_from_pixels(pixels), -1).cpu().numpy())
            embeds.append(image_embeddings(classifier.clip, classifier.on_device(pixels))
                          .float().cpu().numpy())
    if not probs:
        return np.zeros((0, len(classifier.classes))), np.zeros((0, 1))
    return np.concatenate(probs), np.concatenate(embeds)


def two_sample_auroc(real: np.ndarray, synthetic: np.ndarray, seed: int) -> float | None:
    """Cross-validated AUROC of logistic regression telling real from synthetic."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    n = min(len(real), len(synthetic))
    if n < 10:
        return None
    rng = np.random.default_rng(seed)
    x = np.concatenate([real[rng.permutation(len(real))[:n]],
                        synthetic[rng.permutation(len(synthetic))[:n]]])
    y = np.r_[np.zeros(n), np.ones(n)]
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=seed)
    scores = cross_val_predict(LogisticRegression(max_iter=2000), x, y, cv=folds,
                               method="predict_proba")[:, 1]
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, scores))


def quality(params: SynthesizeParams, rows: list[dict], probe: list[dict], work: Path,
            val_rows: list[dict], classes: list[str]) -> dict:
    """Class consistency, the filter and the two-sample AUROC; fills the manifest columns.

    Consistency counts the kept-or-not synthetic set plus the probe images of its class."""
    from pneumoclip.classifier import ClipClassifier

    classifier = ClipClassifier.load(params.classifier_dir).to(distributed.processes().device)
    if classifier.classes != classes:
        raise SynthesizeError(f"{params.classifier_dir} knows {classifier.classes}, "
                              f"the LoRA {classes}")
    probs, embeds = judge(classifier, [work / r["file"] for r in rows + probe])
    for row, p in zip(rows + probe, probs, strict=True):
        own = float(p[classes.index(row["class"])])
        row["own_class_prob"] = f"{own:.6f}"
        row["predicted"] = classes[int(p.argmax())]
        row["kept"] = int(own >= params.filter_threshold)
    real_probs, real_embeds = judge(classifier, [Path(r["path"]) for r in val_rows])
    real_predicted = [classes[int(p.argmax())] for p in real_probs]
    per_class = {}
    for cls in classes:
        judged = [r for r in rows + probe if r["class"] == cls]
        real = [pred == cls for r, pred in zip(val_rows, real_predicted, strict=True)
                if r["label"] == cls]
        if judged:
            per_class[cls] = {
                "generated": sum(r["class"] == cls for r in rows),
                "judged": len(judged),
                "consistency": float(np.mean([r["predicted"] == cls for r in judged])),
                "mean_own_prob": float(np.mean([float(r["own_class_prob"]) for r in judged])),
                "dropped": sum(1 for r in rows if r["class"] == cls and not r["kept"]),
                "real_consistency": float(np.mean(real)) if real else None,
                "real_judged": len(real),
            }
    cap = params.two_sample_max
    real_embeds = real_embeds[:cap]
    kept = np.array([bool(r["kept"]) for r in rows + probe], dtype=bool)
    kept[len(rows):] = not rows  # the probe stands in only when nothing was generated
    synth = embeds[kept][:cap]
    return {
        "per_class": per_class,
        "consistency_mean": float(np.mean([v["consistency"] for v in per_class.values()]))
        if per_class else None,
        "generated": len(rows), "kept": int(kept.sum()),
        "filter_threshold": params.filter_threshold,
        "two_sample_auroc": two_sample_auroc(real_embeds, synth, params.seed),
        "two_sample_real": len(real_embeds),
    }


# ---------------------------------------------------------------- the stage


def synthesize(params: SynthesizeParams) -> dict | None:
    """Draw, judge and write the synthetic set; returns the quality report (on the main
    process; the others draw their share and return None)."""
    state = distributed.processes()
    lora_dir = Path(params.lora_dir)
    if not (lora_dir / META_FILE).is_file():
        raise SynthesizeError(f"{lora_dir}/{META_FILE} is missing; run `dvc repro sd_lora`")
    if not Path(params.classifier_dir).is_dir():
        raise SynthesizeError(f"{params.classifier_dir} is missing; run "
                              "`dvc repro train_clip@real`")
    meta = json.loads((lora_dir / META_FILE).read_text())
    classes = meta["classes"]
    index = read_index(params.index)
    train_counts = Counter(r["label"] for r in index if r["split"] == "train")
    counts = plan_counts(params, dict(train_counts), classes)
    rows = plan(params, counts, meta["captions"])
    probe = probe_plan(params, rows, meta["captions"], classes)
    lora_sha = lora_sha256(lora_dir, meta["adapters"].values())
    work = Path(params.work_dir) / work_key(params, lora_sha, counts)
    if state.is_main_process:
        print("synthesize: " + ", ".join(f"{c} {train_counts.get(c, 0)} real + {n} synthetic"
                                         for c, n in counts.items()))
    if rows or probe:
        pipe, adapters = load_pipeline(params, meta, state.device)
        draw(pipe, adapters, rows + probe, work, params, meta["resolution"], meta["captions"],
             state.process_index, state.num_processes)
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    for row in rows:
        row |= {"steps": params.steps, "guidance": params.guidance,
                "scheduler": params.scheduler, "lora_sha256": lora_sha}
    val_rows = [r for r in index if r["split"] == "val"]
    report = quality(params, rows, probe, work, val_rows, classes) | {
        "counts": counts, "train_counts": dict(train_counts), "lora_sha256": lora_sha,
    }
    with atomic_dir(params.out_dir) as out:
        for cls in classes:
            (out / cls).mkdir()
        for row in rows:
            shutil.copyfile(work / row["file"], out / row["file"])
        with open(out / MANIFEST, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=MANIFEST_FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        grid = sample_grid(rows, probe, work, index, classes, out)
    write_json(params.metrics, report)
    log_to_sd_run(meta, report, grid, params)
    shutil.rmtree(work, ignore_errors=True)
    return report


def sample_grid(rows: list[dict], probe: list[dict], work: Path, index: list[dict],
                classes: list[str], out: Path):
    """Real next to synthetic: per class, 6 real training images then 6 synthetic ones
    (probe images for a class that got none)."""
    from pneumoclip.classifier import read_image

    lines, labels = [], []
    for cls in classes:
        real = [r["path"] for r in index if r["split"] == "train" and r["label"] == cls][:6]
        synth = [work / r["file"] for r in rows + probe if r["class"] == cls][:6]
        lines.append([read_image(p) for p in real] + [Image.open(p) for p in synth])
        labels.append(f"{cls}\nreal | synth")
    grid = make_grid(lines, labels)
    grid.save(out / "grid.png")
    return grid


def log_to_sd_run(meta: dict, report: dict, grid, params: SynthesizeParams) -> None:
    """Add the quality figures to the SD LoRA run that made the images (same store only)."""
    if meta.get("tracking_uri") != tracking.public_uri():
        print("synthesize: the SD LoRA run lives in another tracking store; not logging")
        return
    mlflow = tracking.setup(SD_EXPERIMENT)
    with mlflow.start_run(run_id=meta["run_id"]):
        flat = {"synthetic_generated": report["generated"], "synthetic_kept": report["kept"]}
        for cls, v in report["per_class"].items():
            flat |= {f"consistency_{cls}": v["consistency"], f"dropped_{cls}": v["dropped"]}
            if v["real_consistency"] is not None:
                flat[f"real_consistency_{cls}"] = v["real_consistency"]
        if report["two_sample_auroc"] is not None:
            flat["two_sample_auroc"] = report["two_sample_auroc"]
        mlflow.log_metrics(flat)
        # tags, not params: a rerun with other settings overwrites them
        mlflow.set_tags({f"synthesize.{k}": str(v)
                         for k, v in dataclasses.asdict(params).items()})
        mlflow.log_image(grid, "synthetic/grid.png")
