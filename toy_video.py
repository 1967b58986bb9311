"""A toy video world: coloured shapes that move, captions, a verifier of motion, and a tiny Wan model trained on them.

The video counterpart of toy_world.py, small enough for a CPU. It shares that world's palette, shapes, drawing and
per-frame segmentation, and asks questions only a video can answer:

  * prompts of two families: one object moving ("a red circle moving left": 4 colours x 3 shapes x 4 directions)
    and two objects moving apart or together ("a blue square and a green triangle moving apart": on one row, the
    first-named on the left), in 5 frames of 32 x 32 pixels, a fixed 20% of each family held out;
  * a verifier of a video (a list of frames): the objects are found in its first, middle and last frames by
    toy_world.find_objects, and the motion is read from the object centres in the first and last frames. It returns
    a strict 0/1 score (every requirement met) and a dense one (the fraction met), the training reward;
  * `python toy_video.py`: renders a data set of videos, trains a tiny but real WanPipeline from scratch
    (AutoencoderKLWan, WanTransformer3DModel, a UMT5 text encoder, FlowMatchEulerDiscreteScheduler) and saves it in
    the diffusers format to `tiny_wan/`, where `op_grpo.py --model tiny-video` loads it from.

The saved model loads with the stock pipeline:

    pipe = WanPipeline.from_pretrained("tiny_wan", local_files_only=True)
    frames = pipe("a red circle moving left", num_inference_steps=10, guidance_scale=1.25, height=32, width=32,
                  num_frames=FRAMES, max_sequence_length=TOKENS).frames[0]
"""

import json
import os
import random
import time
from dataclasses import dataclass, replace
from itertools import combinations, product
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
import tyro
from PIL import Image, ImageDraw

import plumbing
import toy_world
from toy_world import BACKGROUND, COLOURS, SHAPES, draw_shape, find_objects, sample_specs, warmup_cosine

# ---------------------------------------------------------------------------------------------------------
# 1. The vocabulary and the prompts.
# ---------------------------------------------------------------------------------------------------------
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # image y grows downwards
PAIR_MOTIONS = ("apart", "together")
FAMILIES = ("motion", "pair")
EVAL_MIX = {"motion": 0.5, "pair": 0.5}
HELD_OUT_FRACTION = 0.2  # of each family

SIZE = 32  # pixels per frame side
FRAMES = 5  # the VAE packs 4 frames into one after the first: 2 latent frames
TOKENS = 10  # UMT5 tokens per prompt: "a blue square and a green triangle moving apart" is 9 words + </s>


@dataclass(frozen=True)
class VideoSpec:
    """What a prompt asks for: one or two (colour, shape) objects with distinct colours, and their motion."""

    family: str
    objects: tuple  # ((colour, shape),) or ((colour, shape), (colour, shape))
    motion: str  # a DIRECTIONS key for one object, a PAIR_MOTIONS entry for two


def describe(spec: VideoSpec) -> str:
    """The caption of a spec; the only place prompts are written."""
    return " and ".join(f"a {colour} {shape}" for colour, shape in spec.objects) + f" moving {spec.motion}"


def all_specs() -> list[VideoSpec]:
    """Every prompt of the world: 48 of one object moving, 108 of a pair moving apart or together."""
    specs = [VideoSpec("motion", ((c, s),), d) for c, s, d in product(COLOURS, SHAPES, DIRECTIONS)]
    pairs = [((c1, s1), (c2, s2)) for (c1, c2), s1, s2 in product(combinations(COLOURS, 2), SHAPES, SHAPES)]
    return specs + [VideoSpec("pair", pair, m) for pair, m in product(pairs, PAIR_MOTIONS)]


def split_specs(seed: int = 0) -> tuple[list[VideoSpec], list[VideoSpec]]:
    """Fixed train / held-out split: HELD_OUT_FRACTION of each family is held out."""
    rng, train, held_out = random.Random(seed), [], []
    for family in FAMILIES:
        specs = [s for s in all_specs() if s.family == family]
        rng.shuffle(specs)
        n_held = round(HELD_OUT_FRACTION * len(specs))
        held_out += specs[:n_held]
        train += specs[n_held:]
    return train, held_out


def vocabulary() -> list[str]:
    """Every word a prompt can contain, read off the prompts themselves."""
    return sorted({w for s in all_specs() for w in describe(s).split()})


SPEC_BY_PROMPT = {describe(s): s for s in all_specs()}

# ---------------------------------------------------------------------------------------------------------
# 2. The renderer: ground-truth videos for pretraining and for testing the verifier.
# ---------------------------------------------------------------------------------------------------------
SIDE_RANGE = (8, 10)  # object side in pixels (inclusive)
TRAVEL = 12  # pixels an object moving alone travels from the first frame to the last
PAIR_TRAVEL = 4  # pixels each of a pair travels, so that their distance changes by 8
MIN_GAP = 2  # pixels between the boxes of two objects in every frame


def _paths(spec: VideoSpec, rng: random.Random) -> list[tuple[str, str, int, tuple, tuple]]:
    """Random start and end top-left corners satisfying the spec: [(colour, shape, side, start, end)]. A pair lies
    on one row, the first-named object on the left; the gap between them is `near` at their closest, `near` + 2 x
    PAIR_TRAVEL at their furthest, and they start at one and end at the other."""
    if spec.family == "motion":
        (colour, shape), side = spec.objects[0], rng.randint(*SIDE_RANGE)
        dx, dy = DIRECTIONS[spec.motion]
        x0 = rng.randint(max(0, -dx * TRAVEL), SIZE - side - max(0, dx * TRAVEL))
        y0 = rng.randint(max(0, -dy * TRAVEL), SIZE - side - max(0, dy * TRAVEL))
        return [(colour, shape, side, (x0, y0), (x0 + dx * TRAVEL, y0 + dy * TRAVEL))]
    sides, near = [rng.randint(*SIDE_RANGE) for _ in spec.objects], rng.randint(MIN_GAP + 1, MIN_GAP + 2)
    far = near + 2 * PAIR_TRAVEL
    x = rng.randint(0, SIZE - sides[0] - sides[1] - far)  # the left object's position when furthest apart
    row = rng.randint(0, SIZE - max(sides))
    apart, close = (x, x + sides[0] + far), (x + PAIR_TRAVEL, x + sides[0] + far - PAIR_TRAVEL)
    start, end = (close, apart) if spec.motion == "apart" else (apart, close)
    return [(colour, shape, side, (start[i], row), (end[i], row))
            for i, ((colour, shape), side) in enumerate(zip(spec.objects, sides))]


def render(spec: VideoSpec, rng: random.Random, frames: int = FRAMES) -> list[Image.Image]:
    """A video of `frames` frames satisfying `spec`: objects moving linearly from start to end corners."""
    for _ in range(1000):
        paths = _paths(spec, rng)
        boxes = [[_box(start, end, side, f / (frames - 1)) for _, _, side, start, end in paths] for f in range(frames)]
        inside = all(0 <= b[0] and b[2] < SIZE and 0 <= b[1] and b[3] < SIZE for frame in boxes for b in frame)
        if inside and not any(toy_world._boxes_close(*frame) for frame in boxes if len(frame) == 2):
            break
    else:
        raise RuntimeError(f"could not place {describe(spec)!r} in {SIZE}x{SIZE} pixels")
    video = []
    for frame in boxes:
        image = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
        draw = ImageDraw.Draw(image)
        for (colour, shape, *_), box in zip(paths, frame):
            draw_shape(draw, shape, box, COLOURS[colour])
        video.append(image)
    return video


def _box(start: tuple, end: tuple, side: int, t: float) -> tuple:
    x, y = (round(a + (b - a) * t) for a, b in zip(start, end))
    return (x, y, x + side - 1, y + side - 1)


# ---------------------------------------------------------------------------------------------------------
# 3. The verifier: objects in the first, middle and last frames; motion from the first and last.
# ---------------------------------------------------------------------------------------------------------
MOTION_MARGIN = 4.0  # pixels: a move (or a change of distance) smaller than this is no motion
# Box fill from which an object reads as a square. Drawn at 8-10 px, circles fill 0.75-0.81 of their box and squares
# all of it; the tiny Wan VAE rounds a circle's corners out by about a pixel (reconstructed circles 0.79-0.89, 5th to
# 95th percentile), so the image world's 0.84 fell inside the circles' range. 0.9 lies midway between the classes.
SQUARE_MIN_FILL = 0.9


def requirements(spec: VideoSpec, video: list) -> dict[str, float]:
    """Each requirement of the prompt, scored in [0, 1], objects matched to the prompt by colour. In the first,
    middle and last frames: the fraction in which each named colour is present, in which its largest object has the
    named shape, and in which no other colour appears. Then the motion: the displacement of the object's largest
    component along the named direction, or the change of the distance between the pair, at least MOTION_MARGIN."""
    frames = [find_objects(video[i], SQUARE_MIN_FILL) for i in (0, len(video) // 2, len(video) - 1)]
    largest = [{o["colour"]: o for o in sorted(objects, key=lambda o: o["area"])} for objects in frames]
    scores = {}
    for colour, shape in spec.objects:
        scores[f"{colour} present"] = np.mean([colour in big for big in largest])
        scores[f"{colour} {shape}"] = np.mean([colour in big and big[colour]["shape"] == shape for big in largest])
    named = {colour for colour, _ in spec.objects}
    scores["nothing else"] = np.mean([all(o["colour"] in named for o in objects) for objects in frames])
    first, last = largest[0], largest[-1]
    if not all(colour in first and colour in last for colour in named):
        scores["motion"] = 0.0
    elif spec.family == "motion":
        (colour, _), (dx, dy) = spec.objects[0], DIRECTIONS[spec.motion]
        (x0, y0), (x1, y1) = first[colour]["centre"], last[colour]["centre"]
        scores["motion"] = float((x1 - x0) * dx + (y1 - y0) * dy >= MOTION_MARGIN)
    else:
        (a, _), (b, _) = spec.objects
        gap = [np.hypot(*np.subtract(big[a]["centre"], big[b]["centre"])) for big in (first, last)]
        scores["motion"] = float((gap[1] - gap[0]) * (1 if spec.motion == "apart" else -1) >= MOTION_MARGIN)
    return {k: float(v) for k, v in scores.items()}


def score(spec: VideoSpec, video: list) -> tuple[float, float]:
    """(strict, dense): strict is 1 only if every requirement is met; dense is their mean."""
    scores = requirements(spec, video)
    return float(all(v == 1.0 for v in scores.values())), sum(scores.values()) / len(scores)


def score_prompt(prompt: str, video: list) -> tuple[float, float]:
    """`score` for a caption of this world; a prompt from elsewhere is a clear error."""
    if prompt not in SPEC_BY_PROMPT:
        raise ValueError(f"{prompt!r} is not a prompt of the toy video world (see toy_video.all_specs)")
    return score(SPEC_BY_PROMPT[prompt], video)


# ---------------------------------------------------------------------------------------------------------
# 3b. The world as an RL task: rewards of whole videos, evaluation prompts (used by op_grpo.py).
# ---------------------------------------------------------------------------------------------------------
def motion_reward(videos: list, prompts: list[str]) -> torch.Tensor:
    """The dense score as a reward: the fraction of the prompt's requirements met, (B,)."""
    return torch.tensor([score_prompt(p, v)[1] for v, p in zip(videos, prompts)])


def motion_strict_reward(videos: list, prompts: list[str]) -> torch.Tensor:
    """The strict 0/1 score as a reward: 1 only if every requirement is met."""
    return torch.tensor([score_prompt(p, v)[0] for v, p in zip(videos, prompts)])


def eval_prompts(per_family: int, only: set | None = None, seed: int = 1234) -> dict[str, list[str]]:
    """The fixed evaluation prompts: per_family prompts per family, for the held-out and the training set."""
    train, held_out = split_specs()
    rng, sets = random.Random(seed), {}
    for name, specs in (("held_out", held_out), ("train", train)):
        pools = [[s for s in specs if s.family == f and (only is None or describe(s) in only)] for f in FAMILIES]
        sets[name] = [describe(rng.choice(pool)) for pool in pools if pool for _ in range(per_family)]
    return sets


def score_by_family(prompts: list[str], videos: list) -> tuple[dict, dict]:
    """Per-video (strict, dense) scores grouped by family: two dicts family -> list of scores."""
    strict, dense = {}, {}
    for prompt, video in zip(prompts, videos):
        family, (s, d) = SPEC_BY_PROMPT[prompt].family, score_prompt(prompt, video)
        strict.setdefault(family, []).append(s)
        dense.setdefault(family, []).append(d)
    return strict, dense


def requirement_kind(key: str) -> str:
    """The kind of a `requirements` key: "red present" -> present, "red circle" -> shape, else the key itself."""
    return key if key in ("nothing else", "motion") else "present" if key.endswith(" present") else "shape"


def requirement_rates(prompts: list[str], videos: list) -> dict[str, float]:
    """The fraction of videos meeting each kind of requirement in full: every named colour present in the checked
    frames, every object of its named shape there, no other colour, and the motion. Beside strict accuracy it shows
    which requirement a change comes from (the motion, or a shape misread in one frame)."""
    met = {"present": [], "shape": [], "nothing else": [], "motion": []}
    for prompt, video in zip(prompts, videos):
        scores = requirements(SPEC_BY_PROMPT[prompt], video)
        for kind in met:
            met[kind].append(all(v == 1.0 for k, v in scores.items() if requirement_kind(k) == kind))
    return {kind: float(np.mean(v)) for kind, v in met.items()}


# ---------------------------------------------------------------------------------------------------------
# 4. Building the tiny Wan pipeline: tokenizer, configs, training, saving.
# ---------------------------------------------------------------------------------------------------------
@dataclass
class BuildArgs:
    """Render the toy video data set, train a tiny WanPipeline from scratch and save it."""

    output_dir: str = "tiny_wan"
    """where the diffusers-format pipeline, its build report and sample strips are written"""
    seed: int = 0
    """seed for data, initialisation and training (the build is deterministic for a given thread count)"""
    num_videos: int = 6000
    """rendered training videos"""
    vae_steps: int = 2400
    """AutoencoderKLWan optimisation steps (batch 8)"""
    vae_lr: float = 2e-3
    """the VAE's AdamW learning rate (warm-up, then cosine decay)"""
    object_weight: float = 4.0
    """extra weight of pixels away from the background in the VAE's loss (toy_world.train_vae)"""
    latent_channels: int = 16
    """the VAE's z_dim: each latent pixel stands for --time-factor frames x 4 x 4 pixels"""
    time_factor: Literal[2, 4] = 4
    """the VAE's compression in time after the first frame (Wan's: 4; 5 frames -> 2 or 3 latent frames). Not 1:
    WanPipeline then rounds 5 frames up to 6"""
    transformer_steps: int = 6000
    """Wan transformer (and UMT5 encoder) flow-matching steps (batch 32)"""
    eval_per_family: int = 64
    """videos per family and per prompt set (train / held-out) for the base model's report"""
    guidance_scale: float = 1.25
    """classifier-free guidance of the report's and the sample strip's videos (--model tiny-video's preset; 10% of
    captions are dropped in training, so any scale works)"""
    num_layers: int = 4
    """transformer blocks"""
    num_heads: int = 12
    """attention heads of width 16 (the transformer's width is 16 x heads, its FFN twice that)"""
    threads: int = 2
    """torch CPU threads"""
    report_only: bool = False
    """train nothing: evaluate the pipeline already in --output-dir at --guidance-scale and rewrite its build report's
    evaluation and sample strip (the build's other settings, losses and seconds stay)"""
    vae_from: str | None = None
    """reuse the trained VAE (and its latent mean and std) of an earlier build's folder instead of training one; its
    channels and time factor replace --latent-channels and --time-factor"""


def build_tokenizer():
    """A T5 tokenizer (what Wan's UMT5 reads) made in memory from this world's words: one token per word."""
    from transformers import T5Tokenizer

    words = [("\u2581" + w, -1.0) for w in vocabulary()]  # "\u2581" marks a word start, as in SentencePiece
    return T5Tokenizer(vocab=[("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + words)


def build_pipeline(args: BuildArgs, tokenizer):
    """Randomly initialised components of a WanPipeline, sized for a CPU: a VAE that downsamples 4x in space and 4x
    in time after the first frame (5 frames of 32 px -> 16 x 2 x 8 x 8 latents), a transformer on 2 x 2 patches (32
    tokens), a 2-layer UMT5 of width 32."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(args.seed)
    z = args.latent_channels
    in_time = [False, True] if args.time_factor == 2 else [True, True]  # halve the frames in one stage or in both
    vae = AutoencoderKLWan(base_dim=16, z_dim=z, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=in_time,
                           latents_mean=[0.0] * z, latents_std=[1.0] * z, scale_factor_temporal=args.time_factor,
                           scale_factor_spatial=4)
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=args.num_heads, attention_head_dim=16,
                                        in_channels=z, out_channels=z, text_dim=32, freq_dim=64,
                                        ffn_dim=32 * args.num_heads,
                                        num_layers=args.num_layers, rope_max_seq_len=32)
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                               num_heads=4, relative_attention_num_buckets=8, dropout_rate=0.0))
    # shift 1: at 8 x 8 latents the picture is gone early in the noise schedule already (as the tiny SD3)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    return WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae,
                       scheduler=scheduler)


def to_tensor(videos: list[list[Image.Image]]) -> torch.Tensor:
    """Videos of PIL frames -> (N, 3, F, H, W) in [-1, 1], the VAE's input."""
    array = np.stack([np.stack([np.asarray(f, dtype=np.float32) for f in v]) for v in videos]) / 127.5 - 1.0
    return torch.from_numpy(array).permute(0, 4, 1, 2, 3).contiguous()


def to_videos(x: torch.Tensor) -> list[list[Image.Image]]:
    """(N, 3, F, H, W) in [-1, 1] -> videos of PIL frames (the inverse of to_tensor, rounded to 8 bits)."""
    array = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1).numpy()
    return [[Image.fromarray(frame) for frame in video] for video in array]


def train_transformer(pipe, latents, prompts, steps, generator) -> list[float]:
    """Rectified flow as toy_world.train_transformer: x_sigma = (1 - sigma) x0 + sigma eps, target eps - x0,
    logit-normal sigma, 10% of captions dropped for guidance, the EMA of the weights saved; UMT5 trains along."""
    params = [p for m in (pipe.transformer, pipe.text_encoder) for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    schedule = warmup_cosine(optimizer, steps, warmup=100)
    ema, losses = [p.detach().clone() for p in params], []
    for step in range(steps):
        index = torch.randint(len(latents), (32,), generator=generator)
        x0 = latents[index]
        batch_prompts = [prompts[i] if torch.rand(1, generator=generator).item() > 0.1 else "" for i in index.tolist()]
        sigma = torch.sigmoid(torch.randn(len(x0), generator=generator))
        noise = torch.randn(x0.shape, generator=generator)
        x_sigma = (1 - sigma.view(-1, 1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1, 1) * noise
        embeds = pipe.encode_prompt(batch_prompts, do_classifier_free_guidance=False, max_sequence_length=TOKENS)[0]
        v = pipe.transformer(x_sigma, timestep=sigma * 1000, encoder_hidden_states=embeds).sample
        loss = F.mse_loss(v, noise - x0)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            for e, p in zip(ema, params):
                e.lerp_(p, 1 - min(0.999, (1 + step) / (10 + step)))
        losses.append(loss.item())
        if step % 250 == 0 or step == steps - 1:
            print(f"  transformer step {step:5d}  loss {np.mean(losses[-250:]):.4f}", flush=True)
    with torch.no_grad():
        for e, p in zip(ema, params):
            p.copy_(e)
    return losses


@torch.no_grad()
def generate(pipe, prompts: list[str], seed: int, guidance: float = 1.0) -> list[list[Image.Image]]:
    """The stock pipeline's videos (ODE, 10 steps), 32 at a time."""
    videos = []
    for start in range(0, len(prompts), 32):
        videos += pipe(prompts[start : start + 32], num_inference_steps=10, guidance_scale=guidance, height=SIZE,
                       width=SIZE, num_frames=FRAMES, max_sequence_length=TOKENS, output_type="pil",
                       generator=torch.Generator().manual_seed(seed + start)).frames
    return videos


def evaluate_pipeline(pipe, specs: list[VideoSpec], n: int, seed: int, guidance: float = 1.0) -> dict:
    """Strict and dense scores of the stock pipeline on n prompts per family, and their EVAL_MIX mean."""
    rng, report = random.Random(seed), {}
    for family in FAMILIES:
        chosen = [rng.choice([s for s in specs if s.family == family]) for _ in range(n)]
        videos = generate(pipe, [describe(s) for s in chosen], seed, guidance)
        scores = np.array([score(s, v) for s, v in zip(chosen, videos)])
        report[family] = {"strict": float(scores[:, 0].mean()), "dense": float(scores[:, 1].mean()), "n": n}
    report["mix"] = {k: sum(EVAL_MIX[f] * report[f][k] for f in FAMILIES) for k in ("strict", "dense")}
    return report


def frame_strips(prompts: list[str], videos: list, path: str, every: int = 2, zoom: int = 3, titles=None) -> None:
    """A PNG of videos, one row each: frames 0, every, 2 every, ... side by side, captioned with the prompt, the
    (strict, dense) score and an optional title per row."""
    labels = [(f"{titles[i]}: " if titles else "") + f"{p}  [{s:.0f} | {d:.2f}]"
              for i, (p, (s, d)) in enumerate(zip(prompts, map(score_prompt, prompts, videos)))]
    plumbing.frame_rows([[(label, v[::every])] for label, v in zip(labels, videos)], path, zoom=zoom)


def build(args: BuildArgs) -> dict:
    torch.set_num_threads(args.threads)
    reused = None
    if args.vae_from:  # the reused VAE fixes the latents' channels and frames
        from diffusers import AutoencoderKLWan

        reused = AutoencoderKLWan.from_pretrained(args.vae_from, subfolder="vae")
        args = replace(args, latent_channels=reused.config.z_dim, time_factor=reused.config.scale_factor_temporal)
    start = time.time()
    rng, generator = random.Random(args.seed), torch.Generator().manual_seed(args.seed)
    train_specs, _ = split_specs()

    print(f"[1/5] rendering {args.num_videos} training videos", flush=True)
    specs = sample_specs(train_specs, EVAL_MIX, args.num_videos, rng)
    pixels, prompts = to_tensor([render(s, rng) for s in specs]), [describe(s) for s in specs]
    pipe = build_pipeline(args, build_tokenizer())
    n_params = {name: sum(p.numel() for p in getattr(pipe, name).parameters())
                for name in ("vae", "transformer", "text_encoder")}
    print(f"      parameters: {n_params}", flush=True)

    if args.vae_from:
        print(f"[2/5] reusing the VAE of {args.vae_from}", flush=True)
        pipe.register_modules(vae=reused)
    else:
        print(f"[2/5] training the VAE for {args.vae_steps} steps", flush=True)
        toy_world.train_vae(pipe.vae, pixels, args.vae_steps, generator, batch_size=8, held=64, lr=args.vae_lr,
                            object_weight=args.object_weight)
    with torch.no_grad():  # MSE and the verifier on reconstructions: the most a transformer on these latents can score
        recon = pipe.vae.decode(pipe.vae.encode(pixels[-64:]).latent_dist.mode()).sample
    vae_mse = F.mse_loss(recon, pixels[-64:]).item()
    recon_scores = np.array([score(s, v) for s, v in zip(specs[-64:], to_videos(recon))]).mean(axis=0)
    print(f"      reconstruction MSE on held videos: {vae_mse:.5f}, strict/dense {recon_scores[0]:.2f}/"
          f"{recon_scores[1]:.2f}", flush=True)

    print("[3/5] encoding the data set and fitting the latents' mean and std per channel", flush=True)
    with torch.no_grad():
        raw = torch.cat([pipe.vae.encode(pixels[i : i + 256]).latent_dist.mode() for i in range(0, len(pixels), 256)])
    if args.vae_from:  # the reused VAE's own statistics, saved with it
        mean, std = torch.tensor(pipe.vae.config.latents_mean), torch.tensor(pipe.vae.config.latents_std)
    else:
        mean, std = raw.mean(dim=(0, 2, 3, 4)), raw.std(dim=(0, 2, 3, 4))
        pipe.vae.register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist())  # decoded as x * std + mean
    latents = (raw - mean.view(1, -1, 1, 1, 1)) / std.view(1, -1, 1, 1, 1)

    print(f"[4/5] training the transformer and text encoder for {args.transformer_steps} steps", flush=True)
    losses = train_transformer(pipe, latents, prompts, args.transformer_steps, generator)

    print("[5/5] evaluating the base model and saving", flush=True)
    os.makedirs(args.output_dir, exist_ok=True)
    pipe.save_pretrained(args.output_dir)
    report = {"vae_reconstruction_mse": vae_mse, "vae_reconstruction_strict_dense": recon_scores.tolist(),
              "flow_loss_last_250_steps": float(np.mean(losses[-250:])), "parameters": n_params, "args": vars(args)}
    return report_base(pipe, args, report, start)


def report_base(pipe, args: BuildArgs, report: dict, start: float) -> dict:
    """The base model's strict and dense scores at --guidance-scale on both prompt sets, and a strip of its samples,
    added to `report` and written to <output-dir>/build_report.json."""
    train_specs, held_out = split_specs()
    pipe.set_progress_bar_config(disable=True)
    report["held_out"] = evaluate_pipeline(pipe, held_out, args.eval_per_family, 1, args.guidance_scale)
    report["train"] = evaluate_pipeline(pipe, train_specs, args.eval_per_family, 2, args.guidance_scale)
    shown = [describe(random.Random(3 + i).choice([s for s in held_out if s.family == f]))
             for f in FAMILIES for i in range(4)]
    strip = os.path.join(args.output_dir, "base_samples.png")
    frame_strips(shown, generate(pipe, shown, 3, args.guidance_scale), strip)
    report["args"]["guidance_scale"] = args.guidance_scale
    report["build_seconds" if not args.report_only else "report_seconds"] = time.time() - start
    with open(os.path.join(args.output_dir, "build_report.json"), "w") as f:
        json.dump(report, f, indent=2)
    for split in ("held_out", "train"):
        print(f"      {split:8s} strict/dense: " + "  ".join(f"{f} {v['strict']:.2f}/{v['dense']:.2f}"
                                                           for f, v in report[split].items()))
    print(f"      saved to {args.output_dir}/ in {time.time() - start:.0f} s")
    return report


def report_again(args: BuildArgs) -> dict:
    """--report-only: report_base for the pipeline already in --output-dir, keeping the rest of its report."""
    from diffusers import WanPipeline

    torch.set_num_threads(args.threads)
    with open(os.path.join(args.output_dir, "build_report.json")) as f:
        report = json.load(f)
    print(f"evaluating {args.output_dir}/ at guidance {args.guidance_scale}", flush=True)
    pipe = WanPipeline.from_pretrained(args.output_dir, local_files_only=True)
    return report_base(pipe, args, report, time.time())


if __name__ == "__main__":
    cli = tyro.cli(BuildArgs)
    report_again(cli) if cli.report_only else build(cli)
