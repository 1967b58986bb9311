"""OP-GRPO: off-policy GRPO for flow-matching image generators, in one file.

Papers
  OP-GRPO   "Efficient Off-Policy GRPO for Flow-Matching Models", arXiv 2604.04142 (equation numbers below)
  Flow-GRPO "Training Flow Matching Models via Online RL", arXiv 2505.05470 (the SDE sampler, the baseline)
  DDPO      "Training Diffusion Models with Reinforcement Learning", arXiv 2305.13301 (RL on denoising chains)

What it does
  Every iteration samples groups of images per prompt with a stochastic (SDE) version of the flow sampler,
  scores them with a reward, and takes PPO-style clipped policy-gradient steps on every denoising step
  (Flow-GRPO). OP-GRPO adds a replay buffer of each prompt's best trajectory: a fraction of the groups
  reuse one stored trajectory, its late steps cut off and regenerated, its surrogate loss multiplied by
  a sequence-level importance weight.

Commands
  python op_grpo.py                                   # embedded tiny SD3 on the toy GenEval world, CPU, ~9 min
  python op_grpo.py --off-policy-fraction 0           # the same run as plain on-policy Flow-GRPO
  python op_grpo.py --model sd3                       # Stable Diffusion 3.5 Medium with LoRA and PickScore, one GPU
  python -m pytest -q test_op_grpo.py                 # the tests

Notation (code name = paper symbol)
  B, P, G           samples in a batch, prompts per iteration, group size (images per prompt)
  K                 denoising steps; step k moves latents[:, k] (sigma_k) to latents[:, k + 1] (sigma_{k+1})
  k                 our step index, 0 = pure noise; the paper's t counts down: t = K - k
  sigma, sigma_next noise levels sigma_k > sigma_{k+1}; x_sigma = (1 - sigma) x_0 + sigma eps
  dt                sigma_next - sigma (< 0)
  velocity          v_theta(x, sigma, c), the model output, approximately eps - x_0
  noise_level       a, the SDE noise scale (Flow-GRPO); 0 gives the deterministic ODE (Euler) step
  log_prob          log p_theta(x_{k+1} | x_k, c) of the current weights, averaged over latent dimensions
  log_prob_old      log p_old: the same under the weights at the start of this iteration
  log_prob_behavior log p_off: recorded when a replayed trajectory was sampled, stored in the buffer
  ratio             r_k = p_theta / p_old, per step (Eq. 6)
  is_weight         w = prod over kept steps of p_old / p_off (Eq. 10); 1 for fresh samples
  keep              steps that enter the loss; a replayed trajectory drops its last `truncate_steps` (Eq. 12)
  rho               --off-policy-fraction: share of the P prompt slots that reuse a stored trajectory
"""

import contextlib
import copy
import datetime
import importlib.util
import io
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Literal

import numpy as np
import torch
import tyro
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

import toy_world

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass
class Args:
    """OP-GRPO fine-tuning of an SD3-family pipeline. A flag left at None takes its --model preset (PRESETS below)."""

    # --- model, prompts and reward
    model: Literal["tiny", "sd3"] = "tiny"
    """tiny: the embedded toy-world SD3 in tiny_sd3/ (CPU, offline, ~9 min); sd3: Stable Diffusion 3.5 Medium (one GPU)"""
    pretrained: str | None = None
    """Hub id or local folder of an SD3-family pipeline (tiny: ./tiny_sd3, sd3: stabilityai/stable-diffusion-3.5-medium)"""
    reward: str | None = None
    """a reward, or a weighted sum as name=weight,...: geneval, geneval_strict (toy world only), jpeg, pickscore (tiny: geneval, sd3: pickscore)"""
    prompt_file: str | None = None
    """text file, one prompt per line; None = the toy world's prompts (tiny) or the built-in DEFAULT_PROMPTS (sd3)"""
    output_dir: str = "runs/op_grpo"
    """where metrics.jsonl, checkpoints, the before/after grid and the fine-tuned weights are written"""
    seed: int = 0
    """seed for prompts, noise and the model's random state"""
    resolution: int | None = None
    """image side in pixels (tiny: 32, sd3: 512)"""
    max_sequence_length: int | None = None
    """T5 tokens per prompt; 0 = no T5, not even loaded (tiny: 0, it has none; sd3: 256, the diffusers pipeline's default)"""

    # --- what trains, and in which precision
    lora_rank: int | None = None
    """LoRA rank on the transformer's attention projections; 0 = full fine-tuning (tiny: 0, sd3: 32 as Flow-GRPO)"""
    lora_alpha: float | None = None
    """LoRA alpha; None = 2 x rank (Flow-GRPO: 64 for rank 32)"""
    mixed_precision: Literal["no", "fp16", "bf16"] | None = None
    """dtype of the frozen weights (VAE, text encoders, LoRA's base transformer); trainable ones stay fp32 (tiny: no, sd3: bf16)"""
    gradient_checkpointing: bool = False
    """recompute transformer activations in the backward pass: less memory, about 30% more update time"""
    micro_batch: int | None = None
    """samples per forward/backward pass in the update and per VAE decode; 0 = all at once (tiny: 0, sd3: 4)"""

    # --- rollouts (Flow-GRPO Sec. 4: SDE sampling)
    iterations: int | None = None
    """rollout-and-update iterations (tiny: 200, sd3: 500)"""
    prompts_per_iteration: int | None = None
    """P: prompt slots per iteration, fresh or replayed (tiny: 8, sd3: 4)"""
    group_size: int | None = None
    """G: images per prompt; advantages are normalised within each group (tiny: 8, sd3: 8)"""
    num_steps: int = 10
    """K: SDE denoising steps per trajectory (Flow-GRPO: 10 for training)"""
    noise_level: float = 0.7
    """a: SDE noise scale (Flow-GRPO: 0.7)"""
    guidance_scale: float | None = None
    """classifier-free guidance in rollouts, update and evaluation; 1 disables it (tiny: 1, trained without; sd3: 4.5 as Flow-GRPO)"""

    # --- the GRPO update (Eqs. 5-6)
    learning_rate: float | None = None
    """AdamW learning rate (tiny: 1e-4, full fine-tuning; sd3: 3e-4, Flow-GRPO's LoRA rate)"""
    warmup_iterations: int = 10
    """linear learning-rate warm-up over the first iterations (Adam's first steps are its largest); 0 = none"""
    updates_per_batch: int = 2
    """optimizer steps per rollout batch (Flow-GRPO: 2); each uses 1/updates of the samples and all their kept steps"""
    train_steps: int | None = None
    """the loss uses the first train_steps of the K steps; None = K - 1 (Flow-GRPO's SD3.5 recipe trains 9 of 10)"""
    clip_range: float | None = None
    """PPO clip epsilon on the per-step ratio of per-dimension-mean log-probs (tiny: 2e-3 for 256 dims; sd3: 1e-4, Flow-GRPO)"""
    adv_clip: float = 5.0
    """advantages are clipped to +-adv_clip (Flow-GRPO: 5)"""
    kl_beta: float = 0.01
    """beta of the KL penalty to the frozen initial model (Eq. 4; Flow-GRPO PickScore: 0.01); 0 disables it and its pass"""
    max_grad_norm: float = 1.0
    """gradient clipping"""

    # --- OP-GRPO (Secs. 4.1-4.3)
    off_policy_fraction: float = 0.25
    """rho: fraction of prompt slots whose group is G-1 fresh images plus one replayed (paper: 0.05, 0.25); 0 = Flow-GRPO"""
    buffer_capacity: int = 128
    """replay buffer entries (one per prompt)"""
    reward_decay: float = 0.005
    """freshness: a stored reward counts as reward - reward_decay * age in iterations (paper: form not given)"""
    correction: Literal["sequence", "none", "naive"] = "sequence"
    """sequence: clip p_theta/p_old, times w = P_old/P_off (Eq. 10); none: w = 1 (ablation); naive: clip p_theta/p_off"""
    truncate_steps: int = 3
    """t_off: the last steps of a replayed trajectory dropped and regenerated by the current ODE (Eq. 12); 0 = off"""

    # --- evaluation and logging
    eval_every: int | None = None
    """evaluate every this many iterations, and before the first and after the last (tiny: 50, sd3: 50)"""
    eval_per_family: int | None = None
    """evaluation images per family and prompt set (toy world; tiny: 128), or in all (prompt list; sd3: 32); fixed noise"""
    eval_steps: int | None = None
    """ODE steps at evaluation (tiny: 10; sd3: 40 as Flow-GRPO)"""
    wandb_project: str | None = None
    """also log metrics and before/after grids to this Weights & Biases project (wandb is imported only then)"""
    device: str | None = None
    """torch device; None picks cuda when available"""
    threads: int | None = None
    """CPU threads for torch; None keeps torch's default"""

    # --- checkpoints and failures
    checkpoint_every: int | None = None
    """write <output-dir>/checkpoint.pt every this many iterations, at the end and on SIGINT/SIGTERM; 0 = only those (tiny: 50, sd3: 25)"""
    resume: str | None = None
    """continue the run saved in this folder; its args.json gives the defaults, so only changed flags need repeating"""
    overwrite: bool = False
    """allow starting afresh in an --output-dir that already holds a checkpoint (it is replaced)"""
    nonfinite_patience: int = 3
    """consecutive iterations whose update is skipped for a NaN/inf before the run stops (with a checkpoint)"""


# Defaults per --model for the flags left at None. tiny: the embedded model on 2 CPU cores. sd3: Flow-GRPO's
# SD3.5-Medium recipe (its config/grpo.py: LoRA r 32 / alpha 64, lr 3e-4, clip 1e-4, CFG 4.5, 10 SDE steps,
# 40 ODE steps for evaluation, 512 px), with the batch scaled from its 24 GPUs down to one 80 GB GPU.
PRESETS = {
    "tiny": dict(pretrained=os.path.join(HERE, "tiny_sd3"), reward="geneval", resolution=32, max_sequence_length=0,
                 lora_rank=0, mixed_precision="no", micro_batch=0, iterations=200, prompts_per_iteration=8, group_size=8,
                 guidance_scale=1.0, learning_rate=1e-4, clip_range=2e-3, eval_every=50, eval_per_family=128,
                 eval_steps=10, checkpoint_every=50),
    "sd3": dict(pretrained="stabilityai/stable-diffusion-3.5-medium", reward="pickscore", resolution=512,
                max_sequence_length=256, lora_rank=32, mixed_precision="bf16", micro_batch=4, iterations=500,
                prompts_per_iteration=4, group_size=8, guidance_scale=4.5, learning_rate=3e-4, clip_range=1e-4,
                eval_every=50, eval_per_family=32, eval_steps=40, checkpoint_every=25),
}


def with_presets(args: Args) -> Args:
    """Fill every flag left at None from the --model preset."""
    preset = {k: v for k, v in PRESETS[args.model].items() if getattr(args, k) is None}
    return replace(args, **preset)


# Numerical constants, named so that nothing hides in a literal.
ADV_EPS = 1e-4  # added to the group std (Flow-GRPO uses 1e-4)
LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def check_args(args: Args) -> None:
    """Reject impossible settings before anything is loaded; each message names its flag."""
    args = with_presets(args)
    problems = []
    if args.group_size < 2:
        problems.append(f"--group-size must be at least 2 (advantages compare images within a group), got {args.group_size}")
    world = int(os.environ.get("WORLD_SIZE", "1"))  # processes started by torchrun / accelerate launch
    if args.prompts_per_iteration < world:
        problems.append(f"--prompts-per-iteration must be at least the number of processes ({world}), got {args.prompts_per_iteration}")
    if not 0.0 <= args.off_policy_fraction < 1.0:
        problems.append(f"--off-policy-fraction must be in [0, 1), got {args.off_policy_fraction}")
    if args.num_steps < 2:
        problems.append(f"--num-steps must be at least 2, got {args.num_steps}")
    if args.train_steps is not None and not 1 <= args.train_steps <= args.num_steps:
        problems.append(f"--train-steps must be in [1, --num-steps={args.num_steps}], got {args.train_steps}")
    if not 0 <= args.truncate_steps < args.num_steps:
        problems.append(f"--truncate-steps must be in [0, --num-steps={args.num_steps}), got {args.truncate_steps}")
    if args.noise_level <= 0:
        problems.append(f"--noise-level must be positive (0 is the deterministic ODE, which has no log-prob), got {args.noise_level}")
    n_samples = args.prompts_per_iteration * args.group_size
    if not 1 <= args.updates_per_batch <= n_samples:
        problems.append(f"--updates-per-batch must be in [1, {n_samples}] (the samples per iteration), got {args.updates_per_batch}")
    for flag in ("learning_rate", "clip_range", "adv_clip", "max_grad_norm"):
        if getattr(args, flag) <= 0:
            problems.append(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    for flag in ("kl_beta", "reward_decay", "warmup_iterations"):
        if getattr(args, flag) < 0:
            problems.append(f"--{flag.replace('_', '-')} must be non-negative, got {getattr(args, flag)}")
    for flag in ("iterations", "eval_every", "eval_per_family", "eval_steps", "buffer_capacity"):
        if getattr(args, flag) < 1:
            problems.append(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.guidance_scale < 1:
        problems.append(f"--guidance-scale must be at least 1 (1 disables guidance), got {args.guidance_scale}")
    if args.checkpoint_every < 0:
        problems.append(f"--checkpoint-every must be non-negative (0 = only at the end and on a signal), got {args.checkpoint_every}")
    if args.nonfinite_patience < 1:
        problems.append(f"--nonfinite-patience must be at least 1, got {args.nonfinite_patience}")
    problems += check_folders(args)
    try:
        rewards = parse_reward(args.reward)
        if any(name.startswith("geneval") for name in rewards) and not uses_toy_world(args):
            problems.append(f"--reward {args.reward} scores the toy world's prompts: use it with --model tiny and no --prompt-file")
    except ValueError as error:
        problems.append(str(error))
    if args.prompt_file is not None:
        try:
            if not read_prompts(args.prompt_file):
                problems.append(f"--prompt-file {args.prompt_file} holds no prompts (one per line; blank and # lines are skipped)")
        except (OSError, UnicodeDecodeError) as error:
            problems.append(f"--prompt-file {args.prompt_file} cannot be read ({error})")
    if args.resolution < 16 or args.resolution % 16:
        problems.append(f"--resolution must be a positive multiple of 16 (VAE factor 8 x patch 2), got {args.resolution}")
    for flag in ("lora_rank", "micro_batch", "max_sequence_length"):
        if getattr(args, flag) < 0:
            problems.append(f"--{flag.replace('_', '-')} must be non-negative, got {getattr(args, flag)}")
    if args.lora_alpha is not None and args.lora_alpha <= 0:
        problems.append(f"--lora-alpha must be positive, got {args.lora_alpha}")
    if args.wandb_project and importlib.util.find_spec("wandb") is None:
        problems.append("--wandb-project needs the wandb package: pip install wandb")
    if problems:
        raise ValueError("\n".join(problems))


CHECKPOINT = "checkpoint.pt"  # in --output-dir: everything needed to continue the run exactly (see save_checkpoint)
STRUCTURAL_FLAGS = ("model", "num_steps", "lora_rank", "resolution")  # a resumed run must keep these: the weights and the stored trajectories depend on them


def check_folders(args: Args) -> list[str]:
    """The file-system half of check_args: a run never overwrites a checkpoint unasked, --resume finds one."""
    problems = []
    existing = os.path.join(args.output_dir, CHECKPOINT)
    resuming_here = args.resume is not None and os.path.realpath(args.resume) == os.path.realpath(args.output_dir)
    if os.path.exists(existing) and not resuming_here and not args.overwrite:
        problems.append(f"--output-dir {args.output_dir} already holds a run ({CHECKPOINT}); continue it with "
                        f"--resume {args.output_dir}, or pass --overwrite, or choose another --output-dir")
    if args.resume is not None:
        path = os.path.join(args.resume, CHECKPOINT)
        if not os.path.isfile(path):
            return problems + [f"--resume {args.resume}: no {CHECKPOINT} in that folder"]
        try:
            with open(os.path.join(args.resume, "args.json")) as f:
                saved = json.load(f)
            done = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["iteration"]
        except Exception as error:  # unreadable or truncated files: say which and why, no traceback
            return problems + [f"--resume {args.resume}: cannot read its args.json and {CHECKPOINT} ({type(error).__name__}: {error})"]
        for flag in STRUCTURAL_FLAGS:
            if saved.get(flag) != getattr(args, flag):
                problems.append(f"--{flag.replace('_', '-')} {getattr(args, flag)} differs from the resumed run's {saved.get(flag)}")
        if args.iterations <= done:
            problems.append(f"--iterations {args.iterations}: the run in {args.resume} has already done {done}; raise it to train on")
    return problems


def parse_reward(spec: str) -> dict[str, float]:
    """'pickscore=1.0,jpeg=0.1' -> {'pickscore': 1.0, 'jpeg': 0.1}; a bare name has weight 1."""
    weights = {}
    for part in spec.split(","):
        name, _, weight = part.strip().partition("=")
        if name not in REWARDS:
            raise ValueError(f"--reward: unknown reward {name!r} (known: {', '.join(REWARDS)}; a sum reads pickscore=1,jpeg=0.1)")
        try:
            weights[name] = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"--reward: weight {weight!r} of {name} is not a number") from None
    return weights


def read_prompts(path: str) -> list[str]:
    """A prompt file: one prompt per line; blank lines and lines starting with # are skipped."""
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]


# --model sd3 without --prompt-file: a small, varied list in the spirit of the PickScore/DrawBench prompts
DEFAULT_PROMPTS = [
    "a red fox sleeping in fresh snow, morning light", "a lighthouse on a cliff during a thunderstorm",
    "a bowl of ramen with a soft-boiled egg, top view", "an astronaut riding a horse on the moon",
    "a watercolor painting of a quiet harbor town", "a close-up portrait of an old fisherman, film photo",
    "a cozy reading nook with a cat and a stack of books", "a glass teapot with blooming tea on a wooden table",
    "a futuristic city at dusk with flying trains", "three ripe pears on a blue plate, still life",
    "a hummingbird drinking from a purple flower", "a snowy mountain cabin under the northern lights",
    "a vintage bicycle leaning against a yellow wall", "an owl wearing tiny round glasses reading a map",
    "a bustling night market with paper lanterns", "a macro photo of a dew drop on a spider web",
    "a sailboat on a calm lake at sunrise", "a corgi in a raincoat jumping into a puddle",
    "a cathedral interior with sunbeams through stained glass", "a plate of colorful macarons in a bakery window",
    "an isometric illustration of a tiny island with a windmill", "a jazz trio playing in a smoky club, oil painting",
    "a green frog sitting on a lily pad in the rain", "a desert road with a red convertible at golden hour",
]


def uses_toy_world(args: Args) -> bool:
    """The toy GenEval world supplies prompts, held-out split and strict evaluation for the tiny model by default."""
    return args.model == "tiny" and args.prompt_file is None


def replay_slots(args: Args, rng: random.Random) -> int:
    """Prompt slots of this iteration that reuse a stored trajectory: floor(rho P), plus one with probability
    frac(rho P), so that any rho replays rho P groups per iteration on average (the paper's 5% of 8 slots is
    0.4). A whole rho P draws no random number."""
    expected = args.off_policy_fraction * args.prompts_per_iteration
    whole = math.floor(expected + 1e-9)  # 1e-9: 0.1 * 10 is 1.0000000000000002 in floating point
    fraction = expected - whole
    return whole + int(fraction > 1e-9 and rng.random() < fraction)


# =========================================================================================================
# Pure math. Functions of tensors only; test_op_grpo.py checks each against an independent answer.
# =========================================================================================================
def sde_step_with_logprob(velocity, sample, sigma, sigma_next, noise_level, prev_sample=None, generator=None, noise=None):
    """One step of Flow-GRPO's SDE sampler, and the Gaussian log-density of its result.

    Two modes share one code path: with prev_sample=None a next latent is drawn (sampling); with a given
    prev_sample its log-probability is computed under `velocity` (scoring stored data under other weights).
    Arguments: velocity, sample (B, C, H, W); sigma, sigma_next: (B,) tensors or scalars.
    Returns prev_sample (B, C, H, W), log_prob (B,), prev_sample_mean (B, C, H, W), std_dev (B, 1, 1, 1).
    The math runs in float32 whatever the model's dtype. noise_level = 0 is the deterministic Euler step,
    which has no density: its log_prob is NaN so that it cannot slip into a ratio unnoticed.
    """
    velocity, sample = velocity.float(), sample.float()
    shape = (-1,) + (1,) * (sample.ndim - 1)  # broadcast per-sample scalars over C, H, W
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=sample.device).reshape(shape).expand(len(sample), *shape[1:])
    sigma_next = torch.as_tensor(sigma_next, dtype=torch.float32, device=sample.device).reshape(shape).expand_as(sigma)
    dt = sigma_next - sigma  # (B, 1, 1, 1), negative: sampling walks from noise (1) to data (0)

    # Flow-GRPO's noise schedule: s_sigma = a * sqrt(sigma / (1 - sigma)). At sigma = 1 (the first step) the ratio is
    # infinite; like Flow-GRPO's code we put 1 - sigma_next in the denominator there, a finite large noise.
    one_minus_sigma = torch.where(sigma >= 1.0, 1.0 - sigma_next, 1.0 - sigma)
    noise_scale = noise_level * torch.sqrt(sigma / one_minus_sigma)

    # mu = x + [v + s^2 / (2 sigma) * (x + (1 - sigma) v)] dt. The bracket's second term is -s^2/2 times
    # the score, grad log p(x) = -(x + (1 - sigma) v) / sigma, which keeps the marginals of the ODE.
    prev_sample_mean = sample + (velocity + noise_scale**2 / (2 * sigma) * (sample + (1 - sigma) * velocity)) * dt
    # std of the transition: s_sigma * sqrt(|dt|)
    std_dev = noise_scale * torch.sqrt(-dt)

    if prev_sample is None:
        if noise is None:  # a caller may pass its own standard-normal draw (several processes: see sample_trajectories)
            noise = torch.randn(sample.shape, generator=generator, device=sample.device, dtype=torch.float32)
        prev_sample = prev_sample_mean + std_dev * noise
    prev_sample = prev_sample.detach().float()  # the sampled latent is data: no gradient flows through it

    if noise_level == 0:
        log_prob = torch.full((len(sample),), float("nan"), device=sample.device)
    else:
        # log N(x' | mu, std^2), averaged (not summed) over latent dimensions as Flow-GRPO does: per-step
        # log-ratios stay O(1e-3) whatever the image size, which is the scale the clip range refers to.
        log_density = -((prev_sample - prev_sample_mean) ** 2) / (2 * std_dev**2) - torch.log(std_dev) - LOG_SQRT_2PI
        log_prob = log_density.mean(dim=tuple(range(1, sample.ndim)))
    return prev_sample, log_prob, prev_sample_mean, std_dev


def group_advantages(rewards: torch.Tensor, eps: float = ADV_EPS) -> torch.Tensor:
    """Eq. 5: A_i = (R_i - mean(R_group)) / (std(R_group) + eps), rewards (P, G) -> advantages (P, G).

    The population std (ddof 0), as Flow-GRPO's numpy code. A group with equal rewards gets zero advantage.
    """
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True, correction=0)
    return (rewards - mean) / (std + eps)


def sequence_is_weight(log_prob_old: torch.Tensor, log_prob_behavior: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Eq. 10: w = P_old(tau) / P_off(tau) = prod over kept steps k of p_old(x_{k+1}|x_k) / p_off(x_{k+1}|x_k).

    (B, K) log-probs and a (B, K) bool mask -> (B,). Steps outside `keep` are ignored even if they hold NaN
    (the regenerated tail has no behaviour log-prob). A constant: no gradient flows through it.
    """
    log_ratio = torch.where(keep, log_prob_old - log_prob_behavior, torch.zeros_like(log_prob_old))
    return torch.exp(log_ratio.sum(dim=1)).detach()


def kept_steps(num_steps: int, truncate_steps: int, replayed: torch.Tensor) -> torch.Tensor:
    """Eq. 12: fresh trajectories keep all K steps; replayed ones keep steps k < K - truncate_steps.

    replayed (B,) bool -> keep (B, K) bool.
    """
    step = torch.arange(num_steps, device=replayed.device)
    return (step[None, :] < num_steps - truncate_steps) | ~replayed[:, None]


def clipped_surrogate(log_prob, log_prob_old, advantages, clip_range):
    """Eq. 6, per (sample, step): the PPO loss max(-A r, -A clip(r, 1 - eps, 1 + eps)) and the ratio r.

    All arguments (N,) (clip_range a float). Minimising it is maximising min(r A, clip(r) A).
    """
    ratio = torch.exp(log_prob - log_prob_old)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped), ratio


def gaussian_kl(mean, mean_ref, std_dev):
    """Eq. 4's KL(p_theta || p_ref) per step for two Gaussians of equal std: |mu - mu_ref|^2 / (2 std^2).

    (B, C, H, W) means, (B, 1, 1, 1) std -> (B,), averaged over dimensions like the log-probs. This is the
    exact KL of the transition; Flow-GRPO's code divides by 2 s_sigma^2 instead (no |dt|), which is ours
    times |dt|: with 10 steps our beta is worth about 10 of theirs.
    """
    return ((mean - mean_ref) ** 2 / (2 * std_dev**2)).mean(dim=tuple(range(1, mean.ndim)))


class NonFiniteError(RuntimeError):
    """A NaN or inf in a named quantity. main() skips the rest of the iteration's update when one is raised."""


def require_finite(name: str, tensor: torch.Tensor, where: str = "") -> None:
    """Raise NonFiniteError naming the quantity (and the step) if `tensor` holds a NaN or inf."""
    if not torch.isfinite(tensor).all():
        raise NonFiniteError(f"non-finite {name}" + (f" {where}" if where else ""))


# =========================================================================================================
# The replay buffer of high-quality trajectories (Sec. 4.1, Eqs. 7-8)
# =========================================================================================================
class ReplayBuffer:
    """At most one trajectory per prompt: the best seen, with its behaviour log-probs and reward.

    Each entry keeps the whole latent trajectory (K + 1, C, H, W), the log-probs recorded when it was
    sampled (K,) (never recomputed: they are p_off), its reward and the iteration it was stored at. Tensors
    live on the CPU. Freshness (paper: no form given): a stored reward counts as reward - decay * age, a
    subtraction that works for negative rewards too, so old entries become easy to replace.
    """

    def __init__(self, capacity: int, decay: float):
        self.capacity, self.decay = capacity, decay
        self.entries: dict[str, dict] = {}
        self.clock = 0  # iterations seen; advanced once per iteration by `tick`

    def __len__(self) -> int:
        return len(self.entries)

    def tick(self) -> None:
        self.clock += 1

    def decayed_reward(self, prompt: str) -> float:
        entry = self.entries[prompt]
        return entry["reward"] - self.decay * (self.clock - entry["born"])

    def offer(self, prompt: str, latents: torch.Tensor, log_probs: torch.Tensor, reward: float) -> bool:
        """Admission rule: replace the prompt's own entry if better, else fill, else evict the lowest."""
        if prompt in self.entries:
            if reward <= self.decayed_reward(prompt):
                return False
        elif len(self.entries) >= self.capacity:
            lowest = min(self.entries, key=self.decayed_reward)
            if reward <= self.decayed_reward(lowest):
                return False
            del self.entries[lowest]
        self.entries[prompt] = {
            # clone: a row of the batch is a view that would keep (and checkpoint) the whole batch's storage
            "latents": latents.detach().cpu().clone(),
            "log_probs": log_probs.detach().cpu().clone(),
            "reward": float(reward),
            "born": self.clock,
        }
        return True

    def sample(self, n: int, rng: random.Random) -> list[str]:
        """n distinct stored prompts, uniformly (paper: silent on how entries are drawn)."""
        return rng.sample(sorted(self.entries), min(n, len(self.entries)))

    def mean_age(self) -> float:
        return float(np.mean([self.clock - e["born"] for e in self.entries.values()])) if self.entries else 0.0

    def state_dict(self) -> dict:
        """Everything, for checkpoints. Bytes per entry: 4 (K + 1) C H W for the latents plus 4 K for the
        log-probs, all float32: 11 x 4 x 8 x 8 x 4 B = 11 kB for the tiny model, 11 x 16 x 64 x 64 x 4 B =
        2.9 MB for SD3.5 at 512 px (K = 10), so the default 128 entries take 369 MB of CPU memory there."""
        return {"clock": self.clock, "entries": self.entries}

    def load_state_dict(self, state: dict) -> None:
        self.clock, self.entries = state["clock"], state["entries"]


# =========================================================================================================
# Rewards: images (PIL) and prompts -> rewards (B,)
# =========================================================================================================
def geneval_reward(images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
    """The toy world's dense score: the fraction of the prompt's requirements met (toy_world.requirements)."""
    return torch.tensor([toy_world.score_prompt(p, im)[1] for im, p in zip(images, prompts)])


def geneval_strict_reward(images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
    """The toy world's strict 0/1 score, GenEval's own: 1 only if every requirement is met. Sparse: a group can be all 0."""
    return torch.tensor([toy_world.score_prompt(p, im)[0] for im, p in zip(images, prompts)])


def jpeg_reward(images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
    """DDPO's JPEG compressibility: minus the size in kB of the image saved as JPEG at quality 95."""
    sizes = []
    for image in images:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=95)
        sizes.append(buffer.tell() / 1000)
    return -torch.tensor(sizes)


PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"  # CLIP-H fine-tuned on Pick-a-Pic preferences (Kirstain et al. 2023)
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # the CLIP-H it was fine-tuned from: tokenizer and image transform
PICKSCORE: dict = {}  # "model" and "processor", set by load_pickscore before training (or by a test, with a tiny CLIP)


def load_pickscore(device: torch.device, dtype: torch.dtype) -> None:
    from transformers import AutoProcessor, CLIPModel

    PICKSCORE["processor"] = from_hub(f"the PickScore processor {PICKSCORE_PROCESSOR}", lambda: AutoProcessor.from_pretrained(PICKSCORE_PROCESSOR))
    model = from_hub(f"the PickScore model {PICKSCORE_MODEL}", lambda: CLIPModel.from_pretrained(PICKSCORE_MODEL, dtype=dtype))
    PICKSCORE["model"] = model.eval().requires_grad_(False).to(device)


@torch.no_grad()
def pickscore_reward(images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
    """PickScore: logit_scale x cos(image embedding, prompt embedding) of the preference-tuned CLIP, divided by
    26 as Flow-GRPO does, which puts typical SD3.5 scores near 0.85."""
    model, processor = PICKSCORE["model"], PICKSCORE["processor"]
    inputs = processor(images=images, text=prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    logits = model(**inputs.to(model.device)).logits_per_image  # (B, B): logit_scale * cos(image_i, text_j)
    return logits.diagonal().float().cpu() / 26


REWARDS = {"geneval": geneval_reward, "geneval_strict": geneval_strict_reward, "jpeg": jpeg_reward, "pickscore": pickscore_reward}


def weighted_reward(weights: dict[str, float]):
    """One reward function from a parse_reward dict: (images, prompts) -> sum of weight x reward, (B,)."""

    def reward_fn(images, prompts):
        return sum(weight * REWARDS[name](images, prompts).float() for name, weight in weights.items())

    return reward_fn


def compute_rewards(reward_fn, name: str, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
    """reward_fn on a batch, (B,) float32. If it raises, it is run image by image to name the first prompt it
    fails on; a NaN/inf reward is a NonFiniteError naming its prompt."""
    try:
        rewards = reward_fn(images, prompts).float()
    except Exception as error:
        for image, prompt in zip(images, prompts):
            try:
                reward_fn([image], [prompt])
            except Exception as single:
                raise RuntimeError(f"reward {name!r} failed on prompt {prompt!r}: {type(single).__name__}: {single}") from single
        raise RuntimeError(f"reward {name!r} failed on a batch of {len(prompts)} (each image alone passes): {error}") from error
    bad = (~torch.isfinite(rewards)).nonzero().flatten()
    if len(bad):
        raise NonFiniteError(f"non-finite reward {name!r} ({rewards[bad[0]].item()}) for prompt {prompts[bad[0]]!r}")
    return rewards


# =========================================================================================================
# The model: loading, prompt embeddings, velocity with optional guidance, sampling, decoding
# =========================================================================================================
def from_hub(what: str, load):
    """Run a from_pretrained call; a missing, gated or unreachable model becomes one line saying what to do."""
    try:
        return load()
    except OSError as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        sys.exit(f"op_grpo.py: error: cannot load {what} ({reason}). Log in with `hf auth login` (gated models such as "
                 "SD3.5 also need their license accepted on the Hub page), or download it beforehand with `hf download <id>` "
                 "on a machine with access and point HF_HOME at that cache, or pass a local folder to --pretrained")


FROZEN_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# LoRA targets, the diffusers names of SD3's joint-attention projections as Flow-GRPO lists them: the image
# stream (to_q/k/v, to_out.0) and the text stream (add_q/k/v_proj, to_add_out). SD3.5's first 13 blocks also
# have a second, image-only self-attention `attn2` (MMDiT-X); "attn.to_q" does not match "attn2.to_q", so it
# stays frozen, as in Flow-GRPO. The feed-forward layers and the AdaLN modulations stay frozen too.
LORA_TARGETS = ["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
                "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v"]


def load_pipeline(args: Args, device: torch.device):
    """An SD3-family pipeline from the Hub or a folder, every weight in the --mixed-precision dtype; the
    embedded tiny model is loaded exactly the way an SD3.5 checkpoint is."""
    from diffusers import StableDiffusion3Pipeline

    if args.model == "tiny" and not os.path.isfile(os.path.join(args.pretrained, "model_index.json")):
        sys.exit(f"op_grpo.py: error: the embedded model is missing from {args.pretrained}; rebuild it with `python toy_world.py`")
    dtype = FROZEN_DTYPES[args.mixed_precision]
    no_t5 = dict(text_encoder_3=None, tokenizer_3=None) if args.max_sequence_length == 0 else {}  # T5 is not even loaded
    pipe = from_hub(f"--pretrained {args.pretrained}", lambda: StableDiffusion3Pipeline.from_pretrained(args.pretrained, dtype=dtype, **no_t5))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def make_trainable(transformer, args: Args):
    """LoRA adapters (rank > 0) or every weight become trainable, in fp32; the rest stays frozen in its dtype.
    Returns the KL reference: a frozen copy for full fine-tuning, the model itself with adapters off for LoRA."""
    transformer.requires_grad_(False)
    if not args.lora_rank:
        reference = copy.deepcopy(transformer) if args.kl_beta > 0 else None
        transformer.float().requires_grad_(True)
        return reference
    from peft import LoraConfig

    transformer.add_adapter(LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha or 2 * args.lora_rank,
                                       init_lora_weights="gaussian", target_modules=LORA_TARGETS))
    for parameter in transformer.parameters():
        if parameter.requires_grad:  # the adapters: fp32 even when the base weights are bf16
            parameter.data = parameter.data.float()
    return transformer if args.kl_beta > 0 else None


@contextlib.contextmanager
def as_reference(transformer, reference):
    """Inside the block, `reference` computes the frozen initial model: with LoRA (reference is transformer)
    the adapters are switched off, so the KL needs no second copy of the weights."""
    if reference is not transformer:
        yield
        return
    transformer.disable_adapters()
    try:
        yield
    finally:
        transformer.enable_adapters()


def save_weights(transformer, args: Args, folder: str) -> None:
    """LoRA: diffusers' LoRA format, which StableDiffusion3Pipeline.load_lora_weights(folder) reads (with its
    rank and alpha); full fine-tuning: the transformer in diffusers format."""
    if not args.lora_rank:
        transformer.save_pretrained(folder)
        return
    from diffusers import StableDiffusion3Pipeline
    from peft.utils import get_peft_model_state_dict

    StableDiffusion3Pipeline.save_lora_weights(folder, transformer_lora_layers=get_peft_model_state_dict(transformer),
                                               transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict())


@torch.no_grad()
def embed_prompts(pipe, prompts: list[str], max_sequence_length: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Text embeddings of every prompt, computed once and kept on the CPU: prompt -> (embeds (L, D), pooled (D',)).
    '' is the unconditional prompt used by guidance. L = 77 CLIP tokens + max_sequence_length T5 tokens."""
    table = {}
    for start in range(0, len(prompts), 64):
        chunk = prompts[start : start + 64]
        embeds, _, pooled, _ = pipe.encode_prompt(
            chunk, None, None, do_classifier_free_guidance=False, max_sequence_length=max_sequence_length
        )
        table.update({p: (e.cpu(), q.cpu()) for p, e, q in zip(chunk, embeds, pooled)})
    return table


def predict_velocity(transformer, x, sigma, embeds, pooled, guidance_scale, uncond=None):
    """v_theta(x, sigma, c), (B, C, H, W). With guidance > 1, one batched pass over conditional and
    unconditional inputs, v = v_u + g (v_c - v_u); uncond = (embeds, pooled) of the empty prompt."""
    timestep = torch.as_tensor(sigma * 1000.0, device=x.device, dtype=torch.float32).expand(len(x))
    x, embeds, pooled = x.to(transformer.dtype), embeds.to(transformer.dtype), pooled.to(transformer.dtype)
    uncond = uncond and tuple(t.to(transformer.dtype) for t in uncond)
    if guidance_scale == 1.0:
        return transformer(hidden_states=x, timestep=timestep, encoder_hidden_states=embeds, pooled_projections=pooled).sample
    u_embeds, u_pooled = (t.expand(len(x), *t.shape) for t in uncond)
    v = transformer(
        hidden_states=torch.cat([x, x]), timestep=torch.cat([timestep, timestep]),
        encoder_hidden_states=torch.cat([u_embeds, embeds]), pooled_projections=torch.cat([u_pooled, pooled]),
    ).sample
    v_uncond, v_cond = v.chunk(2)
    return v_uncond + guidance_scale * (v_cond - v_uncond)


@torch.no_grad()
def sample_trajectories(transformer, start, sigmas, first_step, embeds, pooled, noise_level, guidance_scale, uncond, generator, rows=None):
    """Run the sampler from latents `start` at sigmas[first_step] to sigma = 0.

    Returns latents (B, K - first_step + 1, C, H, W) including `start`, and log_probs (B, K - first_step)
    (NaN for the ODE, noise_level 0). first_step > 0 regenerates the tail of a truncated trajectory.
    rows = (index, total), several processes only: `start` is rows `index` of a batch of `total` trajectories;
    each step's noise is drawn for the whole batch and sliced, so every trajectory gets the noise it would get
    in one process and the processes' generators stay in step.
    """
    latents, log_probs = [start.float()], []
    x = start
    for k in range(first_step, len(sigmas) - 1):
        v = predict_velocity(transformer, x, sigmas[k], embeds, pooled, guidance_scale, uncond)
        require_finite("velocity", v, f"while sampling step {k}")
        noise = None if rows is None else torch.randn((rows[1], *x.shape[1:]), generator=generator, device=x.device)[rows[0]]
        x, log_prob, _, _ = sde_step_with_logprob(v, x, sigmas[k], sigmas[k + 1], noise_level, generator=generator, noise=noise)
        if noise_level > 0:
            require_finite("log-prob", log_prob, f"while sampling step {k}")
        latents.append(x)
        log_probs.append(log_prob)
    return torch.stack(latents, dim=1), torch.stack(log_probs, dim=1)


@torch.no_grad()
def decode(pipe, latents: torch.Tensor, micro_batch: int = 0) -> list[Image.Image]:
    """Final latents (B, C, H, W) -> PIL images through the VAE, undoing the latent shift and scale; micro_batch
    latents at a time (0 = all)."""
    config, images = pipe.vae.config, []
    for chunk in latents.split(micro_batch or len(latents)):
        pixels = pipe.vae.decode(chunk.to(pipe.vae.dtype) / config.scaling_factor + config.shift_factor).sample
        images += pipe.image_processor.postprocess(pixels.float(), output_type="pil")
    return images


def latent_shape(pipe, resolution: int) -> tuple[int, int, int]:
    """(C, H, W) of the latents for square images of `resolution` pixels."""
    side = resolution // pipe.vae_scale_factor
    return (pipe.transformer.config.in_channels, side, side)


def noise_schedule(pipe, num_steps: int, device) -> torch.Tensor:
    """The scheduler's sigmas (K + 1,), from 1 down to 0, with its shift applied (as the stock pipeline)."""
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(num_steps, device=device)
    return scheduler.sigmas.float()


# =========================================================================================================
# Evaluation with the ODE sampler, fixed prompts and noise: strict toy-GenEval accuracy, or the mean reward
# =========================================================================================================
def eval_prompts(per_family: int, seed: int = 1234) -> dict[str, list[str]]:
    """The fixed evaluation prompts: per_family prompts per family, for the held-out and training sets."""
    train, held_out = toy_world.split_specs()
    rng = random.Random(seed)
    sets = {}
    for name, specs in (("held_out", held_out), ("train", train)):
        sets[name] = []
        for family in toy_world.FAMILIES:
            pool = [s for s in specs if s.family == family]
            sets[name] += [toy_world.describe(rng.choice(pool)) for _ in range(per_family if pool else 0)]
    return sets


def mix_mean_and_se(per_family: dict[str, list[float]]) -> tuple[float, float]:
    """EVAL_MIX-weighted mean of per-image scores over families, and its standard error (families as strata).
    A prompt list has the one family "all"."""
    weights = {f: toy_world.EVAL_MIX.get(f, 1.0) for f in per_family}
    total = sum(weights.values())
    mean = sum(w * np.mean(per_family[f]) for f, w in weights.items()) / total
    var = sum(w**2 * np.var(per_family[f]) / len(per_family[f]) for f, w in weights.items()) / total**2
    return float(mean), math.sqrt(var)


@torch.no_grad()
def evaluate(pipe, transformer, table, sets, args, sigmas, device, reward_fn):
    """ODE samples of fixed prompts from fixed noise, scored per set and family.

    Toy world: strict accuracy (the verifier's 0/1), sets held_out and train, EVAL_MIX-weighted; a prompt
    list: the training reward, one set. eval_reward is the mean over sets and eval_se its standard error.
    Also returns the images (for grids) and the per-image outcomes, so that a later evaluation can be
    compared image by image (a paired difference has a much smaller error).
    """
    metrics, images_by_set, outcomes = {}, {}, {}
    chunk_size = 4 * args.micro_batch or 64
    for name, prompts in sets.items():
        generator = torch.Generator(device).manual_seed(args.seed + 99)  # the same noise at every evaluation
        images = []
        for start in range(0, len(prompts), chunk_size):
            chunk = prompts[start : start + chunk_size]
            embeds = torch.stack([table[p][0] for p in chunk]).to(device)
            pooled = torch.stack([table[p][1] for p in chunk]).to(device)
            uncond = tuple(t.to(device) for t in table[""])
            noise = torch.randn((len(chunk), *latent_shape(pipe, args.resolution)), generator=generator, device=device)
            latents, _ = sample_trajectories(transformer, noise, sigmas, 0, embeds, pooled, 0.0, args.guidance_scale, uncond, generator)
            images += decode(pipe, latents[:, -1], args.micro_batch)
        images_by_set[name] = images
        strict, dense = {}, {}
        if uses_toy_world(args):
            for prompt, image in zip(prompts, images):
                family = toy_world.SPEC_BY_PROMPT[prompt].family
                s, d = toy_world.score_prompt(prompt, image)
                strict.setdefault(family, []).append(s)
                dense.setdefault(family, []).append(d)
        else:
            strict["all"] = dense["all"] = compute_rewards(reward_fn, args.reward, images, prompts).tolist()
        outcomes[name] = strict
        metrics.update({f"eval/{name}/{family}": float(np.mean(v)) for family, v in strict.items()})
        metrics[f"eval/{name}"], metrics[f"eval/{name}/se"] = mix_mean_and_se(strict)
        metrics[f"eval/{name}/dense"] = mix_mean_and_se(dense)[0]
    metrics["eval_reward"] = float(np.mean([metrics[f"eval/{name}"] for name in sets]))
    metrics["eval_se"] = math.sqrt(sum(metrics[f"eval/{name}/se"] ** 2 for name in sets)) / len(sets)
    return metrics, images_by_set, outcomes


def paired_change(before: dict, after: dict) -> tuple[float, float]:
    """Change of eval_reward between two evaluations on the same prompts and noise, with its paired
    standard error (from per-image differences, so the shared difficulty of each image cancels)."""
    stats = [
        mix_mean_and_se({f: np.subtract(after[name][f], before[name][f]) for f in before[name]}) for name in before
    ]
    return sum(m for m, _ in stats) / len(stats), math.sqrt(sum(se**2 for _, se in stats)) / len(stats)


GRID_PICKS = 16  # evaluation images shown in the before/after grid, spread evenly over the held-out prompts


def before_after_grid(prompts, before, after, path, score=None, columns=8):
    """Two rows of `columns` samples: before on top of after, the prompt and (toy world) both strict scores
    underneath. The three lists hold the picked images only (2 x columns each); score(prompt, image) -> 0/1."""
    side, cell_w, gap = 128, 150, 4
    cell_h = 2 * side + gap + 40
    grid = Image.new("RGB", (cell_w * columns, cell_h * 2), "white")
    draw = ImageDraw.Draw(grid)
    for i in range(len(prompts)):
        x, y = (i % columns) * cell_w, (i // columns) * cell_h
        for row, image in enumerate((before[i], after[i])):  # before on top, after below
            resample = Image.NEAREST if image.width <= side else Image.LANCZOS  # tiny images are shown as blocks
            grid.paste(image.resize((side, side), resample), (x + (cell_w - side) // 2, y + row * (side + gap)))
        words = prompts[i].split()
        draw.text((x + 3, y + 2 * side + gap + 2), " ".join(words[:4]), fill="black")
        draw.text((x + 3, y + 2 * side + gap + 13), " ".join(words[4:8]), fill="black")
        if score is not None:
            draw.text((x + 3, y + 2 * side + gap + 25), f"before {score(prompts[i], before[i]):.0f}  after {score(prompts[i], after[i]):.0f}", fill="black")
    grid.save(path)


# =========================================================================================================
# Checkpoints and interruption: a crash, a NaN or Ctrl-C never costs the run
# =========================================================================================================
def rng_states(rng: random.Random, generator: torch.Generator) -> dict:
    """Every random stream the loop draws from: prompts (Python), noise and minibatches (generator), torch's global one."""
    return {"python": rng.getstate(), "generator": generator.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_states(states: dict, rng: random.Random, generator: torch.Generator) -> None:
    rng.setstate(states["python"])
    generator.set_state(states["generator"])
    torch.set_rng_state(states["torch"])
    if states["cuda"]:
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(folder: str, transformer, state: dict) -> None:
    """Write <folder>/checkpoint.pt: the trainable weights (all of them, or the adapters) plus `state`
    (iteration, optimizer, scheduler, buffer, RNG states, metrics so far). Weights holding a NaN or inf are
    never written; the file is replaced atomically, so a crash while writing leaves the previous one."""
    trainable = {name: p.detach().cpu().clone() for name, p in transformer.named_parameters() if p.requires_grad}
    for name, weight in trainable.items():
        require_finite(f"weight {name}", weight, "(checkpoint not written; the previous one is kept)")
    path = os.path.join(folder, CHECKPOINT)
    torch.save({**state, "trainable": trainable}, path + ".tmp")
    os.replace(path + ".tmp", path)


STOP_REQUESTED: list[str] = []  # signals received; main() checks it after every iteration


def request_stop(signum, frame) -> None:
    """SIGINT/SIGTERM handler (installed by the command line): the first lets the current iteration finish and
    a checkpoint be written; a second stops at once, keeping the last checkpoint."""
    if STOP_REQUESTED:
        raise KeyboardInterrupt
    STOP_REQUESTED.append(signal.Signals(signum).name)
    print(f"\n{STOP_REQUESTED[0]}: finishing this iteration and writing a checkpoint (send it again to stop now)", file=sys.stderr, flush=True)


def parse_cli(argv: list[str]) -> Args:
    """tyro's command line. With --resume FOLDER the defaults become that run's args.json, so a resumed run
    keeps its settings and only flags given again change (e.g. a higher --iterations)."""
    defaults = Args()
    for i, token in enumerate(argv):
        if token == "--resume" or token.startswith("--resume="):
            folder = token.partition("=")[2] or (argv[i + 1] if i + 1 < len(argv) else "")
            try:
                with open(os.path.join(folder, "args.json")) as f:
                    saved = json.load(f)
                defaults = Args(**{**saved, "overwrite": False})
            except (OSError, ValueError, TypeError) as error:
                sys.exit(f"op_grpo.py: error: --resume {folder}: cannot read the run's args.json ({error})")
    return tyro.cli(Args, args=argv, default=defaults)


# =========================================================================================================
# Several processes (torchrun / accelerate launch). With one process every helper is a no-op.
# =========================================================================================================
def init_distributed(args: Args) -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under a launcher (WORLD_SIZE > 1) join the process group: NCCL and one GPU
    per process when CUDA is there, gloo on CPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    import torch.distributed as dist

    use_cuda = torch.cuda.is_available() and args.device in (None, "cuda")
    if use_cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if not dist.is_initialized():  # an hour: the other ranks wait while rank 0 evaluates alone
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(hours=1))
    return dist.get_rank(), world, torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")


def gather(obj, world: int) -> list:
    """Every process's `obj` (picklable), in rank order; one process: [obj]."""
    if world == 1:
        return [obj]
    out = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


def sum_gradients(parameters: list, world: int) -> None:
    """Sum the gradients over processes, once per optimizer step. (DDP would sync inside every backward and needs
    the same number of them on every rank; here each rank runs one pass per (step, micro-batch) it holds.)"""
    if world == 1:
        return
    for p in parameters:
        if p.grad is None:  # this rank had no sample in the minibatch
            p.grad = torch.zeros_like(p)
        torch.distributed.all_reduce(p.grad)


def rank_divergence(parameters: list, world: int) -> float:
    """Largest |weight - rank 0's weight| over processes: 0 when the update kept every copy identical."""
    local = torch.cat([p.detach().flatten().float() for p in parameters])
    reference = local.clone()
    torch.distributed.broadcast(reference, src=0)
    divergence = (local - reference).abs().max()
    torch.distributed.all_reduce(divergence, op=torch.distributed.ReduceOp.MAX)
    return divergence.item()


# =========================================================================================================
# Training
# =========================================================================================================
def main(args: Args) -> list[dict]:
    # ---- 0. Arguments, seeds, batch arithmetic: everything that can be wrong is caught before loading
    args = with_presets(args)
    check_args(args)
    STOP_REQUESTED.clear()  # a signal from an earlier run in this process does not stop this one
    if args.threads:
        torch.set_num_threads(args.threads)
    # [distributed] every process draws the same prompts and noise from the same seeds; process `rank` keeps the
    # prompt slots rank, rank + world, ...: whole groups (advantages stay local), replayed slots spread over ranks
    rank, world, device = init_distributed(args)
    main_process = rank == 0
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    generator = torch.Generator(device).manual_seed(args.seed)
    P, G, K = args.prompts_per_iteration, args.group_size, args.num_steps
    n_replay = args.off_policy_fraction * P  # replayed groups per iteration, on average
    # the last step, the sharpest Gaussian and the one least able to change the image, is left out by default
    n_train_steps = args.train_steps or K - 1
    B = P * G
    say = print if main_process else (lambda *a, **k: None)  # [distributed] output from rank 0 only
    if world > 1:
        say(f"{world} processes; the {P} prompt slots are dealt out to them, whole groups each")
    say(
        f"batch: {P} prompts x {G} images = {B} trajectories of {K} steps per iteration; "
        f"{n_replay:g} replayed groups ({G - 1} fresh + 1 stored, last {args.truncate_steps} steps regenerated) "
        f"-> {B - n_replay:g} fresh samples; {args.updates_per_batch} updates of {B // args.updates_per_batch} samples "
        f"on the first {n_train_steps} steps" + (f", {args.micro_batch} per pass" if args.micro_batch else "")
    )
    os.makedirs(args.output_dir, exist_ok=True)
    if main_process:
        with open(os.path.join(args.output_dir, "args.json"), "w") as f:
            json.dump(asdict(args), f, indent=2)  # first, so that --resume finds the settings of any checkpoint

    # ---- 1. Prompts; model, trainable weights and KL reference; prompt embeddings (then the text encoders go)
    if uses_toy_world(args):  # the toy GenEval world: training prompts drawn by family, held-out evaluation set
        train_specs, _ = toy_world.split_specs()
        train_prompts = sorted({toy_world.describe(s) for s in train_specs})
        sets = eval_prompts(args.eval_per_family)

        def draw_prompts(n):
            return [toy_world.describe(s) for s in toy_world.sample_specs(train_specs, toy_world.EVAL_MIX, n, rng)]
    else:  # a prompt list: uniform draws for training, the list cycled for a fixed evaluation set
        train_prompts = read_prompts(args.prompt_file) if args.prompt_file else DEFAULT_PROMPTS
        sets = {"prompts": [train_prompts[i % len(train_prompts)] for i in range(args.eval_per_family)]}

        def draw_prompts(n):
            return [rng.choice(train_prompts) for _ in range(n)]

    pipe = load_pipeline(args, device)
    reward_weights = parse_reward(args.reward)
    if "pickscore" in reward_weights:
        load_pickscore(device, FROZEN_DTYPES[args.mixed_precision])
    reward_fn = weighted_reward(reward_weights)
    transformer = pipe.transformer
    reference = make_trainable(transformer, args)
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    trainable = [p for p in transformer.parameters() if p.requires_grad]
    all_prompts = sorted(set(train_prompts) | {p for v in sets.values() for p in v} | {""})
    table = embed_prompts(pipe, all_prompts, args.max_sequence_length)
    pipe.text_encoder = pipe.text_encoder_2 = pipe.text_encoder_3 = None  # embeddings are cached; the encoders go
    if device.type == "cuda":
        torch.cuda.empty_cache()
    optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate, weight_decay=0.0)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: min(1.0, (i + 1) / (args.warmup_iterations + 1)))
    sigmas = noise_schedule(pipe, K, device)
    eval_sigmas = noise_schedule(pipe, args.eval_steps, device)
    buffer = ReplayBuffer(args.buffer_capacity, args.reward_decay)
    uncond = tuple(t.to(device) for t in table[""])
    shape = latent_shape(pipe, args.resolution)  # (C, H, W)

    def embeds_of(prompts):
        return torch.stack([table[p][0] for p in prompts]).to(device), torch.stack([table[p][1] for p in prompts]).to(device)

    # ---- 2. Evaluation before any update, or the state of the run being resumed
    transformer.eval()
    grid_set = next(iter(sets))  # held_out in the toy world
    picks = np.linspace(0, len(sets[grid_set]) - 1, GRID_PICKS).round().astype(int)
    grid_prompts = [sets[grid_set][i] for i in picks]
    if args.resume:
        saved = torch.load(os.path.join(args.resume, CHECKPOINT), map_location="cpu", weights_only=True)
        missing = set(saved["trainable"]) ^ {n for n, p in transformer.named_parameters() if p.requires_grad}
        if missing:
            raise ValueError(f"--resume {args.resume}: its trainable weights do not match this model's: {sorted(missing)[:3]} ...")
        transformer.load_state_dict(saved["trainable"], strict=False)  # after the reference copy: it stays the base model
        optimizer.load_state_dict(saved["optimizer"])
        warmup.load_state_dict(saved["scheduler"])
        buffer.load_state_dict(saved["buffer"])
        set_rng_states(saved["rng"], rng, generator)
        start, history, baseline = saved["iteration"], saved["history"], saved["baseline"]
        print(f"resumed {args.resume} at iteration {start}")
    else:  # [distributed] rank 0 evaluates; the others get its result
        if main_process:
            metrics_before, images_before, outcomes_before = evaluate(pipe, transformer, table, sets, args, eval_sigmas, device, reward_fn)
            grid_before = [torch.from_numpy(np.array(images_before[grid_set][i])) for i in picks]  # (H, W, 3) uint8
            baseline = {"metrics": metrics_before, "outcomes": outcomes_before, "grid": grid_before}
        baseline = gather(baseline if main_process else None, world)[0]
        start, history = 0, []
    metrics_before, outcomes_before = baseline["metrics"], baseline["outcomes"]
    say(f"before: eval_reward {metrics_before['eval_reward']:.3f} +- {metrics_before['eval_se']:.3f} ("
          + ", ".join(f"{name} {metrics_before[f'eval/{name}']:.3f}" for name in sets) + ")")
    tracker = None
    if args.wandb_project and main_process:  # optional: the same rows, and sample images at every evaluation
        import wandb

        tracker = wandb.init(project=args.wandb_project, config=asdict(args), dir=args.output_dir)
    log_file = open(os.path.join(args.output_dir, "metrics.jsonl") if main_process else os.devnull, "w")
    log_file.writelines(json.dumps(row) + "\n" for row in history)  # a resumed run's log repeats the earlier rows

    def checkpoint(next_iteration: int, rng_state: dict) -> None:
        if not main_process:  # [distributed] every rank holds the same weights, buffer and random streams
            return
        save_checkpoint(args.output_dir, transformer, {
            "iteration": next_iteration, "optimizer": optimizer.state_dict(), "scheduler": warmup.state_dict(),
            "buffer": buffer.state_dict(), "rng": rng_state, "history": history, "baseline": baseline})

    # NaN/inf policy: a non-finite velocity, log-prob, reward, ratio, IS weight, KL, loss or gradient (named by
    # require_finite) skips the rest of the iteration's update with a warning; optimizer steps already taken had
    # finite gradients and stay. After nonfinite_patience such iterations in a row the run stops with a checkpoint.
    skipped_in_a_row = 0
    progress = tqdm(range(start, args.iterations), desc="OP-GRPO", dynamic_ncols=True, initial=start, total=args.iterations,
                    disable=not main_process)
    for iteration in progress:
        timings = {}
        clock = time.perf_counter()
        rng_at_start = rng_states(rng, generator)
        pristine = True  # nothing but random draws has changed yet in this iteration: a crash can still be checkpointed

        try:
            # ---- 3. Prompt slots: P - n_replay fresh prompts, n_replay stored prompts (fresh while the buffer is short)
            replay_prompts = buffer.sample(replay_slots(args, rng), rng) if args.off_policy_fraction else []
            slot_prompts = replay_prompts + draw_prompts(P - len(replay_prompts))  # (P,), replayed slots first
            n_rep = len(replay_prompts)
            # fresh trajectories: G - 1 for each replayed slot, G for each fresh slot
            fresh_prompts = [p for i, p in enumerate(slot_prompts) for _ in range(G - 1 if i < n_rep else G)]
            # [distributed] this process's slots and their rows among all fresh trajectories (one process: all)
            my_slots = list(range(rank, P, world))
            first_row = np.cumsum([0] + [G - 1 if i < n_rep else G for i in range(P)])
            fresh_rows = torch.tensor([r for s in my_slots for r in range(first_row[s], first_row[s + 1])], device=device)
            my_replayed = [s for s in my_slots if s < n_rep]

            # ---- 4. Rollouts with the SDE sampler; behaviour log-probs recorded as we go (these are p_old)
            fresh_prompts = [fresh_prompts[r] for r in fresh_rows.tolist()]
            embeds, pooled = embeds_of(fresh_prompts)
            noise = torch.randn((int(first_row[-1]), *shape), generator=generator, device=device)[fresh_rows]
            fresh_latents, fresh_log_probs = sample_trajectories(
                transformer, noise, sigmas, 0, embeds, pooled, args.noise_level, args.guidance_scale, uncond, generator,
                rows=(fresh_rows, first_row[-1]) if world > 1 else None,
            )  # (B_f, K + 1, C, H, W), (B_f, K)
            fresh_images = decode(pipe, fresh_latents[:, -1], args.micro_batch)
            timings["time/sampling"] = time.perf_counter() - clock
            clock = time.perf_counter()
            fresh_rewards = compute_rewards(reward_fn, args.reward, fresh_images, fresh_prompts)
            timings["time/reward"] = time.perf_counter() - clock

            # ---- 5. Replayed trajectories: p_old on the stored steps, the truncated tail regenerated by the current ODE
            clock = time.perf_counter()
            K_keep = K - args.truncate_steps
            rep_prompts = [replay_prompts[s] for s in my_replayed]
            if world > 1 and n_rep and not rep_prompts and args.truncate_steps:
                for _ in range(args.truncate_steps):  # [distributed] draw the tail's noise too, to stay in step
                    torch.randn((n_rep, *shape), generator=generator, device=device)
            if rep_prompts:
                rep_latents = torch.stack([buffer.entries[p]["latents"] for p in rep_prompts]).to(device)
                rep_behavior = torch.stack([buffer.entries[p]["log_probs"] for p in rep_prompts]).to(device)
                rep_embeds, rep_pooled = embeds_of(rep_prompts)
                rep_old = torch.empty_like(rep_behavior)  # (R, K)
                with torch.no_grad():
                    # one forward pass of the current model per step: the kept steps give the weight's p_old; the
                    # truncated ones only feed the cliff diagnostic logged below (3 passes over R samples)
                    for k in range(K):
                        v = predict_velocity(transformer, rep_latents[:, k], sigmas[k], rep_embeds, rep_pooled, args.guidance_scale, uncond)
                        _, rep_old[:, k], _, _ = sde_step_with_logprob(
                            v, rep_latents[:, k], sigmas[k], sigmas[k + 1], args.noise_level, prev_sample=rep_latents[:, k + 1]
                        )
                        require_finite("log p_old of a replayed trajectory", rep_old[:, k], f"at step {k}")
                timings["time/replay_old"] = time.perf_counter() - clock
                clock = time.perf_counter()
                if args.truncate_steps:
                    # Eq. 12-13: z_{t_off} kept, the rest regenerated deterministically; the new image is re-scored
                    # (paper: silent on re-scoring; we do, so that the reward belongs to the trajectory trained on)
                    tail, _ = sample_trajectories(
                        transformer, rep_latents[:, K_keep], sigmas, K_keep, rep_embeds, rep_pooled, 0.0, args.guidance_scale, uncond, generator,
                        rows=(torch.tensor(my_replayed, device=device), n_rep) if world > 1 else None,
                    )
                    rep_latents = torch.cat([rep_latents[:, :K_keep], tail], dim=1)
                    rep_rewards = compute_rewards(reward_fn, args.reward, decode(pipe, rep_latents[:, -1], args.micro_batch), rep_prompts)
                else:
                    rep_rewards = torch.tensor([buffer.entries[p]["reward"] for p in rep_prompts])
                timings["time/tail"] = time.perf_counter() - clock

            # ---- 6. Assemble the batch: group g is slot g; in a replayed slot the stored trajectory is member 0
            latents_list, lp_old_list, lp_beh_list, rew_list, replayed_list, prompts = [], [], [], [], [], []
            cursor = 0
            for slot in my_slots:
                prompt, n_fresh = slot_prompts[slot], G - 1 if slot < n_rep else G
                if slot < n_rep:
                    j = my_replayed.index(slot)  # its row among this process's replayed trajectories
                    latents_list.append(rep_latents[j : j + 1])
                    lp_old_list.append(rep_old[j : j + 1])
                    lp_beh_list.append(rep_behavior[j : j + 1])
                    rew_list.append(rep_rewards[j : j + 1])
                    replayed_list.append(torch.ones(1, dtype=torch.bool))
                latents_list.append(fresh_latents[cursor : cursor + n_fresh])
                lp_old_list.append(fresh_log_probs[cursor : cursor + n_fresh])
                lp_beh_list.append(fresh_log_probs[cursor : cursor + n_fresh])
                rew_list.append(fresh_rewards[cursor : cursor + n_fresh])
                replayed_list.append(torch.zeros(n_fresh, dtype=torch.bool))
                prompts += [prompt] * G
                cursor += n_fresh
            latents = torch.cat(latents_list)  # (B, K + 1, C, H, W)
            log_prob_old = torch.cat(lp_old_list)  # (B, K)
            log_prob_behavior = torch.cat(lp_beh_list)  # (B, K)
            rewards = torch.cat(rew_list).to(device)  # (B,)
            replayed = torch.cat(replayed_list).to(device)  # (B,)
            keep = kept_steps(K, args.truncate_steps, replayed)  # (B, K)
            if args.correction == "sequence":
                is_weight = sequence_is_weight(log_prob_old, log_prob_behavior, keep)  # (B,), exactly 1 where fresh
            else:
                is_weight = torch.ones(len(latents), device=device)
            require_finite("IS weight", is_weight)
            if args.correction == "naive":
                log_prob_old = torch.where(replayed[:, None], log_prob_behavior, log_prob_old)  # clip against p_off
            advantages = group_advantages(rewards.view(-1, G)).flatten().clamp(-args.adv_clip, args.adv_clip)
            embeds, pooled = embeds_of(prompts)
            trained = keep & (torch.arange(K, device=device) < n_train_steps)  # (B, K): the steps in the loss
            # [distributed] sample b of the whole batch is member b % G of slot b // G; `local[b]` is its row here
            # (-1 on other processes), and `trained_all` the trained steps of the whole batch, for the loss's mean
            local = torch.full((B,), -1, device=device)
            local[torch.tensor([s * G + m for s in my_slots for m in range(G)], device=device)] = torch.arange(len(latents), device=device)
            replayed_all = torch.tensor([s < n_rep and m == 0 for s in range(P) for m in range(G)], device=device)
            trained_all = kept_steps(K, args.truncate_steps, replayed_all) & (torch.arange(K, device=device) < n_train_steps)

            # ---- 7. Buffer admission (Eq. 7): each group's best fresh trajectory is the candidate (no buffer at rho = 0)
            pristine = False  # from here on the buffer, the weights and the optimizer change
            buffer.tick()
            candidates = []  # (slot, latents, behaviour log-probs, reward) of this process's groups
            for i, slot in enumerate(my_slots if args.off_policy_fraction else []):
                members = torch.arange(i * G, (i + 1) * G, device=device)
                fresh = members[~replayed[members]]
                best = fresh[rewards[fresh].argmax()]
                candidates.append((slot, latents[best].cpu(), log_prob_behavior[best].cpu(), rewards[best].item()))
            # [distributed] every process offers every group's candidate in slot order: the buffers stay identical
            candidates = sorted((c for part in gather(candidates, world) for c in part), key=lambda c: c[0])
            admitted = sum(buffer.offer(slot_prompts[slot], *rest) for slot, *rest in candidates)

            # ---- 8. Policy update: updates_per_batch optimizer steps, each over a random 1/updates of the samples
            clock = time.perf_counter()
            transformer.train()
            stats = {"loss": [], "clipfrac_on": [], "clipfrac_off": [], "approx_kl": [], "kl": []}
            # groups whose rewards are all equal: zero advantage, no signal (common with a 0/1 reward)
            stats["flat"] = (rewards.view(-1, G).std(dim=1) == 0).float().tolist()
            for minibatch_all in torch.randperm(B, generator=generator, device=device).chunk(args.updates_per_batch):
                n_terms = trained_all[minibatch_all].sum()  # the loss averages over trained (sample, step) pairs
                minibatch = local[minibatch_all][local[minibatch_all] >= 0]  # this process's rows, in the same order
                optimizer.zero_grad(set_to_none=True)
                # one forward/backward pass per (step, micro-batch of the samples that train that step)
                passes = [(k, idx) for k in range(K) for idx in minibatch[trained[minibatch, k]].split(args.micro_batch or B) if len(idx)]
                for k, idx in passes:
                    v = predict_velocity(transformer, latents[idx, k], sigmas[k], embeds[idx], pooled[idx], args.guidance_scale, uncond)
                    require_finite("velocity", v, f"in the update at step {k}")
                    _, log_prob, mean, std_dev = sde_step_with_logprob(
                        v, latents[idx, k], sigmas[k], sigmas[k + 1], args.noise_level, prev_sample=latents[idx, k + 1]
                    )
                    surrogate, ratio = clipped_surrogate(log_prob, log_prob_old[idx, k], advantages[idx], args.clip_range)
                    require_finite("ratio p_theta / p_old", ratio, f"in the update at step {k}")
                    # Eq. 11: the whole clipped surrogate of a replayed trajectory is scaled by its constant weight w
                    loss = (is_weight[idx] * surrogate).sum()
                    if reference is not None:
                        with torch.no_grad(), as_reference(transformer, reference):
                            v_ref = predict_velocity(reference, latents[idx, k], sigmas[k], embeds[idx], pooled[idx], args.guidance_scale, uncond)
                            _, _, mean_ref, _ = sde_step_with_logprob(
                                v_ref, latents[idx, k], sigmas[k], sigmas[k + 1], args.noise_level, prev_sample=latents[idx, k + 1]
                            )
                        kl = gaussian_kl(mean, mean_ref, std_dev)
                        require_finite("KL to the reference", kl, f"in the update at step {k}")
                        loss = loss + args.kl_beta * kl.sum()
                        stats["kl"].append(kl.mean().item())
                    require_finite("loss", loss, f"in the update at step {k}")
                    (loss / n_terms).backward()
                    with torch.no_grad():
                        clipped = ((ratio - 1).abs() > args.clip_range).float()
                        rep = replayed[idx]
                        if (~rep).any():
                            stats["clipfrac_on"].append(clipped[~rep].mean().item())
                        if rep.any():
                            stats["clipfrac_off"].append(clipped[rep].mean().item())
                        # CleanRL's approx_kl: mean of (r - 1) - log r, a low-variance estimate of KL(old || new)
                        stats["approx_kl"].append(((ratio - 1) - torch.log(ratio)).mean().item())
                        stats["loss"].append(loss.item() / n_terms.item())
                sum_gradients(trainable, world)
                grad_norm = torch.nn.utils.clip_grad_norm_(trainable, args.max_grad_norm)
                require_finite("gradient norm", grad_norm, "before an optimizer step (the step is not taken)")
                optimizer.step()
            warmup.step()
            transformer.eval()
            timings["time/update"] = time.perf_counter() - clock
        except NonFiniteError as problem:
            if world > 1:  # [distributed] the other ranks cannot know: stop the job (the launcher stops every rank)
                raise
            optimizer.zero_grad(set_to_none=True)
            skipped_in_a_row += 1
            tqdm.write(f"iteration {iteration}: {problem}; update skipped ({skipped_in_a_row} in a row)", file=sys.stderr)
            row = {"iteration": iteration, "skipped": str(problem)}
            if skipped_in_a_row >= args.nonfinite_patience:
                history.append(row)
                checkpoint(iteration + 1, rng_states(rng, generator))
                raise RuntimeError(f"stopping after {skipped_in_a_row} iterations in a row with non-finite values "
                                   f"(last: {problem}); the weights are finite and saved in {args.output_dir}/{CHECKPOINT}")
        except BaseException:  # a crash, or a second Ctrl-C
            if pristine:  # the state is the iteration's start: checkpoint it, with the random streams rewound
                checkpoint(iteration, rng_at_start)
            raise
        else:
            # ---- 9. Log (an iteration whose update was skipped logs only why); evaluate every eval_every iterations
            skipped_in_a_row = 0
            # replayed trajectories: weights, re-scored rewards, log p_old - log p_off per step (R, K)
            rep_stats = (is_weight[replayed], rep_rewards, rep_old - rep_behavior) if rep_prompts else None
            if world > 1:  # [distributed] the logged statistics cover every process's samples
                parts = gather((fresh_rewards.cpu(), stats, rep_stats and tuple(t.cpu() for t in rep_stats)), world)
                fresh_rewards = torch.cat([p[0] for p in parts])
                stats = {key: [x for p in parts for x in p[1][key]] for key in stats}
                rep_parts = [p[2] for p in parts if p[2] is not None]
                rep_stats = tuple(torch.cat(ts) for ts in zip(*rep_parts)) if rep_parts else None
            row = {
                "iteration": iteration,
                "reward_mean": fresh_rewards.mean().item(),
                "reward_std": fresh_rewards.std().item(),
                "loss": float(np.sum(stats["loss"])) / args.updates_per_batch,
                "clipfrac_on_policy": float(np.mean(stats["clipfrac_on"])) if stats["clipfrac_on"] else None,
                "clipfrac_off_policy": float(np.mean(stats["clipfrac_off"])) if stats["clipfrac_off"] else None,
                "approx_kl": float(np.mean(stats["approx_kl"])),
                "kl_to_reference": float(np.mean(stats["kl"])) if stats["kl"] else None,
                "replayed_groups": n_rep,
                "flat_groups": float(np.mean(stats["flat"])),
                "buffer_size": len(buffer),
                "buffer_mean_age": buffer.mean_age(),
                "buffer_admitted": admitted,
                **timings,
            }
            if rep_stats:
                w, replay_rewards, log_ratio = rep_stats
                row.update({"is_weight_mean": w.mean().item(), "is_weight_min": w.min().item(), "is_weight_max": w.max().item(),
                            "replay_reward_mean": replay_rewards.mean().item()})
                # the late-step "cliff" (paper Fig. 2): per-step mean of log p_old - log p_off on replayed data
                row["log_ratio_old_behavior_per_step"] = log_ratio.mean(0).tolist()
                row["log_ratio_old_behavior_per_step_std"] = log_ratio.std(0, correction=0).tolist()
        if (iteration + 1) % args.eval_every == 0 or iteration == args.iterations - 1:
            if world > 1:
                row["rank_weight_divergence"] = rank_divergence(trainable, world)
        if main_process and ((iteration + 1) % args.eval_every == 0 or iteration == args.iterations - 1):
            clock = time.perf_counter()
            eval_metrics, images_after, outcomes_after = evaluate(pipe, transformer, table, sets, args, eval_sigmas, device, reward_fn)
            row.update(eval_metrics)
            row["eval_change"], row["eval_change_se"] = paired_change(outcomes_before, outcomes_after)
            row["time/eval"] = time.perf_counter() - clock
        elif iteration == 0:
            row.update(metrics_before)  # the evaluation before the first update, logged with iteration 0
        history.append(row)
        log_file.write(json.dumps(row) + "\n")
        log_file.flush()
        if tracker:
            tracker.log({k: v for k, v in row.items() if not isinstance(v, list)}, step=iteration)
            if "eval_reward" in row:
                tracker.log({"samples": [wandb.Image(images_after[grid_set][i], caption=sets[grid_set][i]) for i in picks]}, step=iteration)
        progress.set_postfix(reward=f"{row.get('reward_mean', float('nan')):.3f}", eval=f"{row.get('eval_reward', float('nan')):.3f}")
        stop = any(gather(bool(STOP_REQUESTED), world))  # [distributed] one rank's signal stops them all
        if stop or (args.checkpoint_every and (iteration + 1) % args.checkpoint_every == 0):
            checkpoint(iteration + 1, rng_states(rng, generator))
        if stop:
            say(f"stopped by {(STOP_REQUESTED or ['a signal'])[0]} after iteration {iteration}; continue with: "
                  f"python op_grpo.py --resume {args.output_dir}", file=sys.stderr)
            return history
    log_file.close()
    checkpoint(args.iterations, rng_states(rng, generator))  # lets --resume with a higher --iterations train on
    if not main_process:
        return history

    # ---- 10. Results: before/after scores per set and family, a sample grid, the fine-tuned weights
    final = history[-1]
    say(f"after:  eval_reward {final['eval_reward']:.3f} +- {final['eval_se']:.3f} ("
          + ", ".join(f"{name} {final[f'eval/{name}']:.3f}" for name in sets) + "); "
          f"change {final['eval_change']:+.3f} +- {final['eval_change_se']:.3f} (paired standard error)")
    for key in sorted(k for k in final if k.startswith("eval/") and k.count("/") == 2 and not k.endswith(("/se", "/dense"))):
        print(f"  {key:28s} {metrics_before[key]:.3f} -> {final[key]:.3f}")
    grid_before = [Image.fromarray(t.numpy()) for t in baseline["grid"]]
    grid_path = os.path.join(args.output_dir, "before_after.png")
    score = (lambda prompt, image: toy_world.score_prompt(prompt, image)[0]) if uses_toy_world(args) else None
    before_after_grid(grid_prompts, grid_before, [images_after[grid_set][i] for i in picks], grid_path, score)
    save_weights(transformer, args, os.path.join(args.output_dir, "lora" if args.lora_rank else "transformer"))
    if tracker:
        tracker.log({"before_after": wandb.Image(grid_path)})
        tracker.finish()
    return history


if __name__ == "__main__":
    cli_args = parse_cli(sys.argv[1:])
    try:
        check_args(cli_args)
    except ValueError as error:
        sys.exit(f"op_grpo.py: error: {error}")
    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    main(cli_args)
