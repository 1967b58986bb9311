"""A toy GenEval world: coloured shapes, captions, a verifier, and a tiny SD3 model trained on them.

OP-GRPO is about fine-tuning Stable Diffusion 3.5 with rewards such as GenEval (Ghosh et al., 2023,
arXiv 2310.11513), which checks object counts, colours and positions in generated images. This file is
a world small enough for a CPU where the same questions can be asked:

  * a vocabulary (colours, shapes, counts, relations) that everything else reads: the prompts, the
    renderer that draws ground-truth scenes, the verifier that scores images, and the tokenizer;
  * GenEval-like prompt families: single objects, counting, two objects with colour binding, and
    relative position, split into training and held-out prompts;
  * a verifier that segments an image by colour and returns a strict 0/1 score (as GenEval scores) and a
    dense partial-credit score (the fraction of the prompt's requirements met), usable as an RL reward;
  * `python toy_world.py`: renders a data set, trains a tiny but real StableDiffusion3Pipeline from scratch
    (AutoencoderKL, SD3Transformer2DModel, two CLIP text encoders, FlowMatchEulerDiscreteScheduler) and
    saves it in the diffusers format to `tiny_sd3/`, where `op_grpo.py` loads it from.

The saved model loads with the stock pipeline:

    pipe = StableDiffusion3Pipeline.from_pretrained("tiny_sd3", text_encoder_3=None, tokenizer_3=None,
                                                    local_files_only=True)
    image = pipe("two red circles", num_inference_steps=10, guidance_scale=1.0,
                 max_sequence_length=T5_TOKENS, height=32, width=32).images[0]

There is no T5 encoder: with `text_encoder_3=None` the pipeline fills the T5 slots with zeros, and
`max_sequence_length=T5_TOKENS` (0) keeps that block empty, as it was during training.
"""

import json
import math
import os
import random
import time
from dataclasses import dataclass
from itertools import permutations, product

import numpy as np
import torch
import torch.nn.functional as F
import tyro
from PIL import Image, ImageDraw

# ---------------------------------------------------------------------------------------------------------
# 1. The vocabulary: the one place that defines the world.
# ---------------------------------------------------------------------------------------------------------
COLOURS = {  # name -> RGB; far apart so that the nearest-palette classification is unambiguous
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 70, 220),
    "yellow": (235, 205, 30),
}
BACKGROUND = (240, 240, 235)
SHAPES = ("circle", "square", "triangle")
COUNT_WORDS = {"two": 2, "three": 3}  # a single object is "a <colour> <shape>"
RELATIONS = ("left of", "right of", "above", "below")
FAMILIES = ("single", "counting", "binding", "position")

IMAGE_SIZE = 32  # pixels; the VAE downsamples by 4, so latents are 4 x 8 x 8
T5_TOKENS = 0  # no T5 encoder and no zero-filled T5 slots (see the module docstring)
CLIP_TOKENS = 12  # "<bos> a green triangle left of a yellow square <eos>" is 10 tokens

# Family mixtures. The base model is strong on single objects and weak on position, so both the
# evaluation mix and the training mix lean towards families it can partly do; a mix where most groups
# score all zeros gives GRPO no signal (shared calibration notes, last section).
EVAL_MIX = {"single": 0.2, "counting": 0.3, "binding": 0.3, "position": 0.2}
PRETRAIN_MIX = {"single": 0.15, "counting": 0.25, "binding": 0.3, "position": 0.3}
HELD_OUT_FRACTION = 0.2  # of the counting, binding and position prompts; single objects are all trained on


@dataclass(frozen=True)
class Spec:
    """What a prompt asks for: objects as (colour, shape, count) and an optional relation between two."""

    family: str
    objects: tuple  # ((colour, shape, count), ...), one or two entries with distinct colours
    relation: str | None = None  # one of RELATIONS, read as "objects[0] <relation> objects[1]"


def plural(shape: str, count: int) -> str:
    return shape + ("s" if count > 1 else "")


def describe(spec: Spec) -> str:
    """The caption of a spec; the only place prompts are written."""
    words = []
    for colour, shape, count in spec.objects:
        number = "a" if count == 1 else next(w for w, n in COUNT_WORDS.items() if n == count)
        words.append(f"{number} {colour} {plural(shape, count)}")
    joiner = f" {spec.relation} " if spec.relation else " and "
    return joiner.join(words)


def all_specs() -> list[Spec]:
    """Every prompt of the world: 12 single, 24 counting, 108 binding, 432 position."""
    specs = [Spec("single", ((c, s, 1),)) for c, s in product(COLOURS, SHAPES)]
    specs += [Spec("counting", ((c, s, n),)) for n, c, s in product(COUNT_WORDS.values(), COLOURS, SHAPES)]
    pairs = [((c1, s1, 1), (c2, s2, 1)) for (c1, c2), s1, s2 in product(permutations(COLOURS, 2), SHAPES, SHAPES)]
    specs += [Spec("binding", pair) for pair in pairs]
    specs += [Spec("position", pair, rel) for rel, pair in product(RELATIONS, pairs)]
    return specs


def split_specs(seed: int = 0) -> tuple[list[Spec], list[Spec]]:
    """Fixed train / held-out split: HELD_OUT_FRACTION of each compositional family is held out."""
    rng = random.Random(seed)
    train, held_out = [], []
    for family in FAMILIES:
        specs = [s for s in all_specs() if s.family == family]
        rng.shuffle(specs)
        n_held = 0 if family == "single" else round(HELD_OUT_FRACTION * len(specs))
        held_out += specs[:n_held]
        train += specs[n_held:]
    return train, held_out


def sample_specs(specs: list[Spec], mix: dict[str, float], n: int, rng: random.Random) -> list[Spec]:
    """n specs: a family drawn from `mix`, then a spec of that family drawn uniformly."""
    by_family = {f: [s for s in specs if s.family == f] for f in mix}
    families = rng.choices(list(mix), weights=list(mix.values()), k=n)
    return [rng.choice(by_family[f]) for f in families]


def vocabulary() -> list[str]:
    """Every word a prompt can contain, read off the prompts themselves."""
    return sorted({w for s in all_specs() for w in describe(s).split()})


# ---------------------------------------------------------------------------------------------------------
# 2. The renderer: ground-truth scenes for pretraining and for testing the verifier.
# ---------------------------------------------------------------------------------------------------------
SIZE_RANGE = (8, 12)  # object side in pixels (inclusive)
MIN_GAP = 2  # pixels between the boxes of two objects, so that they never touch
RELATION_MARGIN = 3  # pixels: "A left of B" means B's centre is at least this far right of A's


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple, colour: tuple) -> None:
    x0, y0, x1, y1 = box  # inclusive pixel box
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:  # an upright triangle filling its box: area about half the box, the verifier's cue
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=colour)


def relation_holds(relation: str, a: tuple, b: tuple, margin: float = RELATION_MARGIN) -> bool:
    """Does centre a stand in `relation` to centre b? Centres are (x, y) with y growing downwards."""
    dx, dy = b[0] - a[0], b[1] - a[1]
    return {"left of": dx, "right of": -dx, "above": dy, "below": -dy}[relation] >= margin


def render(spec: Spec, rng: random.Random, size: int = IMAGE_SIZE) -> Image.Image:
    """Draw a scene that satisfies `spec` by rejection sampling of random sizes and positions."""
    for _ in range(1000):
        boxes = []
        for colour, shape, count in spec.objects:
            for _ in range(count):
                side = rng.randint(*SIZE_RANGE)
                x, y = rng.randint(0, size - side), rng.randint(0, size - side)
                boxes.append((colour, shape, (x, y, x + side - 1, y + side - 1)))
        if any(_boxes_close(a[2], b[2]) for i, a in enumerate(boxes) for b in boxes[i + 1 :]):
            continue
        if spec.relation and not relation_holds(spec.relation, _centre(boxes[0][2]), _centre(boxes[1][2])):
            continue
        image = Image.new("RGB", (size, size), BACKGROUND)
        draw = ImageDraw.Draw(image)
        for colour, shape, box in boxes:
            draw_shape(draw, shape, box, COLOURS[colour])
        return image
    raise RuntimeError(f"could not place the objects of {describe(spec)!r} in {size}x{size} pixels")


def _centre(box: tuple) -> tuple:
    return ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)


def _boxes_close(a: tuple, b: tuple) -> bool:
    return not (a[2] + MIN_GAP < b[0] or b[2] + MIN_GAP < a[0] or a[3] + MIN_GAP < b[1] or b[3] + MIN_GAP < a[1])


# ---------------------------------------------------------------------------------------------------------
# 3. The verifier: colour segmentation, connected components, shape from box fill, centroid order.
# ---------------------------------------------------------------------------------------------------------
MIN_AREA = 6  # components smaller than this (in pixels at 32 px) are noise, not objects
MAX_COLOUR_DISTANCE = 110.0  # RGB distance beyond which a pixel belongs to no palette colour
TRIANGLE_MAX_TAPER = 0.55  # width of the top third / bottom third: upright triangles ~0.2-0.5, others ~1
SQUARE_MIN_FILL = 0.84  # area / box area: circles ~0.70-0.83, squares 0.85-1 (also after the VAE's blur)

_PALETTE = np.array([BACKGROUND] + list(COLOURS.values()), dtype=np.float32)  # (5, 3)
_COLOUR_NAMES = list(COLOURS)


def find_objects(image, square_min_fill: float = SQUARE_MIN_FILL) -> list[dict]:
    """Segment an RGB image (PIL or uint8 array H x W x 3) into objects: colour, shape, area, box centre.

    Each pixel takes the nearest palette colour (or none, past MAX_COLOUR_DISTANCE); 4-connected
    components of one colour are objects. Shape: an upright triangle narrows towards its top (the top
    third of its rows is much narrower than the bottom third); otherwise a square fills its bounding box
    and a circle about pi/4 of it (a fill of square_min_fill or more reads as a square). Coordinates are rescaled to
    a 32-pixel canvas.
    """
    pixels = np.asarray(image, dtype=np.float32)[..., :3]
    h, w, _ = pixels.shape
    distance = np.linalg.norm(pixels[:, :, None, :] - _PALETTE[None, None], axis=-1)  # (H, W, 5)
    label = distance.argmin(-1)  # 0 = background, 1.. = COLOURS in order
    label[distance.min(-1) > MAX_COLOUR_DISTANCE] = 0
    seen = np.zeros((h, w), dtype=bool)
    area_scale = (IMAGE_SIZE / h) * (IMAGE_SIZE / w)
    objects = []
    for y0, x0 in zip(*np.nonzero(label)):
        if seen[y0, x0]:
            continue
        colour_index = label[y0, x0]
        stack, ys, xs = [(y0, x0)], [], []
        seen[y0, x0] = True
        while stack:  # flood fill of one component
            y, x = stack.pop()
            ys.append(y)
            xs.append(x)
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and not seen[ny, nx] and label[ny, nx] == colour_index:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        area = len(ys)
        if area * area_scale < MIN_AREA:
            continue
        ys, xs = np.array(ys), np.array(xs)
        top, bottom = ys.min(), ys.max()
        third = max(1, (bottom - top + 1) // 3)
        taper = (ys < top + third).sum() / max(1, (ys > bottom - third).sum())  # equal row counts: a width ratio
        fill = area / ((bottom - top + 1) * (xs.max() - xs.min() + 1))
        shape = "triangle" if taper < TRIANGLE_MAX_TAPER else "square" if fill >= square_min_fill else "circle"
        # the box centre, as the renderer places objects and as GenEval compares detections
        centre = ((xs.min() + xs.max()) / 2 * IMAGE_SIZE / w, (top + bottom) / 2 * IMAGE_SIZE / h)
        objects.append({"colour": _COLOUR_NAMES[colour_index - 1], "shape": shape, "area": area, "centre": centre})
    return objects


def requirements(spec: Spec, objects: list[dict]) -> dict[str, float]:
    """Each requirement of the prompt, scored in [0, 1]. Objects are matched to the prompt by colour.

    Per requested (colour, shape, count): the colour is present; the count is exact; the fraction of
    that colour's objects with the right shape. Then: no object of a colour the prompt does not name; and,
    for position prompts, the relation between the largest object of each of the two colours.
    """
    scores = {}
    for colour, shape, count in spec.objects:
        mine = [o for o in objects if o["colour"] == colour]
        scores[f"{colour} present"] = float(len(mine) > 0)
        scores[f"{colour} count"] = float(len(mine) == count)
        scores[f"{colour} {shape}"] = sum(o["shape"] == shape for o in mine) / len(mine) if mine else 0.0
    named = {colour for colour, _, _ in spec.objects}
    scores["nothing else"] = float(all(o["colour"] in named for o in objects))
    if spec.relation:
        (c1, _, _), (c2, _, _) = spec.objects
        a = [o for o in objects if o["colour"] == c1]
        b = [o for o in objects if o["colour"] == c2]
        holds = bool(a and b) and relation_holds(
            spec.relation, max(a, key=lambda o: o["area"])["centre"], max(b, key=lambda o: o["area"])["centre"]
        )
        scores["relation"] = float(holds)
    return scores


def score(spec: Spec, image) -> tuple[float, float]:
    """(strict, dense): strict is 1 only if every requirement is met (GenEval-style); dense is their mean."""
    scores = requirements(spec, find_objects(image))
    strict = float(all(v == 1.0 for v in scores.values()))
    return strict, sum(scores.values()) / len(scores)


SPEC_BY_PROMPT = {describe(s): s for s in all_specs()}


def score_prompt(prompt: str, image) -> tuple[float, float]:
    """`score` for a caption of this world; a prompt from elsewhere is a clear error."""
    if prompt not in SPEC_BY_PROMPT:
        raise ValueError(f"{prompt!r} is not a prompt of the toy world (see toy_world.all_specs)")
    return score(SPEC_BY_PROMPT[prompt], image)


# ---------------------------------------------------------------------------------------------------------
# 3b. The world as an RL task: rewards, evaluation prompts and their statistics (used by op_grpo.py).
# ---------------------------------------------------------------------------------------------------------
def geneval_reward(images: list, prompts: list[str]) -> torch.Tensor:
    """The dense score as a reward: the fraction of the prompt's requirements met, (B,)."""
    return torch.tensor([score_prompt(p, im)[1] for im, p in zip(images, prompts)])


def geneval_strict_reward(images: list, prompts: list[str]) -> torch.Tensor:
    """GenEval's own 0/1 score as a reward: 1 only if every requirement is met. Sparse: a group can be all 0."""
    return torch.tensor([score_prompt(p, im)[0] for im, p in zip(images, prompts)])


def eval_prompts(per_family: int, only: set | None = None, seed: int = 1234) -> dict[str, list[str]]:
    """The fixed evaluation prompts: per_family prompts per family, for the held-out and the training set; with
    `only`, drawn from those prompts alone (families without one are left out)."""
    train, held_out = split_specs()
    rng = random.Random(seed)
    sets = {}
    for name, specs in (("held_out", held_out), ("train", train)):
        sets[name] = []
        for family in FAMILIES:
            pool = [s for s in specs if s.family == family and (only is None or describe(s) in only)]
            sets[name] += [describe(rng.choice(pool)) for _ in range(per_family if pool else 0)]
    return sets


def score_by_family(prompts: list[str], images: list) -> tuple[dict, dict]:
    """Per-image (strict, dense) scores grouped by family: two dicts family -> list of scores."""
    strict, dense = {}, {}
    for prompt, image in zip(prompts, images):
        family = SPEC_BY_PROMPT[prompt].family
        s, d = score_prompt(prompt, image)
        strict.setdefault(family, []).append(s)
        dense.setdefault(family, []).append(d)
    return strict, dense


def mix_mean_and_se(per_family: dict[str, list[float]], mix: dict | None = None) -> tuple[float, float]:
    """Mean of per-image scores over families weighted by mix (None: EVAL_MIX), and its standard error (families
    as strata). Families outside the mix weigh 1 (op_grpo.py's prompt lists have the one family "all")."""
    weights = {f: (mix or EVAL_MIX).get(f, 1.0) for f in per_family}
    total = sum(weights.values())
    mean = sum(w * np.mean(per_family[f]) for f, w in weights.items()) / total
    var = sum(w**2 * np.var(per_family[f]) / len(per_family[f]) for f, w in weights.items()) / total**2
    return float(mean), math.sqrt(var)


def paired_change(before: dict, after: dict, mix: dict | None = None) -> tuple[float, float]:
    """Change of the mean over sets between two evaluations of the same prompts and noise, with its paired standard
    error (from per-image differences, so that each image's shared difficulty cancels). set -> family -> scores."""
    stats = [mix_mean_and_se({f: np.subtract(after[name][f], before[name][f]) for f in before[name]}, mix)
             for name in before]
    return sum(m for m, _ in stats) / len(stats), math.sqrt(sum(se**2 for _, se in stats)) / len(stats)


# ---------------------------------------------------------------------------------------------------------
# 4. Building the tiny SD3 pipeline: tokenizer, configs, training, saving.
# ---------------------------------------------------------------------------------------------------------
@dataclass
class BuildArgs:
    """Render the toy data set, train a tiny SD3 pipeline from scratch and save it (about 12 minutes)."""

    output_dir: str = "tiny_sd3"
    """where the diffusers-format pipeline, its build report and sample grid are written"""
    seed: int = 0
    """seed for data, initialisation and training (the build is deterministic for a given thread count)"""
    num_images: int = 20000
    """rendered training images"""
    vae_steps: int = 800
    """AutoencoderKL optimisation steps (batch 32)"""
    transformer_steps: int = 3500
    """SD3 transformer (and CLIP encoders) flow-matching steps (batch 64)"""
    eval_per_family: int = 100
    """images per family and per prompt set (train / held-out) for the base model's report"""
    num_layers: int = 4
    """transformer blocks"""
    num_heads: int = 2
    """attention heads of width 32"""
    threads: int = 2
    """torch CPU threads"""


def build_tokenizer():
    """A CLIP tokenizer whose BPE was trained on this world's words, so each word is one token."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    clip_split = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(clip_split), behavior="removed", invert=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=1000,
        special_tokens=["<|startoftext|>", "<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    bpe.train_from_iterator([" ".join(vocabulary())] * 10, trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split()) for m in model["merges"]]
    # The trainer breaks ties between equally frequent pairs differently from run to run, which reorders
    # its ids. Ids are renumbered here (special tokens, then whole words, then the other pieces, each
    # sorted), so that a word's id, hence the model built on it, never depends on the run.
    specials = ["<|startoftext|>", "<|endoftext|>"]
    words = sorted(w + "</w>" for w in vocabulary())
    pieces = specials + words + sorted(set(model["vocab"]) - set(specials) - set(words))
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(pieces)}, merges=merges, model_max_length=CLIP_TOKENS)


def build_pipeline(args: BuildArgs, tokenizer):
    """Randomly initialised components of a StableDiffusion3Pipeline, sized for a CPU."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    def clip(seed):
        torch.manual_seed(seed)
        config = CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, projection_dim=32, max_position_embeddings=CLIP_TOKENS,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )  # eos_token_id must match the tokenizer: the pooled embedding is read at end-of-text
        return CLIPTextModelWithProjection(config)

    torch.manual_seed(args.seed)
    vae = AutoencoderKL(
        block_out_channels=(16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, latent_channels=4, norm_num_groups=8,
        sample_size=IMAGE_SIZE, mid_block_add_attention=False, use_quant_conv=False, use_post_quant_conv=False,
    )
    transformer = SD3Transformer2DModel(
        sample_size=IMAGE_SIZE // 4, patch_size=1, in_channels=4, out_channels=4, num_layers=args.num_layers,
        attention_head_dim=32, num_attention_heads=args.num_heads, joint_attention_dim=64,
        caption_projection_dim=32 * args.num_heads, pooled_projection_dim=64, pos_embed_max_size=IMAGE_SIZE // 4,
        qk_norm="rms_norm",
    )  # joint_attention_dim = the two CLIP widths summed; pooled_projection_dim = their projections summed
    # shift=1: at 8x8 latents the image is destroyed early in the noise schedule already (SD3 paper, Sec. 5.3.2
    # raises the shift with resolution; 3.0 is SD3.5's value at 1024 px)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=clip(args.seed + 1), tokenizer=tokenizer,
        text_encoder_2=clip(args.seed + 2), tokenizer_2=tokenizer, text_encoder_3=None, tokenizer_3=None,
    )


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL images -> (N, 3, H, W) in [-1, 1], the VAE's input range."""
    array = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def warmup_cosine(optimizer, steps: int, warmup: int):
    """Linear warm-up, then cosine decay to zero."""
    def factor(step):
        return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def object_weighted_mse(recon: torch.Tensor, target: torch.Tensor, object_weight: float) -> torch.Tensor:
    """MSE in which pixels away from the background (any channel off by more than 0.1 in [-1, 1]) count
    1 + object_weight times, normalised by the mean weight; images (N, 3, H, W) or videos (N, 3, F, H, W)."""
    background = (torch.tensor(BACKGROUND, dtype=target.dtype) / 127.5 - 1.0).view(1, 3, *[1] * (target.dim() - 2))
    weight = 1 + object_weight * ((target - background).abs().amax(dim=1, keepdim=True) > 0.1).to(target.dtype)
    return (weight * (recon - target) ** 2).mean() / weight.mean()


def train_vae(vae, pixels: torch.Tensor, steps: int, generator: torch.Generator, batch_size: int = 32,
              held: int = 256, lr: float = 2e-3, object_weight: float = 0.0) -> float:
    """Reconstruction (MSE) plus a small KL term; returns the reconstruction MSE on the last `held` samples. Any
    diffusers VAE with encode().latent_dist and decode().sample: images here, videos in toy_video.py. With an
    object_weight w, pixels away from the background count 1 + w times (the mean weight normalised out): small
    objects' colours and outlines, otherwise a few percent of the pixels, are learned sooner."""
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    schedule = warmup_cosine(optimizer, steps, warmup=50)
    for step in range(steps):
        batch = pixels[torch.randint(len(pixels), (batch_size,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.sample(generator)).sample
        loss = object_weighted_mse(recon, batch, object_weight) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 200 == 0 or step == steps - 1:
            print(f"  vae step {step:5d}  loss {loss.item():.4f}", flush=True)
    with torch.no_grad():
        last = pixels[-held:]
        return F.mse_loss(vae.decode(vae.encode(last).latent_dist.mode()).sample, last).item()


def encode_prompts(pipe, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Text embeddings with gradients (the CLIP encoders are trained with the transformer here)."""
    embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False, max_sequence_length=T5_TOKENS)
    return embeds, pooled


def train_transformer(pipe, latents, prompts, steps, generator) -> list[float]:
    """Rectified-flow training: x_sigma = (1 - sigma) x0 + sigma eps, target v = eps - x0 (SD3 paper, Eq. 1-3).

    sigma is logit-normal (SD3's default), 10% of captions are dropped for classifier-free guidance, and
    an exponential moving average of the transformer's weights is what gets saved.
    """
    modules = [pipe.transformer, pipe.text_encoder, pipe.text_encoder_2]
    params = [p for m in modules for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    schedule = warmup_cosine(optimizer, steps, warmup=100)
    ema = [p.detach().clone() for p in params]
    losses = []
    for step in range(steps):
        index = torch.randint(len(latents), (64,), generator=generator)
        x0 = latents[index]
        batch_prompts = [prompts[i] if torch.rand(1, generator=generator).item() > 0.1 else "" for i in index.tolist()]
        sigma = torch.sigmoid(torch.randn(len(x0), generator=generator))  # logit-normal(0, 1)
        noise = torch.randn(x0.shape, generator=generator)
        x_sigma = (1 - sigma[:, None, None, None]) * x0 + sigma[:, None, None, None] * noise
        embeds, pooled = encode_prompts(pipe, batch_prompts)
        v = pipe.transformer(x_sigma, encoder_hidden_states=embeds, pooled_projections=pooled, timestep=sigma * 1000).sample
        loss = F.mse_loss(v, noise - x0)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema, params):
                e.lerp_(p, 1 - decay)
        losses.append(loss.item())
        if step % 250 == 0 or step == steps - 1:
            print(f"  transformer step {step:5d}  loss {np.mean(losses[-250:]):.4f}", flush=True)
    with torch.no_grad():
        for e, p in zip(ema, params):
            p.copy_(e)
    return losses


@torch.no_grad()
def evaluate_pipeline(pipe, specs: list[Spec], n: int, seed: int) -> dict:
    """Strict and dense scores of the stock pipeline (ODE, 10 steps, no guidance) on n prompts per family."""
    rng = random.Random(seed)
    report = {}
    for family in FAMILIES:
        pool = [s for s in specs if s.family == family]
        if not pool:
            continue
        chosen = [rng.choice(pool) for _ in range(n)]
        prompts = [describe(s) for s in chosen]
        images = []
        for start in range(0, n, 50):
            images += pipe(
                prompts[start : start + 50], num_inference_steps=10, guidance_scale=1.0, height=IMAGE_SIZE,
                width=IMAGE_SIZE, max_sequence_length=T5_TOKENS, generator=torch.Generator().manual_seed(seed + start),
            ).images
        scores = np.array([score(s, im) for s, im in zip(chosen, images)])
        report[family] = {"strict": float(scores[:, 0].mean()), "dense": float(scores[:, 1].mean()), "n": n}
    report["mix"] = {
        k: sum(EVAL_MIX[f] * report[f][k] for f in report if f in EVAL_MIX) / sum(EVAL_MIX[f] for f in report if f in EVAL_MIX)
        for k in ("strict", "dense")
    }
    return report


def sample_grid(pipe, specs: list[Spec], path: str, seed: int, per_family: int = 4) -> None:
    """A PNG of base-model samples, one row per family, each with its prompt and (strict, dense) score."""
    rng = random.Random(seed)
    chosen = [rng.choice([s for s in specs if s.family == f]) for f in FAMILIES for _ in range(per_family)]
    images = pipe(
        [describe(s) for s in chosen], num_inference_steps=10, guidance_scale=1.0, height=IMAGE_SIZE, width=IMAGE_SIZE,
        max_sequence_length=T5_TOKENS, generator=torch.Generator().manual_seed(seed),
    ).images
    cell_w, cell_h, zoom = 200, 165, 4
    grid = Image.new("RGB", (cell_w * per_family, cell_h * len(FAMILIES)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (spec, image) in enumerate(zip(chosen, images)):
        x, y = (i % per_family) * cell_w, (i // per_family) * cell_h
        grid.paste(image.resize((IMAGE_SIZE * zoom,) * 2, Image.NEAREST), (x + (cell_w - IMAGE_SIZE * zoom) // 2, y + 2))
        strict, dense = score(spec, image)
        caption = describe(spec).replace(" and ", " and\n").replace(" of ", " of\n").replace(" above ", "\nabove ").replace(" below ", "\nbelow ")
        draw.multiline_text((x + 4, y + IMAGE_SIZE * zoom + 4), caption.split("\n")[0] + f"  [{strict:.0f} | {dense:.2f}]", fill="black")
        if "\n" in caption:
            draw.text((x + 4, y + IMAGE_SIZE * zoom + 16), caption.split("\n")[1], fill="black")
    grid.save(path)


def build(args: BuildArgs) -> dict:
    torch.set_num_threads(args.threads)
    start = time.time()
    rng, generator = random.Random(args.seed), torch.Generator().manual_seed(args.seed)
    train_specs, held_out = split_specs()

    print(f"[1/5] rendering {args.num_images} training images", flush=True)
    specs = sample_specs(train_specs, PRETRAIN_MIX, args.num_images, rng)
    pixels = to_tensor([render(s, rng) for s in specs])
    prompts = [describe(s) for s in specs]

    pipe = build_pipeline(args, build_tokenizer())
    n_params = {name: sum(p.numel() for p in getattr(pipe, name).parameters()) for name in ("vae", "transformer", "text_encoder")}
    print(f"      parameters: {n_params}", flush=True)

    print(f"[2/5] training the VAE for {args.vae_steps} steps", flush=True)
    vae_mse = train_vae(pipe.vae, pixels, args.vae_steps, generator)
    print(f"      reconstruction MSE on held images: {vae_mse:.5f}", flush=True)

    print("[3/5] encoding the data set and fitting the latent shift and scale", flush=True)
    with torch.no_grad():
        raw = torch.cat([pipe.vae.encode(pixels[i : i + 512]).latent_dist.mode() for i in range(0, len(pixels), 512)])
    shift, scale = raw.mean().item(), 1.0 / raw.std().item()
    pipe.vae.register_to_config(shift_factor=shift, scaling_factor=scale)  # the pipeline decodes x / scale + shift
    latents = (raw - shift) * scale

    print(f"[4/5] training the transformer and text encoders for {args.transformer_steps} steps", flush=True)
    losses = train_transformer(pipe, latents, prompts, args.transformer_steps, generator)

    print("[5/5] evaluating the base model and saving", flush=True)
    pipe.set_progress_bar_config(disable=True)
    report = {
        "vae_reconstruction_mse": vae_mse,
        "flow_loss_last_250_steps": float(np.mean(losses[-250:])),
        "parameters": n_params,
        "held_out": evaluate_pipeline(pipe, held_out, args.eval_per_family, seed=1),
        "train": evaluate_pipeline(pipe, train_specs, args.eval_per_family, seed=2),
        "args": vars(args),
    }
    os.makedirs(args.output_dir, exist_ok=True)
    pipe.save_pretrained(args.output_dir)
    sample_grid(pipe, held_out + [s for s in train_specs if s.family == "single"], os.path.join(args.output_dir, "base_samples.png"), seed=3)
    report["build_seconds"] = time.time() - start
    with open(os.path.join(args.output_dir, "build_report.json"), "w") as f:
        json.dump(report, f, indent=2)
    for split in ("held_out", "train"):
        line = "  ".join(f"{f} {v['strict']:.2f}/{v['dense']:.2f}" for f, v in report[split].items())
        print(f"      {split:8s} strict/dense: {line}")
    print(f"      saved to {args.output_dir}/ in {report['build_seconds']:.0f} s")
    return report


if __name__ == "__main__":
    build(tyro.cli(BuildArgs))
