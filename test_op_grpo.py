"""Tests of op_grpo.py and toy_world.py: the ratio math against closed forms first, then the pieces, then
short runs of the whole job. Run with `python -m pytest -q test_op_grpo.py`."""

import dataclasses
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import tyro
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline, WanPipeline
from PIL import Image, ImageDraw

import op_grpo
import plumbing
import profile_sd3
import rewards
import toy_world
from op_grpo import (
    Args,
    ReplayBuffer,
    check_args,
    clipped_surrogate,
    gaussian_kl,
    group_advantages,
    kept_steps,
    sde_step_with_logprob,
    sequence_is_weight,
)

torch.set_num_threads(2)
HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(autouse=True)
def away_from_the_users_folders(tmp_path, monkeypatch):
    """Every test runs in its own empty folder: a default --output-dir (runs/<model>) is never the user's."""
    monkeypatch.chdir(tmp_path)


# ---------------------------------------------------------------------------------------------------------
# A Gaussian toy flow: data x_0 ~ N(m, s0^2) per dimension, x_sigma = (1 - sigma) x_0 + sigma eps. Every
# quantity has a closed form: the marginal N((1 - sigma) m, (1 - sigma)^2 s0^2 + sigma^2), the exact
# velocity E[eps - x_0 | x_sigma] and the score of the marginal.
# ---------------------------------------------------------------------------------------------------------
M, S0 = 1.5, 0.5


def marginal(sigma):
    return (1 - sigma) * M, (1 - sigma) ** 2 * S0**2 + sigma**2  # mean, variance


def exact_velocity(x, sigma):
    mean, var = marginal(sigma)
    centred = x - mean
    e_x0 = M + (1 - sigma) * S0**2 / var * centred  # E[x_0 | x_sigma = x]
    e_eps = sigma / var * centred  # E[eps | x_sigma = x]
    return e_eps - e_x0


def exact_score(x, sigma):
    mean, var = marginal(sigma)
    return -(x - mean) / var


def test_ode_step_equals_diffusers_euler_step():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(10)
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for i, t in enumerate(scheduler.timesteps):
        v = torch.randn(x.shape, generator=torch.Generator().manual_seed(i))
        expected = scheduler.step(v, t, x).prev_sample
        ours, log_prob, mean, std = sde_step_with_logprob(v, x, scheduler.sigmas[i], scheduler.sigmas[i + 1], 0.0)
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(mean, expected, rtol=0, atol=1e-6)
        assert torch.all(std == 0) and torch.isnan(log_prob).all()  # the ODE has no density, loudly
        x = expected


def test_log_prob_is_the_gaussian_density_averaged_over_dimensions():
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(5, 4, 8, 8, generator=g), torch.randn(5, 4, 8, 8, generator=g)
    sigma, sigma_next = torch.tensor([0.9, 0.7, 0.5, 0.3, 0.1]), torch.tensor([0.8, 0.6, 0.4, 0.2, 0.0])
    prev, log_prob, mean, std = sde_step_with_logprob(v, x, sigma, sigma_next, 0.7, generator=g)
    # mean and std written out independently, per sample, from Flow-GRPO's formulas
    for i in range(5):
        s, dt = 0.7 * math.sqrt(sigma[i] / (1 - sigma[i])), (sigma_next[i] - sigma[i]).item()
        mu = x[i] + (v[i] + s**2 / (2 * sigma[i]) * (x[i] + (1 - sigma[i]) * v[i])) * dt
        std_i = s * math.sqrt(-dt)
        torch.testing.assert_close(mean[i], mu)
        assert abs(std[i].item() - std_i) < 1e-6
        expected = torch.distributions.Normal(mu, std_i).log_prob(prev[i]).mean()
        torch.testing.assert_close(log_prob[i], expected, rtol=1e-5, atol=1e-5)


def test_sampling_and_scoring_modes_agree_and_per_sample_sigmas_match_scalars():
    g = torch.Generator().manual_seed(2)
    x, v = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    sigmas, sigmas_next = torch.tensor([1.0, 0.8, 0.5, 0.2]), torch.tensor([0.9, 0.6, 0.3, 0.0])
    prev, log_prob, _, _ = sde_step_with_logprob(v, x, sigmas, sigmas_next, 0.7, generator=g)
    _, rescored, _, _ = sde_step_with_logprob(v, x, sigmas, sigmas_next, 0.7, prev_sample=prev)
    assert torch.equal(log_prob, rescored)  # same code path: the on-policy ratio is exactly 1
    assert torch.equal(torch.exp(rescored - log_prob), torch.ones(4))
    for i in range(4):
        _, lp_i, _, _ = sde_step_with_logprob(v[i : i + 1], x[i : i + 1], sigmas[i].item(), sigmas_next[i].item(), 0.7, prev_sample=prev[i : i + 1])
        torch.testing.assert_close(lp_i[0], log_prob[i])


def test_sigma_one_uses_next_sigma_in_the_denominator():
    x, v = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    _, log_prob, mean, std = sde_step_with_logprob(v, x, 1.0, 0.9, 0.7, generator=torch.Generator().manual_seed(0))
    s = 0.7 * math.sqrt(1.0 / (1 - 0.9))
    assert torch.allclose(std, torch.full_like(std, s * math.sqrt(0.1)))
    assert torch.isfinite(log_prob).all() and torch.isfinite(mean).all()


def test_drift_uses_the_exact_score_of_the_marginal():
    """mu = x + [v - s^2/2 * score] dt with the closed-form score: the score identity in the drift."""
    x = torch.linspace(-3, 3, 64).reshape(1, 1, 8, 8)
    for sigma, sigma_next in [(0.9, 0.8), (0.5, 0.45), (0.1, 0.05)]:
        v = exact_velocity(x, sigma)
        _, _, mean, _ = sde_step_with_logprob(v, x, sigma, sigma_next, 0.7, prev_sample=x)
        s2 = 0.49 * sigma / (1 - sigma)
        expected = x + (v - s2 / 2 * exact_score(x, sigma)) * (sigma_next - sigma)
        torch.testing.assert_close(mean, expected, rtol=1e-5, atol=1e-5)


def run_toy_sde(num_steps, noise_level, start_sigma=0.95, n=200_000, seed=0):
    """Sample the toy flow from its exact marginal at start_sigma down to 0 with the SDE step."""
    g = torch.Generator().manual_seed(seed)
    sigmas = torch.linspace(start_sigma, 0.0, num_steps + 1)
    mean, var = marginal(start_sigma)
    x = mean + math.sqrt(var) * torch.randn(n, 1, 1, 1, generator=g)
    for k in range(num_steps):
        x, _, _, _ = sde_step_with_logprob(exact_velocity(x, sigmas[k]), x, sigmas[k], sigmas[k + 1], noise_level, generator=g)
    return x.mean().item(), x.var().item()


def test_sde_keeps_the_marginals_with_error_shrinking_in_the_number_of_steps():
    errors = []
    for steps in (10, 40, 160):
        mean, var = run_toy_sde(steps, noise_level=0.7)
        errors.append(abs(mean - M) + abs(var - S0**2))
    assert errors[2] < 0.02, errors  # data distribution N(1.5, 0.25) recovered
    assert errors[0] > errors[1] > errors[2], errors


def test_gaussian_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(3)
    mean, mean_ref = torch.randn(3, 4, 4, 4, generator=g), torch.randn(3, 4, 4, 4, generator=g)
    std = torch.tensor([0.1, 0.3, 0.7]).reshape(3, 1, 1, 1)
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, std.expand_as(mean)), torch.distributions.Normal(mean_ref, std.expand_as(mean))
    ).mean(dim=(1, 2, 3))
    torch.testing.assert_close(gaussian_kl(mean, mean_ref, std), expected)


def test_sd3_kl_matches_flow_grpo_recipe():
    """On the same tensors, the sd3 preset's KL penalty is Flow-GRPO's: the mean over dimensions of
    |mu - mu_ref|^2 / (2 s_sigma^2) times its beta 0.01, at every step of SD3.5's 10-step schedule (shift 3)."""
    args = op_grpo.with_presets(Args(model="sd3"))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(10)
    sigmas, g = scheduler.sigmas, torch.Generator().manual_seed(0)
    for k in range(10):
        x, v, v_ref = (torch.randn(2, 16, 8, 8, generator=g) for _ in range(3))
        _, _, mean, std_dev = sde_step_with_logprob(v, x, sigmas[k], sigmas[k + 1], args.noise_level)
        _, _, mean_ref, _ = sde_step_with_logprob(v_ref, x, sigmas[k], sigmas[k + 1], args.noise_level)
        kl, dt = gaussian_kl(mean, mean_ref, std_dev), (sigmas[k + 1] - sigmas[k]).item()
        ours = args.kl_beta * op_grpo.kl_penalty(kl, dt, args.kl_form)
        # Flow-GRPO's std_dev_t: s_sigma = a sqrt(sigma / (1 - sigma)), sigma_1 in the denominator at sigma = 1
        sigma = sigmas[k].item()
        s_sigma = 0.7 * math.sqrt(sigma / (1 - (sigmas[1].item() if sigma == 1 else sigma)))
        theirs = 0.01 * ((mean - mean_ref) ** 2).mean(dim=(1, 2, 3)) / (2 * s_sigma**2)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=0)
        torch.testing.assert_close(op_grpo.kl_penalty(kl, dt, "exact"), kl, rtol=0, atol=0)  # the exact KL kept
    assert op_grpo.with_presets(Args()).kl_form == "exact"


def test_sd3_presets_match_flow_grpo_pickscore_config():
    """Flow-GRPO's config/grpo.py (pickscore_sd3 over base.get_config) and train_sd3.py's EMA (decay 0.9, every 8
    optimizer steps), transcribed: what the sd3 preset shares with it. What differs (batch, advantage std, weight decay,
    warm-up, fp16) is listed in the README and RESULTS.md ("Recipe notes")."""
    flow_grpo = dict(num_steps=10, eval_steps=40, guidance_scale=4.5, resolution=512, noise_level=0.7,
                     learning_rate=3e-4, clip_range=1e-4, adv_clip=5.0, kl_beta=0.01, kl_form="flow_grpo",
                     max_grad_norm=1.0, lora_rank=32, lora_alpha=64, updates_per_batch=2, train_steps=9, ema_decay=0.9)
    sd3 = op_grpo.with_presets(Args(model="sd3"))
    ours = {k: getattr(sd3, k) for k in flow_grpo}
    ours.update(lora_alpha=sd3.lora_alpha or 2 * sd3.lora_rank, train_steps=sd3.train_steps or sd3.num_steps - 1)
    assert ours == flow_grpo  # train_steps: int(timestep_fraction 0.99 x 10); 2 updates: accumulation over half


def test_wan_presets_match_flow_grpo_wan_config():
    """Flow-GRPO's general_ocr_wan2_1 (config/grpo.py over base.get_config) and its train_wan2_1.py, transcribed: the
    KL is the exact one there (its penalty divides by (s_sigma sqrt|dt|)^2); 2 optimizer steps per epoch of 2
    sampling batches; the EMA of decay 0.9 every 8 steps. What differs (batch, its per-step loss scale
    s_sigma / sqrt|dt|) is in the README and RESULTS.md ("Recipe notes")."""
    flow_grpo = dict(num_steps=20, eval_steps=50, guidance_scale=4.5, resolution=240, width=416, num_frames=33,
                     group_size=4, noise_level=0.7, learning_rate=1e-4, clip_range=1e-3, adv_clip=5.0, kl_beta=0.004,
                     kl_form="exact", max_grad_norm=1.0, lora_rank=32, lora_alpha=64, updates_per_batch=2,
                     train_steps=19, max_sequence_length=512, mixed_precision="bf16", reward_every=4, ema_decay=0.9)
    wan = op_grpo.with_presets(Args(model="wan"))
    ours = {k: getattr(wan, k) for k in flow_grpo}
    ours.update(lora_alpha=wan.lora_alpha or 2 * wan.lora_rank, train_steps=wan.train_steps or wan.num_steps - 1)
    assert ours == flow_grpo and wan.pretrained == "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    check_args(Args(model="wan"))  # the preset passes its own checks


def test_group_advantages_closed_form():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0], [0.0, 1.0, 0.0, 1.0]])
    adv = group_advantages(rewards)
    std = math.sqrt(1.25)  # population std of 1, 2, 3, 4
    torch.testing.assert_close(adv[0], torch.tensor([-1.5, -0.5, 0.5, 1.5]) / (std + 1e-4))
    assert torch.equal(adv[1], torch.zeros(4))  # equal rewards: no signal
    torch.testing.assert_close(adv[2], torch.tensor([-0.5, 0.5, -0.5, 0.5]) / (0.5 + 1e-4))  # std 0.5
    torch.testing.assert_close(adv.sum(dim=1), torch.zeros(3), atol=1e-6, rtol=0)


def test_sequence_weight_is_the_product_over_kept_steps():
    g = torch.Generator().manual_seed(4)
    log_old, log_beh = torch.randn(3, 10, generator=g) * 0.1, torch.randn(3, 10, generator=g) * 0.1
    replayed = torch.tensor([True, False, True])
    keep = kept_steps(10, 3, replayed)
    assert keep.sum(dim=1).tolist() == [7, 10, 7]
    log_old[0, 7:] = float("nan")  # regenerated tail: no log-prob, must be ignored
    w = sequence_is_weight(log_old, log_beh, keep)
    for i in range(3):
        kept = keep[i].nonzero().flatten().tolist()
        expected = math.prod(math.exp(log_old[i, k].item()) / math.exp(log_beh[i, k].item()) for k in kept)
        assert abs(w[i].item() - expected) < 1e-5 * expected
    assert torch.equal(sequence_is_weight(log_beh, log_beh, keep), torch.ones(3))  # on-policy: exactly 1
    assert kept_steps(10, 0, replayed).all()


def test_sequence_weight_carries_no_gradient():
    log_old = torch.zeros(2, 4, requires_grad=True)
    w = sequence_is_weight(log_old, torch.zeros(2, 4), torch.ones(2, 4, dtype=torch.bool))
    assert not w.requires_grad


# ---------------------------------------------------------------------------------------------------------
# SDE windows (Flow-GRPO-Fast): a few stochastic steps, ODE elsewhere
# ---------------------------------------------------------------------------------------------------------
def window_log_probs(windows, num_steps=10, seed=0):
    """(B, K) log-probs, NaN outside each row's window [start, end): what a windowed sampler records."""
    values = torch.randn(len(windows), num_steps, generator=torch.Generator().manual_seed(seed)) * 1e-3
    step = torch.arange(num_steps)
    inside = torch.stack([(step >= a) & (step < b) for a, b in windows])
    return torch.where(inside, values, torch.full_like(values, float("nan"))), inside


def test_a_fresh_samples_trained_steps_are_exactly_its_window_and_a_replayed_ones_its_kept_stored_window():
    behavior, inside = window_log_probs([(2, 5), (7, 10), (5, 8), (0, 10)])
    batch = {"replayed": torch.tensor([False, False, True, True]), "stochastic": torch.isfinite(behavior)}
    trained = op_grpo.trained_steps(op_grpo.with_presets(Args(truncate_steps=3)), batch)
    step = torch.arange(10)
    expected = torch.stack([(step >= 2) & (step < 5),  # fresh: its window
                            (step >= 7) & (step < 9),  # fresh: its window, less step 9 (train_steps = K - 1)
                            (step >= 5) & (step < 7),  # replayed: its stored window, less the truncated steps 7-9
                            step < 7])  # replayed without a window: today's truncation
    assert torch.equal(trained, expected)


def test_a_replayed_trajectorys_weight_is_the_product_over_its_stored_window():
    behavior, inside = window_log_probs([(1, 4), (5, 8), (0, 10)], seed=1)
    old = torch.where(inside, behavior + torch.linspace(-2e-3, 3e-3, 10), behavior)  # p_old on the window only
    replayed = torch.tensor([True, True, True])
    keep = kept_steps(10, 3, replayed) & torch.isfinite(behavior)
    w = sequence_is_weight(old, behavior, keep)
    delta = torch.linspace(-2e-3, 3e-3, 10).double()
    expected = [math.exp(delta[1:4].sum()), math.exp(delta[5:7].sum()), math.exp(delta[0:7].sum())]
    torch.testing.assert_close(w.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=0)


@pytest.fixture(scope="module")
def tiny_model():
    args = op_grpo.with_presets(Args())
    return op_grpo.load_model(args, torch.device("cpu"), ["a red circle", "two blue squares"]), args


def test_ode_steps_draw_nothing_and_carry_no_log_prob(tiny_model):
    model, args = tiny_model
    start = torch.randn((2, *model.shape), generator=torch.Generator().manual_seed(0))
    levels = [0.7 if 2 <= k < 5 else 0.0 for k in range(10)]
    generator = torch.Generator().manual_seed(5)
    latents, log_probs = op_grpo.sample_trajectories(model, start, model.sigmas, 0, ["a red circle"] * 2, levels,
                                                     1.0, generator=generator)
    assert torch.isnan(log_probs[:, [0, 1, 5, 6, 7, 8, 9]]).all() and torch.isfinite(log_probs[:, 2:5]).all()
    reference = torch.Generator().manual_seed(5)
    for _ in range(3):  # exactly the window's three draws
        torch.randn(start.shape, generator=reference)
    assert torch.equal(torch.randn(4, generator=generator), torch.randn(4, generator=reference))
    # the ODE steps are the deterministic Euler step of the model's velocity
    v = op_grpo.predict_velocity(model.transformer, latents[:, 6], model.sigmas[6], *model.condition(["a red circle"] * 2), 1.0)
    torch.testing.assert_close(latents[:, 7], latents[:, 6] + (model.sigmas[7] - model.sigmas[6]) * v, rtol=0, atol=1e-6)


def test_the_window_is_drawn_in_its_range_from_the_runs_stream_and_none_without_one():
    args = op_grpo.with_presets(Args(sde_window=3))
    rng, starts = random.Random(0), []
    for _ in range(400):
        a, b = op_grpo.sde_window(args, rng)
        assert b - a == 3
        starts.append(a)
    assert sorted(set(starts)) == [0, 1, 2]  # (0, K // 2) = (0, 5): starts 0 to 2, each about a third of the time
    assert all(abs(starts.count(s) / 400 - 1 / 3) < 4 * math.sqrt(2 / 9 / 400) for s in range(3))
    rng, before = random.Random(0), random.Random(0).random()
    assert op_grpo.sde_window(op_grpo.with_presets(Args(sde_window=0)), rng) == (0, 10) and rng.random() == before
    assert op_grpo.sde_window(op_grpo.with_presets(Args(sde_window=2, sde_window_range=(6, 8))), rng) == (6, 8)


def test_late_steps_are_a_cliff_for_log_ratios():
    """A 1% change of the velocity moves per-step log-ratios far more at low noise (paper Fig. 2).

    Per dimension the log-ratio is about z |d mu| / std + |d mu|^2 / (2 std^2) with z ~ N(0, 1); the
    transition variance std^2 = a^2 sigma / (1 - sigma) |dt| vanishes as sigma -> 0, so both the spread and
    the systematic part (the KL) grow at the last steps.
    """
    g = torch.Generator().manual_seed(5)
    sigmas = torch.linspace(1.0, 0.0, 11)
    x = torch.randn(512, 4, 8, 8, generator=g)
    spread, kl = [], []
    for k in range(10):
        v = exact_velocity(x, sigmas[k])
        nxt, lp_old, mean_old, std = sde_step_with_logprob(v, x, sigmas[k], sigmas[k + 1], 0.7, generator=g)
        _, lp_new, mean_new, _ = sde_step_with_logprob(v * 1.01, x, sigmas[k], sigmas[k + 1], 0.7, prev_sample=nxt)
        spread.append((lp_new - lp_old).abs().mean().item())
        kl.append(gaussian_kl(mean_old, mean_new, std).mean().item())
        x = nxt
    assert all(a < b for a, b in zip(spread, spread[1:])), spread
    assert spread[-1] > 10 * spread[0], spread
    assert kl[-1] > 50 * kl[0] and kl[-1] > 5 * kl[4], kl


@pytest.mark.parametrize("advantage", [1.0, -1.0])
def test_clipped_surrogate_gradients_vanish_beyond_the_clip(advantage):
    eps = 0.1
    for log_ratio, should_vanish in [(0.0, False), (0.2, advantage > 0), (-0.2, advantage < 0)]:
        log_prob = torch.tensor([log_ratio], requires_grad=True)
        loss, ratio = clipped_surrogate(log_prob, torch.zeros(1), torch.tensor([advantage]), eps)
        loss.sum().backward()
        assert torch.allclose(ratio, torch.tensor([math.exp(log_ratio)]))
        if should_vanish:  # past the clip in the direction the advantage pushes: no more incentive
            assert log_prob.grad.item() == 0.0
        else:  # inside the clip, or past it in the unfavourable direction: the gradient pulls back
            assert log_prob.grad.item() == pytest.approx(-advantage * math.exp(log_ratio))
    # the loss value is the pessimistic minimum of the two objectives (CleanRL's max of the negatives)
    loss, _ = clipped_surrogate(torch.tensor([0.5]), torch.tensor([0.0]), torch.tensor([advantage]), eps)
    assert loss.item() == pytest.approx(max(-advantage * math.exp(0.5), -advantage * (1 + eps)))


def test_family_weighted_score_and_paired_change():
    per_family = {"single": [1, 0, 1, 1], "counting": [0, 0, 1, 0]}  # EVAL_MIX weights 0.2 and 0.3
    mean, se = toy_world.mix_mean_and_se(per_family)
    assert mean == pytest.approx((0.2 * 0.75 + 0.3 * 0.25) / 0.5)
    assert se == pytest.approx(math.sqrt(0.2**2 * 0.1875 / 4 + 0.3**2 * 0.1875 / 4) / 0.5)
    before = {"held_out": {"counting": [0, 0, 1, 1]}, "train": {"single": [1, 1, 0, 0]}}
    after = {"held_out": {"counting": [1, 0, 1, 1]}, "train": {"single": [1, 1, 1, 1]}}
    change, change_se = toy_world.paired_change(before, after)
    assert change == pytest.approx((0.25 + 0.5) / 2)  # mean of the two sets' changes
    assert change_se == pytest.approx(math.sqrt(0.1875 / 4 + 0.25 / 4) / 2)  # from per-image differences
    mean, _ = toy_world.mix_mean_and_se(per_family, {"single": 0.9, "counting": 0.1})  # a band's own weights
    assert mean == pytest.approx(0.9 * 0.75 + 0.1 * 0.25)


def test_guidance_is_one_batched_pass_combined_as_v_u_plus_g_times_v_c_minus_v_u():
    class Recorder(torch.nn.Module):  # a stand-in transformer whose output depends on the text inputs
        dtype = torch.float32

        def forward(self, hidden_states, timestep, encoder_hidden_states, pooled_projections):
            self.batch = len(hidden_states)
            out = hidden_states * pooled_projections.sum(1)[:, None, None, None] + encoder_hidden_states.mean((1, 2))[:, None, None, None]
            return type("Output", (), {"sample": out + timestep[:, None, None, None] / 1000})

    g = torch.Generator().manual_seed(6)
    x, embeds, pooled = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 5, 8, generator=g), torch.randn(3, 6, generator=g)
    uncond = (torch.randn(5, 8, generator=g), torch.randn(6, generator=g))
    model = Recorder()
    v = op_grpo.predict_velocity(model, x, torch.tensor(0.5), embeds, pooled, 4.5, uncond)
    assert model.batch == 6  # conditional and unconditional in one pass
    v_c = op_grpo.predict_velocity(model, x, torch.tensor(0.5), embeds, pooled, 1.0)
    v_u = op_grpo.predict_velocity(model, x, torch.tensor(0.5), uncond[0].expand(3, 5, 8), uncond[1].expand(3, 6), 1.0)
    torch.testing.assert_close(v, v_u + 4.5 * (v_c - v_u))


# ---------------------------------------------------------------------------------------------------------
# The replay buffer
# ---------------------------------------------------------------------------------------------------------
def entry(value):
    return torch.full((11, 4, 8, 8), float(value)), torch.full((10,), float(value))


def test_buffer_keeps_one_entry_per_prompt_and_only_a_better_one():
    buffer = ReplayBuffer(capacity=4, decay=0.0)
    assert buffer.offer("a red circle", *entry(1), reward=0.5)
    assert not buffer.offer("a red circle", *entry(2), reward=0.4)  # worse: refused
    assert not buffer.offer("a red circle", *entry(2), reward=0.5)  # equal: refused
    assert buffer.entries["a red circle"]["latents"][0, 0, 0, 0] == 1
    assert buffer.offer("a red circle", *entry(3), reward=0.7)  # better: replaces
    assert len(buffer) == 1 and buffer.entries["a red circle"]["reward"] == 0.7
    assert buffer.entries["a red circle"]["latents"][0, 0, 0, 0] == 3


def test_replay_slots_average_rho_times_p_and_whole_values_draw_nothing():
    rng = random.Random(0)
    draws = [op_grpo.replay_slots(Args(off_policy_fraction=0.05, prompts_per_iteration=8), rng) for _ in range(20000)]
    assert set(draws) == {0, 1} and abs(np.mean(draws) - 0.4) < 4 * math.sqrt(0.24 / 20000)
    state = rng.getstate()
    assert op_grpo.replay_slots(Args(off_policy_fraction=0.25, prompts_per_iteration=8), rng) == 2
    assert op_grpo.replay_slots(Args(off_policy_fraction=0.1, prompts_per_iteration=10), rng) == 1
    assert rng.getstate() == state  # the default run's random stream is untouched


def test_buffer_entries_own_their_memory():
    batch_latents, batch_log_probs = torch.randn(64, 11, 4, 8, 8), torch.randn(64, 10)
    buffer = ReplayBuffer(capacity=4, decay=0.0)
    buffer.offer("p", batch_latents[3], batch_log_probs[3], reward=1.0)
    entry = buffer.entries["p"]
    assert entry["latents"].untyped_storage().nbytes() == 11 * 4 * 8 * 8 * 4  # one trajectory, not the batch
    assert entry["log_probs"].untyped_storage().nbytes() == 10 * 4
    assert torch.equal(entry["latents"], batch_latents[3])


def test_buffer_evicts_the_lowest_when_full():
    buffer = ReplayBuffer(capacity=3, decay=0.0)
    for prompt, reward in [("p1", 0.3), ("p2", 0.1), ("p3", 0.2)]:
        assert buffer.offer(prompt, *entry(0), reward=reward)
    assert not buffer.offer("p4", *entry(0), reward=0.05)  # below the lowest: refused
    assert buffer.offer("p4", *entry(0), reward=0.15)  # evicts p2 (0.1)
    assert sorted(buffer.entries) == ["p1", "p3", "p4"]
    assert len(buffer) == 3


def test_buffer_decay_makes_old_entries_replaceable_also_for_negative_rewards():
    buffer = ReplayBuffer(capacity=2, decay=0.1)
    buffer.offer("old", *entry(0), reward=-1.0)
    buffer.offer("other", *entry(0), reward=-1.2)
    for _ in range(5):
        buffer.tick()
    assert buffer.decayed_reward("old") == pytest.approx(-1.5)
    assert buffer.ages().mean().item() == 5
    assert buffer.offer("old", *entry(1), reward=-1.4)  # worse than the stored -1.0, better than its decayed -1.5
    assert buffer.offer("new", *entry(2), reward=-1.6)  # evicts "other", decayed to -1.7
    assert sorted(buffer.entries) == ["new", "old"]
    assert buffer.entries["old"]["born"] == 5


def test_buffer_sample_is_distinct_and_bounded():
    buffer = ReplayBuffer(capacity=10, decay=0.0)
    for i in range(5):
        buffer.offer(f"p{i}", *entry(i), reward=i)
    picked = buffer.sample(3, random.Random(0))
    assert len(set(picked)) == 3 and set(picked) <= set(buffer.entries)
    assert sorted(buffer.sample(9, random.Random(0))) == sorted(buffer.entries)


def test_failed_weight_draws_prompts_whose_stored_trajectory_beats_their_last_fresh_group_in_proportion():
    buffer = ReplayBuffer(capacity=10, decay=0.0, failed_weight=4.0)
    buffer.offer("rescuable", *entry(0), reward=1.0)
    buffer.offer("rescuable", *entry(0), reward=0.0)  # a later all-fail group: refused, but remembered
    buffer.offer("never", *entry(0), reward=0.0)  # all-fail, and no success stored: nothing to rescue
    buffer.offer("solved", *entry(0), reward=1.0)
    buffer.offer("solved", *entry(0), reward=1.0)  # a success in its latest group too
    buffer.offer("new", *entry(0), reward=1.0)
    # only "rescuable" is failed. Closed form for weights 4, 1, 1, 1: one draw picks it with probability 4/7, and
    # two draws include it with 4/7 + 3 (1/7)(4/6) = 6/7; each of the others is drawn alone with 1/7
    rng, n = random.Random(0), 20000
    for prompt, draws, expected in (("rescuable", 1, 4 / 7), ("rescuable", 2, 6 / 7), ("never", 1, 1 / 7),
                                    ("solved", 1, 1 / 7)):
        hits = [(prompt in buffer.sample(draws, rng)) for _ in range(n)]
        assert abs(np.mean(hits) - expected) < 4 * math.sqrt(expected * (1 - expected) / n)
    assert sorted(buffer.sample(10, rng)) == sorted(buffer.entries)  # distinct and bounded, as uniform draws
    restored = ReplayBuffer(capacity=10, decay=0.0, failed_weight=4.0)
    restored.load_state_dict(buffer.state_dict())  # --resume keeps what the weights depend on
    assert restored.last_best_fresh == {"rescuable": 0.0, "never": 0.0, "solved": 1.0, "new": 1.0}
    # weight 1 is the default's uniform draw, random stream included
    buffer.failed_weight = 1.0
    assert buffer.sample(2, random.Random(5)) == random.Random(5).sample(sorted(buffer.entries), 2)


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------
def test_cli_parses_the_documented_flags():
    args = tyro.cli(Args, args=["--iterations", "5", "--off-policy-fraction", "0.05", "--prompts-per-iteration", "20",
                                "--reward", "jpeg", "--output-dir", "/tmp/x", "--seed", "3", "--correction", "naive"])
    assert (args.iterations, args.off_policy_fraction, args.reward, args.output_dir, args.seed) == (5, 0.05, "jpeg", "/tmp/x", 3)
    assert args.correction == "naive" and args.model == "tiny"
    check_args(args)
    with pytest.raises(SystemExit):
        tyro.cli(Args, args=["--correction", "nonsense"])
    assert op_grpo.parse_reward("pickscore=1.0, jpeg=0.1", rewards.REWARDS) == {"pickscore": 1.0, "jpeg": 0.1}
    assert op_grpo.parse_reward("jpeg", rewards.REWARDS) == {"jpeg": 1.0}
    # flags left at None take the --model preset; given ones win
    sd3 = op_grpo.with_presets(tyro.cli(Args, args=["--model", "sd3", "--group-size", "12"]))
    assert (sd3.lora_rank, sd3.guidance_scale, sd3.clip_range, sd3.eval_steps, sd3.resolution, sd3.group_size) == (32, 4.5, 1e-4, 40, 512, 12)
    assert sd3.pretrained == "stabilityai/stable-diffusion-3.5-medium" and sd3.reward == "pickscore"  # --task's


@pytest.mark.parametrize(
    "flags, flag_named",
    [
        (["--group-size", "1"], "--group-size"),
        (["--off-policy-fraction", "1.0"], "--off-policy-fraction"),
        (["--off-policy-fraction", "-0.1"], "--off-policy-fraction"),
        (["--ema-decay", "1"], "--ema-decay"),
        (["--truncate-steps", "10"], "--truncate-steps"),
        (["--num-steps", "1", "--truncate-steps", "0"], "--num-steps"),
        (["--updates-per-batch", "1000"], "--updates-per-batch"),
        (["--train-steps", "11"], "--train-steps"),
        (["--warmup-iterations", "-1"], "--warmup-iterations"),
        (["--clip-range", "0"], "--clip-range"),
        (["--noise-level", "0"], "--noise-level"),
        (["--kl-beta", "-1"], "--kl-beta"),
        (["--reward", "nonsense"], "--reward"),
        (["--reward", "jpeg=lots"], "--reward"),
        (["--model", "sd3", "--reward", "geneval"], "--reward geneval"),
        (["--prompt-file", "/nonexistent/prompts.txt"], "--prompt-file"),
        (["--resolution", "40"], "--resolution"),
        (["--lora-rank", "-1"], "--lora-rank"),
        (["--micro-batch", "-2"], "--micro-batch"),
        (["--failed-weight", "0"], "--failed-weight"),
        (["--group-size", "0"], "--group-size"),  # and not also --updates-per-batch, whose bound it sets
        (["--prompts-per-iteration", "0"], "--prompts-per-iteration"),
        (["--num-steps", "0"], "--num-steps"),  # and not also --truncate-steps
        (["--prompt-file", "/nonexistent/prompts.txt", "--reward", "geneval"], "--prompt-file"),  # not --reward too
        (["--sde-window", "11"], "--sde-window"),
        (["--sde-window", "3", "--sde-window-range", "0", "2"], "--sde-window-range"),
        (["--sde-window", "3", "--sde-window-range", "8", "12"], "--sde-window-range"),
        (["--width", "40"], "--width"),
        (["--num-frames", "9"], "--num-frames"),  # an image model makes no video
        (["--model", "wan", "--num-frames", "8"], "--num-frames"),
    ],
)
def test_impossible_settings_are_rejected_with_the_flag_named_and_only_the_root_error(flags, flag_named):
    with pytest.raises(ValueError, match=flag_named) as error:
        check_args(tyro.cli(Args, args=flags))
    assert len(str(error.value).splitlines()) == 1, str(error.value)


def test_bad_flag_exits_with_one_line_and_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(HERE, "op_grpo.py"), "--group-size", "1", "--output-dir", str(tmp_path / "run")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert result.stderr.splitlines() == ["op_grpo.py: error: --group-size must be at least 2 (advantages compare "
                                          "images within a group), got 1"]
    assert not (tmp_path / "run").exists()  # rejected before anything was loaded or written
    # two independent mistakes: a line each, each a whole error
    result = subprocess.run([sys.executable, os.path.join(HERE, "op_grpo.py"), "--group-size", "1", "--kl-beta", "-1"],
                            capture_output=True, text=True, timeout=120)
    assert [line.split(" must ")[0] for line in result.stderr.splitlines()] == ["op_grpo.py: error: --group-size",
                                                                               "op_grpo.py: error: --kl-beta"]


def test_curve_points_are_the_evaluations_against_the_runs_minutes():
    rows = [{"iteration": 0, "eval_reward": 0.3, "eval_se": 0.02, "time/sampling": 30.0},  # the start, at minute 0
            {"iteration": 1, "time/sampling": 30.0, "time/update": 60.0},
            {"iteration": 2, "time/sampling": 54.0, "time/eval": 6.0, "eval_reward": 0.4, "eval_se": 0.03}]
    minutes, value, se = plumbing.curve_points(rows)
    np.testing.assert_allclose(minutes, [0.0, 3.0])  # 30 + 90 + 60 seconds, its own evaluation included
    np.testing.assert_allclose(value, [0.3, 0.4])
    np.testing.assert_allclose(se, [0.02, 0.03])


def test_tests_run_outside_the_repository_and_default_folders_never_meet_an_earlier_run(tmp_path):
    assert os.path.realpath(os.getcwd()) == os.path.realpath(tmp_path) != os.path.realpath(HERE)
    assert op_grpo.with_presets(Args()).output_dir == os.path.join("runs", "tiny")  # each model its own folder
    assert op_grpo.with_presets(Args(model="tiny-video")).output_dir == os.path.join("runs", "tiny-video")
    earlier = tmp_path / "runs" / "tiny"
    earlier.mkdir(parents=True)
    (earlier / plumbing.CHECKPOINT).write_bytes(b"")
    (tmp_path / "runs" / "tiny-2").mkdir()  # an empty folder holds no run: it is taken
    check_args(Args(sde_window=2))  # a second run with the default folder starts; the first is not touched
    assert op_grpo.with_presets(Args(sde_window=2)).output_dir == os.path.join("runs", "tiny-2")
    with pytest.raises(plumbing.UsageError, match="already holds a run"):  # named explicitly, it is refused
        check_args(Args(output_dir=str(earlier)))


def one_line_error(argv):
    """The stderr of `python op_grpo.py argv`, which must fail before loading anything."""
    result = subprocess.run([sys.executable, os.path.join(HERE, "op_grpo.py"), *argv], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode != 0 and result.stdout == ""
    return result.stderr.splitlines()


def test_what_a_new_user_mistypes_gets_one_line_that_says_what_to_do(tmp_path):
    assert one_line_error(["--model", "nosuch"]) == [
        "op_grpo.py: error: invalid choice 'nosuch' for argument '--model'. Expected one of ('tiny', 'sd3', 'wan', "
        "'tiny-video')."]
    assert one_line_error(["--group-size", "abc"]) == [
        "op_grpo.py: error: Error parsing --group-size: no type matching INT could be instantiated from ['abc']."]
    [line] = one_line_error(["--resume", str(tmp_path / "nothere")])
    assert "no such folder; give the --output-dir of an earlier run" in line
    [line] = one_line_error(["--sde-window", "0", "--sde-window-range", "5", "2"])
    assert line == "op_grpo.py: error: --sde-window-range 5 2 places an SDE window: give its length with --sde-window L"
    op_grpo.main(short_run(tmp_path, "image_run", iterations=1))
    [line] = one_line_error(["--resume", str(tmp_path / "image_run"), "--model", "tiny-video"])
    assert line.startswith("op_grpo.py: error: --model tiny-video differs from the resumed run's tiny")


def test_the_console_names_strict_accuracy_the_window_and_why_a_set_is_not_the_mean_of_its_rows(tmp_path, capsys):
    windowed = op_grpo.with_presets(Args(sde_window=2))
    assert plumbing.batch_arithmetic(windowed, 1).endswith("on the window's steps among the first 9")
    assert plumbing.batch_arithmetic(op_grpo.with_presets(Args(sde_window=0)), 1).endswith("on the first 9 steps")
    metrics = {"eval_reward": 0.25, "eval_se": 0.1, "eval/held_out": 0.2, "eval/train": 0.3, "eval/prompts": 0.25}
    assert plumbing.eval_summary(metrics, {"held_out": [], "train": []}).startswith("strict accuracy 0.250 +- 0.100")
    assert plumbing.eval_summary(metrics, {"prompts": []}).startswith("mean reward 0.250")
    before, after = {"eval_reward": 0.4}, {"eval_reward": 0.5, "eval_change": 0.1, "eval_change_se": 0.02}
    sets = {"held_out": ["a red circle"], "train": ["a red circle"]}
    assert "With each image, the strict verifier" in plumbing.grid_title(before, after, sets, True)[0]
    assert "With each video, the strict verifier" in plumbing.grid_title(before, after, sets, True, video=True)[0]
    rows = op_grpo.main(short_run(tmp_path, "run", iterations=1))
    out = capsys.readouterr()
    assert "before: strict accuracy" in out.out and "after:  strict accuracy" in out.out
    final = rows[-1]
    held_out = {f: final[f"eval/held_out/{f}"] for f in toy_world.FAMILIES if f"eval/held_out/{f}" in final}
    weighted = sum(toy_world.EVAL_MIX[f] * v for f, v in held_out.items()) / sum(toy_world.EVAL_MIX[f] for f in held_out)
    assert final["eval/held_out"] == pytest.approx(weighted)  # what the printed note says
    assert "a set's score is not the plain mean of its rows: families weigh single 0.2, counting 0.3" in out.out
    assert "strict=" in out.err  # the progress bar's evaluation is strict accuracy too


def test_requirements_list_every_package_the_code_imports_and_the_readme_runs():
    import ast

    listed = {re.split(r"[=<>\[ ]", line)[0].lower() for line in open(os.path.join(HERE, "requirements.txt"))
              if line.strip() and not line.startswith("#")}
    ours = {name[:-3] for name in os.listdir(HERE) if name.endswith(".py")}
    optional = {"wandb"}  # imported only with --wandb-project, which says to install it
    dist = {"PIL": "pillow"}
    imported = set()
    for name in ours:
        for node in ast.walk(ast.parse(open(os.path.join(HERE, name + ".py")).read())):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
            imported |= {m.split(".")[0] for m in modules}
    third_party = {dist.get(m, m).lower().replace("_", "-") for m in imported
                   if m not in sys.stdlib_module_names and m not in ours and m not in optional}
    readme = open(os.path.join(HERE, "README.md")).read()
    commands = {"accelerate"} & set(re.findall(r"^(\w+) launch", readme, re.M))
    assert commands == {"accelerate"} and not (third_party | commands) - listed, (third_party | commands) - listed


def test_committed_results_hold_no_path_of_the_machine_they_ran_on():
    def strings(value):
        if isinstance(value, dict):
            return [s for v in value.values() for s in strings(v)] + [s for k in value for s in strings(k)]
        return [s for v in value for s in strings(v)] if isinstance(value, list) else [value] * isinstance(value, str)

    for name in sorted(os.listdir(os.path.join(HERE, "assets"))):
        if name.endswith(".json"):
            found = [s for s in strings(json.load(open(os.path.join(HERE, "assets", name)))) if os.path.isabs(s)]
            assert not found, f"{name}: {found[:2]}"


# ---------------------------------------------------------------------------------------------------------
# The toy world
# ---------------------------------------------------------------------------------------------------------
def test_verifier_on_ground_truth_renders_of_held_out_prompts():
    train, held_out = toy_world.split_specs()
    rng = random.Random(0)
    right, wrong = [], []
    for _ in range(400):
        spec = rng.choice(held_out)
        image = toy_world.render(spec, rng)
        right.append(toy_world.score(spec, image))
        other = rng.choice([s for s in train + held_out if s.family == spec.family and s != spec])
        wrong.append(toy_world.score(other, image))
    right, wrong = np.array(right), np.array(wrong)
    assert right[:, 0].mean() >= 0.95 and right[:, 1].mean() >= 0.98
    assert wrong[:, 0].mean() <= 0.05 and wrong[:, 1].mean() < 0.7


def test_verifier_reads_counts_shapes_and_positions():
    rng = random.Random(1)
    spec = toy_world.SPEC_BY_PROMPT["a red square left of a blue circle"]
    image = toy_world.render(spec, rng)
    assert toy_world.score(spec, image) == (1.0, 1.0)
    flipped = toy_world.SPEC_BY_PROMPT["a red square right of a blue circle"]
    strict, dense = toy_world.score(flipped, image)
    assert strict == 0.0 and dense == pytest.approx(7 / 8)  # all but the relation
    three = toy_world.render(toy_world.SPEC_BY_PROMPT["three green triangles"], rng)
    assert toy_world.score(toy_world.SPEC_BY_PROMPT["two green triangles"], three)[0] == 0.0
    objects = toy_world.find_objects(three)
    assert [o["shape"] for o in objects] == ["triangle"] * 3 and {o["colour"] for o in objects} == {"green"}
    blank = np.full((32, 32, 3), toy_world.BACKGROUND, dtype=np.uint8)
    assert toy_world.score(spec, blank) == (0.0, pytest.approx(1 / 8))  # only "nothing else" holds
    with pytest.raises(ValueError, match="not a prompt of the toy world"):
        toy_world.score_prompt("a purple hexagon", blank)


def test_verifier_works_at_other_resolutions():
    spec = toy_world.SPEC_BY_PROMPT["two blue circles"]
    image = toy_world.render(spec, random.Random(2))
    assert toy_world.score(spec, image.resize((128, 128), resample=0)) == (1.0, 1.0)


def test_strict_and_dense_geneval_rewards():
    rng = random.Random(3)
    right = toy_world.render(toy_world.SPEC_BY_PROMPT["a red square left of a blue circle"], rng)
    prompts = ["a red square left of a blue circle", "a red square right of a blue circle"]
    toy = op_grpo.reward_table(op_grpo.with_presets(Args()))  # the toy world's verifiers under GenEval's names
    strict, dense = toy["geneval_strict"]([right, right], prompts), toy["geneval"]([right, right], prompts)
    assert strict.tolist() == [1.0, 0.0]  # the flipped relation fails one requirement: no partial credit
    assert dense[0].item() == 1.0 and 0.5 < dense[1].item() < 1.0


def test_vocabulary_covers_every_prompt_one_token_per_word():
    tokenizer = toy_world.build_tokenizer()
    for spec in toy_world.all_specs():
        prompt = toy_world.describe(spec)
        ids = tokenizer(prompt).input_ids
        assert len(ids) == len(prompt.split()) + 2 <= toy_world.CLIP_TOKENS  # <bos> words <eos>
        assert tokenizer.decode(ids, skip_special_tokens=True).strip() == prompt
    assert len(toy_world.all_specs()) == 12 + 24 + 108 + 432
    train, held_out = toy_world.split_specs()
    assert not {toy_world.describe(s) for s in train} & {toy_world.describe(s) for s in held_out}
    assert {s.family for s in held_out} == {"counting", "binding", "position"}


def test_saved_model_loads_offline_and_generates_with_the_stock_pipeline():
    pipe = StableDiffusion3Pipeline.from_pretrained(os.path.join(HERE, "tiny_sd3"), text_encoder_3=None, tokenizer_3=None, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(["a red circle", "two blue squares"], num_inference_steps=4, guidance_scale=1.0, height=32, width=32,
               max_sequence_length=toy_world.T5_TOKENS, output_type="np", generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (2, 32, 32, 3) and np.isfinite(out.images).all()
    assert out.images.std() > 0.05  # an image, not a flat field


def test_build_script_runs_end_to_end_and_deterministically_in_a_reduced_setting(tmp_path):
    from safetensors.torch import load_file

    reports = []
    for name in ("a", "b"):
        args = toy_world.BuildArgs(output_dir=str(tmp_path / name), num_images=256, vae_steps=3, transformer_steps=3, eval_per_family=2)
        reports.append(toy_world.build(args))
    folder = tmp_path / "a"
    assert (folder / "model_index.json").exists() and (folder / "base_samples.png").exists()
    saved = json.loads((folder / "build_report.json").read_text())
    assert saved["held_out"]["mix"]["strict"] == reports[0]["held_out"]["mix"]["strict"]
    assert set(saved["train"]) == set(toy_world.FAMILIES) | {"mix"}
    for part in ("transformer/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        a, b = load_file(tmp_path / "a" / part), load_file(tmp_path / "b" / part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    assert reports[0]["train"] == reports[1]["train"]


# ---------------------------------------------------------------------------------------------------------
# The whole job, short
# ---------------------------------------------------------------------------------------------------------
def test_end_to_end_with_replay_weights_and_truncation(tmp_path):
    args = Args(iterations=4, prompts_per_iteration=4, group_size=4, off_policy_fraction=0.5, truncate_steps=3,
                eval_every=2, eval_per_family=4, output_dir=str(tmp_path), seed=0, sde_window=0)  # every step
    history = op_grpo.main(args)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and rows == json.loads(json.dumps(history))
    assert "eval_reward" in rows[0] and "eval_reward" in rows[1] and "eval_reward" in rows[3]
    replayed = [r for r in rows if r["replayed_groups"] > 0]
    assert replayed, "the buffer was never used"
    for r in replayed:
        assert r["replayed_groups"] == 2 and r["clipfrac_off_policy"] is not None
        assert math.isfinite(r["is_weight_mean"]) and r["is_weight_min"] > 0
        assert r["log_is_weight_summed_p50"] == pytest.approx(4 * 8 * 8 * r["log_is_weight_p50"])  # D = 4 x 8 x 8
        assert len(r["log_ratio_old_behavior_per_step"]) == 10  # every step, truncated ones included
        assert all(math.isfinite(x) for x in r["log_ratio_old_behavior_per_step"])
        assert 0 <= r["replay_advantage_at_clip"] <= 1 and abs(r["replay_advantage_mean"]) <= args.adv_clip
        assert 0 <= r["replay_age_mean"] <= r["iteration"] - 1 and math.isfinite(r["replay_rescored_minus_stored"])
    assert replayed[0]["iteration"] == 1 and replayed[0]["replay_age_mean"] == 0  # stored the iteration before
    for r in rows:
        assert all(math.isfinite(r[k]) for k in ("reward_mean", "loss", "approx_kl", "kl_to_reference"))
    assert (tmp_path / "before_after.png").exists() and (tmp_path / "transformer" / "config.json").exists()
    assert Image.open(tmp_path / "curve.png").size[0] > 100  # the curve, redrawn at each evaluation


def test_zero_off_policy_fraction_is_plain_on_policy_flow_grpo(tmp_path):
    args = Args(iterations=2, prompts_per_iteration=2, group_size=4, off_policy_fraction=0.0, eval_every=2,
                eval_per_family=2, output_dir=str(tmp_path), seed=1)
    rows = op_grpo.main(args)
    for r in rows:
        assert r["replayed_groups"] == 0 and r["buffer_size"] == 0 and r["clipfrac_off_policy"] is None
        assert "is_weight_mean" not in r and math.isfinite(r["loss"])


def test_prompt_replay_control_draws_buffer_prompts_but_samples_every_image_fresh(tmp_path, monkeypatch):
    drawn, rollouts = [], []
    sample, rollout = ReplayBuffer.sample, op_grpo.rollout
    monkeypatch.setattr(ReplayBuffer, "sample", lambda self, n, rng: drawn.append(sample(self, n, rng)) or drawn[-1])
    monkeypatch.setattr(op_grpo, "rollout", lambda *a: rollouts.append(a[2:4]) or rollout(*a))
    monkeypatch.setattr(op_grpo, "rescore_replayed", lambda *a: pytest.fail("a stored trajectory was used"))
    rows = op_grpo.main(short_run(tmp_path, "control", replay="prompt"))
    assert [r["buffer_prompts"] for r in rows] == [len(d) for d in drawn] and sum(len(d) for d in drawn) >= 4
    for (slot_prompts, n_replayed), prompts_from_buffer in zip(rollouts, drawn):
        assert n_replayed == 0 and slot_prompts[: len(prompts_from_buffer)] == prompts_from_buffer  # G fresh each
    for r in rows:
        assert r["replayed_groups"] == 0 and r["clipfrac_off_policy"] is None and "is_weight_mean" not in r
        assert r["rescued_groups"] is None and r["buffer_size"] > 0


def test_toy_prompts_narrow_training_draws_and_evaluation_to_a_band(tmp_path):
    train, held_out = toy_world.split_specs()
    band = [toy_world.describe(s) for s in train if s.family == "counting"][:6]
    band += [toy_world.describe(s) for s in train if s.family == "binding"][:2]
    band += [toy_world.describe(s) for s in held_out if s.family in ("counting", "binding")][:3]
    path = tmp_path / "band.txt"
    path.write_text("\n".join(band) + "\n")
    args = op_grpo.with_presets(Args(toy_prompts=str(path), eval_per_family=4))
    check_args(dataclasses.replace(args, output_dir=str(tmp_path / "out")))
    prompts, sets, draw, mix = plumbing.prompt_sets(args, toy_world, random.Random(0))
    assert set(prompts) == set(band[:8]) and mix == {"counting": 0.75, "binding": 0.25}  # the band's shares
    draws = draw(8000)
    assert set(draws) == set(band[:8]) and max(abs(draws.count(p) / 8000 - 1 / 8) for p in band[:8]) < 0.02  # uniform
    assert set(sets["train"]) <= set(band[:8]) and set(sets["held_out"]) <= set(band[8:])
    assert len(sets["train"]) == 8 and len(sets["held_out"]) == 4 * len({toy_world.SPEC_BY_PROMPT[p].family
                                                                         for p in band[8:]})
    default = plumbing.prompt_sets(op_grpo.with_presets(Args()), toy_world, random.Random(0))
    assert default[1] == toy_world.eval_prompts(128) and default[3] is toy_world.EVAL_MIX  # the world's own
    path.write_text("a purple circle\n")
    with pytest.raises(plumbing.UsageError, match="--toy-prompts .* not prompts of the toy world"):
        check_args(Args(toy_prompts=str(path)))
    path.write_text(band[0] + "\n")
    with pytest.raises(plumbing.UsageError, match="needs training and held-out prompts"):
        check_args(Args(toy_prompts=str(path)))
    with pytest.raises(plumbing.UsageError, match="--toy-prompts narrows a toy world"):
        check_args(Args(toy_prompts=str(path), model="sd3"))


def test_group_diagnostics_closed_form():
    rewards = torch.tensor([[0.0, 0.0, 0.0, 0.0],  # flat, all fail
                            [1.0, 1.0, 1.0, 1.0],  # flat, all pass
                            [1.0, 0.0, 0.0, 0.0],  # hybrid, stored success rescues an all-fail fresh group
                            [0.0, 1.0, 0.0, 1.0],  # hybrid, the fresh members differ already
                            [0.0, 0.0, 0.0, 0.0]])  # hybrid, flat: the stored one fails too
    replayed = torch.zeros(5, 4, dtype=torch.bool)
    replayed[2:, 0] = True
    d = plumbing.group_diagnostics(rewards, replayed)
    assert d["flat_groups"] == [1, 1, 0, 0, 1] and d["flat_all_fail"] == [1, 0, 0, 0, 1]
    assert d["flat_all_pass"] == [0, 1, 0, 0, 0]
    assert d["rescued_groups"] == [1, 0, 0] and d["replay_minus_best_fresh"] == [1.0, -1.0, 0.0]


# ---------------------------------------------------------------------------------------------------------
# Nothing lost: determinism, checkpoints and exact resume, interruption, NaN guards, failing rewards
# ---------------------------------------------------------------------------------------------------------
def short_run(tmp_path, name, **overrides):
    settings = dict(iterations=4, prompts_per_iteration=4, group_size=4, off_policy_fraction=0.5, eval_every=2,
                    eval_per_family=2, checkpoint_every=0, output_dir=str(tmp_path / name), seed=0,
                    sde_window=0, learning_rate=1e-4, ema_decay=0.0)  # the tiny preset before the demo's recipe
    return Args(**{**settings, **overrides})


def without_timings(rows):
    return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in rows]


def test_same_seed_same_metrics_and_two_plus_resume_plus_two_equals_four(tmp_path):
    straight = op_grpo.main(short_run(tmp_path, "straight"))
    again = op_grpo.main(short_run(tmp_path, "again"))
    assert without_timings(again) == without_timings(straight)

    op_grpo.main(short_run(tmp_path, "halves", iterations=2))
    saved = torch.load(tmp_path / "halves" / plumbing.CHECKPOINT, weights_only=True)
    assert saved["iteration"] == 2 and len(saved["buffer"]["entries"]) > 0 and saved["optimizer"]["state"]
    # the command line takes the saved settings as defaults: only the changed flag is given
    resumed_args = op_grpo.parse_cli(["--resume", str(tmp_path / "halves"), "--iterations", "4"])
    assert resumed_args == op_grpo.with_presets(short_run(tmp_path, "halves", resume=str(tmp_path / "halves")))
    resumed = op_grpo.main(resumed_args)
    assert without_timings(resumed) == without_timings(straight)
    logged = [json.loads(line) for line in (tmp_path / "halves" / "metrics.jsonl").read_text().splitlines()]
    assert without_timings(logged) == without_timings(straight)  # the log holds all four rows once
    from safetensors.torch import load_file

    a, b = (load_file(tmp_path / run / "transformer" / "diffusion_pytorch_model.safetensors") for run in ("straight", "halves"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sde_window_zero_reproduces_the_run_from_before_windows_existed(tmp_path):
    """Every logged number of a 3-iteration run with replay and truncation, against the same run made by the code
    before --sde-window existed (assets/reference_run_3_iterations.json). The tolerance only allows for another
    machine's float summation order; on the machine that wrote it the rows are equal."""
    rows = without_timings(op_grpo.main(short_run(tmp_path, "run", iterations=3)))
    with open(os.path.join(HERE, "assets", "reference_run_3_iterations.json")) as f:
        reference = json.load(f)
    added = {"log_is_weight_summed_p50", "replay_advantage_mean", "replay_advantage_at_clip",  # logged since the
             "replay_rescored_minus_stored", "replay_age_mean"}  # reference was made (D x log_is_weight_p50, ...)
    assert [sorted(set(r) - added) for r in rows] == [sorted(r) for r in reference]
    for row, expected in zip(rows, reference):
        for key, value in expected.items():
            assert row[key] == (pytest.approx(value, rel=1e-4, abs=1e-6) if value is not None else None), key


def test_resume_inside_a_windowed_run_is_bit_identical(tmp_path):
    straight = op_grpo.main(short_run(tmp_path, "straight", sde_window=3))
    op_grpo.main(short_run(tmp_path, "halves", sde_window=3, iterations=2))
    resumed = op_grpo.main(op_grpo.parse_cli(["--resume", str(tmp_path / "halves"), "--iterations", "4"]))
    assert without_timings(resumed) == without_timings(straight)
    assert any(r.get("replayed_groups") for r in straight) and "is_weight_mean" in straight[-1]
    per_step = straight[-1]["log_ratio_old_behavior_per_step"]  # only the stored windows' steps have a ratio
    assert per_step[-1] is None and any(v is not None for v in per_step[:5])


def test_weight_average_is_flow_grpos_ema_in_closed_form():
    """The weight jumps from 0 to 1 at the first optimizer step and stays: the average is 1 - prod(d_s) over Flow-GRPO's
    update steps s (s + 1 a multiple of 8, d_s = min(0.9, (1 + s) / (10 + s))); with --ema-decay 0 there is none."""
    weight = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.SGD([weight], lr=1.0)
    average = plumbing.WeightAverage(optimizer, 0.9)
    remaining = 1.0  # prod(d_s) so far
    for s in range(1, 101):
        weight.grad = weight.detach() - 1.0  # one SGD step of lr 1: the weight becomes 1
        optimizer.step()
        if (s + 1) % 8 == 0:
            remaining *= min(0.9, (1 + s) / (10 + s))
        torch.testing.assert_close(average.average[0], torch.full((3,), 1.0 - remaining), rtol=0, atol=1e-6)
    assert average.steps == 100 and 0.05 < remaining < 0.06  # 12 updates: the average is near, not at, the weights
    none = plumbing.WeightAverage(torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=1.0), 0.0)
    assert none.average == [] and none.state_dict() == {"steps": 0, "average": []}


def test_weight_average_stands_in_for_the_weights_and_gives_them_back_after_an_error():
    weight = torch.nn.Parameter(torch.tensor([2.0, 4.0]))
    average = plumbing.WeightAverage(torch.optim.SGD([weight], lr=1.0), 0.9)
    average.average[0].copy_(torch.tensor([1.0, 1.0]))
    with average.in_place():
        assert weight.tolist() == [1.0, 1.0]
    assert weight.tolist() == [2.0, 4.0]
    with pytest.raises(RuntimeError), average.in_place():
        raise RuntimeError("an evaluation that fails")
    assert weight.tolist() == [2.0, 4.0] and average.average[0].tolist() == [1.0, 1.0]
    plain = plumbing.WeightAverage(torch.optim.SGD([weight], lr=1.0), 0.0)
    with plain.in_place():
        assert weight.tolist() == [2.0, 4.0]


def test_ema_run_evaluates_and_saves_the_average_and_resumes_bit_identically(tmp_path):
    """4 optimizer steps an iteration: the average moves at steps 7 and 15 (iterations 2 and 4). The saved weights
    are the average from the checkpoint, not the trained weights; two + resume + two equals four."""
    flags = dict(ema_decay=0.9, updates_per_batch=4)
    straight = op_grpo.main(short_run(tmp_path, "straight", **flags))
    op_grpo.main(short_run(tmp_path, "halves", iterations=2, **flags))
    assert torch.load(tmp_path / "halves" / plumbing.CHECKPOINT, weights_only=True)["average"]["steps"] == 8
    resumed = op_grpo.main(op_grpo.parse_cli(["--resume", str(tmp_path / "halves"), "--iterations", "4"]))
    assert without_timings(resumed) == without_timings(straight)
    from safetensors.torch import load_file

    saved = torch.load(tmp_path / "straight" / plumbing.CHECKPOINT, weights_only=True)
    names = list(saved["trainable"])  # the optimizer's parameters: the transformer's trainable ones, in order
    weights = load_file(tmp_path / "straight" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert saved["average"]["steps"] == 16 and len(saved["average"]["average"]) == len(names)
    assert all(torch.equal(weights[n], a) for n, a in zip(names, saved["average"]["average"]))
    assert any(not torch.equal(weights[n], saved["trainable"][n]) for n in names)


@pytest.mark.parametrize("signum, code, times", [(signal.SIGINT, 130, 1), (signal.SIGTERM, 143, 1), (signal.SIGINT, 130, 2)])
def test_an_interrupted_run_leaves_a_checkpoint_that_resumes_and_exits_128_plus_the_signal(tmp_path, signum, code, times):
    folder = tmp_path / "run"
    command = [sys.executable, os.path.join(HERE, "op_grpo.py"), "--iterations", "100", "--prompts-per-iteration", "4",
               "--group-size", "2", "--eval-per-family", "1", "--eval-every", "100", "--checkpoint-every", "0",
               "--output-dir", str(folder)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = folder / "metrics.jsonl"
    for _ in range(1200):  # up to 120 s for start-up and the first iteration
        if log.exists() and log.read_text().count("\n") >= 1:
            break
        time.sleep(0.1)
    for _ in range(times):  # a second Ctrl-C: stop now, whatever the iteration is doing, and still keep the run
        process.send_signal(signum)
        time.sleep(0.3)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == code, stderr  # a scheduler can tell an interrupted run from a finished one
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    saved = torch.load(folder / plumbing.CHECKPOINT, weights_only=True)
    done = saved["iteration"]
    assert 1 <= done < 100 and len(saved["history"]) == done
    # the resume hint is a line of its own, not written onto the progress bar's line
    hint = [line for line in stderr.replace("\r", "\n").splitlines() if "--resume" in line]
    name = signal.Signals(signum).name
    assert hint and hint[-1].startswith((f"stopped by {name} with {done} of 100 iterations done; continue with: "
                                         f"python op_grpo.py --resume {folder} (--iterations is the run's total",
                                         f"stopped at once by a second {name}: its checkpoint holds {done} finished"))
    assert hint[-1].startswith("stopped by") or times == 2
    if signum == signal.SIGINT:
        rows = op_grpo.main(op_grpo.parse_cli(["--resume", str(folder), "--iterations", str(done + 1)]))
        assert len(rows) == done + 1 and "eval_reward" in rows[-1]


def test_resume_continues_in_the_folder_it_names_even_moved_or_copied(tmp_path, capsys):
    op_grpo.main(short_run(tmp_path, "original", iterations=2))
    os.rename(tmp_path / "original", tmp_path / "moved")  # a run folder moved after it was written
    args = op_grpo.parse_cli(["--resume", str(tmp_path / "moved"), "--iterations", "3"])
    assert args.output_dir == str(tmp_path / "moved")
    op_grpo.main(args)
    assert not (tmp_path / "original").exists()  # nothing recreated where args.json said the run once was
    assert len((tmp_path / "moved" / "metrics.jsonl").read_text().splitlines()) == 3
    assert torch.load(tmp_path / "moved" / plumbing.CHECKPOINT, weights_only=True)["iteration"] == 3
    import shutil

    shutil.copytree(tmp_path / "moved", tmp_path / "copy")  # a copy resumes too, and leaves the original alone
    before = (tmp_path / "moved" / "metrics.jsonl").read_text()
    op_grpo.main(op_grpo.parse_cli(["--resume", str(tmp_path / "copy"), "--iterations", "4"]))
    assert (tmp_path / "moved" / "metrics.jsonl").read_text() == before
    assert len((tmp_path / "copy" / "metrics.jsonl").read_text().splitlines()) == 4
    # an explicit --output-dir elsewhere is allowed, and said
    capsys.readouterr()
    op_grpo.main(op_grpo.parse_cli(["--resume", str(tmp_path / "copy"), "--iterations", "5", "--output-dir",
                                    str(tmp_path / "elsewhere")]))
    assert f"writing to {tmp_path / 'elsewhere'}" in capsys.readouterr().out
    assert torch.load(tmp_path / "elsewhere" / plumbing.CHECKPOINT, weights_only=True)["iteration"] == 5


def test_a_damaged_checkpoint_is_named_before_anything_is_loaded_or_rewritten(tmp_path, monkeypatch):
    op_grpo.main(short_run(tmp_path, "run", iterations=1))
    path = tmp_path / "run" / plumbing.CHECKPOINT
    data = bytearray(path.read_bytes())
    data[len(data) // 3 : len(data) // 3 + 4096] = bytes(4096)  # the right size, corrupted contents
    path.write_bytes(bytes(data))
    settings = (tmp_path / "run" / "args.json").read_text()
    monkeypatch.setattr(op_grpo, "load_pipeline", lambda *a: pytest.fail("the model was loaded"))
    with pytest.raises(plumbing.UsageError, match=r"--resume .*checkpoint\.pt is damaged \(its record .* fails its "
                                                  r"checksum\), so the run cannot go on from it") as error:
        op_grpo.main(op_grpo.parse_cli(["--resume", str(tmp_path / "run"), "--iterations", "2"]))
    assert "another --output-dir" in str(error.value) and len(str(error.value).splitlines()) == 1
    assert (tmp_path / "run" / "args.json").read_text() == settings
    # cut short (a full disk, a copy in progress): said in plain words, not in torch's
    path.write_bytes(bytes(data[: len(data) // 2]))
    for check in (lambda: check_args(op_grpo.parse_cli(["--resume", str(tmp_path / "run"), "--iterations", "2"])),
                  lambda: plumbing.read_checkpoint(str(tmp_path / "run"))):
        with pytest.raises(plumbing.UsageError, match="is damaged \\(it is not a complete checkpoint: it was cut short") as error:
            check()
        assert "mmap" not in str(error.value) and "torch.save" not in str(error.value)


def test_hub_failures_are_told_apart_in_plain_words():
    def chain(*names):  # an OSError raised from a chain of exceptions with these class names, innermost last
        error = None
        for name in reversed(names):
            try:
                raise type(name, (OSError,), {})("details") from error
            except OSError as raised:
                error = raised
        return error

    assert plumbing.hub_failure(chain("OSError", "GatedRepoError")).startswith("it is gated: accept its license")
    assert plumbing.hub_failure(chain("OSError", "RepositoryNotFoundError")).startswith("no such model on the Hub")
    assert plumbing.hub_failure(chain("OSError", "ConnectError", "gaierror")).startswith("the Hub cannot be reached")
    assert plumbing.hub_failure(chain("OSError", "OfflineModeIsEnabled")).startswith("the Hub cannot be reached")
    assert plumbing.hub_failure(OSError("disk full\nmore")) == "disk full"


def test_bad_paths_and_devices_are_named_before_loading(tmp_path):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "not_a_pipeline").mkdir()
    cases = [
        (dict(output_dir=str(tmp_path / "a_file")), "--output-dir .*a_file is a file"),
        (dict(output_dir=str(tmp_path / "a_file" / "run")), "--output-dir .* cannot be created"),
        (dict(device="nosuch"), "--device nosuch is not a torch device"),
        (dict(pretrained=str(tmp_path / "missing")), "--pretrained .*missing: no such folder"),
        (dict(pretrained="tiny_sd"), "--pretrained tiny_sd: no such folder"),
        (dict(pretrained=str(tmp_path / "not_a_pipeline")), "not a diffusers pipeline folder"),
        (dict(resolution=40), r"--resolution must be a multiple of 4 \(VAE factor 4 x patch 1, at most 32\)"),
        (dict(model="sd3", resolution=520), r"--resolution must be a multiple of 16 \(VAE factor 8 x patch 2\)"),
    ]
    if not torch.cuda.is_available():
        cases.append((dict(device="cuda"), "--device cuda: this machine has 0 cuda device"))
    for overrides, message in cases:
        with pytest.raises(plumbing.UsageError, match=message):
            check_args(Args(**{"output_dir": str(tmp_path / "out"), **overrides}))
    check_args(Args(pretrained="someone/some-sd3-model", model="sd3", output_dir=str(tmp_path / "out")))  # Hub's
    assert not (tmp_path / "out").exists()


def test_video_before_after_strips_show_every_frame_of_both_videos_and_score_whole_videos(tmp_path):
    def video(colour):
        return [Image.new("RGB", (8, 8), colour) for _ in range(3)]

    scored = []
    plumbing.before_after_strips(["a red square moving left"], [video("red")], [video("blue")], tmp_path / "s.png",
                                 score=lambda prompt, v: scored.append(v) or 1.0, zoom=2)
    strip = np.asarray(Image.open(tmp_path / "s.png").convert("RGB"))
    side, label = 16, 12  # frames zoomed 2x, below a label line; the after row below the before row
    for f in range(3):
        x = 4 + f * (side + 2) + side // 2
        assert tuple(strip[label + side // 2, x]) == (255, 0, 0)
        assert tuple(strip[(side + label + 2) + label + side // 2, x]) == (0, 0, 255)
    assert [len(v) for v in scored] == [3, 3]  # the verifier saw whole videos
    picture = torch.from_numpy(np.array(video("red")))  # as grid_images keeps a video in the checkpoint
    assert picture.shape == (3, 8, 8, 3) and [f.getpixel((0, 0)) for f in plumbing.to_pil(picture)] == [(255, 0, 0)] * 3


def test_start_up_line_and_before_after_grid_labels_and_title(tmp_path):
    line = plumbing.batch_arithmetic(op_grpo.with_presets(Args(off_policy_fraction=0.125, prompts_per_iteration=8,
                                                               group_size=8)), 1)
    assert "8 prompts x 8 images" in line and "1 replayed group on average" in line and "2 updates of 32 samples" in line
    assert "4 prompts x 8 videos" in plumbing.batch_arithmetic(op_grpo.with_presets(Args(model="tiny-video")), 1)
    assert "no replay (on-policy Flow-GRPO)" in plumbing.batch_arithmetic(op_grpo.with_presets(Args(off_policy_fraction=0)), 1)
    white, red = Image.new("RGB", (32, 32), "white"), Image.new("RGB", (32, 32), "red")
    path = str(tmp_path / "grid.png")
    plumbing.before_after_grid(["a red circle"] * 2, [white] * 2, [red] * 2, path, columns=2)
    grid = np.array(Image.open(path).convert("L"))
    margin = grid[:, :40]  # the row labels "before" and "after" are drawn left of the images
    rows_with_text = np.flatnonzero((margin < 128).any(axis=1))
    assert len(rows_with_text) and rows_with_text.min() < 128 < rows_with_text.max() < 2 * 128 + 4
    # the title says what the numbers under the images are, and the run's overall change
    before = {"eval_reward": 0.386}
    after = {"eval_reward": 0.419, "eval_change": 0.033, "eval_change_se": 0.02}
    sets = {"held_out": ["a red circle"] * 384, "train": ["a red circle"] * 384}
    title = plumbing.grid_title(before, after, sets, scored=True)
    assert "strict verifier of the toy world: 1 = it shows what its prompt asks, 0 = it does not" in title[0]
    assert "0.386 -> 0.419 (change +0.033 +- 0.020, paired SE), over held_out, train" in title[1]
    assert "384 held_out prompts, 16 shown" in title[1]
    assert plumbing.grid_title(before, after, sets, scored=False)[0].endswith("Mean reward 0.386 -> 0.419 (change "
                                                                            "+0.033 +- 0.020, paired SE), over held_out, train")
    plumbing.before_after_grid(["a red circle"] * 2, [white] * 2, [red] * 2, path, columns=2, title=title)
    titled = np.array(Image.open(path).convert("L"))
    assert titled.shape[0] == grid.shape[0] + 8 + 14 * 2 and (titled[:30] < 128).any()  # text above the grid
    np.testing.assert_array_equal(titled[8 + 14 * 2 :], grid)  # and the cells as before, below it


def nan_on_call(function, call_to_break, when=lambda *a, **k: True):
    """Wrap `function` so that its call number `call_to_break` (counting calls where `when` holds) returns NaN."""
    calls = []

    def wrapped(*a, **k):
        out = function(*a, **k)
        if when(*a, **k):
            calls.append(1)
            if len(calls) == call_to_break:
                out = out.clone()
                out[(0,) * out.ndim] = float("nan")
        return out

    return wrapped


def test_a_nan_reward_is_named_and_that_update_skipped(tmp_path, monkeypatch):
    monkeypatch.setitem(op_grpo.WORLD_REWARDS["tiny"], "geneval", nan_on_call(toy_world.geneval_reward, 2))
    rows = op_grpo.main(short_run(tmp_path, "run", iterations=3, off_policy_fraction=0.0))
    assert "reward_mean" in rows[0] and "reward_mean" in rows[2]
    assert rows[1]["skipped"].startswith("non-finite reward 'geneval'") and "for prompt '" in rows[1]["skipped"]


def test_a_nan_velocity_in_the_update_is_named_and_stops_after_patience_with_finite_weights(tmp_path, monkeypatch):
    base = {k: v.clone() for k, v in op_grpo.load_pipeline(op_grpo.with_presets(Args()), torch.device("cpu")).transformer.state_dict().items()}
    in_update = lambda *a, **k: torch.is_grad_enabled()
    monkeypatch.setattr(op_grpo, "predict_velocity", nan_on_call(op_grpo.predict_velocity, 4, when=in_update))
    with pytest.raises(RuntimeError, match="non-finite velocity in the update at step 3"):
        op_grpo.main(short_run(tmp_path, "run", nonfinite_patience=1))
    saved = torch.load(tmp_path / "run" / plumbing.CHECKPOINT, weights_only=True)
    assert saved["iteration"] == 1 and "step 3" in saved["history"][-1]["skipped"]
    # the NaN came in the first minibatch, before any optimizer step: the saved weights are the base model's
    assert all(torch.equal(w, base[name]) for name, w in saved["trainable"].items())


def test_a_failing_reward_names_the_reward_and_prompt_and_keeps_a_checkpoint(tmp_path, monkeypatch):
    def fragile(images, prompts):
        if any("triangle" in p for p in prompts):
            raise ZeroDivisionError("no triangles here")
        return toy_world.geneval_reward(images, prompts)

    monkeypatch.setitem(op_grpo.WORLD_REWARDS["tiny"], "geneval", fragile)
    with pytest.raises(RuntimeError, match=r"reward 'geneval' failed on prompt '[^']*triangle[^']*': ZeroDivisionError"):
        op_grpo.main(short_run(tmp_path, "run"))
    saved = torch.load(tmp_path / "run" / plumbing.CHECKPOINT, weights_only=True)
    assert saved["iteration"] == len(saved["history"])  # the failed iteration is redone on --resume


def test_a_checkpoint_is_never_written_with_non_finite_weights(tmp_path):
    layer = torch.nn.Linear(2, 2)
    plumbing.save_checkpoint(str(tmp_path), layer, {"iteration": 1})
    with torch.no_grad():
        layer.weight[0, 0] = float("inf")
    with pytest.raises(op_grpo.NonFiniteError, match="weight weight"):
        plumbing.save_checkpoint(str(tmp_path), layer, {"iteration": 2})
    saved = torch.load(tmp_path / plumbing.CHECKPOINT, weights_only=True)
    assert saved["iteration"] == 1 and torch.isfinite(saved["trainable"]["weight"]).all()


def test_runs_and_resumes_that_would_lose_work_are_rejected_before_loading(tmp_path):
    plumbing.save_checkpoint(str(tmp_path), torch.nn.Linear(1, 1), {"iteration": 5})
    (tmp_path / "args.json").write_text(json.dumps(dataclasses.asdict(op_grpo.with_presets(Args()))))
    cases = [
        (dict(output_dir=str(tmp_path)), "--output-dir"),  # would overwrite a run
        (dict(output_dir=str(tmp_path / "new"), resume=str(tmp_path / "missing")), "--resume"),
        (dict(output_dir=str(tmp_path), resume=str(tmp_path), num_steps=12), "--num-steps"),
        (dict(output_dir=str(tmp_path), resume=str(tmp_path), iterations=5), "--iterations"),
        (dict(checkpoint_every=-1), "--checkpoint-every"),
        (dict(nonfinite_patience=0), "--nonfinite-patience"),
    ]
    for overrides, flag in cases:
        with pytest.raises(ValueError, match=flag):
            check_args(Args(**overrides))
    with pytest.MonkeyPatch.context() as patch:  # under a launcher with 8 processes, 4 slots cannot give each one a group
        patch.setenv("WORLD_SIZE", "8")
        with pytest.raises(ValueError, match="--prompts-per-iteration must be at least the number of processes"):
            check_args(Args(prompts_per_iteration=4))
    check_args(Args(output_dir=str(tmp_path), overwrite=True))
    check_args(Args(output_dir=str(tmp_path), resume=str(tmp_path), iterations=6))


def test_a_folder_with_a_run_but_no_checkpoint_is_not_replaced_silently(tmp_path):
    (tmp_path / "args.json").write_text("{}")  # what a start leaves before its first iteration: not a run
    check_args(Args(output_dir=str(tmp_path)))
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"iteration": i}) + "\n" for i in range(3)))
    with pytest.raises(ValueError, match=r"--output-dir .* already holds a run \(metrics.jsonl with 3 iterations, "
                                         r"args.json\): it has no checkpoint.pt, so it cannot be resumed, or pass "
                                         r"--overwrite to replace it, or choose another --output-dir"):
        check_args(Args(output_dir=str(tmp_path)))
    check_args(Args(output_dir=str(tmp_path), overwrite=True))


def test_replay_refuses_what_would_break_its_stored_log_probs_or_keep_no_step(tmp_path):
    op_grpo.main(short_run(tmp_path, "replayed", iterations=1, off_policy_fraction=0.5))
    for flag, value in (("--noise-level", "0.8"), ("--guidance-scale", "2.0"), ("--sde-type", "cps")):
        with pytest.raises(plumbing.UsageError) as error:
            check_args(op_grpo.parse_cli(["--resume", str(tmp_path / "replayed"), "--iterations", "2", flag, value]))
        assert str(error.value).startswith(f"{flag} {value} differs from the resumed run's") and \
            "under which its replay buffer's p_off was recorded" in str(error.value) and "\n" not in str(error.value)
    op_grpo.main(short_run(tmp_path, "on_policy", iterations=1, off_policy_fraction=0.0))  # no buffer: free to change
    check_args(op_grpo.parse_cli(["--resume", str(tmp_path / "on_policy"), "--iterations", "2", "--noise-level", "0.8"]))
    with pytest.raises(plumbing.UsageError, match=r"^--sde-window-range 6 9 lets a window start in the last "
                                                  r"--truncate-steps 3 steps.*end the range below 9$"):
        check_args(Args(sde_window=2, sde_window_range=(6, 9)))
    check_args(Args(sde_window=2, sde_window_range=(6, 8)))  # window [6, 8): step 6 is kept
    check_args(Args(sde_window=2, sde_window_range=(6, 9), off_policy_fraction=0.0))  # nothing replayed


def test_a_resume_with_changed_flags_says_them_and_keeps_what_each_start_ran_with(tmp_path, capsys):
    op_grpo.main(short_run(tmp_path, "run", iterations=2))
    capsys.readouterr()
    op_grpo.main(op_grpo.parse_cli(["--resume", str(tmp_path / "run"), "--iterations", "3", "--group-size", "2"]))
    assert "changed since its last start: --iterations 2 -> 3, --group-size 4 -> 2" in capsys.readouterr().out
    starts = [json.loads(line) for line in (tmp_path / "run" / plumbing.ARGS_HISTORY).read_text().splitlines()]
    assert [s["iteration"] for s in starts] == [0, 2]
    assert starts[0]["args"]["group_size"] == 4 and starts[0]["changed"] == {}
    assert starts[1]["args"]["group_size"] == 2 and starts[1]["changed"] == {"iterations": [2, 3], "group_size": [4, 2]}
    assert json.loads((tmp_path / "run" / "args.json").read_text())["group_size"] == 2  # the defaults of a next resume
    # a run written before the history existed: its args.json stands for the first start
    (tmp_path / "run" / plumbing.ARGS_HISTORY).unlink()
    op_grpo.main(op_grpo.parse_cli(["--resume", str(tmp_path / "run"), "--iterations", "4"]))
    starts = [json.loads(line) for line in (tmp_path / "run" / plumbing.ARGS_HISTORY).read_text().splitlines()]
    assert [(s["iteration"], s["changed"]) for s in starts] == [(0, {}), (3, {"iterations": [3, 4]})]


def stop_signals_on_call(monkeypatch, name, signals=2):
    """op_grpo.<name> receives `signals` SIGINTs as it starts (the first time), as if the user pressed Ctrl-C."""
    function, calls = getattr(op_grpo, name), []

    def wrapped(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            for _ in range(signals):
                plumbing.request_stop(signal.SIGINT, None)
        return function(*a, **k)

    monkeypatch.setattr(op_grpo, name, wrapped)


def test_a_second_signal_before_the_update_checkpoints_the_iterations_start_and_it_is_redone(tmp_path, monkeypatch,
                                                                                             capsys):
    straight = op_grpo.main(short_run(tmp_path, "straight"))
    op_grpo.main(short_run(tmp_path, "run", iterations=2))
    stop_signals_on_call(monkeypatch, "rescore_replayed")  # iteration 2, in its rollouts: nothing changed yet
    with pytest.raises(KeyboardInterrupt):
        op_grpo.main(op_grpo.parse_cli(["--resume", str(tmp_path / "run"), "--iterations", "4"]))
    assert plumbing.stopped_at_once(str(tmp_path / "run")) == 130
    assert (f"stopped at once by a second SIGINT: its checkpoint holds 2 finished iterations; continue with: python "
            f"op_grpo.py --resume {tmp_path / 'run'}") in capsys.readouterr().err
    assert torch.load(tmp_path / "run" / plumbing.CHECKPOINT, weights_only=True)["iteration"] == 2
    monkeypatch.undo()
    resumed = op_grpo.main(op_grpo.parse_cli(["--resume", str(tmp_path / "run"), "--iterations", "4"]))
    assert without_timings(resumed) == without_timings(straight)  # the interrupted iteration, redone exactly


def test_a_second_signal_during_the_update_waits_for_it_then_checkpoints_without_evaluating(tmp_path, monkeypatch,
                                                                                          capsys):
    stop_signals_on_call(monkeypatch, "update_pass")  # iteration 0, the weights half-changed
    rows = op_grpo.main(short_run(tmp_path, "run", eval_every=1))
    assert len(rows) == 1 and "loss" in rows[0] and "time/eval" not in rows[0]  # finished, not evaluated
    assert "SIGINT again: the weights are being updated or saved" in capsys.readouterr().err
    saved = torch.load(tmp_path / "run" / plumbing.CHECKPOINT, weights_only=True)
    assert saved["iteration"] == 1 and len(saved["history"]) == 1
    plumbing.STOP_REQUESTED.clear()  # stopped at once before any checkpoint: said plainly
    assert plumbing.stopped_at_once(str(tmp_path / "nowhere")) == 130
    assert "nothing was saved: it stopped before its first checkpoint" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# The --model sd3 code path (LoRA, guidance, PickScore, LoRA files), run on the embedded tiny SD3 pipeline
# ---------------------------------------------------------------------------------------------------------
def sd3_path_args(tmp_path, **overrides):
    """--model sd3 with its code path pointed at the local tiny pipeline (no hub)."""
    settings = dict(model="sd3", pretrained=os.path.join(HERE, "tiny_sd3"), resolution=32, max_sequence_length=0,
                    mixed_precision="no", lora_rank=4, output_dir=str(tmp_path / "run"))
    return op_grpo.with_presets(Args(**{**settings, **overrides}))


def tiny_inputs(pipe, batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, pipe.transformer.config.in_channels, 8, 8), generator=g)  # 32 px / VAE factor 4
    table = op_grpo.embed_prompts(pipe, ["a red circle", "two blue squares", "a green triangle", ""], 0)
    embeds = torch.stack([table[p][0] for p in list(table)[:batch]])
    pooled = torch.stack([table[p][1] for p in list(table)[:batch]])
    return x, embeds, pooled, table[""]


def test_lora_attaches_to_the_attention_projections_and_only_it_trains(tmp_path):
    args = sd3_path_args(tmp_path, mixed_precision="bf16")
    pipe = op_grpo.load_pipeline(args, torch.device("cpu"))
    transformer = pipe.transformer
    linear = [n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)]
    expected = {n for n in linear if n.split(".")[-2:] in (["attn", "to_q"], ["attn", "to_k"], ["attn", "to_v"], ["attn", "add_q_proj"],
                ["attn", "add_k_proj"], ["attn", "add_v_proj"], ["attn", "to_add_out"])} | {n for n in linear if n.endswith(".attn.to_out.0")}
    assert op_grpo.make_trainable(transformer, args) is transformer  # the KL reference is the same model, adapters off
    trainable = {n: p for n, p in transformer.named_parameters() if p.requires_grad}
    adapted = {n.split(".lora_")[0] for n in trainable}
    assert adapted == expected and len(expected) == 4 * 8 - 1  # 4 blocks x 8 projections; the last has no to_add_out
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in trainable.values())  # adapters fp32 ...
    frozen = [p for p in transformer.parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)  # ... over bf16 base weights
    assert not any("attn2" in n or ".ff." in n for n in adapted)


def test_disabling_the_adapters_reproduces_the_base_model_exactly(tmp_path):
    args = sd3_path_args(tmp_path)
    base_pipe, pipe = (op_grpo.load_pipeline(args, torch.device("cpu")) for _ in range(2))
    transformer = pipe.transformer
    reference = op_grpo.make_trainable(transformer, args)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.1)  # a trained-looking adapter: B starts at zero
    x, embeds, pooled, _ = tiny_inputs(pipe)
    with torch.no_grad():
        v_base = op_grpo.predict_velocity(base_pipe.transformer, x, 0.6, embeds, pooled, 1.0)
        v_adapted = op_grpo.predict_velocity(transformer, x, 0.6, embeds, pooled, 1.0)
        with op_grpo.as_reference(transformer, reference):
            v_reference = op_grpo.predict_velocity(reference, x, 0.6, embeds, pooled, 1.0)
        v_after = op_grpo.predict_velocity(transformer, x, 0.6, embeds, pooled, 1.0)
    assert torch.equal(v_reference, v_base)
    assert not torch.allclose(v_adapted, v_base, atol=1e-4)
    assert torch.equal(v_after, v_adapted)  # the adapters are back on, and trainable
    assert all(p.requires_grad for n, p in transformer.named_parameters() if ".lora_" in n)


def test_guidance_with_the_real_transformer_is_the_hand_computed_combination(tmp_path):
    pipe = op_grpo.load_pipeline(sd3_path_args(tmp_path), torch.device("cpu"))
    x, embeds, pooled, uncond = tiny_inputs(pipe)
    with torch.no_grad():
        v = op_grpo.predict_velocity(pipe.transformer, x, 0.4, embeds, pooled, 4.5, uncond)
        v_c = op_grpo.predict_velocity(pipe.transformer, x, 0.4, embeds, pooled, 1.0)
        v_u = op_grpo.predict_velocity(pipe.transformer, x, 0.4, uncond[0].expand_as(embeds), uncond[1].expand_as(pooled), 1.0)
    # batch-size-dependent float32 kernels differ by ~1e-5 per pass; the factor 4.5 amplifies that
    torch.testing.assert_close(v, v_u + 4.5 * (v_c - v_u), atol=2e-4, rtol=1e-4)
    assert (v - v_c).abs().mean() > 100 * 2e-4  # and guidance does change the velocity


def test_sd3_path_run_saves_a_lora_that_load_lora_weights_reproduces(tmp_path):
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("# three prompts\na red circle\n\ntwo blue squares\na green triangle above a yellow circle\n")
    args = sd3_path_args(tmp_path, prompt_file=str(prompt_file), reward="jpeg",
                         guidance_scale=2.0, iterations=2, prompts_per_iteration=4, group_size=2, micro_batch=3,
                         off_policy_fraction=0.5, eval_every=2, eval_per_family=4, ema_decay=0.0)  # the EMA's own test:
    rows = op_grpo.main(args)  # test_ema_run_evaluates_and_saves_the_average_and_resumes_bit_identically
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows) and "eval/prompts" in rows[-1]
    saved = torch.load(tmp_path / "run" / plumbing.CHECKPOINT, weights_only=True)

    trained_pipe = op_grpo.load_pipeline(args, torch.device("cpu"))
    op_grpo.make_trainable(trained_pipe.transformer, args)
    trained_pipe.transformer.load_state_dict(saved["trainable"], strict=False)
    loaded_pipe = op_grpo.load_pipeline(args, torch.device("cpu"))
    loaded_pipe.load_lora_weights(str(tmp_path / "run" / "lora"))  # the stock diffusers loader
    base_pipe = op_grpo.load_pipeline(args, torch.device("cpu"))
    x, embeds, pooled, _ = tiny_inputs(base_pipe)
    with torch.no_grad():
        v_trained, v_loaded, v_base = (op_grpo.predict_velocity(p.transformer, x, 0.5, embeds, pooled, 1.0)
                                       for p in (trained_pipe, loaded_pipe, base_pipe))
    torch.testing.assert_close(v_loaded, v_trained, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(v_trained, v_base, atol=1e-7)  # two iterations moved the adapters


def test_pickscore_wrapper_and_weighted_sum_on_a_tiny_random_clip(monkeypatch):
    model, processor = tiny_clip()
    tokenizer = processor.tokenizer
    monkeypatch.setitem(rewards.PICKSCORE, "model", model)
    monkeypatch.setitem(rewards.PICKSCORE, "processor", processor)
    prompts = ["a red circle", "two blue squares", "a green triangle"]
    images = [toy_world.render(toy_world.SPEC_BY_PROMPT[p], random.Random(i)) for i, p in enumerate(prompts)]
    scores = rewards.pickscore_reward(images, prompts)
    # independently: normalised projected embeddings, their cosine times exp(logit_scale), over 26
    with torch.no_grad():
        pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
        tokens = tokenizer(prompts, padding=True, return_tensors="pt")
        image_emb = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        text_emb = model.text_projection(model.text_model(**tokens).pooler_output)
        cosine = torch.nn.functional.cosine_similarity(image_emb, text_emb)
    torch.testing.assert_close(scores, model.logit_scale.exp() * cosine / 26, atol=1e-5, rtol=1e-5)
    table = rewards.REWARDS
    combined = op_grpo.weighted_reward(op_grpo.parse_reward("pickscore=1.0,jpeg=0.1", table), table)(images, prompts)
    torch.testing.assert_close(combined, scores + 0.1 * rewards.jpeg_reward(images, prompts))


def test_ocr_score_formula_against_hand_computed_edit_distances():
    assert rewards.ocr_target('a sign that reads "Open Late" at night') == "Open Late"
    assert rewards.ocr_target('it says "half') == "half"  # Flow-GRPO's split('"')[1]: up to the next quote or the end
    for prompt in ("no quotes here", 'an empty "" quote', 'blank "   " text'):
        with pytest.raises(ValueError, match="no text in double quotes"):
            rewards.ocr_target(prompt)
    # spaces dropped, lower case; d = Levenshtein distance capped at the target's length n; reward 1 - d / n
    assert rewards.text_score("OPEN LATE", "Open Late") == 1.0
    assert rewards.text_score("0penlate", "Open Late") == 1 - 1 / 8  # one substitution (0 for o) of 8 letters
    assert rewards.text_score("openlat", "Open Late") == 1 - 1 / 8  # one deletion
    assert rewards.text_score("kitten", "sitting") == 1 - 3 / 7  # the textbook distance 3
    assert rewards.text_score("", "Open Late") == 0.0  # nothing read: d = n
    assert rewards.text_score("a long unrelated paragraph of text", "stop") == 0.0  # d capped at n, never below 0
    assert rewards.text_score("we are open late tonight", "Open Late") == 1.0  # the image rule: contained = 0
    assert rewards.text_score("we are open late tonight", "Open Late", substring=False) == 0.0  # the video rule: 15 > 8


def rendered_text(text, font, size, noisy, seed=0):
    """A 512 px image with `text` drawn in the middle, on a plain or a noisy background."""
    from PIL import ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    pixels = rng.integers(150, 230, (512, 512, 3), dtype=np.uint8) if noisy else np.full((512, 512, 3), 235, np.uint8)
    image, face = Image.fromarray(pixels), ImageFont.truetype(font, size)
    draw = ImageDraw.Draw(image)
    draw.text(((512 - draw.textlength(text, font=face)) / 2, 256 - size / 2), text, font=face, fill=(20, 20, 60))
    return image


def test_ocr_reward_reads_rendered_text_with_the_real_engine():
    import matplotlib

    fonts = [os.path.join(matplotlib.get_data_path(), "fonts", "ttf", f) for f in ("DejaVuSans.ttf", "DejaVuSerif.ttf")]
    images = [rendered_text("Open Late", f, size, noisy) for f in fonts for size in (28, 44, 64) for noisy in (0, 1)]
    own = rewards.ocr_reward(images, ['a diner sign that reads "Open Late"'] * len(images))
    other = rewards.ocr_reward(images, ['a sticky note with "Buy Milk"'] * len(images))
    assert own.shape == (12,) and own.dtype == torch.float32 and (own >= 0.8).all(), own
    assert (other <= own - 0.5).all(), other
    blank = Image.new("RGB", (512, 512), "white")
    assert rewards.ocr_reward([blank], ['a sign "Open Late"']).tolist() == [0.0]  # Flow-GRPO: nothing read scores 0
    # the video form: frames 0, 4, 8 of 9; the mean over the frames that read anything, 0 if none does
    text, empty = rendered_text("Buy Milk", fonts[0], 44, 0), Image.new("RGB", (512, 512), "white")
    videos = [[text if f == 4 else empty for f in range(9)], [empty] * 9, [text] * 9]
    assert rewards.video_ocr_reward(videos, ['a note "Buy Milk"'] * 3).tolist() == [1.0, 0.0, 1.0]
    wrong = [[rendered_text("Buy Mild", fonts[0], 44, 0) if f == 0 else text for f in range(9)]]
    assert rewards.video_ocr_reward(wrong, ['a note "Buy Milk"']).tolist() == pytest.approx([(1 - 1 / 7 + 2) / 3])


def test_cps_step_against_its_formula_and_its_log_prob_against_the_gaussian_density():
    g = torch.Generator().manual_seed(0)
    x, v, noise = (torch.randn(3, 4, 8, 8, generator=g) for _ in range(3))
    sigma, sigma_next, a = torch.tensor([1.0, 0.6, 0.2]), torch.tensor([0.8, 0.4, 0.1]), 0.8
    x_next, log_prob, mean, std = sde_step_with_logprob(v, x, sigma, sigma_next, a, noise=noise, sde_type="cps")
    s, sn = sigma.view(-1, 1, 1, 1), sigma_next.view(-1, 1, 1, 1)
    std_expected = sn * math.sin(a * math.pi / 2)  # Flow-GRPO-Fast: sigma_next sin(a pi / 2)
    x0, x1 = x - s * v, x + (1 - s) * v
    mean_expected = x0 * (1 - sn) + x1 * torch.sqrt(sn**2 - std_expected**2)
    torch.testing.assert_close(std, std_expected)
    torch.testing.assert_close(mean, mean_expected)
    torch.testing.assert_close(x_next, mean_expected + std_expected * noise)
    torch.testing.assert_close(log_prob, -((x_next - mean) ** 2).mean(dim=(1, 2, 3)))  # no constants, no variance
    # what a ratio of CPS log-probs is: the Gaussian's per-dimension log-ratio times 2 std^2 (std is the same under
    # both weights at a step), so CPS's sequence weight is the product of the Gaussian ratios to the power 2 std_k^2
    v_other = v + 0.05 * torch.randn(v.shape, generator=g)
    _, log_prob_other, mean_other, _ = sde_step_with_logprob(v_other, x, sigma, sigma_next, a, prev_sample=x_next,
                                                             sde_type="cps")
    normal = lambda m: torch.distributions.Normal(m, std.expand_as(m)).log_prob(x_next).mean(dim=(1, 2, 3))
    gaussian_log_ratio = normal(mean_other) - normal(mean)
    torch.testing.assert_close(log_prob_other - log_prob, 2 * std.flatten() ** 2 * gaussian_log_ratio, rtol=1e-4,
                               atol=1e-6)
    # noise level 0 is the Euler step, as for the SDE
    euler, _, _, _ = sde_step_with_logprob(v, x, sigma, sigma_next, 0.0, sde_type="cps")
    torch.testing.assert_close(euler, x + (sn - s) * v)


def test_cps_marginals_on_gaussian_toy_flows_against_their_closed_form():
    """CPS keeps x_sigma's coefficients of data and noise about the predicted x0: exact where that prediction is
    (a point mass), not for data with spread, where E[x0 | x] shrinks. With the exact velocity every step is linear
    Gaussian, so the variance after each step has a closed form: V' = ((1 - s') alpha + c beta)^2 V + std^2, with
    alpha = (1 - s) S0^2 / V_s, beta = s / V_s (V_s: the flow's marginal), c = sqrt(s'^2 - std^2). Monte Carlo
    follows it, and ends below the data's S0."""
    sigmas, a = torch.linspace(0.95, 0.0, 21), 0.8
    mean0, var0 = marginal(0.95)
    g = torch.Generator().manual_seed(1)
    x = mean0 + math.sqrt(var0) * torch.randn(200_000, 1, 1, 1, generator=g)
    variance = var0
    for k in range(20):
        s, s_next = sigmas[k].item(), sigmas[k + 1].item()
        std = s_next * math.sin(a * math.pi / 2)
        true_variance = marginal(s)[1]  # the exact velocity is E[eps - x0 | x] under the flow's own marginal
        gain = ((1 - s_next) * (1 - s) * S0**2 + math.sqrt(s_next**2 - std**2) * s) / true_variance
        variance = gain**2 * variance + std**2
        x, _, _, _ = sde_step_with_logprob(exact_velocity(x, s), x, s, s_next, a, generator=g, sde_type="cps")
        assert abs(x.mean().item() - (1 - s_next) * M) < 0.01  # the mean is kept at every step
        assert abs(x.var().item() - variance) < 0.01 * variance + 1e-4, (k, x.var().item(), variance)
    assert abs(math.sqrt(variance) - S0) > 0.05  # not the data's spread: CPS is not marginal-preserving here
    # a point mass (S0 = 0): x0 is predicted exactly, and every step lands on (1 - s') m + s' eps
    x = 0.95 * torch.randn(200_000, 1, 1, 1, generator=g) + 0.05 * M
    for k in range(20):
        s, s_next = sigmas[k].item(), sigmas[k + 1].item()
        x, _, _, _ = sde_step_with_logprob((x - (1 - s) * M) / s - M, x, s, s_next, a, generator=g, sde_type="cps")
        assert abs(x.mean().item() - (1 - s_next) * M) < 0.01 and abs(x.std().item() - s_next) < 0.01


def test_sd3_tasks_match_flow_grpo_configs():
    """Flow-GRPO's config/grpo.py transcribed (over base.get_config): general_ocr_sd3, geneval_sd3, pickscore_sd3
    and Flow-GRPO-Fast's geneval_sd3_fast_nocfg, pickscore_sd3_fast_nocfg; what one GPU cannot share (48 groups
    per epoch on 32 GPUs, global std) is in RESULTS.md ("Recipe notes"). Every one sets train.ema (decay 0.9)."""
    shared = dict(num_steps=10, eval_steps=40, resolution=512, learning_rate=3e-4, adv_clip=5.0, max_grad_norm=1.0,
                  lora_rank=32, lora_alpha=64, updates_per_batch=2, max_sequence_length=128, ema_decay=0.9)
    slow = dict(shared, guidance_scale=4.5, noise_level=0.7, clip_range=1e-4, sde_type="sde", sde_window=0,
                train_steps=9, group_size=24)  # train_steps: int(timestep_fraction 0.99 x 10)
    fast = dict(shared, guidance_scale=1.0, noise_level=0.8, clip_range=1e-5, kl_beta=0.0, sde_type="cps",
                sde_window=3, sde_window_range=(0, 5))
    configs = {"ocr": dict(slow, kl_beta=0.04, reward="ocr"), "geneval": dict(slow, kl_beta=0.04, reward="geneval"),
               "pickscore": dict(slow, kl_beta=0.01, reward="pickscore"),
               "geneval-fast": dict(fast, group_size=24, reward="geneval"),
               "pickscore-fast": dict(fast, group_size=18, reward="pickscore")}
    for task, config in configs.items():
        args = op_grpo.with_presets(Args(model="sd3", task=task))
        ours = {k: getattr(args, k) for k in config}
        ours.update(lora_alpha=args.lora_alpha or 2 * args.lora_rank)
        if "train_steps" in config:  # Flow-GRPO-Fast trains its window's steps, which lie in the first 9 here too
            ours.update(train_steps=args.train_steps or args.num_steps - 1)
        assert ours == config, task
    assert op_grpo.with_presets(Args(model="sd3")) == op_grpo.with_presets(Args(model="sd3", task="pickscore"))
    assert op_grpo.with_presets(Args(model="sd3", task="ocr")).prompt_file == op_grpo.OCR_PROMPTS
    check_args(Args(model="sd3", task="ocr"))  # its built-in prompts all quote a text
    check_args(Args(model="sd3", task="pickscore-fast"))
    assert op_grpo.with_presets(Args(model="wan")).reward == "video_ocr"  # general_ocr_wan2_1's reward


def test_task_and_reward_mistakes_get_one_line_naming_the_flag(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("a cat on a sofa\n")
    cases = [(dict(model="sd3", task="geneval"), "--reward geneval needs GenEval's metadata: --prompt-file"),
             (dict(model="sd3", reward="ocr", prompt_file=str(plain)), "--prompt-file .*plain.txt, prompt 1: no text"),
             (dict(model="tiny", task="ocr"), "--task ocr is one of Flow-GRPO's SD3 configs: use it with --model sd3"),
             (dict(model="sd3", task="pickscore-fast", noise_level=1.5), "--noise-level must be in \\(0, 1\\] with"),
             (dict(model="sd3", reward="motion"), "--reward motion scores the toy world of --model tiny-video")]
    for settings, message in cases:
        with pytest.raises(plumbing.UsageError, match=message) as error:
            check_args(Args(**settings))
        assert len(str(error.value).splitlines()) == 1, str(error.value)
    assert one_line_error(["--model", "sd3", "--task", "nosuch"])[0].startswith(
        "op_grpo.py: error: invalid choice 'nosuch' for argument '--task'")


# ---------------------------------------------------------------------------------------------------------
# GenEval (rewards.py): GenEval's detection filter, IoU and relative position, Flow-GRPO's partial reward and
# GenEval's official rule tag by tag (hand-computed values in comments), then the whole reward on tiny random
# Mask2Former and CLIP models, the colour crops with a stub CLIP, and the metadata reader
# ---------------------------------------------------------------------------------------------------------
def obj(x1, y1, x2, y2, score=0.95, mask=None):
    """A detection (box, mask). In the judge tests the mask slot carries the object's colour name instead, which
    the fake classifier below reads back."""
    return np.array([x1, y1, x2, y2, score], dtype=float), mask


def fake_colors(objects, classname):
    return [mask for _, mask in objects]


def never_called(objects, classname):
    raise AssertionError("colour classification should not run here")


# ------------------------------------------------------------------------------------------------ detection filter
def test_threshold_is_strict():
    kept = rewards.filter_detections({"car": [obj(0, 0, 9, 9, 0.3), obj(20, 0, 29, 9, 0.31)]}, "single_object")
    assert [box[4] for box, _ in kept["car"]] == [0.31]


def test_counting_uses_its_own_threshold_and_empty_classes_are_dropped():
    raw = {"cup": [obj(0, 0, 9, 9, s) for s in (0.5, 0.95, 0.9, 0.85)], "dog": [obj(0, 0, 9, 9, 0.2)]}
    assert [box[4] for box, _ in rewards.filter_detections(raw, "counting")["cup"]] == [0.95]  # 0.9 itself is out
    kept = rewards.filter_detections(raw, "colors")
    assert [box[4] for box, _ in kept["cup"]] == [0.95, 0.9, 0.85, 0.5]  # sorted by score, descending
    assert "dog" not in kept and "dog" not in rewards.filter_detections(raw, "counting")


def test_max_objects_keeps_the_sixteen_most_confident_in_order():
    scores = np.random.default_rng(0).permutation(np.linspace(0.4, 0.99, 20))
    kept = rewards.filter_detections({"kite": [obj(0, 0, 9, 9, s, mask=f"m{s}") for s in scores]}, "position")["kite"]
    assert [box[4] for box, _ in kept] == sorted(scores, reverse=True)[:rewards.MAX_OBJECTS] and len(kept) == 16
    assert all(mask == f"m{box[4]}" for box, mask in kept)  # each mask stays with its box


def test_no_duplicate_removal_at_one_and_greedy_suppression_below():
    raw = {"car": [obj(0, 0, 9, 9, 0.9), obj(0, 0, 9, 9, 0.8), obj(5, 5, 14, 14, 0.7), obj(50, 50, 59, 59, 0.6)]}
    assert len(rewards.filter_detections(raw, "two_object")["car"]) == 4  # NMS_THRESHOLD = 1.0: all kept
    # at 0.5: the copy of the best box (IoU 1) goes; the shifted one (IoU 1/7) and the far one stay
    kept = rewards.filter_detections(raw, "two_object", nms_threshold=0.5)["car"]
    assert [box[4] for box, _ in kept] == [0.9, 0.7, 0.6]
    # at 0.1: IoU 1/7 >= 0.1 drops the shifted box too
    assert [box[4] for box, _ in rewards.filter_detections(raw, "two_object", nms_threshold=0.1)["car"]] == [0.9, 0.6]


def test_compute_iou_counts_pixels_inclusively():
    assert rewards.compute_iou([0, 0, 9, 9], [0, 0, 9, 9]) == 1
    # 10 x 10 boxes each (inclusive); overlap [5, 9] x [5, 9] = 25 pixels; union 100 + 100 - 25 = 175
    assert rewards.compute_iou([0, 0, 9, 9], [5, 5, 14, 14]) == pytest.approx(25 / 175)
    # sharing the column x = 9: 1 x 10 = 10 pixels; union 190
    assert rewards.compute_iou([0, 0, 9, 9], [9, 0, 18, 9]) == pytest.approx(10 / 190)
    assert rewards.compute_iou([0, 0, 9, 9], [20, 20, 29, 29]) == 0
    assert rewards.compute_iou([0, 0, -5, -5], [0, 0, -5, -5]) == 0  # empty union -> 0, not a division by zero


# ----------------------------------------------------------------------------------------------- relative position
def test_clearly_left_and_right():
    # centres 100 apart in x, margin 0.1 x (10 + 10) = 2: shrunk offset -98 over norm 100 = -0.98
    assert rewards.relative_position(obj(0, 0, 10, 10), obj(100, 0, 110, 10)) == {"left of"}
    assert rewards.relative_position(obj(100, 0, 110, 10), obj(0, 0, 10, 10)) == {"right of"}


def test_margin():
    a = obj(0, 0, 100, 100)  # margin 0.1 x (100 + 100) = 20 in x
    assert rewards.relative_position(a, obj(15, 0, 115, 100)) == set()  # offset -15 shrinks to 0
    assert rewards.relative_position(a, obj(39, 0, 139, 100)) == set()  # -19 / 39 = -0.487: not past -0.5
    assert rewards.relative_position(a, obj(41, 0, 141, 100)) == {"left of"}  # -21 / 41 = -0.512
    assert rewards.relative_position(a, obj(15, 0, 115, 100), margin=0) == {"left of"}  # -15 / 15 = -1


def test_diagonal_gives_two_relations_and_y_grows_down():
    # offset (-100, -100), shrunk (-98, -98), over norm 141.4: -0.69 on both axes
    assert rewards.relative_position(obj(0, 0, 10, 10), obj(100, 100, 110, 110)) == {"left of", "above"}
    assert rewards.relative_position(obj(0, 0, 10, 10), obj(0, 100, 10, 110)) == {"above"}  # smaller y: above
    assert rewards.relative_position(obj(0, 100, 10, 110), obj(0, 0, 10, 10)) == {"below"}
    # mostly right, a little lower: dy = (20 - 2) / 100.5 = 0.18 < 0.5, dx = 0.96
    assert rewards.relative_position(obj(100, 20, 110, 30), obj(0, 0, 10, 10)) == {"right of"}


# ----------------------------------------------------------------------------------------------- judges, tag by tag
def both(objects, metadata, colors=fake_colors):
    """(Flow-GRPO's strict flag, its partial score, GenEval's official verdict)."""
    return (*rewards.judge(objects, metadata, colors), rewards.judge_geneval(objects, metadata, colors))


def test_single_object():
    meta = {"tag": "single_object", "include": [{"class": "bowl", "count": 1}]}
    bowl = obj(0, 0, 9, 9)
    assert both({"bowl": [bowl]}, meta) == (True, 1.0, True)
    assert both({}, meta) == (False, 0.0, False)  # 1 - |1 - 0| / 1 = 0
    assert both({"bowl": [bowl] * 2}, meta) == (False, 0.0, True)  # exact count vs ">= 1"
    assert both({"bowl": [bowl] * 3}, meta) == (False, -1.0, True)  # 1 - |1 - 3| / 1 = -1: a negative term


def test_two_object():
    meta = {"tag": "two_object", "include": [{"class": "bowl", "count": 1}, {"class": "skis", "count": 1}]}
    assert both({"bowl": [obj(0, 0, 9, 9)], "skis": [obj(50, 0, 59, 9)]}, meta) == (True, 1.0, True)
    assert both({"bowl": [obj(0, 0, 9, 9)]}, meta) == (False, 0.5, False)  # terms 1 and 0


def test_counting():
    meta = {"tag": "counting", "include": [{"class": "wine glass", "count": 2}],
            "exclude": [{"class": "wine glass", "count": 3}]}
    glasses = [obj(10 * i, 0, 10 * i + 9, 9) for i in range(9)]
    assert both({"wine glass": glasses[:2]}, meta) == (True, 1.0, True)
    # N + 1: official fails by the exclude clause (3 >= 3), Flow-GRPO by the count: 1 - |2 - 3| / 2 = 0.5
    assert both({"wine glass": glasses[:3]}, meta) == (False, 0.5, False)
    assert rewards.judge_geneval({"wine glass": glasses[:3]}, {**meta, "exclude": []}, fake_colors)  # it is the exclude
    assert both({"wine glass": glasses[:1]}, meta) == (False, 0.5, False)  # 1 - |2 - 1| / 2
    assert both({"wine glass": glasses[:5]}, meta) == (False, -0.5, False)  # 1 - |2 - 5| / 2 = -0.5
    four = {"tag": "counting", "include": [{"class": "wine glass", "count": 4}]}
    assert rewards.judge({"wine glass": glasses}, four, never_called) == (False, -0.25)  # 1 - |4 - 9| / 4


def test_colors():
    meta = {"tag": "colors", "include": [{"class": "cup", "count": 1, "color": "purple"}]}
    assert both({"cup": [obj(0, 0, 9, 9, mask="purple")]}, meta) == (True, 1.0, True)  # terms 1, 1
    assert both({"cup": [obj(0, 0, 9, 9, mask="red")]}, meta) == (False, 0.5, False)  # terms 1, 1 - |1 - 0| / 1
    assert both({}, meta, never_called) == (False, 0.0, False)  # terms 0, 0.0
    two = {"cup": [obj(0, 0, 9, 9, 0.9, "purple"), obj(20, 0, 29, 9, 0.8, "red")]}
    assert rewards.judge(two, meta, never_called) == (False, 0.0)  # count 2 != 1: terms 0, 0.0, no colour check
    assert rewards.judge_geneval(two, meta, fake_colors)  # official: only the most confident cup, purple
    assert not rewards.judge_geneval({"cup": two["cup"][::-1]}, meta, fake_colors)  # ... here red


def test_position():
    meta = {"tag": "position", "include": [{"class": "laptop", "count": 1},
                                           {"class": "cow", "count": 1, "position": ["right of", 0]}]}
    laptop, right, left = obj(0, 0, 10, 10), obj(100, 0, 110, 10), obj(-100, 0, -90, 10)
    assert both({"laptop": [laptop], "cow": [right]}, meta) == (True, 1.0, True)  # terms 1, 1, 1.0
    # wrong side: terms 1, 1, 0.0 and (the quirk) 1.0 -> 3 / 4
    assert both({"laptop": [laptop], "cow": [left]}, meta) == (False, 0.75, False)
    # missing target: laptop term 0, cow term 1, "no target" 0.0 -> 1 / 3
    assert both({"cow": [right]}, meta) == (False, pytest.approx(1 / 3), False)
    assert both({"laptop": [laptop]}, meta) == (False, pytest.approx(1 / 3), False)  # cow: 0, then 0.0
    # two cows on the right: exact count fails (terms 1, 0, 0.0); official checks the top cow only
    assert both({"laptop": [laptop], "cow": [right, right]}, meta) == (False, pytest.approx(1 / 3), True)


def test_color_attr():
    meta = {"tag": "color_attr", "include": [{"class": "handbag", "count": 1, "color": "pink"},
                                             {"class": "scissors", "count": 1, "color": "black"}]}
    handbag = obj(0, 0, 9, 9, mask="pink")
    assert both({"handbag": [handbag], "scissors": [obj(20, 0, 29, 9, mask="black")]}, meta) == (True, 1.0, True)
    # terms 1, 1, 1, 0 -> 0.75
    assert both({"handbag": [handbag], "scissors": [obj(20, 0, 29, 9, mask="white")]}, meta) == (False, 0.75, False)
    assert both({"handbag": [handbag]}, meta) == (False, 0.5, False)  # terms 1, 1, 0, 0.0


def test_flow_grpo_ignores_exclude_and_scores_nothing_as_zero():
    meta = {"tag": "single_object", "include": [{"class": "bowl", "count": 1}],
            "exclude": [{"class": "cup", "count": 1}]}
    assert both({"bowl": [obj(0, 0, 9, 9)], "cup": [obj(20, 0, 29, 9)]}, meta) == (True, 1.0, False)
    assert rewards.judge({}, {"tag": "single_object", "include": []}, never_called) == (True, 0.0)


# ------------------------------------------------------------------------------------- the reward on tiny models
def tiny_detector(labels, num_queries=1, confident=None):
    """A random Mask2Former (tiny Swin backbone) and its processor; `confident` names a label whose class logit is
    pushed up so that every query finds it."""
    from transformers import (Mask2FormerConfig, Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor,
                              SwinConfig)
    torch.manual_seed(0)
    backbone = SwinConfig(embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=2, image_size=64,
                          out_features=["stage1", "stage2", "stage3", "stage4"])
    config = Mask2FormerConfig(backbone_config=backbone, feature_size=32, mask_feature_size=32, hidden_dim=32,
                               encoder_layers=1, decoder_layers=2, num_attention_heads=2, dim_feedforward=32,
                               encoder_feedforward_dim=32, num_queries=num_queries, id2label=dict(enumerate(labels)),
                               label2id={name: i for i, name in enumerate(labels)})
    model = Mask2FormerForUniversalSegmentation(config).eval()
    if confident is not None:
        with torch.no_grad():
            model.class_predictor.bias[labels.index(confident)] = 50.0
    return model, Mask2FormerImageProcessor(size={"height": 64, "width": 64})


def tiny_clip():
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(HERE, "tiny_sd3", "tokenizer"))
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)).eval()
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return model, CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


METADATA = {m["prompt"]: m for m in [
    {"tag": "single_object", "include": [{"class": "car", "count": 1}], "prompt": "a photo of a car"},
    {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}], "prompt": "a photo of a red car"},
    {"tag": "counting", "include": [{"class": "car", "count": 2}], "exclude": [{"class": "car", "count": 3}],
     "prompt": "a photo of two cars"},
    {"tag": "position", "include": [{"class": "person", "count": 1},
                                    {"class": "car", "count": 1, "position": ["right of", 0]}],
     "prompt": "a photo of a car right of a person"},
]}


@pytest.fixture
def use_models():
    """Returns install(detector, clip): puts the tiny models and METADATA into GENEVAL; restores it afterwards."""
    saved = dict(rewards.GENEVAL)

    def install(detector, clip):
        rewards.GENEVAL.clear()
        rewards.GENEVAL.update(detector=detector[0], detector_processor=detector[1], clip=clip[0], clip_processor=clip[1],
                          metadata=METADATA)
    yield install
    rewards.GENEVAL.clear()
    rewards.GENEVAL.update(saved)


def noise_images(n, size=(48, 40)):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


def test_reward_shapes_and_ranges_on_random_models(use_models):
    use_models(tiny_detector(["person", "bicycle", "car"], num_queries=3), tiny_clip())
    images, prompts = noise_images(4), list(METADATA)
    scores, strict = rewards.geneval_scores(images, prompts)
    assert scores.shape == strict.shape == (4,) and scores.dtype == strict.dtype == torch.float32
    assert torch.isfinite(scores).all() and (scores <= 1).all() and set(strict.tolist()) <= {0.0, 1.0}
    assert torch.equal(rewards.geneval_reward(images, prompts), scores)
    assert torch.equal(rewards.geneval_strict_reward(images, prompts), strict)


def test_detect_and_reward_with_a_confident_detector(use_models):
    use_models(tiny_detector(["person", "car", "remote"], confident="car"), tiny_clip())
    images = noise_images(2)
    for found in rewards.detect(images):
        [(box, mask)] = found["car"]
        assert mask.dtype == bool and mask.shape == (40, 48) and 0.3 < box[4] <= 1
        ys, xs = np.nonzero(mask)  # the box is the mask's extent, right and bottom one past the last pixel
        assert box[:4].tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    assert rewards.geneval_scores(images, ["a photo of a car"] * 2)[0].tolist() == [1.0, 1.0]
    scores, strict = rewards.geneval_scores(images, ["a photo of a red car"] * 2)  # through the tiny CLIP's colours
    assert set(scores.tolist()) <= {0.5, 1.0} and strict.tolist() == [float(s == 1.0) for s in scores.tolist()]
    use_models(tiny_detector(["person", "car", "remote"], confident="remote"), tiny_clip())
    assert list(rewards.detect(images[:1])[0]) == ["tv remote"]  # GenEval's name for COCO's "remote"


def test_load_geneval_loads_the_named_checkpoints_through_fetch(use_models, monkeypatch):
    import transformers
    detector, clip = tiny_detector(["person", "bicycle", "car"]), tiny_clip()
    made = {"Mask2FormerImageProcessor": detector[1], "Mask2FormerForUniversalSegmentation": detector[0].train(),
            "CLIPProcessor": clip[1], "CLIPModel": clip[0].train()}
    loads, wrapped = [], []
    for name, made_object in made.items():
        monkeypatch.setattr(getattr(transformers, name), "from_pretrained", lambda path, made_object=made_object,
                            name=name, **kwargs: loads.append((name, path, kwargs)) or made_object)
    rewards.load_geneval("cpu", torch.float32, METADATA, fetch=lambda name, load: wrapped.append(name) or load())
    assert sorted(loads) == sorted([("Mask2FormerImageProcessor", rewards.DETECTOR, {}),
                                    ("Mask2FormerForUniversalSegmentation", rewards.DETECTOR, {"dtype": torch.float32}),
                                    ("CLIPProcessor", rewards.CLIP, {}), ("CLIPModel", rewards.CLIP, {"dtype": torch.float32})])
    assert sorted(wrapped) == sorted([rewards.DETECTOR, rewards.DETECTOR, rewards.CLIP, rewards.CLIP])  # every load went through it
    assert rewards.GENEVAL["metadata"] is METADATA and rewards.GENEVAL["detector_processor"] is detector[1]
    for model in (rewards.GENEVAL["detector"], rewards.GENEVAL["clip"]):
        assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_color_text_embeddings_ensemble_the_three_templates(use_models):
    use_models((None, None), tiny_clip())
    model, processor = rewards.GENEVAL["clip"], rewards.GENEVAL["clip_processor"]
    with torch.no_grad():  # independently, one text at a time: unit template embeddings, averaged, renormalised
        def unit(text):
            tokens = processor.tokenizer([text], truncation=True, return_tensors="pt")
            return torch.nn.functional.normalize(model.get_text_features(**tokens).pooler_output[0], dim=0)
        expected = torch.stack([torch.stack([unit(t.format(color=c, cls="wine glass")) for t in rewards.COLOR_TEMPLATES])
                                .mean(0) for c in rewards.COLORS])
    expected = expected / expected.norm(dim=1, keepdim=True)
    torch.testing.assert_close(rewards._color_embeddings("wine glass"), expected, atol=1e-5, rtol=1e-5)
    assert rewards.COLOR_TEMPLATES[1].format(color="red", cls="wine glass") == "a photo of a red-colored wine glass"


def test_missing_metadata_names_the_prompt(use_models):
    use_models(tiny_detector(["person", "bicycle", "car"]), tiny_clip())
    with pytest.raises(KeyError, match="a photo of a unicorn"):
        rewards.geneval_scores(noise_images(2), ["a photo of a car", "a photo of a unicorn"])


def test_plumbing_with_fixed_detections(use_models, monkeypatch):
    use_models(tiny_detector(["person", "bicycle", "car"]), tiny_clip())
    fixed = [
        # position, car left of the person (wrong side); the 0.2 bicycle is filtered out: terms 1, 1, 0.0, 1.0
        {"person": [obj(30, 0, 40, 10)], "car": [obj(0, 0, 10, 10)], "bicycle": [obj(0, 0, 5, 5, 0.2)]},
        # counting keeps scores above 0.9 only: 2 of the 3 cars, the exact count
        {"car": [obj(0, 0, 9, 9, 0.95), obj(20, 0, 29, 9, 0.92), obj(30, 0, 39, 9, 0.5)]},
        # colours: one car, classified red by the patched classifier
        {"car": [obj(0, 0, 9, 9, 0.5)]},
    ]
    seen = []
    monkeypatch.setattr(rewards, "detect", lambda images: fixed[:len(images)])
    monkeypatch.setattr(rewards, "classify_colors", lambda image, objects, name: seen.append(image.size) or ["red"])
    images = noise_images(2) + noise_images(1, size=(30, 20))  # the colour check must get the third image
    scores, strict = rewards.geneval_scores(images, ["a photo of a car right of a person", "a photo of two cars",
                                                "a photo of a red car"])
    assert scores.tolist() == [0.75, 1.0, 1.0] and strict.tolist() == [0.0, 1.0, 1.0] and seen == [(30, 20)]


# -------------------------------------------------------------------------------------------------- colour crops
class StubProcessor:
    """Text -> the index of its colour word; image -> its mean RGB minus the #999 grey (so the grey canvas adds
    nothing); records the crop sizes."""
    def __init__(self):
        self.sizes = []

    def __call__(self, text=None, images=None, **kwargs):
        from transformers import BatchEncoding
        if text is not None:
            words = [t.removeprefix("a photo of a ").split(" ")[0].split("-")[0] for t in text]
            return BatchEncoding({"input_ids": torch.tensor([rewards.COLORS.index(w) for w in words])})
        self.sizes += [image.size for image in images]
        return {"pixel_values": torch.tensor(np.stack([np.asarray(i, float).mean((0, 1)) - 153 for i in images]))}


class StubClip:
    """CLIP that embeds a colour name as its RGB and an image as what StubProcessor made of it, both minus grey."""
    device, dtype = torch.device("cpu"), torch.float32
    RGB = torch.tensor([[255, 0, 0], [255, 165, 0], [255, 255, 0], [0, 255, 0], [0, 0, 255], [128, 0, 128],
                        [255, 192, 203], [139, 69, 19], [0, 0, 0], [255, 255, 255]], dtype=torch.float32) - 153

    def get_text_features(self, input_ids, **kwargs):
        return type("Out", (), {"pooler_output": self.RGB[input_ids]})

    def get_image_features(self, pixel_values):
        return type("Out", (), {"pooler_output": pixel_values})


def red_ring_on_blue():
    """A 60 x 50 blue image with a red ring (box [10, 5, 30, 25)) and a green square; masks of both."""
    image = Image.new("RGB", (60, 50), (0, 0, 255))
    draw = ImageDraw.Draw(image)
    draw.rectangle([10, 5, 29, 24], outline=(255, 0, 0), width=2)
    draw.rectangle([40, 30, 49, 39], fill=(0, 255, 0))
    pixels = np.asarray(image)
    return image, (pixels == [255, 0, 0]).all(-1), (pixels == [0, 255, 0]).all(-1)


def test_color_crops_composite_the_mask_over_grey_and_cut_the_box():
    image, ring, _ = red_ring_on_blue()
    [crop] = rewards.color_crops(image, [obj(10, 5, 30, 25, mask=ring)])
    pixels = np.asarray(crop)
    assert crop.size == (20, 20)
    assert (pixels[0, 0] == [255, 0, 0]).all() and (pixels[10, 10] == [153, 153, 153]).all()  # ring; inside: grey
    assert not (pixels == [0, 0, 255]).all(-1).any()  # no blue left


def test_color_classification_uses_mask_and_box(use_models):
    image, ring, square = red_ring_on_blue()
    use_models((None, None), (StubClip(), StubProcessor()))
    objects = [(rewards._mask_box(ring, 0.9), ring), (rewards._mask_box(square, 0.9), square)]
    assert rewards.classify_colors(image, objects, "car") == ["red", "green"]
    assert rewards.GENEVAL["clip_processor"].sizes == [(20, 20), (10, 10)]
    assert rewards.classify_colors(image, [(objects[0][0], None)], "car") != ["red"]  # unmasked, the blue wins over


# ---------------------------------------------------------------------------------------------- metadata reader
def test_read_geneval_metadata(tmp_path):
    lines = [{"tag": "counting", "include": [{"class": "wine glass", "count": 2}],
              "exclude": [{"class": "wine glass", "count": 3}], "prompt": "a photo of two wine glasses"},
             {"tag": "single_object", "include": [{"class": "bowl", "count": 1}], "prompt": "a photo of a bowl"}]
    path = tmp_path / "train_metadata.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    assert rewards.read_geneval_metadata(path) == {line["prompt"]: line for line in lines}


@pytest.mark.parametrize("bad, message", [
    ('{"tag": "counting", "include": [', "line 2: not JSON"),
    ('{"tag": "counting", "include": []}', "line 2: needs the fields prompt, tag and include"),
    ('{"prompt": "p", "include": []}', "line 2: needs the fields"),
    ('{"prompt": "p", "tag": "counting"}', "line 2: needs the fields"),
    ('["a list"]', "line 2: needs the fields"),
    ('{"prompt": "p", "tag": "shapes", "include": []}', "line 2: unknown tag 'shapes'"),
    ('{"prompt": "a photo of a bowl", "tag": "colors", "include": []}', "line 2: prompt 'a photo of a bowl' appears"),
])
def test_read_geneval_metadata_errors_name_file_and_line(tmp_path, bad, message):
    path = tmp_path / "meta.jsonl"
    path.write_text('{"tag": "single_object", "include": [], "prompt": "a photo of a bowl"}\n' + bad + "\n")
    with pytest.raises(ValueError, match=f"meta.jsonl, {message}"):
        rewards.read_geneval_metadata(path)


def test_a_model_that_cannot_be_fetched_gives_one_line_saying_what_to_do(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty_cache")}
    result = subprocess.run([sys.executable, os.path.join(HERE, "op_grpo.py"), "--model", "sd3", "--output-dir", str(tmp_path / "run")],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode != 0
    message = [line for line in result.stderr.splitlines() if line.strip()]  # no library chatter, no traceback
    assert len(message) == 1 and message[0].startswith("op_grpo.py: error: cannot load stabilityai/stable-diffusion-3.5-medium")
    assert "the Hub cannot be reached from this machine and the model is not in the local cache" in message[0]
    assert "hf auth login" in message[0] and "--pretrained" in message[0] and "stacktrace" not in message[0]
    assert not (tmp_path / "run").exists()  # a start that failed leaves no output folder behind


GENEVAL_LINE = {"tag": "two_object", "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}],
                "prompt": "a photo of a cat and a dog"}


@pytest.mark.parametrize("flags, model", [(["--model", "sd3", "--task", "ocr"], "stabilityai/stable-diffusion-3.5-medium"),
                                          (["--model", "sd3", "--task", "geneval-fast", "--prompt-file", "meta.jsonl"],
                                           "stabilityai/stable-diffusion-3.5-medium"),
                                          (["--model", "wan"], "Wan-AI/Wan2.1-T2V-1.3B-Diffusers")])
def test_the_papers_tasks_start_until_the_hub_and_stop_there_in_one_line(tmp_path, flags, model):
    (tmp_path / "meta.jsonl").write_text(json.dumps(GENEVAL_LINE) + "\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty_cache")}
    result = subprocess.run([sys.executable, os.path.join(HERE, "op_grpo.py"), *flags], capture_output=True,
                            text=True, timeout=300, env=env)
    message = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0 and len(message) == 1, result.stderr  # every check passed; the model is out of reach
    assert message[0].startswith(f"op_grpo.py: error: cannot load {model}")
    # the reward models of GenEval and PickScore are fetched the same way, and fail the same way
    code = ("import sys, torch, rewards, plumbing\ntry:\n    rewards.load({'geneval', 'pickscore'}, torch.device('cpu'), "
            "torch.float32, 'meta.jsonl')\nexcept plumbing.UsageError as error:\n    sys.exit(str(error))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**env, "PYTHONPATH": HERE}, cwd=tmp_path)
    assert result.returncode != 0 and result.stderr.startswith("cannot load "), result.stderr
    assert "--pretrained" not in result.stderr  # a reward model has no flag to point elsewhere: HF_HOME does


# ---------------------------------------------------------------------------------------------------------
# Several processes: torchrun with 2 CPU processes (gloo) against one process, same flags and seed
# ---------------------------------------------------------------------------------------------------------
def test_two_processes_reproduce_one_and_keep_identical_weights(tmp_path):
    flags = ["--iterations", "3", "--prompts-per-iteration", "4", "--group-size", "2", "--off-policy-fraction", "0.5",
             "--eval-every", "3", "--eval-per-family", "2", "--checkpoint-every", "0", "--threads", "1"]
    script, env = os.path.join(HERE, "op_grpo.py"), {**os.environ, "TMPDIR": str(tmp_path)}  # torchrun's temp folders
    for name, launcher in (("one", [sys.executable]), ("two", [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"])):
        result = subprocess.run([*launcher, script, *flags, "--output-dir", str(tmp_path / name)], capture_output=True, text=True, timeout=600, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        if name == "one":  # the console: no library noise, no "eval=nan", and a closing line saying where results are
            console = result.stdout + result.stderr
            assert not any(noise in console for noise in ("torchvision", "Loading", "eval=nan", "Traceback"))
            assert f"results in {tmp_path / name}/" in result.stdout
    one, two = ([json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()] for name in ("one", "two"))
    assert len(one) == len(two) == 3 and any(r["replayed_groups"] for r in two)
    assert two[-1]["rank_weight_divergence"] == 0.0  # the summed gradients keep both copies bit-identical
    # the same samples, rewards, buffer and gradients (up to float summation order over processes)
    for a, b in zip(one, two):
        for key in ("reward_mean", "reward_std", "loss", "is_weight_mean", "replay_reward_mean", "eval_reward", "eval/held_out/dense"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
        for key in ("log_ratio_old_behavior_per_step",):
            if key in a:
                np.testing.assert_allclose(np.asarray(b[key], float), np.asarray(a[key], float), rtol=1e-3, atol=1e-6)
        assert (a["replayed_groups"], a["buffer_size"], a["buffer_admitted"]) == (b["replayed_groups"], b["buffer_size"], b["buffer_admitted"])
    assert (tmp_path / "two" / plumbing.CHECKPOINT).exists() and (tmp_path / "two" / "before_after.png").exists()


def test_window_study_sizes_its_runs_picks_the_largest_change_and_runs_it_on_three_seeds_with_two_threads(tmp_path,
                                                                                                       monkeypatch):
    import benchmark

    calls, change = [], {"all_lr1e-4": 0.01, "all_lr3e-5": 0.05, "w3_lr3e-5": 0.12, "w3_lr5e-5": 0.08,
                         "w2_lr3e-5": 0.1, "w3_lr3e-5_P16": 0.02}

    def fake_run_one(name, seed, flags, args):  # stands for op_grpo.py: rows with timings and a final change
        calls.append((name, seed, flags, args.iterations, args.eval_every))
        folder = os.path.join(args.output_dir, f"{name}_seed{seed}")
        os.makedirs(folder, exist_ok=True)
        final = change[name.removeprefix("windows_").removeprefix("default_")]
        rows = [{"iteration": i, "time/update": 1.0, "time/sampling": 0.5,
                 **({"eval_reward": 0.4 + final, "eval_se": 0.01, "eval_change": final, "eval_change_se": 0.02,
                     "time/eval": 3.0} if i == args.iterations - 1 else {})} for i in range(args.iterations)]
        rows[0].update(eval_reward=0.4)
        with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        return folder

    monkeypatch.setattr(benchmark, "run_one", fake_run_one)
    monkeypatch.setattr(benchmark, "WINDOW_ARCHIVE", str(tmp_path / "archive"))
    summary = benchmark.run_windows(benchmark.BenchArgs(output_dir=str(tmp_path / "runs"), parallel=1))
    phase1 = {c[0]: c for c in calls[: len(benchmark.WINDOW_SWEEP)]}
    assert phase1["windows_w3_lr3e-5"][3:] == (450, 56) and phase1["windows_all_lr1e-4"][3:] == (160, 20)
    assert phase1["windows_w3_lr3e-5"][2][-2:] == ["--threads", "1"]
    assert summary["chosen"] == "w3_lr3e-5"
    assert [(c[0], c[1], c[2][-1]) for c in calls[len(benchmark.WINDOW_SWEEP) :]] == [
        ("windows_default_w3_lr3e-5", s, "2") for s in (0, 1, 2)]
    run = summary["phase2"]["default_w3_lr3e-5_seed1"]
    assert run["final_change"] == 0.12 and run["train_seconds_per_iteration"] == 1.5
    assert run["wall_seconds"] == 450 * 1.5 + 3.0 and run["change_per_minute"] == pytest.approx(0.12 / (678 / 60))


def fake_runs(calls: list, final_change, timed=lambda name: False):
    """A stand-in for benchmark.run_one (an op_grpo.py run): it records the call and writes rows with an update time
    and an evaluation every eval_every iterations at 0.4 + final_change(name) (0.4 before training), and for the
    runs timed(name) a process time of 590.5 s."""
    def run_one(name, seed, flags, args):
        calls.append((name, seed, flags, args.iterations, args.eval_every))
        folder = os.path.join(args.output_dir, f"{name}_seed{seed}")
        os.makedirs(folder, exist_ok=True)
        final = final_change(name)
        rows = [{"iteration": i, "time/update": 0.5, **({"eval_reward": 0.4 + final, "eval_se": 0.01, "time/eval": 5.0,
                 "eval_change": final, "eval_change_se": 0.02} if (i + 1) % args.eval_every == 0 else {})}
                for i in range(args.iterations)]
        rows[0].update(eval_reward=0.4)
        with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        if timed(name):
            with open(os.path.join(folder, "process_seconds.txt"), "w") as f:
                f.write("590.5\n")
        return folder
    return run_one


def test_demo_sweep_runs_750_iterations_with_3_evaluations_and_times_phase_2_whole(tmp_path, monkeypatch):
    import benchmark

    calls, change = [], {"w2_lr3e-5_kl": 0.19, "w2_lr3e-5": 0.10, "w3_lr3e-5": 0.18, "w2_lr5e-5": -0.05,
                         "w3_lr3e-5_500": 0.13, "G24_500": 0.17, "G24_500_ema": 0.16, "G24_500_ema95": 0.2}

    final = lambda name: change[name.removeprefix("demo_").removeprefix("default_")]  # noqa: E731
    fake_run_one = fake_runs(calls, final, timed=lambda name: "default_" in name)  # phase 2: also its process time
    monkeypatch.setattr(benchmark, "run_one", fake_run_one)
    monkeypatch.setattr(benchmark, "DEMO_ARCHIVE", str(tmp_path / "archive"))
    summary = benchmark.run_demo(benchmark.BenchArgs(output_dir=str(tmp_path / "runs"), parallel=1))
    assert [c[3:] for c in calls] == [(750, 250)] * 7 + [(500, 250)] * 12 and summary["plot"] == "demo_curves.png"
    assert summary["chosen"] == "w2_lr3e-5_kl" and [c[2][-1] for c in calls] == ["1"] * 4 + ["2"] * 15
    follow_up = summary["phase3"]["default_w3_lr3e-5_500_seed1"]  # the follow-ups: their own flags, timed whole
    assert follow_up["final_change"] == 0.13 and follow_up["process_seconds"] == 590.5
    assert calls[9][2][:2] == ["--sde-window", "3"] and calls[9][2][-4:-2] == ["--kl-beta", "0"]
    assert summary["phase3"]["default_G24_500_seed2"]["final_change"] == 0.17
    assert calls[-7][2][-6:-2] == ["--group-size", "24", "--prompts-per-iteration", "3"]
    assert calls[-4][2][-4:-2] == ["--ema-decay", "0.9"] and calls[-1][2][-4:-2] == ["--ema-decay", "0.95"]
    assert [c[1] for c in calls[-3:]] == [3, 4, 5]  # the fifth candidate: fresh seeds
    assert summary["phase3"]["default_G24_500_ema95_seed5"]["final_change"] == 0.2
    assert summary["phase3"]["default_G24_500_ema_seed0"]["final_change"] == 0.16
    assert "--kl-beta" not in calls[0][2] and calls[1][2][-4:-2] == ["--kl-beta", "0"]
    run = summary["phase2"]["default_w2_lr3e-5_kl_seed2"]
    assert run["process_seconds"] == 590.5 and run["iterations"] == [0, 250, 500, 750]
    assert "process_seconds" not in summary["phase1"]["w3_lr3e-5_seed0"]


def test_every_benchmark_run_starts_from_the_former_tiny_preset_and_its_own_flags_win(tmp_path, monkeypatch):
    """The studies in RESULTS.md were run on the tiny preset before the demo's recipe became it: run_one puts that
    preset's flags (TINY_BEFORE) first, so a run that names nothing gets the former settings, the golden run's."""
    import benchmark

    commands = []
    monkeypatch.setattr(benchmark.subprocess, "run", lambda command, **_: commands.append(command))
    args = benchmark.BenchArgs(output_dir=str(tmp_path), parallel=1)
    benchmark.run_one("plain", 0, [], args)
    benchmark.run_one("windowed", 0, ["--sde-window", "2", "--learning-rate", "3e-5"], args)
    plain, windowed = (op_grpo.with_presets(op_grpo.parse_cli(c[2:])) for c in commands)
    former = short_run(tmp_path, "former", prompts_per_iteration=8, group_size=8)
    assert [(a.sde_window, a.learning_rate, a.ema_decay, a.prompts_per_iteration, a.group_size) for a in (plain, former)] \
        == [(0, 1e-4, 0.0, 8, 8)] * 2
    assert (windowed.sde_window, windowed.learning_rate, windowed.group_size, windowed.threads) == (2, 3e-5, 8, 1)


def test_regime_study_pilots_lora_then_runs_the_chain_with_the_pilots_choice(tmp_path, monkeypatch):
    import benchmark

    calls, pilot = [], {"full": 0.10, "lora4": 0.03, "lora16": 0.07}  # lora16: >= 2 SE and >= half of full

    fake_run_one = fake_runs(calls, lambda name: pilot.get(name.removeprefix("pilot_"), 0.05 + 0.01 * ("op_grpo" in name)))
    monkeypatch.setattr(benchmark, "run_one", fake_run_one)
    monkeypatch.setattr(benchmark, "REGIME_ARCHIVE", str(tmp_path / "archive"))
    summary = benchmark.run_regime(benchmark.BenchArgs(output_dir=str(tmp_path / "runs"), parallel=1))
    assert [c[3:] for c in calls[:3]] == [(300, 100)] * 3 and all("--off-policy-fraction" in c[2] for c in calls[:3])
    assert summary["choices"] == {"paper": "lora16"}
    chain, replication = calls[3:57], calls[57:]
    assert len(chain) == 9 * 3 * 2 and {c[3:] for c in chain} == {(1000, 100)}
    assert [c[:2] for c in replication[:2]] == [("G24_dense_replication_op_grpo", 3),
                                                ("G24_dense_replication_flow_grpo", 3)]
    assert len(replication) == 6 and replication[0][2] == next(c[2] for c in chain if c[:2] == ("G24_dense_op_grpo", 0))
    paper = dict(zip(chain[0][2][::2], chain[0][2][1::2]))  # the first run: paper-like, dense, OP-GRPO, seed 0
    assert chain[0][:2] == ("paper_dense_op_grpo", 0) and chain[1][:2] == ("paper_dense_flow_grpo", 0)
    assert paper["--group-size"] == "24" and paper["--prompts-per-iteration"] == "1" and paper["--lora-rank"] == "16"
    assert paper["--clip-range"] == "1.6e-3" and paper["--kl-beta"] == "0.04" and paper["--learning-rate"] == "3e-4"
    assert "--lora-rank" not in chain[-1][2] and chain[-1][0].startswith("paper_full_dense")
    entry = summary["comparisons"]["paper_strict: op_grpo vs flow_grpo"]
    assert entry["mean_curve_difference"]["mean"] == pytest.approx(0.01) and len(entry["per_seed"]) == 3
    replicated = summary["comparisons"]["G24_dense_replication: op_grpo vs flow_grpo"]
    assert [s["seed"] for s in replicated["per_seed"]] == [3, 4, 5]
    assert len(summary["comparisons"]["G24_dense: op_grpo vs flow_grpo"]["per_seed"]) == 3  # its seeds stay apart
    benchmark.plot_regime(summary, str(tmp_path))  # every comparison of the chain has a panel
    assert os.path.getsize(tmp_path / "regime_curves.png") > 10_000
    assert benchmark.regime_choice({"full": {"final_change": 0.10}, "lora4": {"final_change": 0.04, "final_change_se":
                                    0.01}, "lora16": {"final_change": 0.03, "final_change_se": 0.01}}) == "full"


def test_video_preset_study_reads_the_preset_guidance_study_and_calls_a_rise_at_two_se_over_seeds(monkeypatch):
    import benchmark

    flags = benchmark.VIDEO_SIDE_BY_SIDE[f"{benchmark.VIDEO_PRESET_STUDY}/op_grpo"][0]  # as run_one passes them
    study = op_grpo.with_presets(op_grpo.parse_cli([*benchmark.TINY_BEFORE, *flags, "--output-dir", "x"]))
    preset = op_grpo.with_presets(Args(model="tiny-video", output_dir="x"))
    assert study == preset  # every setting a study run trains with is the default command's
    changes = {"op_grpo": [0.05, 0.06, 0.07], "flow_grpo": [-0.02, 0.03, 0.08]}  # OP: 0.06 +- 0.0058; Flow: 0.03 +- 0.029
    runs = {f"s/{arm}_seed{seed}": {"name": f"s/{arm}", "seed": seed, "final_change": c, "final_change_se": 0.03,
                                    "eval_reward": [0.4, 0.4 + c], "train_seconds_per_iteration": 10.0,
                                    "start_end": {"eval/train/met/shape": [0.4, 0.4 + c]}}
            for arm, cs in changes.items() for seed, c in enumerate(cs)}
    contrasts = {"s/op_grpo - s/flow_grpo": {"per_seed": {"0": {"equal_time_curve_difference": 0.01}},
                                             "equal_time_curve_difference": {"mean": 0.01, "se_over_seeds": None}}}
    monkeypatch.setattr(benchmark, "VIDEO_SIDE_BY_SIDE", {"s/op_grpo": (["--model", "tiny-video"], 100, 10)})
    study = benchmark.preset_study({"runs": runs, "contrasts": contrasts}, "s")
    op, flow = study["arms"]["op_grpo"], study["arms"]["flow_grpo"]
    assert op["strict_change"]["mean"] == pytest.approx(0.06) and op["rises"] and not flow["rises"]
    assert op["strict_change"]["se_over_seeds"] == pytest.approx(0.01 / math.sqrt(3))
    assert op["requirements_start_end"]["eval/train/met/shape"] == pytest.approx([0.4, 0.46])
    assert [r["change"] for r in flow["per_seed"]] == changes["flow_grpo"] and study["op_minus_flow_equal_time"][
        "per_seed"] == [0.01]


def test_benchmark_ratio_is_the_first_evaluation_at_the_baseline_final():
    import benchmark

    def rows(rewards, seconds_per_iteration):
        # the metrics.jsonl layout: row 0 carries the evaluation before training, then one every 2 iterations
        out = [{"iteration": i, "time/update": seconds_per_iteration} for i in range(6)]
        out[0].update(eval_reward=rewards[0])
        for i, reward in zip((1, 3, 5), rewards[1:]):
            out[i].update({"eval_reward": reward, "time/eval": 99.0})  # evaluation time is not training time
        out[-1].update(eval_se=0.01, eval_change=rewards[-1] - rewards[0], eval_change_se=0.02)
        return out

    flow = benchmark.curve(rows([0.4, 0.42, 0.45, 0.50], 1.0))
    op = benchmark.curve(rows([0.4, 0.47, 0.51, 0.49], 2.0))
    assert flow["iterations"] == [0, 2, 4, 6] and flow["train_seconds"] == [0.0, 2.0, 4.0, 6.0]
    result = benchmark.compare(flow, op)
    assert (result["iteration_ratio"], result["wall_clock_ratio"]) == (4 / 6, 8 / 6)  # OP first >= 0.50 at iteration 4
    assert result["mean_curve_difference"] == pytest.approx((0.47 + 0.51 + 0.49 - 0.42 - 0.45 - 0.50) / 3)
    # the paper's speed-up: Flow-GRPO's curve read at 2 / 0.342 = 5.85 iterations (between 4 and 6), then at its end
    at_2 = 0.45 + (0.50 - 0.45) * (2 / 0.342 - 4) / 2
    assert result["paper_implied_curve_difference"] == pytest.approx((at_2 + 0.50 + 0.50 - 0.42 - 0.45 - 0.50) / 3)
    assert benchmark.first_reach(op, 0.6) is None
    assert benchmark.first_reach(op, 0.3) == (2, 4.0)  # the evaluation before training never counts
    # one seed (benchmark.py --quick) has no standard error: said in words, never printed as "+- nan"
    assert benchmark.mean_se([0.2]) == (0.2, None) and benchmark.mean_se([0.1, 0.3])[1] == pytest.approx(0.1)
    assert benchmark.pm({"mean": 0.1, "se_over_seeds": None}) == "+0.100 (one seed: no SE)"
    assert benchmark.pm({"mean": -0.1, "se_over_seeds": 0.02}) == "-0.100 +- 0.020"


def test_side_by_side_contrasts_compare_at_equal_training_time_and_at_equal_iterations():
    import benchmark

    def run(rewards, seconds_per_point, iterations=(0, 2, 4, 6)):
        return {"iterations": list(iterations), "eval_reward": rewards,
                "train_seconds": [seconds_per_point * i for i in range(len(rewards))]}

    variant = run([0.4, 0.5, 0.6, 0.7], 1.0)  # accuracy 0.4 + 0.1 t
    reference = run([0.4, 0.42, 0.44, 0.46], 2.0)  # accuracy 0.4 + 0.01 t
    c = benchmark.contrast(variant, reference)
    # the gap 0.09 t, read at t = 3k/100 for k = 1..100 (the shorter run ends at 3 s): mean 0.09 * 3 * 101 / 200
    assert c["equal_time_seconds"] == 3.0 and c["equal_time_curve_difference"] == pytest.approx(0.09 * 3 * 101 / 200)
    assert c["wall_clock_ratio"] == pytest.approx(1 / 6)  # 0.46 first reached at the 1-second evaluation
    # the same evaluation iterations: differences 0.08, 0.16, 0.24 after iteration 0
    assert c["curve_difference"] == pytest.approx(0.16) and c["final_difference"] == pytest.approx(0.24)
    assert c["first_third_difference"] == pytest.approx(0.08) and c["last_third_difference"] == pytest.approx(0.20)
    assert c["gap_growth"] == pytest.approx(0.12) and c["iteration_ratio"] == pytest.approx(2 / 6)
    # other evaluation iterations (all steps against a window): only the equal-time measures
    other = benchmark.contrast(variant, run([0.4, 0.42, 0.44, 0.46], 2.0, iterations=(0, 1, 2, 3)))
    assert "curve_difference" not in other and other["equal_time_curve_difference"] == c["equal_time_curve_difference"]
    assert benchmark.contrast(reference, variant)["wall_clock_ratio"] is None  # never reaches 0.7


def test_study_runs_are_archived_when_finished_and_restored_instead_of_rerun(tmp_path, monkeypatch):
    import gzip

    import benchmark

    calls = []

    def fake_run_one(name, seed, flags, args):  # stands for op_grpo.py: writes its rows unless they are complete
        calls.append((name, seed, flags))
        folder = os.path.join(args.output_dir, f"{name}_seed{seed}")
        if len(benchmark.load_rows(folder)) != args.iterations:
            os.makedirs(folder, exist_ok=True)
            (tmp_path / "ran").write_text("yes")
            with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
                f.writelines(json.dumps({"iteration": i, "eval_reward": 0.5}) + "\n" for i in range(args.iterations))
            with open(os.path.join(folder, "process_seconds.txt"), "w") as f:  # as run_one times the process
                f.write("123.4\n")
        return folder

    monkeypatch.setattr(benchmark, "run_one", fake_run_one)
    args = benchmark.BenchArgs(iterations=3, output_dir=str(tmp_path / "runs"))
    archive = str(tmp_path / "archive")
    benchmark.run_archived("A/flow_grpo", 0, ["--x"], args, archive)
    stored, seconds = sorted((tmp_path / "archive").iterdir())
    assert seconds.name == stored.name.replace(".jsonl.gz", ".process_seconds.txt") and seconds.read_text() == "123.4\n"
    assert stored.name.startswith("A_flow_grpo_seed0_") and stored.name.endswith(".jsonl.gz")
    assert calls == [("A_flow_grpo", 0, ["--x"])] and (tmp_path / "ran").exists()
    written = (tmp_path / "runs" / "A_flow_grpo_seed0" / "metrics.jsonl").read_text()
    assert gzip.open(stored, "rt").read() == written
    import shutil

    shutil.rmtree(tmp_path / "runs")  # a new machine: only the archive is left
    (tmp_path / "ran").unlink()
    benchmark.run_archived("A/flow_grpo", 0, ["--x"], args, archive)
    assert not (tmp_path / "ran").exists()  # restored, not run again
    assert (tmp_path / "runs" / "A_flow_grpo_seed0" / "metrics.jsonl").read_text() == written
    assert (tmp_path / "runs" / "A_flow_grpo_seed0" / "process_seconds.txt").read_text() == "123.4\n"  # kept too
    shutil.rmtree(tmp_path / "runs")  # other flags (a tuned baseline) are another run: not restored, run again
    benchmark.run_archived("A/flow_grpo", 0, ["--x", "--learning-rate", "2e-4"], args, archive)
    assert (tmp_path / "ran").exists() and len(list((tmp_path / "archive").iterdir())) == 4
    shutil.rmtree(tmp_path / "runs")
    (tmp_path / "ran").unlink()
    made_only = benchmark.BenchArgs(iterations=3, output_dir=str(tmp_path / "runs"), made_only=True)
    assert benchmark.run_archived("A/flow_grpo", 0, ["--y"], made_only, archive) is None  # not made: not started
    assert benchmark.run_archived("A/flow_grpo", 0, ["--x"], made_only, archive) is not None  # restored
    assert not (tmp_path / "ran").exists()


def test_study_summary_pairs_each_variant_with_its_regimes_flow_grpo_by_seed(tmp_path, monkeypatch):
    import benchmark

    def write(name, seed, rewards, extra=None):
        folder = tmp_path / f"{name.replace('/', '_')}_seed{seed}"
        folder.mkdir()
        rows = [{"iteration": i, "time/update": 1.0, **(extra or {})} for i in range(4)]
        rows[0]["eval_reward"] = rewards[0]
        for i, reward in zip((1, 3), rewards[1:]):
            rows[i].update({"eval_reward": reward, "time/eval": 5.0, "eval_se": 0.01, "eval_change": reward - rewards[0],
                            "eval_change_se": 0.02})
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return (name, seed), str(folder)

    folders = dict([write("A/flow_grpo", 0, [0.1, 0.2, 0.3]), write("A/op_grpo", 0, [0.1, 0.3, 0.3], {"rescued_groups": 0.5}),
                    write("A/flow_grpo", 1, [0.1, 0.1, 0.2]), write("A/op_grpo", 1, [0.1, 0.2, 0.2])])
    summary = benchmark.study_summary(folders)
    entry = summary["comparisons"]["A: op_grpo vs flow_grpo"]
    assert summary["contrasts"] == {}  # none of STUDY_CONTRASTS' regimes here
    assert [s["seed"] for s in entry["per_seed"]] == [0, 1] and entry["regime"] == "A"
    assert entry["mean_curve_difference"]["mean"] == pytest.approx((0.05 + 0.05) / 2)  # (0.3+0.3-0.2-0.3)/2 per seed
    assert entry["median_iteration_ratio"] == pytest.approx((2 / 4 + 2 / 4) / 2)  # OP reaches Flow's final at 2 of 4
    assert summary["runs"]["A/op_grpo_seed0"]["rescued_groups"] == 0.5
    folders |= dict([write("A/other", 1, [0.1, 0.4, 0.1])])  # a variant paired with op_grpo on the seed both have
    monkeypatch.setattr(benchmark, "STUDY_CONTRASTS", [("A", "other", "op_grpo")])
    contrast = benchmark.study_summary(folders)["contrasts"]["A: other − op_grpo"]
    assert contrast["seeds"] == 1 and contrast["curve_per_seed"] == pytest.approx([(0.4 + 0.1 - 0.2 - 0.2) / 2])
    assert contrast["final"] == {"mean": pytest.approx(0.1 - 0.2), "se_over_seeds": None}


def test_study_learns_rule_and_tuning_choice():
    import benchmark

    assert benchmark.learns([0.10, 0.11, 0.12])  # mean 0.11, SE 0.0058
    assert not benchmark.learns([0.086, 0.028, 0.030])  # B with G 2's Flow-GRPO arm: 2.5 SE
    assert not benchmark.learns([0.5])  # one seed has no SE
    assert benchmark.chosen_tuning(0.0, {"lr": 0.05, "kl": 0.02}) == "lr"
    assert benchmark.chosen_tuning(0.086, {"lr": 0.05, "kl": 0.08}) is None  # no step beats the default's seed 0


def test_study_tunes_only_a_baseline_that_does_not_learn_and_runs_every_arm_on_the_chosen_setting(tmp_path,
                                                                                                    monkeypatch):
    import benchmark

    flow_change = {"L": [0.10, 0.11, 0.12, 0.10, 0.11], "N": [0.0, 0.01, -0.01], "N_lr_2e-4": [0.05, 0.04, 0.06],
                   "N_kl_0": [0.02]}
    calls = []

    def fake_run(name, seed, flags, args):
        calls.append((name, seed, flags))
        regime, variant = name.split("/")
        change = flow_change[regime][seed] if variant == "flow_grpo" else 0.03 + 0.01 * seed
        folder = tmp_path / f"{name.replace('/', '_')}_seed{seed}"
        folder.mkdir(exist_ok=True)
        rows = [{"iteration": i, "time/update": 1.0} for i in range(4)]
        rows[0]["eval_reward"] = 0.1
        for i, reward in ((1, 0.1 + change / 2), (3, 0.1 + change)):
            rows[i].update({"eval_reward": reward, "time/eval": 5.0, "eval_se": 0.01, "eval_change": reward - 0.1,
                            "eval_change_se": 0.02})
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(folder)

    monkeypatch.setattr(benchmark, "run_archived", fake_run)
    monkeypatch.setattr(benchmark, "STUDY_REGIMES", {"L": ["--l"], "N": ["--n"]})
    monkeypatch.setattr(benchmark, "STUDY_LATER", {"N": {"op_failed_x4": ["--failed-weight", "4"]}, "Z": {"x": []}})
    monkeypatch.setattr(benchmark, "STUDY_CONTRASTS", [("N_lr_2e-4", "op_failed_x4", "op_grpo")])
    monkeypatch.setattr(benchmark, "STUDY_REPLICATION", {"N": ("op_failed_x4",)})
    summary = benchmark.run_study(benchmark.BenchArgs(study=True, output_dir=str(tmp_path)))
    ran = {(name, seed): flags for name, seed, flags in calls}
    tuned = summary["choices"]["tuning"]
    assert tuned == {"N": {"seed0_change": pytest.approx({"N": 0.0, "N_lr_2e-4": 0.05, "N_kl_0": 0.02}),
                           "chosen": "N_lr_2e-4"}}
    assert ("L_lr_2e-4/flow_grpo", 0) not in ran and ("N_kl_0/flow_grpo", 1) not in ran  # L learns; kl 0 lost
    assert ran[("N_lr_2e-4/op_grpo", 2)] == ["--n", "--learning-rate", "2e-4"]  # OP-GRPO gets the tuned setting
    assert ran[("N_lr_2e-4/flow_grpo", 1)] == ["--n", "--learning-rate", "2e-4", "--off-policy-fraction", "0"]
    assert ("N/op_grpo", 0) not in ran  # the untuned regime gets no OP-GRPO run
    assert summary["choices"]["follow_up_regime"] == "L"  # largest Flow-GRPO mean change after tuning
    assert ran[("L/prompt_replay_rho_0.5", 2)] == ["--l", "--off-policy-fraction", "0.5", "--replay", "prompt"]
    assert {k for k in summary["comparisons"]} >= {"N_lr_2e-4: op_grpo vs flow_grpo", "L: op_rho_0.5 vs flow_grpo"}
    assert len([c for c in calls if c[1] in (3, 4) and c[0][0] == "L"]) == 4  # phase 3: one comparison, both arms
    # phase 4 runs on the tuned regime's flags, 3 seeds, and skips a regime the study does not have
    assert ran[("N_lr_2e-4/op_failed_x4", 2)] == ["--n", "--learning-rate", "2e-4", "--failed-weight", "4"]
    assert [c[1] for c in calls if c[0] == "N_lr_2e-4/op_failed_x4"] == [0, 1, 2, 3, 4]  # phases 4 and 5
    assert not any("Z" in c[0] for c in calls)
    assert summary["contrasts"]["N_lr_2e-4: op_failed_x4 − op_grpo"]["seeds"] == 3
    table = benchmark.study_tables(summary)
    assert "| N_lr_2e-4: op_grpo vs flow_grpo | 3 | " in table and "| `N_kl_0/flow_grpo_seed0` | +0.020 ± 0.020 |" in table
    assert "| N_lr_2e-4: op_failed_x4 − op_grpo | 3 | +0.000, +0.000, +0.000 | +0.000 +- 0.000 |" in table

    # --made-only with the OP-GRPO runs of L not made: they are listed, phase 3 is not chosen, the rest is summarised
    monkeypatch.setattr(benchmark, "run_archived", lambda name, seed, flags, args: None
                        if name.startswith("L/") and name != "L/flow_grpo" else fake_run(name, seed, flags, args))
    partial = benchmark.run_study(benchmark.BenchArgs(study=True, made_only=True, output_dir=str(tmp_path)))
    assert "L/op_grpo seed 2" in partial["missing"] and "L/prompt_replay_rho_0.5 seed 0" in partial["missing"]
    assert partial["choices"]["extra_seeds_for"] is None and "N_lr_2e-4: op_grpo vs flow_grpo" in partial["comparisons"]


# ---------------------------------------------------------------------------------------------------------
# profile_sd3.py: the SD3.5-Medium-shaped pipeline it builds offline loads through the stock StableDiffusion3Pipeline
# with the stated architecture, the full-size configs have SD3.5-Medium's sizes, the overhead ratio's arithmetic,
# and a tiny end-to-end profile with its exact pass counts
# ---------------------------------------------------------------------------------------------------------
def skip_sd35_positional_table(monkeypatch):
    """SD3.5-M's fixed sin-cos positional table (384 x 384 positions x 1536) takes 11 s to compute in float64 each
    time such a transformer is made, on building and on loading; here it is zeros of the same shape. Other sizes
    (the tiny model's) are computed as usual. The architecture and the saved tensors' shapes are unchanged."""
    from diffusers.models import embeddings

    original = embeddings.get_2d_sincos_pos_embed

    def table(embed_dim, grid_size, *args, **kwargs):
        if (embed_dim, grid_size) == (1536, 384):
            return torch.zeros(384 * 384, 1536)
        return original(embed_dim, grid_size, *args, **kwargs)

    monkeypatch.setattr(embeddings, "get_2d_sincos_pos_embed", table)


@pytest.fixture(scope="module")
def reduced_pipeline(tmp_path_factory):
    """SD3.5-M's widths with 2 transformer blocks and 1-layer text encoders, built and saved once (about 10 s)."""
    folder = str(tmp_path_factory.mktemp("profile") / "pipeline")
    with pytest.MonkeyPatch.context() as monkeypatch:
        skip_sd35_positional_table(monkeypatch)
        profile_sd3.ensure_pipeline(profile_sd3.ProfileArgs(depth=2, text_depth=1, folder=folder), torch.device("cpu"))
    return folder


def test_built_pipeline_loads_with_the_stock_pipeline_and_has_sd35_medium_widths(reduced_pipeline, monkeypatch):
    skip_sd35_positional_table(monkeypatch)
    pipe = StableDiffusion3Pipeline.from_pretrained(reduced_pipeline, local_files_only=True)
    t = pipe.transformer.config
    assert (t.num_layers, t.num_attention_heads, t.attention_head_dim, t.caption_projection_dim) == (2, 24, 64, 1536)
    assert (t.joint_attention_dim, t.pooled_projection_dim, t.patch_size) == (4096, 2048, 2)
    assert (t.in_channels, t.out_channels, t.pos_embed_max_size, t.qk_norm) == (16, 16, 384, "rms_norm")
    assert tuple(t.dual_attention_layers) == (0, 1)  # the first min(13, depth) blocks
    assert all(block.attn2 is not None for block in pipe.transformer.transformer_blocks)  # MMDiT-X second attention
    v = pipe.vae.config
    assert (v.latent_channels, tuple(v.block_out_channels), v.layers_per_block) == (16, (128, 256, 512, 512), 2)
    assert (v.scaling_factor, v.shift_factor, v.use_quant_conv, v.use_post_quant_conv) == (1.5305, 0.0609, False, False)
    assert pipe.vae_scale_factor == 8 and pipe.scheduler.config.shift == 3.0
    for encoder, width in ((pipe.text_encoder, 768), (pipe.text_encoder_2, 1280)):
        assert (encoder.config.hidden_size, encoder.config.projection_dim) == (width, width)
    assert pipe.text_encoder_3.config.d_model == 4096 and pipe.tokenizer.model_max_length == 77
    # the stock encode_prompt: 77 CLIP slots (768 + 1280, padded to 4096) then the T5 slots; pooled 768 + 1280
    prompts = ["a red fox sleeping in fresh snow", "an owl reading a map"]
    embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False,
                                              max_sequence_length=8)
    assert embeds.shape == (2, 77 + 8, 4096) and pooled.shape == (2, 2048) and torch.isfinite(embeds).all()
    ids = pipe.tokenizer_3("a red fox").input_ids
    assert ids == [pipe.tokenizer_3.convert_tokens_to_ids("▁" + w) for w in ("a", "red", "fox")] + [1]  # words, eos


def test_full_size_configs_have_sd35_medium_sizes():
    run = op_grpo.with_presets(op_grpo.Args(model="sd3"))
    arithmetic = profile_sd3.memory_arithmetic(run)  # built on the meta device: no memory, no time
    n = arithmetic["parameters"]
    # 2.24 B weights + a 0.23 B positional table: Stability's "2.5 billion parameters" for SD3.5 Medium
    assert round(n["transformer"] / 1e6) == 2243 and round(384 * 384 * 1536 / 1e6) == 226
    assert round(n["clip_l"] / 1e6) == 124 and round(n["clip_g"] / 1e6) == 695 and round(n["t5_xxl"] / 1e8) == 48
    assert round(n["pickscore_clip_h"] / 1e6) == 986 and n["vae"] == 83819683
    # LoRA r 32 on the joint attention's 8 projections per block (q, k, v, out of both streams, all 1536 x 1536)
    assert n["lora"] == (24 * 8 - 1) * 32 * (1536 + 1536)  # the last block has no to_add_out
    frozen_bytes = 2 * (n["transformer"] + 384 * 384 * 1536)  # bf16 weights and positional table
    assert arithmetic["gpu_gb"]["transformer_frozen"] == pytest.approx(frozen_bytes / 2**30, abs=1e-3)


def test_full_size_wan_configs_have_wan_1_3b_sizes():
    run = op_grpo.with_presets(op_grpo.Args(model="wan"))
    arithmetic = profile_sd3.memory_arithmetic(run)
    n = arithmetic["parameters"]
    # Wan2.1-T2V-1.3B's bf16 transformer file is 2.84 GB (1.42 B); the UMT5-XXL encoder's bf16 file 11.4 GB (5.7 B)
    assert round(n["transformer"] / 1e7) == 142 and round(n["umt5_xxl"] / 1e8) == 57
    # LoRA r 32 on q, k, v, out of both attentions of 30 blocks, all 1536 x 1536
    assert n["lora"] == 30 * 8 * 32 * (1536 + 1536)
    assert arithmetic["gpu_gb"]["transformer_frozen"] == pytest.approx(2 * n["transformer"] / 2**30, abs=1e-3)
    assert arithmetic["gpu_gb"]["vae"] == pytest.approx(4 * n["vae"] / 2**30, abs=1e-3)  # the VAE stays float32
    # a stored trajectory: 21 latents of 16 x 9 x 30 x 52 (33 frames of 240 x 416) and 20 log-probs, float32
    latents = 21 * 16 * 9 * 30 * 52 + 20
    assert arithmetic["host_gb"]["replay_buffer_full"] == pytest.approx(run.buffer_capacity * 4 * latents / 2**30,
                                                                        abs=1e-3)


def test_wan_profile_builds_wan_widths_and_runs_op_grpo_wan_end_to_end(tmp_path, monkeypatch):
    """--model wan: Wan2.1-T2V-1.3B's widths with 2 blocks and a 1-layer UMT5, loaded by the stock WanPipeline,
    then a reduced profile of op_grpo --model wan on it (5 frames of 32 x 48 px: 2 x 4 x 6 latents)."""
    folder, threads = str(tmp_path / "pipeline"), torch.get_num_threads()
    profile_sd3.ensure_pipeline(profile_sd3.ProfileArgs(model="wan", depth=2, text_depth=1, folder=folder),
                                torch.device("cpu"))
    pipe = WanPipeline.from_pretrained(folder, local_files_only=True)
    t, v = pipe.transformer.config, pipe.vae.config
    assert (t.num_layers, t.num_attention_heads, t.attention_head_dim, t.ffn_dim, t.text_dim) == (2, 12, 128, 8960, 4096)
    assert (v.base_dim, v.z_dim, tuple(v.dim_mult), tuple(v.temperal_downsample)) == (96, 16, (1, 2, 4, 4),
                                                                                      (False, True, True))
    assert pipe.scheduler.config.flow_shift == 3.0 and pipe.text_encoder.config.d_model == 4096
    args = profile_sd3.ProfileArgs(
        model="wan", folder=folder, run_dir=str(tmp_path / "run"), output=str(tmp_path / "profile.json"), depth=2,
        text_depth=1, resolution=32, width=48, num_frames=5, max_sequence_length=4, prompts_per_iteration=2,
        group_size=2, micro_batch=2, off_policy_fraction=0.5, num_steps=4, iterations=2, eval_per_family=1,
        eval_steps=2, activations=False, timing_repeats=1, device="cpu", threads=1, sde_window=0)
    try:
        results = profile_sd3.main(args)
    finally:
        torch.set_num_threads(threads)
    run = results["op_grpo_args"]
    assert (run["model"], run["lora_rank"], run["kl_form"], run["guidance_scale"]) == ("wan", 32, "exact", 4.5)
    assert results["build"]["seconds"] == "reused" and results["overhead"]["ratio"] > 0
    assert {tuple(p["latents"][1:]) for p in results["overhead"]["passes"]} == {(16, 2, 4, 6)}
    assert all(results["seconds"]["per_iteration_mean"][k] > 0 for k in profile_sd3.STAGES)


def test_overhead_ratio_is_iteration_seconds_over_the_passes_it_contains():
    ratio, pure = profile_sd3.overhead_ratio(10.0, {"sample": 2.0, "update": 1.0}, {"sample": 3.0, "update": 2.0})
    assert pure == 8.0 and ratio == 1.25


def test_profile_runs_op_grpo_sd3_end_to_end_on_the_reduced_build(reduced_pipeline, tmp_path, monkeypatch):
    skip_sd35_positional_table(monkeypatch)
    threads = torch.get_num_threads()  # op_grpo.main sets --threads for the whole process
    args = profile_sd3.ProfileArgs(
        folder=reduced_pipeline, run_dir=str(tmp_path / "run"), output=str(tmp_path / "profile.json"), depth=2,
        text_depth=1, resolution=64, max_sequence_length=4, prompts_per_iteration=2, group_size=2, micro_batch=2,
        off_policy_fraction=0.5, num_steps=4, iterations=2, eval_per_family=2, eval_steps=2, activations=False,
        timing_repeats=1, device="cpu", threads=1, sde_window=2)
    on_disk, watched_run = [], profile_sd3.watched_run

    def watched_run_reading_the_file(profile_args, run):  # what a run stopped at this point would have left
        on_disk.append(json.load(open(args.output)) if os.path.exists(args.output) else None)
        return watched_run(profile_args, run)

    monkeypatch.setattr(profile_sd3, "watched_run", watched_run_reading_the_file)
    try:
        results = profile_sd3.main(args)
    finally:
        torch.set_num_threads(threads)
    assert on_disk[0] is None and on_disk[1]["windowed"] == "stopped before it finished"
    assert on_disk[1]["overhead"]["ratio"] == results["overhead"]["ratio"]  # the first run's results were saved
    assert json.load(open(args.output))["overhead"]["ratio"] == results["overhead"]["ratio"] > 0
    assert results["build"]["seconds"] == "reused" and results["op_grpo_args"]["lora_rank"] == 32
    windowed = results["windowed"]  # the same run with an SDE window of 2 of the 4 steps, beside it
    assert windowed["sde_window"] == 2 and all(windowed["per_iteration_mean"][k] > 0 for k in profile_sd3.STAGES)
    stages = results["seconds"]["per_iteration_mean"]
    assert all(stages[k] > 0 for k in profile_sd3.STAGES)  # iteration 1 replays one slot: p_old pass and tail too
    # the passes of iteration 1 (K = 4, 2 prompts x 2, one replayed slot, micro-batch 2): sampling 4 steps over the
    # 3 fresh samples in passes of 2 and 1, p_old 4 + tail 3 over the replayed one; the update, 2 minibatches of 2 on
    # the first 3 steps, where the replayed sample keeps step 0 only: 4 passes of 2 samples and 2 of 1, each with
    # its KL reference pass
    passes = {(p["latents"][0], p["gradients"], p["adapters_off"]): p["per_iteration"]
              for p in results["overhead"]["passes"]}
    assert passes == {(2, False, False): 4, (1, False, False): 4 + 7, (2, True, False): 4, (1, True, False): 2,
                      (2, False, True): 4, (1, False, True): 2}


# ---------------------------------------------------------------------------------------------------------
# Video: --model wan on a tiny random-weight Wan2.1 pipeline built here (diffusers' own test sizes), offline
# ---------------------------------------------------------------------------------------------------------
WAN_WORDS = "a red blue green circle square triangle moving left right up down and apart together".split()


def build_tiny_wan(folder: str) -> None:
    """A WanPipeline with random weights at diffusers' test sizes (2 layers, 2 heads of 12, a 3-channel base VAE),
    a UMT5 text encoder of width 32 and a T5 tokenizer made in memory, saved with the UniPC flow scheduler that
    Wan2.1-T2V-1.3B ships (shift 3)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import T5Tokenizer, UMT5Config, UMT5EncoderModel

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0) for w in WAN_WORDS]
    torch.manual_seed(0)
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=32, num_layers=2,
                                               num_heads=4, relative_attention_num_buckets=8))
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                        in_channels=16, out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32,
                                        num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                        rope_max_seq_len=32)
    scheduler = UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction")
    WanPipeline(tokenizer=T5Tokenizer(vocab=vocab), text_encoder=text_encoder, transformer=transformer, vae=vae,
                scheduler=scheduler).save_pretrained(folder)


@pytest.fixture(scope="module")
def tiny_wan(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("wan") / "pipeline")
    build_tiny_wan(folder)
    return folder


def wan_args(folder, tmp_path, **overrides):
    """--model wan pointed at the tiny pipeline: 16 x 32 frames, 9 of them (3 latent frames), LoRA rank 4."""
    os.makedirs(tmp_path, exist_ok=True)
    prompts = tmp_path / "video_prompts.txt"
    prompts.write_text("a red circle moving left\na blue square moving up\na green triangle and a red square apart\n")
    settings = dict(model="wan", pretrained=folder, resolution=16, width=32, num_frames=9, max_sequence_length=8,
                    mixed_precision="no", lora_rank=4, micro_batch=0, num_steps=6, prompt_file=str(prompts),
                    reward="jpeg", iterations=4, prompts_per_iteration=2, group_size=2, off_policy_fraction=0.5,
                    truncate_steps=2, guidance_scale=2.0, eval_every=2, eval_per_family=2, eval_steps=4,
                    checkpoint_every=0, output_dir=str(tmp_path / "run"), seed=0, ema_decay=0.0)  # saved = trained
    return op_grpo.with_presets(Args(**{**settings, **overrides}))


def test_the_step_log_prob_on_video_latents_is_the_gaussian_density():
    g = torch.Generator().manual_seed(2)
    x, v = torch.randn(3, 16, 3, 2, 4, generator=g), torch.randn(3, 16, 3, 2, 4, generator=g)  # (B, C, F, H, W)
    sigma, sigma_next = torch.tensor([0.9, 0.6, 0.3]), torch.tensor([0.8, 0.5, 0.1])
    prev, log_prob, mean, std = sde_step_with_logprob(v, x, sigma, sigma_next, 0.7, generator=g)
    assert prev.shape == x.shape and std.shape == (3, 1, 1, 1, 1)
    for i in range(3):
        s, dt = 0.7 * math.sqrt(sigma[i] / (1 - sigma[i])), (sigma_next[i] - sigma[i]).item()
        mu = x[i] + (v[i] + s**2 / (2 * sigma[i]) * (x[i] + (1 - sigma[i]) * v[i])) * dt
        torch.testing.assert_close(mean[i], mu)
        expected = torch.distributions.Normal(mu, s * math.sqrt(-dt)).log_prob(prev[i]).mean()
        torch.testing.assert_close(log_prob[i], expected, rtol=1e-5, atol=1e-5)
    kl = op_grpo.gaussian_kl(mean, mean + 0.1, std)  # the KL per step on 5-D latents, against its closed form
    torch.testing.assert_close(kl, 0.01 / (2 * std.flatten() ** 2))


def test_an_image_reward_scores_a_video_by_its_mean_over_every_nth_frame(monkeypatch):
    def brightness(images, prompts):  # an image reward: each frame's red value
        return torch.tensor([float(image.getpixel((0, 0))[0]) for image in images])

    videos = [[Image.new("RGB", (4, 4), (10 * f + 100 * v, 0, 0)) for f in range(9)] for v in range(2)]
    table = {"brightness": brightness, "frames": lambda videos, prompts: torch.tensor([len(v) for v in videos])}
    reward = op_grpo.weighted_reward({"brightness": 2.0}, table, every=4)  # frames 0, 4, 8: red 0, 40, 80 (+100 v)
    torch.testing.assert_close(reward(videos, ["p", "q"]), 2.0 * torch.tensor([40.0, 140.0]))
    monkeypatch.setattr(op_grpo, "VIDEO_REWARDS", {"frames"})  # a reward of whole videos gets every frame
    assert op_grpo.weighted_reward({"frames": 1.0}, table, every=4)(videos, ["p", "q"]).tolist() == [9.0, 9.0]


def test_wan_sampler_is_the_stock_pipeline_with_its_flow_shift_as_an_euler_schedule(tiny_wan, tmp_path):
    """ODE sampling and decoding here equal WanPipeline's own loop with a flow-matching Euler scheduler of the
    checkpoint's shift (load_pipeline's replacement for its UniPC solver): the same frames from the same noise."""
    args = wan_args(tiny_wan, tmp_path)
    model = op_grpo.load_model(args, torch.device("cpu"), ["a red circle moving left"])
    assert model.shape == (16, 3, 2, 4) and isinstance(model.pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    expected = FlowMatchEulerDiscreteScheduler(shift=3.0)
    expected.set_timesteps(6)
    torch.testing.assert_close(model.sigmas, expected.sigmas.float())
    noise = torch.randn((1, *model.shape), generator=torch.Generator().manual_seed(0))
    latents, log_probs = op_grpo.sample_trajectories(model, noise, model.sigmas, 0, ["a red circle moving left"], 0.0,
                                                     2.0)
    assert latents.shape == (1, 7, 16, 3, 2, 4) and torch.isnan(log_probs).all()
    ours = op_grpo.decode(model.pipe, latents[:, -1])[0]
    stock = op_grpo.load_pipeline(args, torch.device("cpu"))
    frames = stock(prompt="a red circle moving left", negative_prompt="", height=16, width=32, num_frames=9,
                   num_inference_steps=6, guidance_scale=2.0, latents=noise, max_sequence_length=8,
                   output_type="np").frames[0]
    assert len(ours) == 9 and ours[0].size == (32, 16)
    np.testing.assert_allclose(np.stack([np.asarray(f) for f in ours]), np.round(frames * 255), atol=1)


def test_wan_run_replays_truncates_resumes_exactly_and_saves_a_lora_that_wan_pipeline_loads(tiny_wan, tmp_path):
    straight = op_grpo.main(wan_args(tiny_wan, tmp_path / "a"))
    assert any(r["replayed_groups"] for r in straight) and all(math.isfinite(r["loss"]) for r in straight)
    assert "is_weight_mean" in straight[-1] and len(straight[-1]["log_ratio_old_behavior_per_step"]) == 6
    op_grpo.main(wan_args(tiny_wan, tmp_path / "b", iterations=2))
    resumed = op_grpo.main(op_grpo.parse_cli(["--resume", str(tmp_path / "b" / "run"), "--iterations", "4"]))
    assert without_timings(resumed) == without_timings(straight)

    args = wan_args(tiny_wan, tmp_path / "a")
    saved = torch.load(tmp_path / "a" / "run" / plumbing.CHECKPOINT, weights_only=True)
    trained = op_grpo.load_pipeline(args, torch.device("cpu"))
    op_grpo.make_trainable(trained.transformer, args)
    trained.transformer.load_state_dict(saved["trainable"], strict=False)
    loaded = WanPipeline.from_pretrained(tiny_wan)
    loaded.load_lora_weights(str(tmp_path / "a" / "run" / "lora"))  # the stock diffusers loader
    base = WanPipeline.from_pretrained(tiny_wan)
    x = torch.randn((2, 16, 3, 2, 4), generator=torch.Generator().manual_seed(1))
    embeds = op_grpo.embed_prompts(base, ["a red circle moving left", "a blue square moving up"], 8)
    cond = [torch.stack([embeds[p][i] for p in embeds]) for i in (0, 1)]
    with torch.no_grad():
        v_trained, v_loaded, v_base = (op_grpo.predict_velocity(p.transformer, x, 0.5, *cond, 1.0)
                                       for p in (trained, loaded, base))
    torch.testing.assert_close(v_loaded, v_trained, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(v_trained, v_base, atol=1e-7)  # training moved the adapters
    adapted = {n.split(".lora_")[0] for n, p in trained.transformer.named_parameters() if p.requires_grad}
    assert adapted == {f"blocks.{b}.{a}.{t}" for b in (0, 1) for a in ("attn1", "attn2")
                       for t in ("to_q", "to_k", "to_v", "to_out.0")}


# ---------------------------------------------------------------------------------------------------------
# The toy video world: prompts, renderer, verifier of motion, and the tiny Wan build
# ---------------------------------------------------------------------------------------------------------
def test_video_world_prompts_split_and_vocabulary():
    import toy_video

    specs = toy_video.all_specs()
    assert len(specs) == 48 + 108 and len({toy_video.describe(s) for s in specs}) == len(specs)
    train, held_out = toy_video.split_specs()
    assert len(held_out) == round(0.2 * 48) + round(0.2 * 108) and not set(train) & set(held_out)
    assert toy_video.describe(specs[0]) == "a red circle moving left"
    longest = max(len(toy_video.describe(s).split()) for s in specs)
    assert longest + 1 == toy_video.TOKENS  # every word is one token, plus </s>
    tokenizer = toy_video.build_tokenizer()
    ids = tokenizer("a blue square and a green triangle moving apart").input_ids
    assert len(ids) == toy_video.TOKENS and tokenizer.unk_token_id not in ids


def test_video_verifier_passes_ground_truth_and_fails_wrong_static_and_reversed_motion():
    import toy_video

    rng = random.Random(0)
    for spec in toy_video.all_specs():
        video = toy_video.render(spec, rng)
        assert len(video) == toy_video.FRAMES and video[0].size == (toy_video.SIZE, toy_video.SIZE)
        assert toy_video.score(spec, video) == (1.0, 1.0), toy_video.describe(spec)
        if spec.family == "pair":  # the first-named object on the left, in every frame
            (a, _), (b, _) = spec.objects
            assert all(found[a]["centre"][0] < found[b]["centre"][0]
                       for found in ({o["colour"]: o for o in toy_world.find_objects(f)} for f in video))
        assert toy_video.score(spec, video[::-1])[0] == 0.0  # played backwards: the opposite motion
        assert toy_video.score(spec, [video[0]] * len(video))[0] == 0.0  # standing still
        for other in (s for s in toy_video.all_specs() if s.objects == spec.objects and s.motion != spec.motion):
            assert toy_video.requirements(other, video)["motion"] == 0.0
    # dense partial credit: present, circle, nothing else, but the wrong motion -> 3 of 4 requirements
    spec = toy_video.SPEC_BY_PROMPT["a red circle moving left"]
    right = toy_video.render(toy_video.SPEC_BY_PROMPT["a red circle moving right"], rng)
    assert toy_video.score(spec, right) == (0.0, 0.75)
    assert toy_video.motion_reward([right], ["a red circle moving left"]).tolist() == [0.75]
    with pytest.raises(ValueError, match="not a prompt of the toy video world"):
        toy_video.score_prompt("a purple circle moving left", right)


def test_video_requirement_rates_say_which_kind_of_requirement_fails():
    import toy_video

    rng, specs = random.Random(1), toy_video.all_specs()[::7]
    prompts, videos = [toy_video.describe(s) for s in specs], [toy_video.render(s, rng) for s in specs]
    every = {"present": 1.0, "shape": 1.0, "nothing else": 1.0, "motion": 1.0}
    assert toy_video.requirement_rates(prompts, videos) == every
    assert toy_video.requirement_rates(prompts, [v[::-1] for v in videos]) == {**every, "motion": 0.0}
    # a circle drawn as a square in the last frame of the first of two videos: half the videos fail "shape" only
    circle = toy_video.SPEC_BY_PROMPT["a red circle moving up"]
    video = toy_video.render(circle, rng)
    square = toy_video.render(toy_video.SPEC_BY_PROMPT["a red square moving up"], random.Random(5))
    assert toy_video.requirements(circle, video[:-1] + square[-1:])["red circle"] == pytest.approx(2 / 3)
    rates = toy_video.requirement_rates(["a red circle moving up"] * 2, [video[:-1] + square[-1:], video])
    assert rates["shape"] == 0.5 and rates["present"] == rates["nothing else"] == 1.0
    assert [toy_video.requirement_kind(k) for k in ("red present", "red circle", "nothing else", "motion")] == [
        "present", "shape", "nothing else", "motion"]


def test_video_shape_read_tolerates_a_pixel_of_rounding_at_each_corner():
    """Circles drawn at 8-10 px fill 0.75-0.81 of their box, squares all of it. The tiny Wan VAE rounds a circle out
    by about a pixel per corner: with one more pixel at each corner of its box a circle still reads as a circle in
    the video world (the image world's 0.84 reads the 8-px one as a square), and a square missing its four corner
    pixels still reads as a square."""
    import toy_video

    colour = np.array(toy_world.COLOURS["red"], dtype=np.uint8)
    for side in range(toy_video.SIDE_RANGE[0], toy_video.SIDE_RANGE[1] + 1):
        frames = {}
        for shape in ("circle", "square"):
            image = Image.new("RGB", (32, 32), toy_world.BACKGROUND)
            toy_world.draw_shape(ImageDraw.Draw(image), shape, (10, 10, 9 + side, 9 + side), toy_world.COLOURS["red"])
            frames[shape] = np.asarray(image).copy()
        object_mask = (frames["circle"] != np.array(toy_world.BACKGROUND, dtype=np.uint8)).any(-1)
        for y, x, dy, dx in ((10, 10, 1, 1), (10, 9 + side, 1, -1), (9 + side, 10, -1, 1), (9 + side, 9 + side, -1, -1)):
            while not object_mask[y, x]:  # walk the diagonal in from the box corner to the circle
                y, x = y + dy, x + dx
            frames["circle"][y - dy, x] = colour  # one pixel more, touching the circle where it meets the diagonal
            frames["square"][10 if dy > 0 else 9 + side, 10 if dx > 0 else 9 + side] = toy_world.BACKGROUND
        reads = {shape: toy_world.find_objects(frame, toy_video.SQUARE_MIN_FILL) for shape, frame in frames.items()}
        assert [o["shape"] for o in reads["circle"]] == ["circle"] and [o["shape"] for o in reads["square"]] == ["square"]
        if side == 8:
            assert toy_world.find_objects(frames["circle"])[0]["shape"] == "square"


def test_shapes_survive_the_embedded_tiny_wan_vae():
    """Ground-truth videos through the embedded tiny Wan VAE (encode, decode) keep what the verifier reads: most pass
    every strict check, and shape reads are right in 90% of object-frames or more."""
    import toy_video
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan.from_pretrained(os.path.join(HERE, "tiny_wan"), subfolder="vae", local_files_only=True)
    rng, (train, _) = random.Random(7), toy_video.split_specs()
    specs = [rng.choice(train) for _ in range(64)]
    pixels = toy_video.to_tensor([toy_video.render(s, rng) for s in specs])
    with torch.no_grad():
        videos = toy_video.to_videos(vae.decode(vae.encode(pixels).latent_dist.mode()).sample)
    checks = [toy_video.requirements(s, v) for s, v in zip(specs, videos)]
    shape_reads = [v for c, s in zip(checks, specs) for colour, shape in s.objects for v in [c[f"{colour} {shape}"]]]
    assert np.mean(shape_reads) >= 0.9
    assert np.mean([all(v == 1.0 for v in c.values()) for c in checks]) >= 0.8


@pytest.fixture(scope="module")
def reduced_tiny_wan(tmp_path_factory):
    """python toy_video.py in a reduced setting (96 videos, 2 steps of each training): (build args, report)."""
    import toy_video

    args = toy_video.BuildArgs(output_dir=str(tmp_path_factory.mktemp("video") / "tiny_wan"), num_videos=96,
                               vae_steps=2, transformer_steps=2, eval_per_family=2, threads=1)
    return args, toy_video.build(args)


def test_object_weighted_mse_counts_object_pixels_one_plus_w_times():
    """Two pixels, one background and one red object pixel, errors 0.1 and 0.3 on every channel: weights 1 and 5."""
    background = torch.tensor(toy_world.BACKGROUND, dtype=torch.float32) / 127.5 - 1.0
    target = torch.stack([background, torch.tensor([1.0, -1.0, -1.0])], dim=1).view(1, 3, 1, 1, 2)  # a 1-frame video
    recon = target + torch.tensor([0.1, 0.3]).view(1, 1, 1, 1, 2)
    expected = (1 * 0.1**2 + 5 * 0.3**2) / (1 + 5)
    assert toy_world.object_weighted_mse(recon, target, 4.0).item() == pytest.approx(expected)
    assert toy_world.object_weighted_mse(recon[..., 0], target[..., 0], 0.0).item() == pytest.approx(
        torch.nn.functional.mse_loss(recon[..., 0], target[..., 0]).item())  # w 0: plain MSE (4-D: images)


def test_embedded_tiny_wan_loads_offline_generates_and_was_built_with_headroom():
    """tiny_wan/ (python toy_video.py) loads with the stock pipeline and makes videos of the world's shape; its build
    report, made at the tiny-video preset's guidance, leaves RL headroom: held-out strict accuracy in [0.3, 0.7]."""
    import toy_video

    folder = os.path.join(HERE, "tiny_wan")
    pipe = WanPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    guidance = op_grpo.PRESETS["tiny-video"]["guidance_scale"]
    frames = pipe(["a red circle moving left"], num_inference_steps=4, guidance_scale=guidance, height=toy_video.SIZE,
                  width=toy_video.SIZE, num_frames=toy_video.FRAMES, max_sequence_length=toy_video.TOKENS,
                  output_type="np", generator=torch.Generator().manual_seed(0)).frames
    assert frames.shape == (1, toy_video.FRAMES, toy_video.SIZE, toy_video.SIZE, 3) and np.isfinite(frames).all()
    assert frames.std() > 0.05  # a video, not a flat field
    report = json.loads(open(os.path.join(folder, "build_report.json")).read())
    assert report["args"]["guidance_scale"] == guidance
    assert 0.3 <= report["held_out"]["mix"]["strict"] <= 0.7


def test_video_build_runs_end_to_end_and_loads_with_the_stock_wan_pipeline(reduced_tiny_wan):
    import toy_video

    args, report = reduced_tiny_wan
    assert set(report["held_out"]) == {"motion", "pair", "mix"} and report["parameters"]["transformer"] > 0
    pipe = WanPipeline.from_pretrained(args.output_dir, local_files_only=True)
    std = pipe.vae.config.latents_std  # the fitted normalisation was saved
    assert len(std) == args.latent_channels == pipe.transformer.config.in_channels and std != [1.0] * len(std)
    frames = pipe("a red circle moving left", num_inference_steps=2, guidance_scale=1.0, height=32, width=32,
                  num_frames=9, max_sequence_length=toy_video.TOKENS).frames[0]
    assert len(frames) == 9 and os.path.exists(os.path.join(args.output_dir, "base_samples.png"))
    # --vae-from: a second build trains only the transformer on the first build's VAE, normalisation included; the
    # VAE's channels and time factor win over the flags
    again = dataclasses.replace(args, output_dir=args.output_dir + "_again", vae_from=args.output_dir, num_heads=4,
                                latent_channels=4, time_factor=2)
    second = toy_video.build(again)
    reused = WanPipeline.from_pretrained(again.output_dir, local_files_only=True)
    assert reused.transformer.config.in_channels == args.latent_channels and reused.vae_scale_factor_temporal == 4
    assert reused.vae.config.latents_mean == pipe.vae.config.latents_mean and reused.vae.config.latents_std == std
    assert all(torch.equal(a, b) for a, b in zip(reused.vae.state_dict().values(), pipe.vae.state_dict().values()))
    assert second["vae_reconstruction_mse"] == pytest.approx(report["vae_reconstruction_mse"], rel=1e-4)


def test_video_build_with_less_time_compression_keeps_more_latent_frames(tmp_path):
    """--time-factor 2: the VAE packs 2 frames into each latent frame after the first (5 -> 3), the saved
    pipeline says so, and the stock pipeline's latents and videos have the matching frame counts."""
    import toy_video

    args = toy_video.BuildArgs(output_dir=str(tmp_path / "tiny_wan"), num_videos=16, vae_steps=1, transformer_steps=1,
                               eval_per_family=1, threads=1, time_factor=2, latent_channels=4, num_heads=2)
    toy_video.build(args)
    pipe = WanPipeline.from_pretrained(args.output_dir, local_files_only=True)
    assert pipe.vae_scale_factor_temporal == 2
    video = toy_video.to_tensor([toy_video.render(toy_video.all_specs()[0], random.Random(0))])
    latent_frames = 1 + (toy_video.FRAMES - 1) // 2
    assert pipe.vae.encode(video).latent_dist.mode().shape == (1, 4, latent_frames, 8, 8)
    run = dict(num_inference_steps=1, guidance_scale=1.0, height=32, width=32, num_frames=toy_video.FRAMES,
               max_sequence_length=toy_video.TOKENS)
    assert pipe("a red circle moving left", output_type="latent", **run).frames.shape == (1, 4, latent_frames, 8, 8)
    assert len(pipe("a red circle moving left", **run).frames[0]) == toy_video.FRAMES
    # --report-only: the saved pipeline evaluated again at another guidance; the build's own record stays
    built = json.loads(open(os.path.join(args.output_dir, "build_report.json")).read())
    again = toy_video.report_again(dataclasses.replace(args, report_only=True, guidance_scale=2.5, eval_per_family=2))
    saved = json.loads(open(os.path.join(args.output_dir, "build_report.json")).read())
    assert saved == again and saved["args"]["guidance_scale"] == 2.5 and saved["held_out"]["motion"]["n"] == 2
    assert {k: saved[k] for k in ("flow_loss_last_250_steps", "build_seconds", "parameters")} == {
        k: built[k] for k in ("flow_loss_last_250_steps", "build_seconds", "parameters")}
    held_out = toy_video.evaluate_pipeline(pipe, toy_video.split_specs()[1], 2, 1, 2.5)
    assert saved["held_out"]["mix"] == pytest.approx(held_out["mix"])


def test_tiny_video_runs_the_whole_job_on_the_toy_video_world_with_replay(reduced_tiny_wan, tmp_path, monkeypatch):
    import toy_video

    args = Args(model="tiny-video", pretrained=reduced_tiny_wan[0].output_dir, iterations=3, prompts_per_iteration=2,
                group_size=4, off_policy_fraction=0.5, eval_every=3, eval_per_family=2, output_dir=str(tmp_path))
    rows = op_grpo.main(args)
    assert any(r["replayed_groups"] for r in rows) and all(math.isfinite(r["loss"]) for r in rows)
    assert {"eval/held_out/motion", "eval/held_out/pair", "eval/train/motion", "eval/train/pair"} <= set(rows[-1])
    assert all(0 <= rows[-1][f"eval/{s}/met/{k}"] <= 1 for s in ("held_out", "train") for k in ("shape", "motion"))
    assert all(0 <= rows[-1][f"eval/{s}"] <= 1 for s in ("held_out", "train"))
    sets = toy_video.eval_prompts(2)
    assert set(sets["held_out"]) <= {toy_video.describe(s) for s in toy_video.split_specs()[1]}
    assert (tmp_path / "before_after.png").exists() and (tmp_path / "transformer" / "config.json").exists()
    assert all(0 <= r["reward_mean"] <= 1 for r in rows)  # the dense motion reward
    with pytest.raises(plumbing.UsageError, match="--reward geneval scores the toy world of --model tiny: use it "
                                                  "there, without --prompt-file"):
        check_args(dataclasses.replace(args, reward="geneval", output_dir=str(tmp_path / "other")))
    monkeypatch.setitem(op_grpo.PRESETS["tiny-video"], "pretrained", str(tmp_path / "missing"))
    with pytest.raises(plumbing.UsageError, match="build it with `python toy_video.py`"):
        check_args(Args(model="tiny-video", output_dir=str(tmp_path / "other")))
