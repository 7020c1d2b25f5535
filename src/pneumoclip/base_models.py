"""`base_models` stage: put the SD and CLIP bases into `models/base/{sd,clip}`.

Each is a Hugging Face repo id (downloaded once, then saved locally), a local folder in
`save_pretrained` / hub layout, or `tiny`: the shipped pretrained tiny bases in `tiny_dir`
(made by `pneumoclip pretrain`). All three load through the very same `from_pretrained`
calls, in float32. `tiny-random` builds the tiny architecture instead, random-init from a
seed, for unit tests: the real classes (CLIPModel, UNet2DConditionModel, AutoencoderKL,
CLIPTextModel, CLIPTokenizer), small enough for a CPU. Every base is saved in
`save_pretrained` form, so every later stage loads it as it would a hub model.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch

from pneumoclip.config import (
    TINY,
    TINY_RANDOM,
    BaseModelSource,
    BaseModelsParams,
    TinyClip,
    TinySD,
)
from pneumoclip.fsutil import atomic_dir

# Words the tiny tokenizer learns as whole tokens. Any other text still tokenizes (down to
# single bytes, as in CLIP's own BPE), it just takes more tokens.
TOKENIZER_CORPUS = """
a an the of with and or no in on at to for from showing shows chest x-ray xray x ray radiograph
radiography photo image scan film frontal pa ap view of lungs lung pediatric child children
kid infant patient normal healthy clear clean unremarkable bacteria bacterial virus viral
pneumonia infection infected lobar consolidation focal dense opacity opacities interstitial
diffuse patchy bilateral perihilar infiltrates infiltrate streaky hazy airspace disease
effusion pleural right left upper lower middle lobe heart mediastinum ribs diaphragm
sign signs finding findings typical pattern of case
""".split()
SPECIAL = ("<|startoftext|>", "<|endoftext|>")


# ---------------------------------------------------------------- tokenizer


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte to printable-character map."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def learn_bpe(words: list[str]) -> list[tuple[str, str]]:
    """Plain BPE training, CLIP style (`</w>` marks a word's end), until each word is one token.

    Encoding merges by rank reproduces training, so every corpus word becomes a single id.
    """
    byte_map = bytes_to_unicode()
    freq = Counter(words)
    splits = {}
    for word in freq:
        symbols = [byte_map[b] for b in word.encode("utf-8")]
        symbols[-1] += "</w>"
        splits[word] = symbols
    merges: list[tuple[str, str]] = []
    while True:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, symbols in splits.items():
            for pair in zip(symbols, symbols[1:], strict=False):
                pairs[pair] += freq[word]
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))  # deterministic tie-break
        merges.append(best)
        for word, symbols in splits.items():
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            splits[word] = merged


def build_tokenizer(out_dir: Path, max_length: int):
    """A real CLIPTokenizer whose vocabulary is learnt from TOKENIZER_CORPUS."""
    from transformers import CLIPTokenizer

    chars = list(bytes_to_unicode().values())
    merges = learn_bpe([w for text in TOKENIZER_CORPUS for w in text.split("-") if w])
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + list(SPECIAL)
    raw = out_dir / "_bpe"
    raw.mkdir(parents=True)
    (raw / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (raw / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges))
    tokenizer = CLIPTokenizer(
        str(raw / "vocab.json"), str(raw / "merges.txt"),
        pad_token="<|endoftext|>", model_max_length=max_length,
    )
    tokenizer.save_pretrained(out_dir)
    for f in raw.iterdir():
        f.unlink()
    raw.rmdir()
    return tokenizer


def token_ids(tokenizer) -> dict[str, int]:
    """bos/eos/pad ids for the text config; CLIP pools at the first eos token."""
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "vocab_size": len(tokenizer),
    }


# ---------------------------------------------------------------- tiny models


def build_tiny_clip(cfg: TinyClip, seed: int, out: Path) -> None:
    from transformers import (
        CLIPConfig,
        CLIPImageProcessorPil,
        CLIPModel,
        CLIPProcessor,
        CLIPTextConfig,
        CLIPVisionConfig,
    )

    tokenizer = build_tokenizer(out / "_tok", cfg.max_text_len)
    text = CLIPTextConfig(
        hidden_size=cfg.text_hidden, intermediate_size=4 * cfg.text_hidden,
        num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.heads,
        max_position_embeddings=cfg.max_text_len, projection_dim=cfg.projection_dim,
        **token_ids(tokenizer),
    )
    vision = CLIPVisionConfig(
        hidden_size=cfg.vision_hidden, intermediate_size=4 * cfg.vision_hidden,
        num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.heads,
        image_size=cfg.image_size, patch_size=cfg.patch_size, projection_dim=cfg.projection_dim,
    )
    config = CLIPConfig(
        text_config=text.to_dict(), vision_config=vision.to_dict(),
        projection_dim=cfg.projection_dim,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config)
    model.save_pretrained(out)
    size = cfg.image_size
    image_processor = CLIPImageProcessorPil(  # PIL backend: no torchvision here
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    for f in (out / "_tok").iterdir():
        f.unlink()
    (out / "_tok").rmdir()


def build_tiny_sd(cfg: TinySD, seed: int, out: Path) -> None:
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tokenizer(out / "_tok", cfg.max_text_len)
    n_unet = len(cfg.unet_channels)
    n_vae = len(cfg.vae_channels)
    latent_size = cfg.resolution // 2 ** (n_vae - 1)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=cfg.latent_channels, out_channels=cfg.latent_channels,
        block_out_channels=tuple(cfg.unet_channels), layers_per_block=1,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n_unet - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n_unet - 1) + ("UpBlock2D",),
        cross_attention_dim=cfg.text_hidden, attention_head_dim=cfg.heads,
        norm_num_groups=min(32, cfg.unet_channels[0]),
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=cfg.latent_channels,
        block_out_channels=tuple(cfg.vae_channels), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * n_vae,
        up_block_types=("UpDecoderBlock2D",) * n_vae,
        norm_num_groups=min(32, cfg.vae_channels[0]), sample_size=cfg.resolution,
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=cfg.text_hidden, intermediate_size=4 * cfg.text_hidden,
            num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.heads,
            max_position_embeddings=cfg.max_text_len, **token_ids(tokenizer),
        )
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=cfg.train_timesteps, beta_schedule="scaled_linear",
        beta_start=0.00085, beta_end=0.012, clip_sample=False, steps_offset=1,
    )
    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipeline.save_pretrained(out)
    for f in (out / "_tok").iterdir():
        f.unlink()
    (out / "_tok").rmdir()


# ---------------------------------------------------------------- hub models


def is_folder(source: BaseModelSource) -> bool:
    """A `source` that names an existing folder is a local base, not a hub id."""
    return Path(source.source).is_dir()


def _revision(source: BaseModelSource) -> str | None:
    return None if is_folder(source) else source.revision  # a folder has no revisions


def fetch_hub_clip(source: BaseModelSource, out: Path) -> None:
    """A hub id or a local folder in hub layout, through the same `from_pretrained` calls.

    A folder loads with `local_files_only`, which the saved tokenizer config records: the
    output is then the same bytes whether or not HF_HUB_OFFLINE is set (a stage's output must
    not depend on the environment, or a fresh machine's dvc.lock differs)."""
    from transformers import CLIPModel, CLIPProcessor

    revision, local = _revision(source), is_folder(source)
    model = CLIPModel.from_pretrained(source.source, revision=revision, dtype=torch.float32)
    model.save_pretrained(out)
    CLIPProcessor.from_pretrained(source.source, revision=revision,
                                  local_files_only=local).save_pretrained(out)


def fetch_hub_sd(source: BaseModelSource, out: Path) -> None:
    """A hub id or a local folder in hub layout, through the same `from_pretrained` calls."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    local = is_folder(source)  # see fetch_hub_clip
    tokenizer = CLIPTokenizer.from_pretrained(source.source, subfolder="tokenizer",
                                              revision=_revision(source), local_files_only=local)
    pipeline = StableDiffusionPipeline.from_pretrained(
        source.source, revision=_revision(source), safety_checker=None,
        requires_safety_checker=False, dtype=torch.float32, local_files_only=local,
        tokenizer=tokenizer,
    )
    pipeline.save_pretrained(out)


# ---------------------------------------------------------------- the stage


def build_base_models(params: BaseModelsParams) -> None:
    """Write models/base/{clip,sd} atomically; a failure keeps the previous ones."""
    out_root = Path(params.out_dir)
    with atomic_dir(out_root) as out:
        for name, source in (("clip", params.clip), ("sd", params.sd)):
            target = out / name
            target.mkdir()
            if source.source == TINY_RANDOM:
                print(f"base_models: building random-init tiny {name} from seed {params.seed}")
                if name == "clip":
                    build_tiny_clip(params.tiny_clip, params.seed, target)
                else:
                    build_tiny_sd(params.tiny_sd, params.seed, target)
            elif source.source == TINY:
                shipped = Path(params.tiny_dir) / name
                if not shipped.is_dir():
                    raise FileNotFoundError(
                        f"base_models: no pretrained tiny {name} in {shipped}; make it with "
                        f"`pneumoclip pretrain` (docs/pipeline.md) or use {TINY_RANDOM!r}")
                print(f"base_models: installing the pretrained tiny {name} from {shipped}")
                folder = BaseModelSource(source=str(shipped), revision=source.revision)
                (fetch_hub_clip if name == "clip" else fetch_hub_sd)(folder, target)
            else:
                where = ("folder " + source.source if is_folder(source)
                         else f"{source.source}@{source.revision}")
                print(f"base_models: loading {name} from {where}")
                (fetch_hub_clip if name == "clip" else fetch_hub_sd)(source, target)
            record = {"source": source.source, "revision": source.revision}
            if source.source == TINY:  # which pretraining made it
                manifest = json.loads((Path(params.tiny_dir) / "manifest.json").read_text())
                record["pretrain_images_sha256"] = manifest["images_sha256"]
            (target / "pneumoclip_source.json").write_text(json.dumps(record, indent=2))
