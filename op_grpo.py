"""OP-GRPO: off-policy GRPO for flow-matching image and video generators, in one file.

Papers
  OP-GRPO   "Efficient Off-Policy GRPO for Flow-Matching Models", arXiv 2604.04142 (equation numbers below)
  Flow-GRPO "Training Flow Matching Models via Online RL", arXiv 2505.05470 (the SDE sampler, the baseline)
  DDPO      "Training Diffusion Models with Reinforcement Learning", arXiv 2305.13301 (RL on denoising chains)

Every iteration samples groups of images per prompt with a stochastic (SDE) version of the flow sampler, scores
them with a reward and takes PPO-style clipped policy-gradient steps on every denoising step (Flow-GRPO). OP-GRPO
adds a replay buffer of each prompt's best trajectory: a fraction of the groups reuse one stored trajectory, its
late steps cut off and regenerated, its surrogate loss multiplied by a sequence-level importance weight.

  python op_grpo.py                          # embedded tiny SD3 on the toy GenEval world, 2 CPU cores, ~9 min
  python op_grpo.py --off-policy-fraction 0  # the same run as plain on-policy Flow-GRPO
  python op_grpo.py --model sd3              # Stable Diffusion 3.5 Medium with LoRA and PickScore, one GPU
  python op_grpo.py --model wan              # Wan2.1-T2V-1.3B video, PickScore on every 4th frame, one GPU
  python op_grpo.py --model tiny-video       # embedded tiny Wan on the toy video world (moving shapes), CPU

Reading order: Args -> pure math -> replay buffer -> rewards -> model helpers -> the stages of one iteration ->
main() -> evaluation -> the command line. What does not change what is computed (argument checks, processes, NaN
policy, checkpoints, logging, signals) is in plumbing.py.

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
  rho, replayed     --off-policy-fraction, the share of the P prompt slots that replay a stored trajectory;
                    "replayed" is the one word for those slots, their prompts, trajectories and groups
"""

import contextlib
import copy
import functools
import math
import os
import random
import signal
import sys
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch
from PIL import Image

import plumbing
import rewards
import toy_video
import toy_world
from plumbing import NonFiniteError, UsageError, from_hub, require_finite, timed

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass
class Args:
    """OP-GRPO fine-tuning of an SD3-family or Wan pipeline. A flag left at None takes its --model preset (PRESETS)."""

    # --- model, prompts and reward
    model: Literal["tiny", "sd3", "wan", "tiny-video"] = "tiny"
    """tiny: the embedded toy-world SD3 in tiny_sd3/ (CPU, offline, ~9 min); sd3: Stable Diffusion 3.5 Medium; wan:
    Wan2.1-T2V-1.3B, text to video; tiny-video: the embedded toy-video-world Wan in tiny_wan/ (CPU, offline)"""
    task: Literal["pickscore", "ocr", "geneval", "pickscore-fast", "geneval-fast"] | None = None
    """sd3 only: the Flow-GRPO config whose values fill the flags left unset (TASKS; None = pickscore): pickscore_sd3,
    general_ocr_sd3, geneval_sd3, and Flow-GRPO-Fast's pickscore_sd3_fast_nocfg and geneval_sd3_fast_nocfg"""
    pretrained: str | None = None
    """Hub id or folder of the --model's pipeline (tiny: ./tiny_sd3, sd3: stabilityai/stable-diffusion-3.5-medium)"""
    reward: str | None = None
    """jpeg, pickscore, ocr, video_ocr, geneval, geneval_strict (rewards.py; a toy world's: geneval(_strict), motion,
    motion_strict) or a sum name=weight,... (tiny: geneval, tiny-video: motion, sd3: the --task's, wan: video_ocr)"""
    prompt_file: str | None = None
    """text file, one prompt per line, or GenEval's metadata .jsonl; None = the toy world's prompts (tiny), the
    built-in DEFAULT_PROMPTS (sd3), assets/ocr_prompts.txt (an OCR reward)"""
    toy_prompts: str | None = None
    """toy world only: a file of its prompts; training draws and both evaluation sets keep only those (a band)"""
    output_dir: str | None = None
    """where metrics.jsonl, checkpoints, the before/after grid and the weights go; None = runs/<model>, or the first of
    runs/<model>-2, -3, ... that holds no run (an explicit folder holding a run needs --resume or --overwrite)"""
    seed: int = 0
    """seed for prompts, noise and the model's random state"""
    resolution: int | None = None
    """image (video: frame) height in pixels, and width unless --width (tiny: 32, sd3: 512, wan: 240)"""
    width: int | None = None
    """image or frame width in pixels; None = --resolution, square (wan: 416, Flow-GRPO's)"""
    num_frames: int | None = None
    """video frames, 4 n + 1 (wan: 33, Flow-GRPO's); None for image models"""
    reward_every: int = 4
    """an image reward scores a video by its mean over frames 0, n, 2n, ... (Flow-GRPO's video OCR: every 4th)"""
    max_sequence_length: int | None = None
    """T5 tokens per prompt; 0 = no T5, not even loaded (tiny: 0, it has none; sd3: 128, Flow-GRPO's; wan: 512)"""

    # --- what trains, and in which precision
    lora_rank: int | None = None
    """LoRA rank on the transformer's attention projections; 0 = full fine-tuning (tiny: 0, sd3: 32 as Flow-GRPO)"""
    lora_alpha: float | None = None
    """LoRA alpha; None = 2 x rank (Flow-GRPO: 64 for rank 32)"""
    mixed_precision: Literal["no", "fp16", "bf16"] | None = None
    """dtype of the frozen weights (VAE, text encoders, LoRA's base); trainable ones stay fp32 (tiny: no, sd3: bf16)"""
    gradient_checkpointing: bool = False
    """recompute transformer activations in the backward pass: less memory, about 30% more update time"""
    micro_batch: int | None = None
    """samples per forward/backward pass in the update and per VAE decode; 0 = all at once (tiny: 0, sd3: 4)"""

    # --- rollouts (Flow-GRPO Sec. 4: SDE sampling)
    iterations: int | None = None
    """rollout-and-update iterations in all; with --resume the run's total, not a further count (tiny, sd3: 500)"""
    prompts_per_iteration: int | None = None
    """P: prompt slots per iteration, fresh or replayed (tiny: 3, sd3: 2)"""
    group_size: int | None = None
    """G: images per prompt; advantages are normalised within each group (tiny, sd3: 24 as Flow-GRPO)"""
    num_steps: int | None = None
    """K: SDE denoising steps per trajectory (Flow-GRPO: tiny, sd3: 10; wan: 20)"""
    noise_level: float | None = None
    """a: SDE noise scale (Flow-GRPO: 0.7; Flow-GRPO-Fast's CPS: 0.8)"""
    sde_type: Literal["sde", "cps"] | None = None
    """sde: Flow-GRPO's SDE step and Gaussian log-prob; cps: Flow-GRPO-Fast's coefficients-preserving step, noise
    sigma_next sin(a pi / 2), log-prob -(x' - mu)^2 without its variance (the -fast tasks; others: sde)"""
    sde_window: int | None = None
    """L: only a window of L consecutive steps is stochastic, trained and replayed, ODE elsewhere (Flow-GRPO-Fast,
    MixGRPO; Flow-GRPO-Fast's SD3: 3; tiny: 2); 0 = every step stochastic (Flow-GRPO; sd3, wan, tiny-video)"""
    sde_window_range: tuple[int, int] | None = None
    """[lo, hi) in which each iteration's window is drawn uniformly (None = (0, K // 2), Flow-GRPO-Fast's)"""
    guidance_scale: float | None = None
    """classifier-free guidance in rollouts, update and evaluation; 1 = none (tiny: 1; sd3: 4.5; tiny-video: 1.25)"""

    # --- the GRPO update (Eqs. 5-6)
    learning_rate: float | None = None
    """AdamW learning rate (tiny: 3e-5, full fine-tuning; sd3: 3e-4, Flow-GRPO's LoRA rate)"""
    warmup_iterations: int = 10
    """linear learning-rate warm-up over the first iterations (Adam's first steps are its largest); 0 = none"""
    updates_per_batch: int = 2
    """optimizer steps per rollout batch (Flow-GRPO: 2), each on 1/updates of the samples and all their kept steps"""
    train_steps: int | None = None
    """the loss uses the first train_steps of the K steps; None = K - 1 (Flow-GRPO's SD3.5 recipe trains 9 of 10)"""
    clip_range: float | None = None
    """PPO clip epsilon on the ratio of per-dimension-mean log-probs (tiny: 2e-3 for 256 dims; sd3: 1e-4, Flow-GRPO)"""
    adv_clip: float = 5.0
    """advantages are clipped to +-adv_clip (Flow-GRPO: 5)"""
    kl_beta: float | None = None
    """beta of the KL penalty to the frozen initial model (Eq. 4); 0 = none (tiny 0.01, sd3 the --task's, wan 0.004)"""
    kl_form: Literal["exact", "flow_grpo"] | None = None
    """exact: the Gaussian KL of each transition; flow_grpo: Flow-GRPO's SD3 penalty, |dt| x that KL, with which its
    beta is meant (10 steps: about 1/10 as strong) (tiny: exact; sd3: flow_grpo; wan: exact, as Flow-GRPO's Wan)"""
    max_grad_norm: float = 1.0
    """gradient clipping"""
    ema_decay: float | None = None
    """an EMA of the weights, updated every 8th optimizer step, is evaluated and saved in their place (Flow-GRPO: 0.9,
    as sd3 and wan; tiny: 0.95, about the last 80 iterations); 0 = the weights themselves (tiny-video)"""

    # --- OP-GRPO (Secs. 4.1-4.3)
    off_policy_fraction: float = 0.25
    """rho: share of prompt slots whose group is G-1 fresh images + 1 replayed (paper: 0.05, 0.25); 0 = Flow-GRPO"""
    buffer_capacity: int = 128
    """replay buffer entries (one per prompt)"""
    reward_decay: float = 0.005
    """freshness: a stored reward counts as reward - reward_decay * age in iterations (paper: form not given)"""
    correction: Literal["sequence", "none", "naive"] = "sequence"
    """sequence: clip p_theta/p_old times w = P_old/P_off (Eq. 10); none: w = 1; naive: clip p_theta/p_off (rejected)"""
    truncate_steps: int = 3
    """t_off: the last steps of a replayed trajectory dropped and regenerated by the current ODE (Eq. 12); 0 = off"""
    failed_weight: float = 1.0
    """buffer draw weight of a prompt whose last fresh group all scored below its stored trajectory (0/1 reward: all
    failed, and a success is stored), against 1 for the rest; 1 = uniform draws (paper: silent on the draw)"""
    replay: Literal["trajectory", "prompt"] = "trajectory"
    """trajectory: OP-GRPO; prompt: a control whose replayed slots take buffer prompts but sample all G images fresh"""

    # --- evaluation, logging, checkpoints
    eval_every: int | None = None
    """evaluate every this many iterations, and before the first and after the last (tiny: 250, sd3: 50)"""
    eval_per_family: int | None = None
    """evaluation images per family and set (toy world; tiny: 128), or in all (prompt list; sd3: 32); fixed noise"""
    eval_steps: int | None = None
    """ODE steps at evaluation (tiny: 10; sd3: 40 as Flow-GRPO)"""
    wandb_project: str | None = None
    """also log metrics and before/after grids to this Weights & Biases project (wandb is imported only then)"""
    device: str | None = None
    """torch device (cpu, cuda, cuda:1, ...); None picks cuda when available"""
    threads: int | None = None
    """CPU threads for torch; None keeps torch's default"""
    checkpoint_every: int | None = None
    """write <output-dir>/checkpoint.pt every this many iterations, at the end and on a signal (tiny: 50, sd3: 25)"""
    resume: str | None = None
    """continue the run in this folder, writing there; its args.json gives the defaults: repeat only changed flags"""
    overwrite: bool = False
    """allow starting afresh in an --output-dir that already holds a checkpoint (it is replaced)"""
    nonfinite_patience: int = 3
    """consecutive iterations whose update is skipped for a NaN/inf before the run stops (with a checkpoint)"""


# Defaults per --model for flags left at None: tiny for 2 CPU cores (RESULTS.md, "A fifth candidate"); sd3 and wan:
# Flow-GRPO's config/grpo.py (+ a TASKS entry) and general_ocr_wan2_1, sized for one GPU (tests check each value).
OCR_PROMPTS = os.path.join(HERE, "assets", "ocr_prompts.txt")
SHARED = dict(noise_level=0.7, sde_type="sde", sde_window=0, ema_decay=0.0)  # every preset's unless it overrides
PRESETS = {
    "tiny": dict(pretrained=os.path.join(HERE, "tiny_sd3"), reward="geneval", resolution=32, max_sequence_length=0,
                 lora_rank=0, mixed_precision="no", micro_batch=0, iterations=500, prompts_per_iteration=3,
                 group_size=24, num_steps=10, guidance_scale=1.0, learning_rate=3e-5, clip_range=2e-3, kl_beta=0.01,
                 eval_every=250, eval_per_family=128, eval_steps=10, checkpoint_every=50, kl_form="exact", sde_window=2,
                 ema_decay=0.95),
    "sd3": dict(pretrained="stabilityai/stable-diffusion-3.5-medium", resolution=512, max_sequence_length=128,
                lora_rank=32, mixed_precision="bf16", micro_batch=4, iterations=500, prompts_per_iteration=2,
                group_size=24, num_steps=10, guidance_scale=4.5, learning_rate=3e-4, clip_range=1e-4, eval_every=50,
                eval_per_family=32, eval_steps=40, checkpoint_every=25, kl_form="flow_grpo", ema_decay=0.9),
    "wan": dict(pretrained="Wan-AI/Wan2.1-T2V-1.3B-Diffusers", reward="video_ocr", prompt_file=OCR_PROMPTS,
                resolution=240, width=416, num_frames=33, max_sequence_length=512, lora_rank=32, micro_batch=2,
                mixed_precision="bf16", iterations=500, prompts_per_iteration=4, group_size=4, num_steps=20,
                guidance_scale=4.5, learning_rate=1e-4, clip_range=1e-3, kl_beta=0.004, eval_every=50,
                eval_per_family=16, eval_steps=50, checkpoint_every=25, kl_form="exact", ema_decay=0.9),
    "tiny-video": dict(pretrained=os.path.join(HERE, "tiny_wan"), reward="motion", resolution=toy_video.SIZE,
                       num_frames=toy_video.FRAMES, max_sequence_length=toy_video.TOKENS, lora_rank=0,
                       mixed_precision="no", micro_batch=0, iterations=100, prompts_per_iteration=4, group_size=8,
                       num_steps=10, guidance_scale=1.25, learning_rate=1e-4, clip_range=2e-3, kl_beta=0.01,
                       eval_every=25, eval_per_family=64, eval_steps=10, checkpoint_every=25, kl_form="exact"),
}
# --model sd3 --task: Flow-GRPO's configs (config/grpo.py), each value one GPU can share. Fast: Flow-GRPO-Fast's
# *_sd3_fast_nocfg, CPS in a window of 3 steps starting in steps 0-2, no guidance, no KL, a tighter clip.
FAST = dict(sde_type="cps", noise_level=0.8, sde_window=3, sde_window_range=(0, 5), guidance_scale=1.0,
            clip_range=1e-5, kl_beta=0.0)
TASKS = {"pickscore": dict(reward="pickscore", kl_beta=0.01), "geneval": dict(reward="geneval", kl_beta=0.04),
         "ocr": dict(reward="ocr", kl_beta=0.04, prompt_file=OCR_PROMPTS),
         "pickscore-fast": dict(reward="pickscore", group_size=18, **FAST),
         "geneval-fast": dict(reward="geneval", **FAST)}


def with_presets(args: Args) -> Args:
    """Fill every flag left at None from the --task and --model presets, and --output-dir with a folder with no run."""
    if args.model == "sd3":  # the task is recorded, so that a resumed run keeps it
        args = replace(args, task=args.task or "pickscore")
    preset = {**SHARED, **PRESETS[args.model], **(TASKS[args.task] if args.model == "sd3" else {})}
    args = replace(args, **{k: v for k, v in preset.items() if getattr(args, k) is None})
    return args if args.output_dir else replace(args, output_dir=plumbing.free_folder(f"runs/{args.model}"))


# =========================================================================================================
# Pure math. Functions of tensors only, each checked in test_op_grpo.py against an independent answer.
# =========================================================================================================
def sde_step_with_logprob(velocity, sample, sigma, sigma_next, noise_level, prev_sample=None, generator=None,
                          noise=None, sde_type="sde"):
    """One step of Flow-GRPO's SDE sampler (Eq. 2) and the Gaussian log-density of its result (sde_type "cps":
    Flow-GRPO-Fast's coefficients-preserving step and its log-prob). With prev_sample=None a next latent is drawn
    (sampling); with a given one its log-probability under `velocity` is computed (scoring stored data).
    velocity, sample (B, C, H, W); sigma, sigma_next (B,) or scalars; noise: an optional standard-normal draw.
    -> prev_sample (B, C, H, W), log_prob (B,), prev_sample_mean (B, C, H, W), std_dev (B, 1, 1, 1).
    The math runs in float32 whatever the model's dtype. noise_level = 0 is the deterministic Euler step: it
    draws no noise, and its log_prob is NaN (it has no density) so that it cannot slip into a ratio unnoticed."""
    velocity, sample = velocity.float(), sample.float()
    ones = [1] * (sample.ndim - 1)
    sigma, sigma_next = (torch.as_tensor(s, dtype=torch.float32, device=sample.device).reshape(-1, *ones)
                         .expand(len(sample), *ones) for s in (sigma, sigma_next))  # (B, 1, 1, 1)
    dt = sigma_next - sigma  # negative: sampling walks from noise (1) to data (0)

    if sde_type == "cps":  # Flow-GRPO-Fast's coefficients-preserving step: x_next = x0_hat (1 - sigma_next) + x1_hat
        # sqrt(sigma_next^2 - std^2) + std eps, std = sigma_next sin(a pi / 2): data and noise keep x_sigma's weights
        std_dev = sigma_next * math.sin(noise_level * math.pi / 2)
        x0_hat, x1_hat = sample - sigma * velocity, sample + (1 - sigma) * velocity  # predicted data and noise
        prev_sample_mean = x0_hat * (1 - sigma_next) + x1_hat * torch.sqrt(sigma_next**2 - std_dev**2)
    else:  # Flow-GRPO's noise schedule s_sigma = a sqrt(sigma / (1 - sigma)), infinite at sigma = 1 (the first
        # step): like Flow-GRPO's code we put 1 - sigma_next in the denominator there, a finite large noise.
        one_minus_sigma = torch.where(sigma >= 1.0, 1.0 - sigma_next, 1.0 - sigma)
        noise_scale = noise_level * torch.sqrt(sigma / one_minus_sigma)
        # mu = x + [v + s^2 / (2 sigma) * (x + (1 - sigma) v)] dt. The bracket's second term is -s^2/2 times the
        # score, grad log p(x) = -(x + (1 - sigma) v) / sigma, which keeps the marginals of the ODE.
        prev_sample_mean = sample + (velocity + noise_scale**2 / (2 * sigma) * (sample + (1 - sigma) * velocity)) * dt
        std_dev = noise_scale * torch.sqrt(-dt)  # std of the transition: s_sigma * sqrt(|dt|)

    if prev_sample is None and noise_level == 0:
        prev_sample = prev_sample_mean  # the ODE step draws nothing, so the random stream is left alone
    elif prev_sample is None:
        if noise is None:
            noise = torch.randn(sample.shape, generator=generator, device=sample.device, dtype=torch.float32)
        prev_sample = prev_sample_mean + std_dev * noise
    prev_sample = prev_sample.detach().float()  # the sampled latent is data: no gradient flows through it

    if noise_level == 0:
        return prev_sample, torch.full((len(sample),), float("nan"), device=sample.device), prev_sample_mean, std_dev
    # log N(x' | mu, std^2), averaged (not summed) over latent dimensions as Flow-GRPO does: per-step
    # log-ratios stay O(1e-3) whatever the image size, which is the scale the clip range refers to. CPS (Flow-GRPO's
    # code): -(x' - mu)^2 alone, 2 std^2 times the log-density less its constants; a ratio is the Gaussian's ^(2 std^2)
    log_density = -((prev_sample - prev_sample_mean) ** 2)
    if sde_type != "cps":
        log_density = log_density / (2 * std_dev**2) - torch.log(std_dev) - 0.5 * math.log(2 * math.pi)
    return prev_sample, log_density.mean(dim=tuple(range(1, sample.ndim))), prev_sample_mean, std_dev


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Eq. 5: A_i = (R_i - mean(R_group)) / (std(R_group) + eps), rewards (P, G) -> advantages (P, G).

    The population std (ddof 0) and eps 1e-4, as Flow-GRPO's code. A group of equal rewards gets zero advantage.
    """
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True, correction=0)
    return (rewards - mean) / (std + eps)


def sequence_is_weight(log_prob_old: torch.Tensor, log_prob_behavior: torch.Tensor, keep: torch.Tensor):
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
    exact KL of the transition; Flow-GRPO's code divides by 2 s_sigma^2 instead (no |dt|): see kl_penalty.
    """
    return ((mean - mean_ref) ** 2 / (2 * std_dev**2)).mean(dim=tuple(range(1, mean.ndim)))


def kl_penalty(kl, dt: float, form: str):
    """Eq. 4's penalty of one step from its exact KL, (B,) -> (B,): "exact" keeps it; "flow_grpo" is Flow-GRPO's
    |mu - mu_ref|^2 / (2 s_sigma^2) averaged over dimensions, the KL times |dt| (the transition's variance is
    s_sigma^2 |dt|): with 10 steps, a tenth of the exact KL on average. dt = sigma_next - sigma."""
    return kl * abs(dt) if form == "flow_grpo" else kl


# =========================================================================================================
# The replay buffer of high-quality trajectories (Sec. 4.1, Eqs. 7-8)
# =========================================================================================================
class ReplayBuffer:
    """At most one trajectory per prompt, the best seen: latents (K + 1, C, H, W), the log-probs recorded when it was
    sampled (K,) (p_off, never recomputed), its reward and the iteration stored, on the CPU: 11 kB for the tiny model,
    2.9 MB for SD3.5 at 512 px. Freshness (paper: no form given): reward - decay * age, fine for negative rewards.
    Draws are uniform, or weighted toward failed prompts, whose stored reward beats their whole latest fresh group."""

    def __init__(self, capacity: int, decay: float, failed_weight: float = 1.0):
        self.capacity, self.decay, self.failed_weight = capacity, decay, failed_weight
        self.entries: dict[str, dict] = {}
        self.last_best_fresh: dict[str, float] = {}  # per prompt, the best reward of its latest fresh group
        self.clock = 0  # iterations seen; advanced once per iteration by `tick`

    def __len__(self) -> int:
        return len(self.entries)

    def tick(self) -> None:
        self.clock += 1

    def decayed_reward(self, prompt: str) -> float:
        return self.entries[prompt]["reward"] - self.decay * (self.clock - self.entries[prompt]["born"])

    def offer(self, prompt: str, latents: torch.Tensor, log_probs: torch.Tensor, reward: float) -> bool:
        """Eq. 7's admission of a group's best fresh trajectory: replace the prompt's own entry if better, else fill,
        else evict the lowest. The reward is also kept as the prompt's latest best fresh one, for weighted draws."""
        self.last_best_fresh[prompt] = float(reward)
        if prompt in self.entries:
            if reward <= self.decayed_reward(prompt):
                return False
        elif len(self.entries) >= self.capacity:
            lowest = min(self.entries, key=self.decayed_reward)
            if reward <= self.decayed_reward(lowest):
                return False
            del self.entries[lowest]
        self.entries[prompt] = {  # clones: a row of the batch is a view that would keep the whole batch alive
            "latents": latents.detach().cpu().clone(), "log_probs": log_probs.detach().cpu().clone(),
            "reward": float(reward), "born": self.clock}
        return True

    def sample(self, n: int, rng: random.Random) -> list[str]:
        """n distinct stored prompts (paper: silent on how): uniformly, or one after another with probability
        proportional to w (failed_weight if failed, else 1): the n largest u^(1/w), u ~ U(0, 1) (Efraimidis 2006)."""
        prompts = sorted(self.entries)
        if self.failed_weight == 1:
            return rng.sample(prompts, min(n, len(prompts)))
        w = {p: self.failed_weight if self.last_best_fresh.get(p, math.inf) < e["reward"] else 1.0  # failed or not
             for p, e in self.entries.items()}
        return sorted(prompts, key=lambda p: rng.random() ** (1 / w[p]), reverse=True)[:n]

    def trajectories(self, prompts: list[str], device=None):
        """-> latents (R, K + 1, C, H, W), behaviour log_probs (R, K), rewards (R,) of the prompts' entries."""
        entries = [self.entries[p] for p in prompts]
        return (torch.stack([e["latents"] for e in entries]).to(device),
                torch.stack([e["log_probs"] for e in entries]).to(device), torch.tensor([e["reward"] for e in entries]))

    def ages(self, prompts: list[str] | None = None) -> torch.Tensor:  # iterations since stored; None: every entry
        return torch.tensor([float(self.clock - self.entries[p]["born"]) for p in prompts or self.entries])

    def state_dict(self) -> dict:
        return {"clock": self.clock, "entries": self.entries, "last_best_fresh": self.last_best_fresh}

    def load_state_dict(self, state: dict) -> None:
        self.clock, self.entries = state["clock"], state["entries"]
        self.last_best_fresh = state.get("last_best_fresh", {})  # absent from earlier versions' checkpoints


# =========================================================================================================
# Rewards: rewards.py holds the reward models; here, what wraps them. The toy worlds bring their own verifiers, under
# the names of the tasks they stand in for (geneval: the toy GenEval; motion: the toy video world's checks).
# =========================================================================================================
WORLDS = {"tiny": toy_world, "tiny-video": toy_video}  # the embedded models' toy worlds, and their rewards:
WORLD_REWARDS = {"tiny": {"geneval": toy_world.geneval_reward, "geneval_strict": toy_world.geneval_strict_reward},
                 "tiny-video": {"motion": toy_video.motion_reward, "motion_strict": toy_video.motion_strict_reward}}
VIDEO_REWARDS = rewards.VIDEO_REWARDS | {"motion", "motion_strict"}  # they score whole videos (lists of frames)


def reward_table(args: Args) -> dict:
    """name -> reward: rewards.REWARDS (a toy world: less OCR and GenEval, which read prompts) plus its verifiers"""
    toy = world_of(args) is not None
    return {**{k: f for k, f in rewards.REWARDS.items() if not toy or k in rewards.NO_PROMPT_DATA},
            **(WORLD_REWARDS[args.model] if toy else {})}


def on_frames(reward, every: int):
    """An image reward made a video reward: each video's mean over its frames 0, every, 2 every, ..."""
    def video_reward(videos, prompts):
        picked = [video[::every] for video in videos]
        scores = reward([f for v in picked for f in v], [p for v, p in zip(picked, prompts) for _ in v]).float()
        return torch.stack([s.mean() for s in scores.split([len(v) for v in picked])])
    return video_reward


def weighted_reward(weights: dict[str, float], table: dict, every: int | None = None):
    """One reward function from a parse_reward dict: (images, prompts) -> sum of weight x reward, (B,). For videos
    (every = a frame stride) an image reward scores every every-th frame (on_frames)."""
    fns = {name: table[name] if every is None or name in VIDEO_REWARDS else on_frames(table[name], every)
           for name in weights}
    return lambda images, prompts: sum(w * fns[name](images, prompts).float() for name, w in weights.items())


def compute_rewards(reward_fn, name: str, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
    """reward_fn on a batch, (B,) float32. If it raises, it is run image by image to name the first prompt it
    fails on; a NaN/inf reward is a NonFiniteError naming its prompt."""
    try:
        scores = reward_fn(images, prompts).float()
    except Exception as error:
        for image, prompt in zip(images, prompts):
            try:
                reward_fn([image], [prompt])
            except Exception as one:
                raise RuntimeError(f"reward {name!r} failed on prompt {prompt!r}: {type(one).__name__}: {one}") from one
        raise RuntimeError(f"reward {name!r} failed on a batch of {len(prompts)} (each image alone passes): "
                           f"{error}") from error
    bad = (~torch.isfinite(scores)).nonzero().flatten()
    if len(bad):
        raise NonFiniteError(f"non-finite reward {name!r} ({scores[bad[0]].item()}) for prompt {prompts[bad[0]]!r}")
    return scores


def parse_reward(spec: str, table: dict) -> dict[str, float]:
    """'pickscore=1.0,jpeg=0.1' -> {'pickscore': 1.0, 'jpeg': 0.1}; a bare name has weight 1; names from `table`."""
    weights = {}
    for part in spec.split(","):
        name, _, weight = part.strip().partition("=")
        if name not in table:
            raise ValueError(f"--reward: unknown reward {name!r} (known here: {', '.join(table)}; a sum: a=1,b=0.1)")
        try:
            weights[name] = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"--reward: weight {weight!r} of {name} is not a number") from None
    return weights


def load_reward(args: Args, device: torch.device):
    """The --reward function; its models (PickScore, GenEval's detector and CLIP) are loaded here, before training."""
    table = reward_table(args)
    weights = parse_reward(args.reward, table)
    if not world_of(args):
        rewards.load(weights, device, FROZEN_DTYPES[args.mixed_precision], args.prompt_file)
    return weighted_reward(weights, table, args.reward_every if args.num_frames else None)


def world_of(args: Args):
    """The toy world (toy_world, images; toy_video, videos) that supplies prompts, held-out split and strict
    evaluation to an embedded model unless --prompt-file is given; None otherwise."""
    return WORLDS.get(args.model) if args.prompt_file is None else None


# =========================================================================================================
# The model: loading, trainable weights, prompt embeddings, velocity, the per-step log-prob, sampling, decoding
# =========================================================================================================
FROZEN_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# What differs per model family is this table and the few lines that ask makes_video(pipe); the method does not
# care whether a latent is an image (C, H, W) or a video (C, F, H, W). LoRA targets: SD3's joint-attention
# projections as Flow-GRPO lists them, the image stream (to_q/k/v, to_out.0) and the text stream (add_q/k/v_proj,
# to_add_out); SD3.5's image-only `attn2` (MMDiT-X) is not matched by "attn.to_q" and stays frozen, as in
# Flow-GRPO. Wan: the self- and cross-attention projections of every block (attn1, attn2), Flow-GRPO's Wan list
# less its add_k/v_proj, which exist only in the image-to-video model. Feed-forward and modulation layers stay frozen.
PIPELINES = {"tiny": "StableDiffusion3Pipeline", "sd3": "StableDiffusion3Pipeline", "wan": "WanPipeline",
             "tiny-video": "WanPipeline"}
LORA_TARGETS = {"StableDiffusion3Pipeline": ["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
                                             "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v"],
                "WanPipeline": ["to_q", "to_k", "to_v", "to_out.0"]}


def makes_video(pipe) -> bool:
    """A video pipeline (Wan) decodes through a video_processor, an image pipeline (SD3) through an image_processor."""
    return hasattr(pipe, "video_processor")


def load_pipeline(args: Args, device: torch.device):
    """The --model's pipeline from the Hub or a folder in the --mixed-precision dtype, loaded as an SD3.5 checkpoint is
    (no T5 at max length 0). Wan: the VAE stays float32 (Flow-GRPO's), and a flow-matching Euler scheduler with the
    checkpoint's shift replaces its UniPC solver, which would only give the sigmas: the sampler is ours."""
    import diffusers

    pipeline, dtype = getattr(diffusers, PIPELINES[args.model]), FROZEN_DTYPES[args.mixed_precision]
    sd3_without_t5 = args.max_sequence_length == 0 and pipeline is diffusers.StableDiffusion3Pipeline
    no_t5 = dict(text_encoder_3=None, tokenizer_3=None) if sd3_without_t5 else {}
    pipe = from_hub(args.pretrained, lambda: pipeline.from_pretrained(args.pretrained, dtype=dtype, **no_t5))
    if makes_video(pipe):
        pipe.vae.float()
        if not isinstance(pipe.scheduler, diffusers.FlowMatchEulerDiscreteScheduler):
            pipe.scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=pipe.scheduler.config.flow_shift)
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

    targets = LORA_TARGETS[PIPELINES[args.model]]
    transformer.add_adapter(LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha or 2 * args.lora_rank,
                                       init_lora_weights="gaussian", target_modules=targets))
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


@torch.no_grad()
def embed_prompts(pipe, prompts: list[str], max_sequence_length: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Text embeddings of every prompt, computed once and kept on the CPU: prompt -> (embeds (L, D), pooled (D',)).
    '' is the unconditional prompt used by guidance. SD3: L = 77 CLIP tokens + max_sequence_length T5 tokens; Wan:
    max_sequence_length UMT5 tokens, and no pooled embedding (D' = 0, so that one code path serves both)."""
    table = {}
    for start in range(0, len(prompts), 64):
        chunk = prompts[start : start + 64]
        if makes_video(pipe):
            embeds = pipe.encode_prompt(chunk, do_classifier_free_guidance=False,
                                        max_sequence_length=max_sequence_length)[0]
            pooled = embeds.new_zeros(len(chunk), 0)
        else:
            embeds, _, pooled, _ = pipe.encode_prompt(chunk, None, None, do_classifier_free_guidance=False,
                                                      max_sequence_length=max_sequence_length)
        table.update({p: (e.cpu(), q.cpu()) for p, e, q in zip(chunk, embeds, pooled)})
    return table


def noise_schedule(pipe, num_steps: int, device) -> torch.Tensor:
    """The scheduler's sigmas (K + 1,), from 1 down to 0, with its shift applied (as the stock pipeline)."""
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(num_steps, device=device)
    return scheduler.sigmas.float()


@dataclass
class Model:
    """The policy and what every stage needs to run it: the pipeline (VAE, image processor), the transformer
    being trained, its KL reference, the prompt embeddings table (CPU; "" is the unconditional prompt), the
    training sigmas (K + 1,), the latent shape ((C, H, W), a video's (C, F, H, W)) and the device."""

    pipe: object
    transformer: torch.nn.Module
    reference: torch.nn.Module | None
    table: dict
    sigmas: torch.Tensor
    shape: tuple
    device: torch.device
    uncond: tuple  # (embeds (L, D), pooled (D',)) of "" on the device, for the unconditional pass of guidance

    def condition(self, prompts: list[str]):
        """(embeds (B, L, D), pooled (B, D')) of the prompts, on the model's device."""
        return tuple(torch.stack([self.table[p][i] for p in prompts]).to(self.device) for i in (0, 1))


def load_model(args: Args, device: torch.device, prompts: list[str]) -> Model:
    """The pipeline, its trainable weights and KL reference, and the embeddings of `prompts` (and of ""), after
    which the text encoders are dropped: they run once per prompt, never in the loop."""
    pipe = load_pipeline(args, device)
    reference = make_trainable(pipe.transformer, args)
    if args.gradient_checkpointing:
        pipe.transformer.enable_gradient_checkpointing()
    table = embed_prompts(pipe, sorted(set(prompts) | {""}), args.max_sequence_length)
    pipe.text_encoder = pipe.text_encoder_2 = pipe.text_encoder_3 = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
    factor = getattr(pipe, "vae_scale_factor_spatial", None) or pipe.vae_scale_factor
    frames = ((args.num_frames - 1) // pipe.vae_scale_factor_temporal + 1,) if makes_video(pipe) else ()  # 4 in 1
    side = (args.resolution // factor, (args.width or args.resolution) // factor)
    shape = (pipe.transformer.config.in_channels, *frames, *side)
    return Model(pipe, pipe.transformer, reference, table, noise_schedule(pipe, args.num_steps, device), shape, device,
                 tuple(t.to(device) for t in table[""]))


def predict_velocity(transformer, x, sigma, embeds, pooled, guidance_scale, uncond=None):
    """v_theta(x, sigma, c), shaped as x. With guidance > 1, one batched pass over conditional and
    unconditional inputs, v = v_u + g (v_c - v_u); uncond = (embeds, pooled) of the empty prompt."""
    timestep = torch.as_tensor(sigma * 1000.0, device=x.device, dtype=torch.float32).expand(len(x))
    x, embeds, pooled = x.to(transformer.dtype), embeds.to(transformer.dtype), pooled.to(transformer.dtype)

    def run(x, timestep, embeds, pooled):  # Wan takes no pooled embedding (its width is 0)
        extra = {"pooled_projections": pooled} if pooled.shape[-1] else {}
        return transformer(hidden_states=x, timestep=timestep, encoder_hidden_states=embeds, **extra).sample

    if guidance_scale == 1.0:
        return run(x, timestep, embeds, pooled)
    u_embeds, u_pooled = (t.to(transformer.dtype).expand(len(x), *t.shape) for t in uncond)
    v_uncond, v_cond = run(torch.cat([x, x]), torch.cat([timestep, timestep]), torch.cat([u_embeds, embeds]),
                           torch.cat([u_pooled, pooled])).chunk(2)
    return v_uncond + guidance_scale * (v_cond - v_uncond)


def step_log_prob(transformer, x, x_next, k, cond, model: Model, args: Args, where: str):
    """log p(x_next | x, c) of step k under `transformer`, with the transition's mean and std. One helper for the
    three scoring passes: p_old of replayed trajectories, p_theta in the update, and (its mean) the KL reference.
    x, x_next (B, C, H, W); cond = (embeds, pooled) -> log_prob (B,), mean (B, C, H, W), std_dev (B, 1, 1, 1).
    """
    v = predict_velocity(transformer, x, model.sigmas[k], *cond, args.guidance_scale, model.uncond)
    require_finite("velocity", v, where)
    _, log_prob, mean, std_dev = sde_step_with_logprob(v, x, model.sigmas[k], model.sigmas[k + 1], args.noise_level,
                                                       prev_sample=x_next, sde_type=args.sde_type)
    require_finite("log-prob", log_prob, where)
    return log_prob, mean, std_dev


@torch.no_grad()
def sample_trajectories(model: Model, start, sigmas, first_step, prompts, noise_level, guidance_scale, micro_batch=0,
                        generator=None, rows=None, sde_type="sde"):
    """The sampler ("sde" or "cps") from latents `start` (B, C, H, W) at sigmas[first_step] to 0, micro_batch samples a
    pass (0 = all); noise_level: a float or one per step k (an SDE window; 0: an ODE step, no noise, NaN log-prob).
    -> latents (B, K - first_step + 1, C, H, W) from `start`, log_probs (B, K - first_step). rows = (index, total):
    `start` is rows `index` of a batch of `total`, whose noise each step draws whole, so that a trajectory's noise
    depends neither on how the batch is dealt out to processes nor on micro_batch."""
    (embeds, pooled), (index, total) = model.condition(prompts), rows or (slice(None), len(start))
    size = micro_batch or len(start)
    latents, log_probs, x, chunks = [start.float()], [], start, [slice(i, i + size) for i in range(0, len(start), size)]
    for k in range(first_step, len(sigmas) - 1):
        v = torch.cat([predict_velocity(model.transformer, x[c], sigmas[k], embeds[c], pooled[c], guidance_scale,
                                        model.uncond) for c in chunks])
        require_finite("velocity", v, f"while sampling step {k}")
        level, noise = noise_level[k] if isinstance(noise_level, list) else noise_level, None
        if level > 0:
            noise = torch.randn((total, *x.shape[1:]), generator=generator, device=x.device)[index]
        x, log_prob, _, _ = sde_step_with_logprob(v, x, sigmas[k], sigmas[k + 1], level, noise=noise, sde_type=sde_type)
        if level > 0:
            require_finite("log-prob", log_prob, f"while sampling step {k}")
        latents.append(x)
        log_probs.append(log_prob)
    return torch.stack(latents, dim=1), torch.stack(log_probs, dim=1)


@torch.no_grad()
def decode(pipe, latents: torch.Tensor, micro_batch: int = 0) -> list:
    """Final latents -> PIL images, or videos as lists of PIL frames, through the VAE, undoing the latents'
    normalisation (SD3: a shift and scale; Wan: a mean and std per channel); micro_batch latents at a time (0 = all)."""
    config, images = pipe.vae.config, []
    for chunk in latents.split(micro_batch or len(latents)):
        if makes_video(pipe):
            mean, std = (torch.tensor(v).view(1, -1, 1, 1, 1).to(chunk) for v in (config.latents_mean,
                                                                                    config.latents_std))
            pixels = pipe.vae.decode((chunk * std + mean).to(pipe.vae.dtype)).sample
            images += pipe.video_processor.postprocess_video(pixels.float(), output_type="pil")
        else:
            pixels = pipe.vae.decode(chunk.to(pipe.vae.dtype) / config.scaling_factor + config.shift_factor).sample
            images += pipe.image_processor.postprocess(pixels.float(), output_type="pil")
    return images


# =========================================================================================================
# The stages of one iteration, in the order main() runs them
# =========================================================================================================
def replay_slots(args: Args, rng: random.Random) -> int:
    """How many of the P slots replay: floor(rho P), plus one with probability frac(rho P), so that any rho replays
    rho P groups per iteration on average (the paper's 5% of 8 slots is 0.4). A whole rho P draws no number."""
    expected = args.off_policy_fraction * args.prompts_per_iteration
    whole = math.floor(expected + 1e-9)  # 1e-9: 0.1 * 10 is 1.0000000000000002 in floating point
    return whole + int(expected - whole > 1e-9 and rng.random() < expected - whole)


def choose_prompts(args: Args, buffer: ReplayBuffer, draw_prompts, rng: random.Random) -> tuple[list[str], int]:
    """Stage 1 (Eq. 8): the P slot prompts, replayed ones first: rho P (on average) drawn from the buffer, fewer
    while it is short; the rest fresh. -> (prompts (P,), number drawn from the buffer)"""
    replayed = buffer.sample(replay_slots(args, rng), rng) if args.off_policy_fraction else []
    return replayed + draw_prompts(args.prompts_per_iteration - len(replayed)), len(replayed)


def sde_window(args: Args, rng: random.Random) -> tuple[int, int]:
    """Stage 1 (Flow-GRPO-Fast): this iteration's SDE window, steps [start, end); its start is drawn uniformly so that
    the window lies in --sde-window-range. Without a window, every step: (0, K), and no random number is drawn."""
    if not args.sde_window:
        return 0, args.num_steps
    low, high = plumbing.window_range(args)
    start = rng.randint(low, high - args.sde_window)
    return start, start + args.sde_window


def rollout(model: Model, args: Args, slot_prompts: list[str], n_replayed: int, slots: list[int], generator,
            window: tuple[int, int]) -> dict:
    """Stage 2: this process's fresh trajectories, sampled with the SDE, G - 1 for a replayed slot and G for a fresh
    one; their log-probs are recorded on the way (p_old now, p_off if one is ever replayed). Steps outside the SDE
    window are ODE steps, with NaN log-probs. -> prompts (N,), latents (N, K + 1, C, H, W), log_probs (N, K), images"""
    sizes = [args.group_size - (slot < n_replayed) for slot in range(len(slot_prompts))]
    first = np.cumsum([0] + sizes)  # each slot's first row among the fresh trajectories of all processes
    rows = torch.tensor([r for s in slots for r in range(first[s], first[s + 1])], device=model.device)
    prompts = [slot_prompts[s] for s in slots for _ in range(sizes[s])]
    noise = torch.randn((int(first[-1]), *model.shape), generator=generator, device=model.device)[rows]
    levels = [args.noise_level if window[0] <= k < window[1] else 0.0 for k in range(args.num_steps)]
    latents, log_probs = sample_trajectories(model, noise, model.sigmas, 0, prompts, levels, args.guidance_scale,
                                             args.micro_batch, generator, (rows, int(first[-1])), args.sde_type)
    images = decode(model.pipe, latents[:, -1], args.micro_batch)
    return {"prompts": prompts, "latents": latents, "log_probs": log_probs, "images": images}


@torch.no_grad()
def rescore_replayed(model: Model, args: Args, buffer: ReplayBuffer, prompts: list[str]) -> dict:
    """Stage 3 (Eq. 10's numerator): the replayed prompts' stored trajectories and log p_old of each stochastic step
    (their own SDE window; NaN at ODE steps), one pass per step; kept steps give w, the rest the logged cliff (Fig. 2)
    -> prompts, latents (R, K + 1, C, H, W), log_prob_old, log_prob_behavior (R, K), rewards (R,)"""
    latents, log_prob_behavior, stored_rewards = buffer.trajectories(prompts, model.device)
    (embeds, pooled), log_prob_old = model.condition(prompts), torch.full_like(log_prob_behavior, float("nan"))
    for k in range(args.num_steps):
        rows = torch.isfinite(log_prob_behavior[:, k]).nonzero().flatten()  # the trajectories stochastic at step k
        if len(rows):
            log_prob_old[rows, k] = step_log_prob(model.transformer, latents[rows, k], latents[rows, k + 1], k,
                                                  (embeds[rows], pooled[rows]), model, args,
                                                  f"in log p_old of a replayed trajectory at step {k}")[0]
    return dict(prompts=prompts, latents=latents, log_prob_old=log_prob_old, log_prob_behavior=log_prob_behavior,
                rewards=stored_rewards, stored=stored_rewards.clone(), ages=buffer.ages(prompts))  # as stored (logged)


@torch.no_grad()
def regenerate_tail(model: Model, args: Args, replayed: dict, reward_fn) -> None:
    """Stage 4 (Eqs. 12-13): keep a replayed trajectory up to z_{t_off} = K - truncate_steps, or the end of its SDE
    window if sooner (the steps after a window have no density), regenerate the rest with the current ODE and re-score
    the image (paper: silent on re-scoring; we do, so that the reward is the trained trajectory's). In place."""
    K, stochastic = args.num_steps, torch.isfinite(replayed["log_prob_behavior"])  # (R, K)
    window_end = K - stochastic.flip(1).int().argmax(dim=1)  # 1 + each trajectory's last stochastic step
    restart = window_end.clamp(max=K - args.truncate_steps)  # (R,)
    for start in sorted(set(restart[restart < K].tolist())):  # all at t_off without a window: one batch
        rows = (restart == start).nonzero().flatten()
        tail, _ = sample_trajectories(model, replayed["latents"][rows, start], model.sigmas, start,
                                      [replayed["prompts"][r] for r in rows], 0.0, args.guidance_scale,
                                      args.micro_batch)
        replayed["latents"][rows, start:] = tail
    if (rows := (restart < K).nonzero().flatten()).numel():
        prompts = [replayed["prompts"][r] for r in rows]
        images = decode(model.pipe, replayed["latents"][rows, -1], args.micro_batch)
        replayed["rewards"][rows] = compute_rewards(reward_fn, args.reward, images, prompts)


def hybrid_groups(args: Args, fresh: dict, replayed: dict | None, slots: list[int], n_replayed: int) -> dict:
    """Stage 5 (Eq. 8): this process's groups, group i from slot slots[i]; a replayed slot's group is its stored
    trajectory (member 0) and G - 1 fresh ones. For fresh samples log_prob_old = log_prob_behavior (just recorded).
    -> latents (B, K + 1, C, H, W), log_prob_old, log_prob_behavior (B, K), rewards, replayed (B,), and
    index (B,): each row's place in the whole batch of all processes, slot * G + member."""
    keys, G, parts, cursor = ("latents", "log_prob_old", "log_prob_behavior", "rewards"), args.group_size, [], 0
    for slot in slots:
        if slot < n_replayed:
            j = [s for s in slots if s < n_replayed].index(slot)  # its row among this process's replayed ones
            parts.append([replayed[key][j : j + 1] for key in keys] + [True])
        rows = slice(cursor, cursor + G - (slot < n_replayed))
        log_probs = fresh["log_probs"][rows]  # fresh: old and behaviour policy are the same
        parts.append([fresh["latents"][rows], log_probs, log_probs, fresh["rewards"][rows], False])
        cursor = rows.stop
    batch = {key: torch.cat([p[i] for p in parts]) for i, key in enumerate(keys)}
    batch["stochastic"] = torch.isfinite(batch["log_prob_behavior"])  # (B, K): the SDE window (ODE: no density)
    batch["replayed"] = torch.cat([torch.full((len(p[0]),), p[4]) for p in parts])
    batch["index"] = torch.tensor([s * G + m for s in slots for m in range(G)])
    return {key: t.to(batch["latents"].device) for key, t in batch.items()}


def trained_steps(args: Args, batch: dict) -> torch.Tensor:
    """-> (B, K): the (sample, step) pairs in the loss: stochastic (in the sample's SDE window), kept (Eq. 12) and
    among the first train_steps (by default the last step, the sharpest Gaussian, least able to change the image)."""
    step = torch.arange(args.num_steps, device=batch["replayed"].device)
    kept = kept_steps(args.num_steps, args.truncate_steps, batch["replayed"]) & batch["stochastic"]
    return kept & (step < (args.train_steps or args.num_steps - 1))


def admit_best(buffer: ReplayBuffer, args: Args, batch: dict, slot_prompts: list[str], processes) -> int:
    """Stage 6 (Eq. 7): each group's best fresh trajectory is offered to the buffer (none at rho = 0); -> how many
    were admitted. Every process offers every group's candidate in slot order, so the buffers stay identical."""
    G, candidates = args.group_size, []
    for i, slot in enumerate(processes.slots(args.prompts_per_iteration) if args.off_policy_fraction else []):
        members = torch.arange(i * G, (i + 1) * G, device=batch["rewards"].device)
        fresh = members[~batch["replayed"][members]]
        best = fresh[batch["rewards"][fresh].argmax()]
        candidates.append((slot, batch["latents"][best].cpu(), batch["log_prob_behavior"][best].cpu(),
                           batch["rewards"][best].item()))
    candidates = sorted((c for part in processes.gather(candidates) for c in part), key=lambda c: c[0])
    return sum(buffer.offer(slot_prompts[slot], *rest) for slot, *rest in candidates)


def update_pass(model: Model, args: Args, batch: dict, idx: torch.Tensor, k: int, n_terms, stats: dict) -> None:
    """One forward/backward pass of the update on samples `idx` at step k: the clipped surrogate (Eq. 6) times each
    sample's sequence weight (Eq. 11), plus beta times the KL to the reference (Eq. 4), over n_terms, the count of
    the minibatch's trained (sample, step) pairs on all processes. Gradients accumulate."""
    x, x_next, where = batch["latents"][idx, k], batch["latents"][idx, k + 1], f"in the update at step {k}"
    cond = (batch["embeds"][idx], batch["pooled"][idx])
    log_prob, mean, std_dev = step_log_prob(model.transformer, x, x_next, k, cond, model, args, where)
    log_prob_old, advantages = batch["log_prob_old"][idx, k], batch["advantages"][idx]
    surrogate, ratio = clipped_surrogate(log_prob, log_prob_old, advantages, args.clip_range)
    require_finite("ratio p_theta / p_old", ratio, where)
    loss = (batch["is_weight"][idx] * surrogate).sum()  # Eq. 11: w scales a replayed trajectory's whole surrogate
    if model.reference is not None:
        with torch.no_grad(), as_reference(model.transformer, model.reference):
            _, mean_ref, _ = step_log_prob(model.reference, x, x_next, k, cond, model, args, where + " (reference)")
        kl = gaussian_kl(mean, mean_ref, std_dev)
        require_finite("KL to the reference", kl, where)
        dt = (model.sigmas[k + 1] - model.sigmas[k]).item()
        loss = loss + args.kl_beta * kl_penalty(kl, dt, args.kl_form).sum()
        stats["kl"].append(kl.mean().item())
    require_finite("loss", loss, where)
    (loss / n_terms).backward()
    with torch.no_grad():
        clipped, replayed = ((ratio - 1).abs() > args.clip_range).float(), batch["replayed"][idx]
        if (~replayed).any():
            stats["clipfrac_on"].append(clipped[~replayed].mean().item())
        if replayed.any():
            stats["clipfrac_off"].append(clipped[replayed].mean().item())
        # CleanRL's approx_kl: mean of (r - 1) - log r, a low-variance estimate of KL(old || new)
        stats["approx_kl"].append(((ratio - 1) - torch.log(ratio)).mean().item())
        stats["loss"].append(loss.item() / n_terms.item())


def policy_update(model: Model, args: Args, batch: dict, optimizer, processes, generator) -> dict:
    """Stage 7: updates_per_batch optimizer steps, each on a random 1/updates of the batch's samples and all their
    trained steps, one pass per (step, micro-batch). -> per-pass statistics (lists)."""
    B, K = args.prompts_per_iteration * args.group_size, args.num_steps
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    trained, trained_all = trained_steps(args, batch), torch.zeros((B, K), dtype=torch.int64)
    for index, mask in processes.gather((batch["index"].cpu(), trained.cpu())):  # every process's trained pairs
        trained_all[index] = mask.long()
    local = torch.full((B,), -1, device=model.device)  # each whole-batch sample's row here (-1: another process's)
    local[batch["index"]] = torch.arange(len(batch["index"]), device=model.device)
    stats = {"loss": [], "clipfrac_on": [], "clipfrac_off": [], "approx_kl": [], "kl": []}
    model.transformer.train()
    for minibatch in torch.randperm(B, generator=generator, device=model.device).chunk(args.updates_per_batch):
        n_terms = trained_all[minibatch.cpu()].sum().to(model.device)  # the loss: a mean over the trained pairs
        rows = local[minibatch][local[minibatch] >= 0]  # this process's samples of the minibatch, in order
        optimizer.zero_grad(set_to_none=True)
        for k in range(K):
            for idx in rows[trained[rows, k]].split(args.micro_batch or B):
                if len(idx):
                    update_pass(model, args, batch, idx, k, n_terms, stats)
        processes.sum_gradients(trainable)
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, args.max_grad_norm)
        require_finite("gradient norm", grad_norm, "before an optimizer step (the step is not taken)")
        optimizer.step()
    model.transformer.eval()
    return stats


# =========================================================================================================
# Training
# =========================================================================================================
def main(args: Args) -> list[dict]:
    # ---- Setup: arguments (anything wrong is caught before loading), processes, seeds, the batch arithmetic
    args = with_presets(args)
    check_args(args)
    plumbing.STOP_REQUESTED.clear()  # a signal from an earlier run in this process does not stop this one
    if args.threads:
        torch.set_num_threads(args.threads)
    processes = plumbing.Processes(args)
    device, say = processes.device, processes.say
    saved = plumbing.read_checkpoint(args.resume) if args.resume else None  # a damaged file stops us before any loading
    rng, generator = random.Random(args.seed), torch.Generator(device).manual_seed(args.seed)
    torch.manual_seed(args.seed)
    P, G, K = args.prompts_per_iteration, args.group_size, args.num_steps
    say(plumbing.batch_arithmetic(args, processes.world))

    # ---- Prompts, model, reward, optimizer, buffer
    train_prompts, sets, draw_prompts, mix = plumbing.prompt_sets(args, world_of(args), rng)
    model = load_model(args, device, train_prompts + [p for v in sets.values() for p in v])
    reward_fn = load_reward(args, device)
    trainable = [p for p in model.transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate, weight_decay=0.0)
    average = plumbing.WeightAverage(optimizer, args.ema_decay)  # Flow-GRPO's EMA, evaluated in the weights' place
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: min(1.0, (i + 1) / (args.warmup_iterations + 1)))
    buffer = ReplayBuffer(args.buffer_capacity, args.reward_decay, args.failed_weight)
    state = plumbing.RunState(args, model.transformer, optimizer, warmup, buffer, rng, generator, processes, average)
    start = state.load(saved) if saved is not None else 0
    changed = plumbing.prepare_output_dir(args, processes, start)  # only now: a start that fails leaves nothing

    # ---- Evaluation before any update, or the state of the run being resumed
    eval_sigmas = noise_schedule(model.pipe, args.eval_steps, device)
    model.transformer.eval()
    if saved is not None:
        say(f"resumed {args.resume} at iteration {start}" + ("" if plumbing.same_folder(args.resume, args.output_dir)
                                                             else f", writing to {args.output_dir}")
            + (f"; changed since its last start: {changed}" if changed else ""))
    else:  # rank 0 evaluates; the others get its result
        if processes.main:
            metrics, images, outcomes = evaluate(model, args, sets, mix, eval_sigmas, reward_fn)
            state.baseline = {"metrics": metrics, "outcomes": outcomes, "grid": plumbing.grid_images(images, sets)}
        state.baseline = processes.gather(state.baseline)[0]
    say("before: " + plumbing.eval_summary(state.baseline["metrics"], sets))
    logger, guard = plumbing.Logger(args, processes, state.history, start), plumbing.NonFinitePolicy(args, state)
    images = None  # of the latest evaluation

    for iteration in range(start, args.iterations):
        timings = {}
        with guard.iteration(iteration):
            # ---- 1-2. Prompt slots (Eq. 8; this process keeps its own) and SDE rollouts of the fresh samples
            with timed(timings, "sampling"):
                slot_prompts, n_drawn = choose_prompts(args, buffer, draw_prompts, rng)
                n_replayed, slots = n_drawn if args.replay == "trajectory" else 0, processes.slots(P)
                fresh = rollout(model, args, slot_prompts, n_replayed, slots, generator, sde_window(args, rng))
            with timed(timings, "reward"):
                fresh["rewards"] = compute_rewards(reward_fn, args.reward, fresh.pop("images"), fresh["prompts"])

            # ---- 3-4. Replayed trajectories: log p_old of every stored step; the tail regenerated and re-scored
            replayed, mine = None, [slot_prompts[s] for s in slots if s < n_replayed]
            if mine:
                with timed(timings, "replay_old"):
                    replayed = rescore_replayed(model, args, buffer, mine)
                with timed(timings, "tail"):
                    regenerate_tail(model, args, replayed, reward_fn)

            # ---- 5. Hybrid groups (Eq. 8), kept steps (Eq. 12), sequence weights (Eq. 10), advantages (Eq. 5)
            batch = hybrid_groups(args, fresh, replayed, slots, n_replayed)
            batch["embeds"], batch["pooled"] = model.condition([slot_prompts[s] for s in slots for _ in range(G)])
            keep = kept_steps(K, args.truncate_steps, batch["replayed"]) & batch["stochastic"]  # (B, K)
            batch["is_weight"] = torch.ones(len(keep), device=device)  # w = 1: fresh samples, and --correction none
            if args.correction == "sequence":
                batch["is_weight"] = sequence_is_weight(batch["log_prob_old"], batch["log_prob_behavior"], keep)
            elif args.correction == "naive":  # the variant the paper rejects: the clip compares p_theta with p_off
                batch["log_prob_old"] = torch.where(batch["replayed"][:, None], batch["log_prob_behavior"],
                                                    batch["log_prob_old"])
            require_finite("IS weight", batch["is_weight"])
            advantages = group_advantages(batch["rewards"].view(-1, G)).flatten()  # (B,)
            batch["advantages"] = advantages.clamp(-args.adv_clip, args.adv_clip)

            # ---- 6. Buffer admission (Eq. 7): from here on the buffer, the weights and the optimizer change
            guard.pristine = False
            buffer.tick()
            admitted = admit_best(buffer, args, batch, slot_prompts, processes)

            # ---- 7. Policy update (Eqs. 4, 6, 11)
            with timed(timings, "update"):
                stats = policy_update(model, args, batch, optimizer, processes, generator)
            warmup.step()

        # ---- 8. Log; evaluate every eval_every iterations and after the last
        row = {"iteration": iteration, "skipped": guard.skipped}
        if not guard.skipped:
            row = {"iteration": iteration, **plumbing.iteration_metrics(args, fresh, replayed, batch, stats, processes),
                   "replayed_groups": n_replayed, "buffer_prompts": n_drawn, "buffer_size": len(buffer),
                   "buffer_mean_age": buffer.ages().mean().nan_to_num().item(), "buffer_admitted": admitted, **timings}
        if ((iteration + 1) % args.eval_every == 0 or iteration == args.iterations - 1) and not plumbing.stopping_now():
            row.update(processes.divergence(trainable))
            if processes.main:  # a second signal cuts the evaluation short, not the checkpoint
                with plumbing.unless_stopped_now(), timed(row, "eval"), average.in_place():
                    metrics, images, outcomes = evaluate(model, args, sets, mix, eval_sigmas, reward_fn)
                row.update(metrics)
                change = toy_world.paired_change(state.baseline["outcomes"], outcomes, mix)  # any world's
                row["eval_change"], row["eval_change_se"] = change
        elif iteration == 0:
            row.update(state.baseline["metrics"])  # the evaluation before the first update, logged with iteration 0
        state.history.append(row)
        evaluated = "time/eval" in row  # this iteration's evaluation: its grid picks go to wandb, if used
        logger.log(row, [(images[next(iter(sets))][i], p) for i, p in plumbing.grid_picks(sets)] if evaluated else None)

        # ---- 9. Checkpoint every checkpoint_every iterations; a signal stops the run after its checkpoint
        stop = processes.any(bool(plumbing.STOP_REQUESTED))
        if stop or (args.checkpoint_every and (iteration + 1) % args.checkpoint_every == 0):
            state.save(iteration + 1)
        if stop:
            logger.close(plumbing.stop_message(iteration + 1, args))
            return state.history
    state.save(args.iterations)  # lets --resume with a higher --iterations train on
    logger.close()
    if processes.main:  # before/after scores, the grid (toy world: with strict scores), the fine-tuned weights
        world = world_of(args)  # a toy world's verifier labels the grid: images, or videos as frame strips
        score = (lambda prompt, image: world.score_prompt(prompt, image)[0]) if world else None
        plumbing.report_results(args, state, sets, mix, images, logger, score, model.transformer, PIPELINES[args.model])
    return state.history


# =========================================================================================================
# Evaluation with the ODE sampler, fixed prompts and noise: strict toy-GenEval accuracy, or the mean reward
# =========================================================================================================
@torch.no_grad()
def evaluate(model: Model, args: Args, sets: dict, mix: dict | None, eval_sigmas: torch.Tensor, reward_fn):
    """ODE samples of fixed prompts from fixed noise, scored per set and family: a toy world's strict accuracy (0/1) on
    held_out and train, families weighted by mix, or a prompt list's training reward; eval_reward: the mean over sets.
    -> metrics, images per set (for grids), per-image outcomes per set and family (for paired differences)."""
    metrics, images_by_set, outcomes, world = {}, {}, {}, world_of(args)
    for name, prompts in sets.items():
        generator = torch.Generator(model.device).manual_seed(args.seed + 99)  # the same noise at every evaluation
        images, size = [], 4 * args.micro_batch or 64
        for chunk in (prompts[i : i + size] for i in range(0, len(prompts), size)):
            noise = torch.randn((len(chunk), *model.shape), generator=generator, device=model.device)
            latents, _ = sample_trajectories(model, noise, eval_sigmas, 0, chunk, 0, args.guidance_scale,
                                             args.micro_batch)
            images += decode(model.pipe, latents[:, -1], args.micro_batch)
        images_by_set[name] = images  # videos: lists of frames
        if world:
            strict, dense = world.score_by_family(prompts, images)
            rates = getattr(world, "requirement_rates", lambda *_: {})(prompts, images)  # toy video: motion, shape...
            metrics.update({f"eval/{name}/met/{kind}": rate for kind, rate in rates.items()})
        else:
            strict = dense = {"all": compute_rewards(reward_fn, args.reward, images, prompts).tolist()}
        outcomes[name] = strict
        metrics.update({f"eval/{name}/{family}": float(np.mean(v)) for family, v in strict.items()})
        metrics[f"eval/{name}"], metrics[f"eval/{name}/se"] = toy_world.mix_mean_and_se(strict, mix)
        metrics[f"eval/{name}/dense"] = toy_world.mix_mean_and_se(dense, mix)[0]
    metrics["eval_reward"] = float(np.mean([metrics[f"eval/{name}"] for name in sets]))
    metrics["eval_se"] = math.sqrt(sum(metrics[f"eval/{name}/se"] ** 2 for name in sets)) / len(sets)
    return metrics, images_by_set, outcomes


# =========================================================================================================
# The command line. The infrastructure (processes, NaN policy, checkpoints, logging, signals) is in plumbing.py.
# =========================================================================================================
def check_args(args: Args) -> None:
    """Reject impossible settings before anything is loaded, each message naming its flag (a UsageError)."""
    args = with_presets(args)
    if clash := plumbing.resume_clash(args):  # a resumed run given another model: the one problem said
        raise UsageError(clash)
    builds = {PRESETS[model]["pretrained"]: f"python {world.__name__}.py" for model, world in WORLDS.items()}
    problems = plumbing.check_settings(args, world_of(args), builds)
    prompt_file_wrong = any(p.startswith("--prompt-file") for p in problems)  # the root error: nothing follows it
    try:
        names = parse_reward(args.reward, reward_table(args))
        if not world_of(args) and not prompt_file_wrong:
            problems += rewards.check_prompts(names, args.prompt_file)
    except ValueError as error:
        names = [part.partition("=")[0].strip() for part in args.reward.split(",")]
        homes = [model for model, table in WORLD_REWARDS.items() if set(names) & set(table)]
        if not (homes and prompt_file_wrong):
            problems.append(f"--reward {args.reward} scores the toy world of --model {homes[0]}: use it there, "
                            "without --prompt-file" if homes else str(error))
    if problems:
        raise UsageError("\n".join(problems))


parse_cli = functools.partial(plumbing.parse_cli, Args)  # tyro; --resume FOLDER: that run's settings are the defaults


if __name__ == "__main__":
    cli_args = None
    try:
        cli_args = parse_cli(sys.argv[1:])
        check_args(cli_args)
        signal.signal(signal.SIGINT, plumbing.request_stop)
        signal.signal(signal.SIGTERM, plumbing.request_stop)
        plumbing.quiet_libraries()
        main(cli_args)
        for stop_signal in (signal.SIGINT, signal.SIGTERM):  # the run is saved: a late signal changes nothing
            signal.signal(stop_signal, signal.SIG_IGN)
    except UsageError as error:  # one line per problem
        sys.exit("\n".join(f"op_grpo.py: error: {line}" for line in str(error).splitlines()))
    except KeyboardInterrupt:  # a second signal: stopped at once; say what was kept, no traceback
        sys.exit(plumbing.stopped_at_once(cli_args and cli_args.output_dir))
    if plumbing.STOP_REQUESTED:
        sys.exit(128 + plumbing.STOP_REQUESTED[0])
