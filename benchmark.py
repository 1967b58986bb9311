"""OP-GRPO against on-policy Flow-GRPO on the toy GenEval task, the paper's ablations, and the late-step cliff.

  python benchmark.py                                    # 3 seeds + ablations, 11 runs: about 1.5 h on 2 CPU cores
  python benchmark.py --seeds 0 1 2 3 4 --investigate    # the README's results: 25 runs, about 3.6 h
  python benchmark.py --quick                            # a smoke run of every arm, a few minutes
  python benchmark.py --study                            # where replay pays: the pre-registered study (RESULTS.md)
  python benchmark.py --study --quick                    # its smoke run
  python benchmark.py --windows                          # SDE windows: learning per minute (RESULTS.md), ~70 min
  python benchmark.py --demo                             # the default run as a demo: 4 + 3 + 3 runs, ~1.5 h
  python benchmark.py --side-by-side                     # windows in both arms, 600 iterations: 15 runs, ~2.2 h
  python benchmark.py --video --eval-per-family 64        # the toy video world (--model tiny-video): 6 runs
  python benchmark.py --regime                           # replay in the paper's regime: 3 + 54 runs, ~8 h, resumable
  python benchmark.py --regime --made-only               # its summary so far, starting no run

Every run is `python op_grpo.py <flags> --threads 1` in a process of its own, `--parallel` (2) at a time: the two
arms of a seed run side by side, so that they share the machine's load and their wall-clock times compare.
A run whose metrics are complete is not run again, so an interrupted benchmark continues where it stopped.
Writes the results (JSON) and the plots: evaluation reward vs iteration and vs training seconds, the per-step
log p_old - log p_off of replayed trajectories, the time per iteration by stage, and (--investigate) one panel
per investigated setting.
"""

import contextlib
import gzip
import hashlib
import itertools
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import time
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import tyro

import plumbing

HERE = os.path.dirname(os.path.abspath(__file__))

# The two arms: the same fresh samples per iteration, the same iterations; OP-GRPO's defaults are op_grpo.py's.
ARMS = {"flow_grpo": ["--off-policy-fraction", "0"], "op_grpo": []}
# The paper's ablations of OP-GRPO (one seed each): rho 0.25 is the op_grpo arm itself.
ABLATIONS = {
    "no_correction": ["--correction", "none"],  # w = 1: no sequence-level importance weight
    "naive_ratio": ["--correction", "naive"],  # p_theta / p_off inside the clip
    "no_truncation": ["--truncate-steps", "0"],  # every step of a replayed trajectory is kept
    "rho_0.05": ["--off-policy-fraction", "0.05"],
    "rho_0.5": ["--off-policy-fraction", "0.5"],
}
# Investigation (--investigate): settings that might change the comparison. A setting with both arms runs
# Flow-GRPO and OP-GRPO under the same extra flags on the first n seeds; an OP-GRPO-only setting is compared
# with the main Flow-GRPO run of the same seed. name: (extra flags, arms, number of seeds)
INVESTIGATION = {
    # GenEval's own 0/1 score as the training reward: groups can be all 0 (no signal), which a replayed success fixes
    "strict_reward": (["--reward", "geneval_strict"], ("flow_grpo", "op_grpo"), 2),
    "lr_2e-4": (["--learning-rate", "2e-4"], ("flow_grpo", "op_grpo"), 1),
    "updates_4": (["--updates-per-batch", "4"], ("flow_grpo", "op_grpo"), 1),  # more, smaller steps per batch
    "decay_0": (["--reward-decay", "0"], ("op_grpo",), 1),  # the buffer keeps each prompt's best ever
    "decay_0.05": (["--reward-decay", "0.05"], ("op_grpo",), 1),  # entries go stale within ~10 iterations
}
PAPER_RATIO = 0.342  # OP-GRPO's steps to Flow-GRPO's final score, over Flow-GRPO's (paper, mean over tasks)
STAGES = ["time/sampling", "time/reward", "time/replay_old", "time/tail", "time/update"]  # what one iteration costs


@dataclass
class BenchArgs:
    """Flow-GRPO vs OP-GRPO on the embedded tiny SD3 (toy GenEval reward), with ablations."""

    quick: bool = False
    """smoke run: one seed, 4 iterations, tiny evaluations; writes under <output-dir>_quick, not to assets/"""
    seeds: tuple[int, ...] = (0, 1, 2)
    """seeds of the two main arms (the ablations use the first)"""
    iterations: int = 200
    """iterations of every run (the default run's budget)"""
    eval_every: int = 20
    """evaluation interval: the resolution of "iterations to reach" (0.1 of the budget)"""
    eval_per_family: int = 128
    """evaluation images per family and prompt set (1,024 per evaluation)"""
    investigate: bool = False
    """also run the INVESTIGATION settings (14 more runs with the defaults' seeds: about 2 hours)"""
    study: bool = False
    """run the study of where replay pays instead (STUDY_REGIMES: 0/1 reward, many flat groups); writes study_*"""
    windows: bool = False
    """run the SDE-window sweep and the default candidate's seeds instead (WINDOW_SWEEP); writes window_*"""
    demo: bool = False
    """run the sweep for the default run as a demo instead (DEMO_SWEEP, then 3 seeds of the best); writes demo_*"""
    side_by_side: bool = False
    """run the windows' side-by-side and longer horizon instead (SIDE_BY_SIDE, 3 seeds); writes side_by_side_*"""
    video: bool = False
    """run OP-GRPO against Flow-GRPO on the toy video world instead (--model tiny-video, VIDEO_SIDE_BY_SIDE, 3 seeds);
    writes video_side_by_side_*"""
    regime: bool = False
    """run replay in the paper's regime instead (REGIME_PILOT, then REGIME_ORDER, 3 seeds); writes regime_results.json"""
    made_only: bool = False
    """with --study or --regime: summarise the runs made so far (finished or archived), start none, and list the
    missing ones"""
    parallel: int = 2
    """runs at a time, one CPU thread each"""
    output_dir: str = "runs/benchmark"
    """the runs' output folders"""
    assets_dir: str = "assets"
    """where benchmark_results.json and the plots go"""


def finished(folder: str, args: BenchArgs) -> bool:
    rows = load_rows(folder)
    return len(rows) == args.iterations and "eval_reward" in rows[-1]


# The tiny preset until the fifth demo candidate became it (RESULTS.md): every study here was designed and run on it,
# so each run starts from it and its own flags change what they name (tiny-video's preset has the same values but 4
# prompts an iteration: its studies ran at 8 unless their flags say 4).
TINY_BEFORE = ["--sde-window", "0", "--learning-rate", "1e-4", "--group-size", "8", "--prompts-per-iteration", "8",
               "--ema-decay", "0"]


def run_one(name: str, seed: int, flags: list[str], args: BenchArgs) -> str:
    """One op_grpo.py run in its own process; skipped when its metrics are already complete."""
    folder = os.path.join(args.output_dir, f"{name}_seed{seed}")
    if finished(folder, args):
        return folder
    command = [sys.executable, os.path.join(HERE, "op_grpo.py"), "--output-dir", folder, "--overwrite", "--seed", str(seed),
               "--iterations", str(args.iterations), "--eval-every", str(args.eval_every),
               "--eval-per-family", str(args.eval_per_family), "--threads", "1", "--checkpoint-every", "0", *TINY_BEFORE,
               *flags]
    os.makedirs(folder, exist_ok=True)
    clock = time.perf_counter()
    with open(os.path.join(folder, "log.txt"), "w") as log:
        subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=True)
    with open(os.path.join(folder, "process_seconds.txt"), "w") as f:  # the whole process: loading and evaluations
        f.write(f"{time.perf_counter() - clock:.1f}\n")
    print(f"  done: {name} seed {seed}", flush=True)
    return folder


def load_rows(folder: str) -> list[dict]:
    path = os.path.join(folder, "metrics.jsonl")
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def curve(rows: list[dict]) -> dict:
    """Evaluation points of a run: iterations trained, eval_reward, and training seconds (evaluation excluded)."""
    train_seconds = np.cumsum([sum(r.get(k, 0.0) for k in STAGES) for r in rows])
    points = [(0, rows[0]["eval_reward"], 0.0)]  # row 0 carries the evaluation before any update
    points += [(r["iteration"] + 1, r["eval_reward"], float(train_seconds[i])) for i, r in enumerate(rows) if "time/eval" in r]
    iterations, reward, seconds = (list(x) for x in zip(*points))
    return {"iterations": iterations, "eval_reward": reward, "train_seconds": seconds, "final_se": rows[-1]["eval_se"],
            "final_change": rows[-1]["eval_change"], "final_change_se": rows[-1]["eval_change_se"]}


def first_reach(c: dict, target: float):
    """(iterations, seconds) at the first evaluation of curve c at or above target; None if never."""
    for it, reward, seconds in zip(c["iterations"], c["eval_reward"], c["train_seconds"]):
        if it > 0 and reward >= target:
            return it, seconds
    return None


def mean_of(rows: list[dict], key: str):
    values = [r[key] for r in rows if r.get(key) is not None]
    return float(np.mean(values)) if values else None


def mean_se(values: list[float]) -> tuple[float, float | None]:
    """Mean and its standard error over seeds; the SE is None for a single seed (not NaN: JSON has no NaN)."""
    return float(np.mean(values)), float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else None


def seed_stat(values: list[float]) -> dict:
    """{"mean", "se_over_seeds"} of per-seed values (mean_se as the results JSON stores it)."""
    return dict(zip(("mean", "se_over_seeds"), mean_se(values)))


def pm(stat: dict, sign: str = "+") -> str:
    """'mean +- SE' of a {"mean", "se_over_seeds"} entry, or 'mean (one seed: no SE)'."""
    se = stat["se_over_seeds"]
    return f"{stat['mean']:{sign}.3f} " + ("(one seed: no SE)" if se is None else f"+- {se:.3f}")


def compare(flow: dict, op: dict) -> dict:
    """One Flow-GRPO curve against one OP-GRPO curve (same seed and settings)."""
    reached = first_reach(op, flow["eval_reward"][-1])
    flow_mean, op_mean = float(np.mean(flow["eval_reward"][1:])), float(np.mean(op["eval_reward"][1:]))
    # what the paper's speed-up would look like here: OP-GRPO's curve = Flow-GRPO's, time-compressed by 0.342
    # (linear interpolation between evaluations, flat after the end)
    x = np.array(flow["iterations"][1:])
    compressed = np.interp(np.minimum(x / PAPER_RATIO, x[-1]), flow["iterations"], flow["eval_reward"])
    return {
        "flow_grpo_final": flow["eval_reward"][-1], "op_grpo_final": op["eval_reward"][-1],
        "flow_grpo_final_se": flow["final_se"], "op_grpo_final_se": op["final_se"],
        "flow_grpo_change": flow["final_change"], "op_grpo_change": op["final_change"],
        "change_se": max(flow["final_change_se"], op["final_change_se"]),
        # the paper's measure: OP-GRPO's iterations (and time) to Flow-GRPO's final score, over Flow-GRPO's
        "iteration_ratio": reached[0] / flow["iterations"][-1] if reached else None,
        "wall_clock_ratio": reached[1] / flow["train_seconds"][-1] if reached else None,
        "flow_grpo_mean_curve": flow_mean, "op_grpo_mean_curve": op_mean, "mean_curve_difference": op_mean - flow_mean,
        "paper_implied_curve_difference": float(np.mean(compressed)) - flow_mean,
    }


def median_or_none(values: list) -> float | None:
    """The median, counting None (never reached) as infinitely slow; None if that is the median."""
    value = statistics.median([v if v is not None else math.inf for v in values])
    return None if math.isinf(value) else value


def summarise(args: BenchArgs, folders: dict) -> dict:
    rows = {key: load_rows(folder) for key, folder in folders.items()}
    curves = {key: curve(r) for key, r in rows.items()}
    per_seed = [{"seed": seed, **compare(curves[("flow_grpo", seed)], curves[("op_grpo", seed)])} for seed in args.seeds]

    finals = {arm: mean_se([s[f"{arm}_final"] for s in per_seed]) for arm in ARMS}
    difference = mean_se([s["op_grpo_final"] - s["flow_grpo_final"] for s in per_seed])
    curve_difference = mean_se([s["mean_curve_difference"] for s in per_seed])
    ablations = {}
    for name in ["op_grpo", *ABLATIONS]:
        r = rows[(name, args.seeds[0])]
        ablations[name] = {
            "final_eval_reward": r[-1]["eval_reward"], "eval_change": r[-1]["eval_change"], "eval_change_se": r[-1]["eval_change_se"],
            "clipfrac_off_policy": mean_of(r, "clipfrac_off_policy"), "clipfrac_on_policy": mean_of(r, "clipfrac_on_policy"),
            "is_weight_mean": mean_of(r, "is_weight_mean"), "is_weight_min": min((x["is_weight_min"] for x in r if "is_weight_min" in x), default=None),
            "replayed_groups_per_iteration": mean_of(r, "replayed_groups"),
        }
    investigation = {}
    for setting, (flags, arms, n_seeds) in (INVESTIGATION.items() if args.investigate else ()):
        investigation[setting] = {"flags": flags, "arms": list(arms), "per_seed": []}
        for seed in args.seeds[:n_seeds]:
            flow_key = (f"{setting}_flow_grpo" if "flow_grpo" in arms else "flow_grpo", seed)
            investigation[setting]["per_seed"].append({
                "seed": seed, "flow_grpo_run": f"{flow_key[0]}_seed{seed}", "op_grpo_run": f"{setting}_op_grpo_seed{seed}",
                **compare(curves[flow_key], curves[(f"{setting}_op_grpo", seed)]),
                "flat_groups": {arm: mean_of(rows[key], "flat_groups") for arm, key in (("flow_grpo", flow_key), ("op_grpo", (f"{setting}_op_grpo", seed)))},
                "clipfrac_off_policy": mean_of(rows[(f"{setting}_op_grpo", seed)], "clipfrac_off_policy"),
            })
    # the cliff: per step, mean over iterations of the mean and of the spread over replayed trajectories
    replayed = [x for seed in args.seeds for x in rows[("op_grpo", seed)] if "log_ratio_old_behavior_per_step" in x]
    cliff = {"mean": np.mean([x["log_ratio_old_behavior_per_step"] for x in replayed], axis=0).tolist(),
             "spread": np.mean([x["log_ratio_old_behavior_per_step_std"] for x in replayed], axis=0).tolist(),
             "replayed_iterations": len(replayed)}
    times = {arm: {k: mean_of([x for seed in args.seeds for x in rows[(arm, seed)]], k) or 0.0 for k in STAGES} for arm in ARMS}
    return {
        "config": {**asdict(args), "arms": ARMS, "ablations": ABLATIONS, "investigation": INVESTIGATION if args.investigate else {}},
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "threads_per_run": 1, "runs_at_a_time": args.parallel},
        "per_seed": per_seed,
        "median_iteration_ratio": median_or_none([s["iteration_ratio"] for s in per_seed]),
        "median_wall_clock_ratio": median_or_none([s["wall_clock_ratio"] for s in per_seed]),
        "targets": {"iteration_ratio": 0.30, "wall_clock_ratio": 0.40, "paper_iteration_ratio": PAPER_RATIO},
        "final_eval_reward": {arm: {"mean": m, "se_over_seeds": se} for arm, (m, se) in finals.items()},
        "final_difference": {"mean": difference[0], "se_over_seeds": difference[1]},
        "mean_curve_difference": {"mean": curve_difference[0], "se_over_seeds": curve_difference[1]},
        "paper_implied_curve_difference": seed_stat([s["paper_implied_curve_difference"] for s in per_seed]),
        # per seed, paper-implied minus measured: how far the measured curves are from the paper's claim
        "shortfall_from_paper": seed_stat([s["paper_implied_curve_difference"] - s["mean_curve_difference"] for s in per_seed]),
        "ablations": ablations, "investigation": investigation, "cliff": cliff, "seconds_per_iteration": times,
        "curves": {f"{name}_seed{seed}": c for (name, seed), c in curves.items()},
    }


def plot(results: dict, args: BenchArgs, truncate_steps: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for arm, colour in (("flow_grpo", "tab:blue"), ("op_grpo", "tab:red")):
        runs = [results["curves"][f"{arm}_seed{s}"] for s in args.seeds]
        reward = np.array([c["eval_reward"] for c in runs])
        for ax, x in ((axes[0], np.array(runs[0]["iterations"])), (axes[1], np.mean([c["train_seconds"] for c in runs], axis=0))):
            ax.plot(x, reward.mean(0), color=colour, label=f"{arm} (mean of {len(runs)} seeds)")
            ax.fill_between(x, reward.min(0), reward.max(0), color=colour, alpha=0.2)
    axes[0].set_xlabel("iteration")
    axes[1].set_xlabel("training seconds (evaluation excluded, mean over seeds)")
    for ax in axes:
        ax.set_ylabel("eval_reward (strict toy GenEval)")
        ax.grid(alpha=0.3)
        ax.legend()
    figure.suptitle("OP-GRPO vs on-policy Flow-GRPO, tiny SD3, band = min..max over seeds")
    figure.tight_layout()
    figure.savefig(os.path.join(args.assets_dir, "benchmark_curves.png"), dpi=110)

    figure, ax = plt.subplots(figsize=(6.5, 4))
    cliff = results["cliff"]
    steps = np.arange(len(cliff["mean"]))
    ax.errorbar(steps, cliff["mean"], yerr=cliff["spread"], fmt="o-", capsize=3, label="mean +- spread over replayed trajectories")
    ax.axvline(len(steps) - truncate_steps - 0.5, color="grey", linestyle="--", label=f"truncation: last {truncate_steps} steps regenerated")
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_xlabel("denoising step k (0 = pure noise)")
    ax.set_ylabel("log p_old - log p_off (per-dimension mean)")
    ax.set_title("Late-step cliff (paper Fig. 2) on the tiny SD3")
    ax.legend()
    figure.tight_layout()
    figure.savefig(os.path.join(args.assets_dir, "benchmark_cliff.png"), dpi=110)

    figure, ax = plt.subplots(figsize=(6.5, 3))
    left = np.zeros(len(ARMS))
    for stage in STAGES:
        width = np.array([results["seconds_per_iteration"][arm][stage] for arm in ARMS])
        ax.barh(list(ARMS), width, left=left, label=stage.removeprefix("time/"))
        left += width
    ax.set_xlabel("seconds per iteration (1 CPU thread)")
    ax.legend(fontsize=8, ncol=3)
    figure.tight_layout()
    figure.savefig(os.path.join(args.assets_dir, "benchmark_time.png"), dpi=110)


    if results["investigation"]:  # one panel per setting: its Flow-GRPO and OP-GRPO curves, mean over its seeds
        settings = results["investigation"]
        figure, axes = plt.subplots(1, len(settings), figsize=(3.3 * len(settings), 3.4), sharey=True, squeeze=False)
        for ax, (setting, inv) in zip(axes[0], settings.items()):
            for key, colour in (("flow_grpo_run", "tab:blue"), ("op_grpo_run", "tab:red")):
                names = [s[key] for s in inv["per_seed"]]
                runs = [results["curves"][n] for n in names]
                ax.plot(runs[0]["iterations"], np.mean([c["eval_reward"] for c in runs], axis=0), color=colour,
                        label=f"{names[0].rsplit('_seed', 1)[0]} ({len(runs)} seed{'s' * (len(runs) > 1)})")
            ax.set_title(setting)
            ax.set_xlabel("iteration")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        axes[0][0].set_ylabel("eval_reward (strict toy GenEval)")
        figure.tight_layout()
        figure.savefig(os.path.join(args.assets_dir, "benchmark_investigation.png"), dpi=110)


def report(results: dict) -> None:
    fmt = lambda x: "not reached" if x is None else f"{x:.2f}"
    print("\nseed  Flow-GRPO final  OP-GRPO final  iteration ratio  wall-clock ratio")
    for s in results["per_seed"]:
        print(f"{s['seed']:4d}  {s['flow_grpo_final']:15.3f}  {s['op_grpo_final']:13.3f}  {fmt(s['iteration_ratio']):>15s}  {fmt(s['wall_clock_ratio']):>16s}")
    print(f"median iteration ratio {fmt(results['median_iteration_ratio'])} (target <= 0.30, paper 0.342); "
          f"median wall-clock ratio {fmt(results['median_wall_clock_ratio'])} (target <= 0.40)")
    d, c = results["final_difference"], results["mean_curve_difference"]
    print(f"final OP - Flow: {pm(d)}; mean over the curve: {pm(c)} (SE over seeds)")
    p = results["paper_implied_curve_difference"]
    q = results["shortfall_from_paper"]
    print(f"the paper's speed-up (ratio {PAPER_RATIO}) would make the curve-mean difference {pm(p)}; "
          f"shortfall (paired over seeds) {pm(q, '')}")
    print("\nablation         final  change   clipfrac off  clipfrac on  IS weight mean")
    for name, a in results["ablations"].items():
        print(f"{name:15s} {a['final_eval_reward']:6.3f} {a['eval_change']:+7.3f}   {fmt(a['clipfrac_off_policy']):>11s}  {fmt(a['clipfrac_on_policy']):>11s}  {fmt(a['is_weight_mean']):>14s}")
    if results["investigation"]:
        print("\nsetting        seed  Flow final (change)  OP final (change)  +-SE   ratio        curve OP-Flow  flat groups Flow/OP")
    for setting, inv in results["investigation"].items():
        for s in inv["per_seed"]:
            flat = {arm: "-" if x is None else f"{x:.2f}" for arm, x in s["flat_groups"].items()}
            print(f"{setting:14s} {s['seed']:4d}  {s['flow_grpo_final']:.3f} ({s['flow_grpo_change']:+.3f})      {s['op_grpo_final']:.3f} ({s['op_grpo_change']:+.3f})"
                  f"    {s['change_se']:.3f}  {fmt(s['iteration_ratio']):>11s}  {s['mean_curve_difference']:+.3f}         {flat['flow_grpo']}/{flat['op_grpo']}")


# ---------------------------------------------------------------------------------------------------------
# The study: OP-GRPO against Flow-GRPO where all-fail groups are common. Every setting below but phase 4's was fixed
# before any comparison was run (RESULTS.md, "When does replay pay?").
# ---------------------------------------------------------------------------------------------------------
BANDS = {name: os.path.join(HERE, "assets", f"band_{name}.txt") for name in ("hard", "count_bind")}
STRICT = ["--reward", "geneval_strict"]  # GenEval's 0/1: a group can be all 0
STUDY_REGIMES = {  # name: flags; every regime samples 64 images per iteration, as the default run
    "A_hard_G8": ["--toy-prompts", BANDS["hard"], *STRICT],  # base success in (0, 0.15]
    "B_G4": ["--toy-prompts", BANDS["count_bind"], *STRICT, "--group-size", "4", "--prompts-per-iteration", "16"],
    "B_G2": ["--toy-prompts", BANDS["count_bind"], *STRICT, "--group-size", "2", "--prompts-per-iteration", "32"],
}
# in the regime whose Flow-GRPO arm learns most (mean change over seeds): more replay, and the prompt-replay control
STUDY_FOLLOW_UP = {"op_rho_0.5": ["--off-policy-fraction", "0.5"],
                   "prompt_replay_rho_0.5": ["--off-policy-fraction", "0.5", "--replay", "prompt"]}
# a regime whose Flow-GRPO arm does not learn (learns() false) tries each step alone on seed 0 (chosen_tuning)
STUDY_TUNING = {"lr_2e-4": ["--learning-rate", "2e-4"], "kl_0": ["--kl-beta", "0"]}
STUDY_SEEDS, STUDY_EXTRA_SEEDS = (0, 1, 2), (3, 4)  # the largest effect after 3 seeds gets 2 more
# Phase 4, fixed after phases 1-3 (so its regimes were chosen knowing their results): comparison 5, buffer draws
# weighted 4:1 toward prompts whose last fresh group all failed while a success is stored, in both B regimes; and the
# prompt-replay control at OP-GRPO's rho 0.25 in B with G 2, where replay helped. regime: {variant: flags}
STUDY_LATER = {"B_G2": {"op_failed_x4": ["--failed-weight", "4"], "prompt_replay": ["--replay", "prompt"]},
               "B_G4": {"op_failed_x4": ["--failed-weight", "4"]}}
# Phase 5, a replication fixed after phase 4: the regime where replay helped gets seeds 3 and 4 of these variants
STUDY_REPLICATION = {"B_G2": ("flow_grpo", "op_grpo", "prompt_replay")}
# paired over seeds, within a regime: (regime, variant, reference); curve-mean and final differences, variant - reference
STUDY_CONTRASTS = [("B_G4", "op_rho_0.5", "prompt_replay_rho_0.5"), ("B_G2", "op_grpo", "prompt_replay"),
                   ("B_G2", "op_failed_x4", "op_grpo"), ("B_G4", "op_failed_x4", "op_grpo")]
STUDY_ARCHIVE = os.path.join(HERE, "assets", "study_runs")  # finished runs' metrics, committed as they come
DIAGNOSTICS = ["flat_groups", "flat_all_fail", "flat_all_pass", "rescued_groups", "replay_minus_best_fresh",
               "log_is_weight_p10", "log_is_weight_p50", "log_is_weight_p90", "clipfrac_off_policy", "replayed_groups",
               "clipfrac_on_policy", "log_is_weight_summed_p50", "replay_advantage_mean", "replay_advantage_at_clip",
               "replay_rescored_minus_stored", "replay_age_mean", "buffer_size", "buffer_admitted", "is_weight_mean"]


def measure_base(samples: int = 16, seed: int = 0) -> dict[str, float]:
    """Strict success of the base model per toy-world prompt (training and held-out): `samples` SDE samples each
    (noise 0.7, 10 steps, as in training), scored by the verifier. Writes the two bands of the study."""
    import op_grpo
    import toy_world

    args = op_grpo.with_presets(op_grpo.Args(seed=seed))
    torch.manual_seed(seed)
    prompts = sorted(toy_world.SPEC_BY_PROMPT)
    model = op_grpo.load_model(args, torch.device("cpu"), prompts)
    generator, success = torch.Generator().manual_seed(seed), {}
    for start in range(0, len(prompts), 4):
        chunk = [p for p in prompts[start : start + 4] for _ in range(samples)]
        noise = torch.randn((len(chunk), *model.shape), generator=generator)
        latents, _ = op_grpo.sample_trajectories(model, noise, model.sigmas, 0, chunk, args.noise_level,
                                                 args.guidance_scale, 0, generator)
        scores = toy_world.geneval_strict_reward(op_grpo.decode(model.pipe, latents[:, -1]), chunk)
        for i, prompt in enumerate(prompts[start : start + 4]):
            success[prompt] = float(scores[i * samples : (i + 1) * samples].mean())
    families = {p: toy_world.SPEC_BY_PROMPT[p].family for p in prompts}
    bands = {"hard": [p for p in prompts if 0 < success[p] <= 0.15],
             "count_bind": [p for p in prompts if families[p] in ("counting", "binding")]}
    for name, band in bands.items():
        with open(BANDS[name], "w") as f:
            f.write(f"# {name}: {len(band)} toy-world prompts; rule and measurement in assets/base_success.json\n")
            f.writelines(p + "\n" for p in band)
    return {"samples_per_prompt": samples, "seed": seed, "noise_level": args.noise_level, "num_steps": args.num_steps,
            "rule": {"hard": "0 < success <= 0.15", "count_bind": "families counting and binding"},
            "band_sizes": {k: len(v) for k, v in bands.items()}, "success": success}


def study_summary(folders: dict) -> dict:
    """Per comparison (a regime's Flow-GRPO arm against one OP-GRPO variant, same seeds): compare() per seed, the
    finals and changes, median ratios and the curve-mean difference with SEs over seeds; per run its diagnostics."""
    rows = {key: load_rows(folder) for key, folder in folders.items()}
    curves = {key: curve(r) for key, r in rows.items()}
    comparisons = {}
    for (name, seed), c in sorted(curves.items()):
        regime, variant = name.split("/")
        if variant != "flow_grpo" and (f"{regime}/flow_grpo", seed) in curves:
            entry = comparisons.setdefault(f"{regime}: {variant} vs flow_grpo",
                                           {"regime": regime, "variant": variant, "per_seed": []})
            entry["per_seed"].append({"seed": seed, **compare(curves[(f"{regime}/flow_grpo", seed)], c)})
    for entry in comparisons.values():
        per_seed = entry["per_seed"]
        entry["median_iteration_ratio"] = median_or_none([x["iteration_ratio"] for x in per_seed])
        entry["median_wall_clock_ratio"] = median_or_none([x["wall_clock_ratio"] for x in per_seed])
        for k in ("flow_grpo_final", "op_grpo_final", "flow_grpo_change", "op_grpo_change", "mean_curve_difference"):
            entry[k] = seed_stat([x[k] for x in per_seed])
    contrasts = {}  # two variants of one regime, paired by seed (the seeds both have)
    for regime, variant, reference in STUDY_CONTRASTS:
        pairs = [(curves[(f"{regime}/{reference}", s)], c) for (n, s), c in sorted(curves.items())
                 if n == f"{regime}/{variant}" and (f"{regime}/{reference}", s) in curves]
        if pairs:
            per_seed = [compare(ref, c) for ref, c in pairs]
            gaps = [x["mean_curve_difference"] for x in per_seed]
            contrasts[f"{regime}: {variant} − {reference}"] = {
                "seeds": len(pairs), "curve": seed_stat(gaps), "curve_per_seed": gaps,
                "final": seed_stat([x["op_grpo_final"] - x["flow_grpo_final"] for x in per_seed])}
    return {"comparisons": comparisons, "contrasts": contrasts,
            "runs": {f"{n}_seed{s}": {k: mean_of(r, k) for k in DIAGNOSTICS} for (n, s), r in rows.items()},
            "curves": {f"{n}_seed{s}": c for (n, s), c in curves.items()},
            "diagnostics_per_iteration": {f"{n}_seed{s}": {k: [x.get(k) for x in r] for k in DIAGNOSTICS}
                                          for (n, s), r in rows.items()}}


def learns(changes: list[float]) -> bool:
    """The pre-registered check that a baseline learns: mean change over seeds at least three SEs over seeds."""
    mean, se = mean_se(changes)
    return se is not None and mean >= 3 * se


def chosen_tuning(default_change: float, step_changes: dict[str, float]) -> str | None:
    """The tuning step with the largest seed-0 change if it beats the default's seed-0 change, else None."""
    best = max(step_changes, key=step_changes.get)
    return best if step_changes[best] > default_change else None


def run_archived(name: str, seed: int, flags: list[str], args: BenchArgs, archive: str = STUDY_ARCHIVE) -> str:
    """run_one for the study, with an archive that outlives the machine: a finished run is restored from
    <archive>/<run>_<flags digest>.jsonl.gz (and its process seconds) when its folder lacks metrics, and archived
    there once finished (not in --quick). A folder that already holds a finished run is reused as run_one does,
    whatever its flags."""
    folder = f"{name.replace('/', '_')}_seed{seed}"
    # the archive name carries a digest of the flags (paths relative to this folder): other flags, another run
    digest = hashlib.sha1(" ".join(f.replace(HERE + os.sep, "") for f in flags).encode()).hexdigest()[:8]
    stored = os.path.join(archive, f"{folder}_{digest}.jsonl.gz")
    rows_path = os.path.join(args.output_dir, folder, "metrics.jsonl")
    seconds = stored.removesuffix(".jsonl.gz") + ".process_seconds.txt"  # run_one's timing of the whole process
    seconds_path = os.path.join(os.path.dirname(rows_path), "process_seconds.txt")
    if not args.quick and os.path.exists(stored) and not os.path.exists(rows_path):
        os.makedirs(os.path.dirname(rows_path), exist_ok=True)
        with gzip.open(stored, "rt") as f, open(rows_path, "w") as out:
            out.write(f.read())
        if os.path.exists(seconds):
            shutil.copyfile(seconds, seconds_path)
    if args.made_only and not finished(os.path.dirname(rows_path), args):
        return None
    done = run_one(folder.rsplit("_seed", 1)[0], seed, flags, args)
    if not args.quick and not os.path.exists(stored):
        os.makedirs(archive, exist_ok=True)
        with open(rows_path) as f, gzip.open(stored, "wt") as out:
            out.write(f.read())
        if os.path.exists(seconds_path):
            shutil.copyfile(seconds_path, seconds)
    return done


def run_study(args: BenchArgs) -> dict:
    """Phase 1: every regime's Flow-GRPO arm, 3 seeds, and the tuning of a regime where it does not learn; then
    both arms of every (tuned) regime, 3 seeds. Phase 2: in the regime whose Flow-GRPO learns most (mean change),
    rho 0.5 and the prompt-replay control. Phase 3: the comparison with the largest |curve-mean difference| / SE
    gets 2 more seeds (both of its arms). Phase 4: STUDY_LATER, 3 seeds each. Phase 5: STUDY_REPLICATION."""
    if not all(os.path.exists(band) for band in BANDS.values()):
        base = measure_base()
        with open(os.path.join(HERE, "assets", "base_success.json"), "w") as f:
            json.dump(base, f, indent=1)
    seeds = STUDY_SEEDS[:1] if args.quick else STUDY_SEEDS
    regimes = dict(STUDY_REGIMES)
    flags = {f"{regime}/flow_grpo": regime_flags + ARMS["flow_grpo"] for regime, regime_flags in regimes.items()}

    missing = []  # runs not made yet (--made-only)

    def run(jobs: list) -> dict:  # [(name, seed)] -> {(name, seed): folder}, args.parallel at a time
        with ThreadPoolExecutor(args.parallel) as pool:
            done = dict(zip(jobs, pool.map(lambda job: run_archived(*job, flags[job[0]], args), jobs)))
        missing.extend(f"{name} seed {seed}" for (name, seed), folder in done.items() if folder is None)
        return {job: folder for job, folder in done.items() if folder is not None}

    def changes(regime: str, of_seeds: tuple = seeds) -> list[float]:  # Flow-GRPO's, over the seeds made
        runs = [(f"{regime}/flow_grpo", seed) for seed in of_seeds]
        return [load_rows(folders[run])[-1]["eval_change"] for run in runs if run in folders]

    # the baseline first: a regime whose Flow-GRPO arm does not learn is tuned on seed 0, each step alone; a chosen
    # step replaces it as a regime of its own (its seed-0 run is the tuning run)
    folders = run([(f"{regime}/flow_grpo", seed) for seed in seeds for regime in regimes])
    tuning, current = {}, {regime: regime for regime in regimes}  # a regime's name, tuned or not
    for regime in STUDY_REGIMES:
        if learns(changes(regime)):
            continue
        trials = {f"{regime}_{label}": STUDY_REGIMES[regime] + step for label, step in STUDY_TUNING.items()}
        flags.update({f"{trial}/flow_grpo": trial_flags + ARMS["flow_grpo"] for trial, trial_flags in trials.items()})
        folders |= run([(f"{trial}/flow_grpo", seeds[0]) for trial in trials])
        seed0 = {t: changes(t, seeds[:1]) for t in [regime, *trials]}
        if not all(seed0.values()):
            continue  # not all made yet (--made-only)
        pick = chosen_tuning(seed0[regime][0], {trial: seed0[trial][0] for trial in trials})
        tuning[regime] = {"seed0_change": {t: c[0] for t, c in seed0.items()}, "chosen": pick}
        if pick:  # the tuned regime takes the untuned one's place (the order of runs and plot columns)
            regimes = {pick if r == regime else r: trials[pick] if r == regime else f for r, f in regimes.items()}
            current[regime] = pick
    flags.update({f"{regime}/{arm}": regime_flags + ARMS[arm]
                  for regime, regime_flags in regimes.items() for arm in ARMS})
    folders |= run([(f"{regime}/{arm}", seed) for seed in seeds for regime in regimes for arm in ARMS])
    mean_change = {r: float(np.mean(c)) for r in regimes if (c := changes(r))}
    follow_up = max(mean_change, key=mean_change.get)
    flags.update({f"{follow_up}/{v}": regimes[follow_up] + f for v, f in STUDY_FOLLOW_UP.items()})
    folders |= run([(f"{follow_up}/{v}", seed) for seed in seeds for v in STUDY_FOLLOW_UP])
    summary = study_summary(folders)

    def strength(entry):
        d = entry["mean_curve_difference"]
        return abs(d["mean"]) / d["se_over_seeds"] if d["se_over_seeds"] else abs(d["mean"])

    # phase 3 is chosen only once phases 1 and 2 are complete (with --made-only they may not be)
    largest = max(summary["comparisons"].values(), key=strength) if not missing else None
    if largest and not args.quick:
        names = [f"{largest['regime']}/flow_grpo", f"{largest['regime']}/{largest['variant']}"]
        folders |= run([(name, seed) for seed in STUDY_EXTRA_SEEDS for name in names])
    # phase 4: comparison 5 and the control where replay helped, on the (tuned) regimes' flags
    later = {f"{current[r]}/{v}": regimes[current[r]] + f for r, vs in STUDY_LATER.items() if r in current
             for v, f in vs.items()}
    flags.update(later)
    folders |= run([(name, seed) for seed in seeds for name in later])  # by seed: a cut loses seeds, not comparisons
    if not args.quick:  # phase 5: the replication, on the same flags as the first seeds
        folders |= run([(f"{current[r]}/{v}", seed) for r, vs in STUDY_REPLICATION.items() if r in current
                        for seed in STUDY_EXTRA_SEEDS for v in vs])
    summary = study_summary(folders)
    summary["missing"] = missing
    summary["choices"] = {"tuning": tuning, "flow_grpo_mean_change": mean_change, "follow_up_regime": follow_up,
                          "extra_seeds_for": largest and f"{largest['regime']}: {largest['variant']} vs flow_grpo"}
    summary["config"] = {**asdict(args), "regimes": regimes, "tuning": STUDY_TUNING, "follow_up": STUDY_FOLLOW_UP,
                         "later": STUDY_LATER, "replication": STUDY_REPLICATION, "contrasts": STUDY_CONTRASTS,
                         "flags": flags}
    return summary


def plot_study(summary: dict, assets_dir: str) -> None:
    """study_curves.png: per regime, eval reward against iteration and training seconds (mean, min..max over
    seeds) for every variant; study_diagnostics.png: per regime, the mechanism's numbers over iterations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regimes = list(summary["config"]["regimes"])  # tuned or not; the tuning trials are in the tables only
    colours = {"flow_grpo": "tab:blue", "op_grpo": "tab:red", "op_rho_0.5": "tab:orange",
               "prompt_replay_rho_0.5": "tab:purple", "op_failed_x4": "tab:green", "prompt_replay": "tab:brown"}
    variants = {r: sorted({k.rsplit("_seed", 1)[0] for k in summary["curves"] if k.startswith(r + "/")})
                for r in regimes}
    runs_of = lambda variant: [k for k in summary["curves"] if k.rsplit("_seed", 1)[0] == variant]  # noqa: E731
    figure, axes = plt.subplots(2, len(regimes), figsize=(4.2 * len(regimes), 7), squeeze=False)
    for col, regime in enumerate(regimes):
        for variant in variants[regime]:
            runs = [summary["curves"][k] for k in runs_of(variant)]
            reward = np.array([c["eval_reward"] for c in runs])
            for row, x in enumerate((runs[0]["iterations"], np.mean([c["train_seconds"] for c in runs], axis=0))):
                colour = colours[variant.split("/")[1]]
                label = f"{variant.split('/')[1]} ({len(runs)} seed{'s' * (len(runs) != 1)})"
                axes[row][col].plot(x, reward.mean(0), color=colour, label=label)
                axes[row][col].fill_between(x, reward.min(0), reward.max(0), color=colour, alpha=0.15)
        axes[0][col].set_title(regime)
        axes[0][col].set_xlabel("iteration")
        axes[1][col].set_xlabel("training seconds (mean over seeds)")
        axes[0][col].legend(fontsize=7)
    for ax in axes.flat:
        ax.set_ylabel("strict eval reward (band)")
        ax.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(os.path.join(assets_dir, "study_curves.png"), dpi=110)

    keys = ["flat_all_fail", "rescued_groups", "replay_minus_best_fresh", "log_is_weight_p10", "clipfrac_off_policy"]
    figure, axes = plt.subplots(len(keys), len(regimes), figsize=(4.2 * len(regimes), 2.2 * len(keys)), squeeze=False)
    for col, regime in enumerate(regimes):
        for variant in variants[regime]:
            for row, key in enumerate(keys):
                series = [summary["diagnostics_per_iteration"][k][key] for k in runs_of(variant)]
                values = np.array([[np.nan if v is None else v for v in s] for s in series], dtype=float)
                counts = (~np.isnan(values)).sum(axis=0)
                if not counts.any():
                    continue  # not logged for this variant (Flow-GRPO has no replayed trajectory)
                mean = np.nansum(values, axis=0) / np.maximum(counts, 1)  # over seeds; then a 10-iteration running
                logged = np.flatnonzero(counts)  # mean over the iterations where it was logged
                smooth = mean[logged]
                if len(logged) >= 10:
                    smooth = np.convolve(smooth, np.ones(10) / 10, mode="valid")
                axes[row][col].plot(logged[len(logged) - len(smooth):], smooth, color=colours[variant.split("/")[1]],
                                    label=variant.split("/")[1], linewidth=1)
                axes[row][col].set_ylabel(key, fontsize=7)
        axes[0][col].set_title(regime)
        for ax in axes[:, col]:
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=6)
    for ax in axes[-1]:
        ax.set_xlabel("iteration")
    figure.tight_layout()
    figure.savefig(os.path.join(assets_dir, "study_diagnostics.png"), dpi=110)


def study_tables(summary: dict) -> str:
    """The study's Markdown tables: one row per comparison with Flow-GRPO, one per contrast of two variants, one per
    run (its mechanism's numbers)."""
    ratio = lambda x: "never" if x is None else f"{x:.2f}"  # noqa: E731
    num = lambda x, f="+.3f": "–" if x is None else format(x, f)  # noqa: E731
    lines = ["| comparison | seeds | final Flow / OP | change Flow / OP | iteration ratio per seed (median) | "
             "wall-clock ratio per seed (median) | curve OP − Flow |", "|---|---|---|---|---|---|---|"]
    for key, e in summary["comparisons"].items():
        per_seed = e["per_seed"]
        lines.append(f"| {key} | {len(per_seed)} | {pm(e['flow_grpo_final'], '')} / {pm(e['op_grpo_final'], '')} | "
                     f"{pm(e['flow_grpo_change'])} / {pm(e['op_grpo_change'])} | "
                     f"{', '.join(ratio(x['iteration_ratio']) for x in per_seed)} "
                     f"({ratio(e['median_iteration_ratio'])}) | "
                     f"{', '.join(ratio(x['wall_clock_ratio']) for x in per_seed)} "
                     f"({ratio(e['median_wall_clock_ratio'])}) | {pm(e['mean_curve_difference'])} |")
    if summary.get("contrasts"):
        lines += ["", "| contrast (paired by seed) | seeds | curve, per seed | curve | final |", "|---|---|---|---|---|"]
        lines += [f"| {key} | {c['seeds']} | {', '.join(f'{x:+.3f}' for x in c['curve_per_seed'])} | {pm(c['curve'])} | "
                  f"{pm(c['final'])} |" for key, c in summary["contrasts"].items()]
    lines += ["", "| run | change ± paired SE | flat groups (all-fail / all-pass) | rescued groups | replayed − best "
              "fresh | log w p10 / p50 / p90 | off-policy clip | s / iteration |", "|---|---|---|---|---|---|---|---|"]
    for run, d in sorted(summary["runs"].items()):
        c = summary["curves"][run]
        lines.append(f"| `{run}` | {c['final_change']:+.3f} ± {c['final_change_se']:.3f} | {num(d['flat_groups'], '.2f')} "
                     f"({num(d['flat_all_fail'], '.2f')} / {num(d['flat_all_pass'], '.2f')}) | "
                     f"{num(d['rescued_groups'], '.2f')} | {num(d['replay_minus_best_fresh'])} | "
                     f"{num(d['log_is_weight_p10'])} / {num(d['log_is_weight_p50'])} / {num(d['log_is_weight_p90'])} | "
                     f"{num(d['clipfrac_off_policy'], '.3f')} | {c['train_seconds'][-1] / c['iterations'][-1]:.2f} |")
    return "\n".join(lines)


def report_study(summary: dict) -> None:
    print(study_tables(summary))
    print(f"choices: {summary['choices']}")
    if summary["missing"]:
        print(f"not made yet ({len(summary['missing'])}): {', '.join(summary['missing'])}")


# ---------------------------------------------------------------------------------------------------------
# SDE windows: learning per minute of the default run (RESULTS.md, "SDE windows", written before the runs). Phase 1:
# OP-GRPO as the default run (dense reward, 8 x 8, rho 0.25) under each WINDOW_SWEEP variant, seed 0, one thread
# each, two at a time, each sized to about 10 minutes of single-thread training. Phase 2: the variant with the
# largest final change, as `python op_grpo.py` would run it (two threads, alone), on seeds 0, 1 and 2.
# ---------------------------------------------------------------------------------------------------------
WINDOW_ARCHIVE = os.path.join(HERE, "assets", "window_runs")
WINDOW_SWEEP = {  # name: (flags, iterations); the iterations equalise single-thread compute (pilot: 3.85 / 1.35 s)
    "all_lr1e-4": ([], 160),  # the default run today
    "all_lr3e-5": (["--learning-rate", "3e-5"], 160),
    "w3_lr3e-5": (["--sde-window", "3", "--learning-rate", "3e-5"], 450),
    "w3_lr5e-5": (["--sde-window", "3", "--learning-rate", "5e-5"], 450),
    "w2_lr3e-5": (["--sde-window", "2", "--learning-rate", "3e-5"], 500),
    "w3_lr3e-5_P16": (["--sde-window", "3", "--learning-rate", "3e-5", "--prompts-per-iteration", "16"], 250),
}
WINDOW_SEEDS = (0, 1, 2)  # phase 2


def window_job(name: str, seed: int, flags: list[str], iterations: int, args: BenchArgs, threads: int = 1,
               evaluations: int = 8, prefix: str = "windows", archive: str | None = None):
    """One run of the window studies: `evaluations` evaluations whatever its length; archived like the study's."""
    sized = args if args.quick else replace(args, iterations=iterations, eval_every=max(1, iterations // evaluations))
    return run_archived(f"{prefix}/{name}", seed, [*flags, "--threads", str(threads)], sized, archive or WINDOW_ARCHIVE)


def window_summary(folders: dict) -> dict:
    """Per run: final change and its paired SE, the curve (iterations, accuracy, training seconds), seconds per
    iteration in training and in all (evaluations included), and the change per minute of the whole run."""
    runs = {}
    for (name, seed), folder in folders.items():
        rows = load_rows(folder)
        c, wall = curve(rows), sum(v for r in rows for k, v in r.items() if k.startswith("time/"))
        with contextlib.suppress(OSError), open(os.path.join(folder, "process_seconds.txt")) as f:
            c["process_seconds"] = float(f.read())  # absent if restored from an archive without it
        runs[f"{name}_seed{seed}"] = {"name": name, "seed": seed, **c, "wall_seconds": wall,
                                      "train_seconds_per_iteration": c["train_seconds"][-1] / len(rows),
                                      "change_per_minute": c["final_change"] / (wall / 60)}
        evaluated = [rows[0]] + [r for r in rows if "time/eval" in r]  # the toy video world's requirement rates
        met = sorted({k for k in evaluated[-1] if "/met/" in k or k.endswith("/dense")})
        if met and all(k in evaluated[0] for k in met):
            runs[f"{name}_seed{seed}"]["start_end"] = {k: [evaluated[0][k], evaluated[-1][k]] for k in met}
    return runs


def requirement_table(summary: dict) -> str:
    """Per run with requirement rates (the toy video world): each rate and the dense score at the start -> the end,
    the mean over the held-out and training sets."""
    runs = [r for r in summary["runs"].values() if "start_end" in r]
    if not runs:
        return ""
    kinds = sorted({k.split("/", 2)[2] for r in runs for k in r["start_end"]})
    lines = ["| run | seed | " + " | ".join(kinds) + " |", "|---|---|" + "---|" * len(kinds)]
    for r in runs:
        cells = []
        for kind in kinds:
            pairs = np.array([v for k, v in r["start_end"].items() if k.split("/", 2)[2] == kind])
            cells.append(f"{pairs[:, 0].mean():.3f} → {pairs[:, 1].mean():.3f}" if len(pairs) else "–")
        lines.append(f"| {r['name']} | {r['seed']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_windows(args: BenchArgs, sweep: dict = WINDOW_SWEEP, seeds=WINDOW_SEEDS, **job) -> dict:
    """Phase 1 (the sweep, seed 0, args.parallel at a time), then phase 2 (the best variant, `seeds`, one at a time
    with two threads); job: window_job's evaluations, prefix, archive. -> {"phase1", "chosen", "phase2"}"""
    with ThreadPoolExecutor(args.parallel) as pool:
        done = list(pool.map(lambda name: window_job(name, 0, *sweep[name], args, **job), sweep))
    phase1 = window_summary({(name, 0): folder for name, folder in zip(sweep, done) if folder})
    if len(phase1) < len(sweep):
        return {"phase1": phase1, "chosen": None, "phase2": {}}
    chosen = max(sweep, key=lambda name: phase1[f"{name}_seed0"]["final_change"])
    print(f"phase 2: {chosen}, seeds {seeds}, two threads, one at a time", flush=True)
    folders = {(f"default_{chosen}", s): window_job(f"default_{chosen}", s, *sweep[chosen], args, threads=2, **job)
               for s in seeds}
    return {"phase1": phase1, "chosen": chosen, "phase2": window_summary({k: f for k, f in folders.items() if f})}


# ---------------------------------------------------------------------------------------------------------
# The default run as a demo (RESULTS.md, "The default run as a demo", written before the runs): the window study's
# candidate and three variants of it, 750 iterations and 3 evaluations after the start (every 250), seed 0, one
# thread each, two at a time; phase 2: the largest final change on seeds 0-2, two threads alone, timed whole.
# ---------------------------------------------------------------------------------------------------------
DEMO_ARCHIVE = os.path.join(HERE, "assets", "demo_runs")
NO_KL = ["--kl-beta", "0"]
DEMO_SWEEP = {
    "w2_lr3e-5_kl": (["--sde-window", "2", "--learning-rate", "3e-5"], 750),  # the window study's candidate
    "w2_lr3e-5": (["--sde-window", "2", "--learning-rate", "3e-5", *NO_KL], 750),  # no reference pass
    "w3_lr3e-5": (["--sde-window", "3", "--learning-rate", "3e-5", *NO_KL], 750),
    "w2_lr5e-5": (["--sde-window", "2", "--learning-rate", "5e-5", *NO_KL], 750),
}


# The follow-up (RESULTS.md, "A follow-up: the window of 3 for 500 iterations", written before its runs): phase 1's
# window of 3, stopped at 500 iterations, straight to phase 2's conditions (two threads alone, seeds 0-2, timed whole).
# The third candidate ("A third candidate: groups of 24"): the regime study's G24 recipe, 500 iterations; the fourth
# ("A fourth candidate"): the third with Flow-GRPO's EMA of the weights; the fifth ("A fifth candidate"): a longer
# average, on seeds the earlier candidates' runs did not use (an entry's third item: its seeds, else WINDOW_SEEDS).
DEMO_G24 = ["--sde-window", "2", "--learning-rate", "3e-5", "--group-size", "24", "--prompts-per-iteration", "3"]
DEMO_FOLLOW_UP = {"w3_lr3e-5_500": (["--sde-window", "3", "--learning-rate", "3e-5", *NO_KL], 500),
                  "G24_500": (DEMO_G24, 500), "G24_500_ema": ([*DEMO_G24, "--ema-decay", "0.9"], 500),
                  "G24_500_ema95": ([*DEMO_G24, "--ema-decay", "0.95"], 500, (3, 4, 5))}


def run_demo(args: BenchArgs) -> dict:
    summary = run_windows(args, DEMO_SWEEP, WINDOW_SEEDS, evaluations=3, prefix="demo", archive=DEMO_ARCHIVE)
    follow_up = {(f"default_{name}", s): window_job(f"default_{name}", s, flags, iterations, args, threads=2,
                                                      evaluations=2, prefix="demo", archive=DEMO_ARCHIVE)
                 for name, (flags, iterations, *seeds) in DEMO_FOLLOW_UP.items() for s in (seeds[0] if seeds else WINDOW_SEEDS)}
    return summary | {"plot": "demo_curves.png", "phase3": window_summary({k: f for k, f in follow_up.items() if f})}


def plot_windows(summary: dict, assets_dir: str) -> None:
    """window_curves.png: strict accuracy change against training minutes, phase 1's variants (left) and the
    default candidate's seeds (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = [("phase1", "phase 1: seed 0, one thread each"), ("phase2", f"phase 2: {summary['chosen']}, two threads")]
    phases += [("phase3", "follow-up: " + ", ".join(DEMO_FOLLOW_UP) + ", two threads")] if "phase3" in summary else []
    figure, axes = plt.subplots(1, len(phases), figsize=(5.5 * len(phases), 4), sharey=True)
    for ax, (phase, title) in zip(axes, phases):
        for key, r in summary[phase].items():
            change = np.array(r["eval_reward"]) - r["eval_reward"][0]
            ax.plot(np.array(r["train_seconds"]) / 60, change, marker=".", label=key.removeprefix("default_"))
        ax.set_title(title)
        ax.set_xlabel("training minutes (evaluations excluded)")
        ax.axhline(0, color="grey", lw=0.8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("strict accuracy change since iteration 0")
    figure.tight_layout()
    figure.savefig(os.path.join(assets_dir, summary.get("plot", "window_curves.png")), dpi=110)


def report_windows(summary: dict) -> None:
    for phase in ("phase1", "phase2", "phase3"):
        for key, r in summary.get(phase, {}).items():
            print(f"{phase} {key:34s} change {r['final_change']:+.3f} +- {r['final_change_se']:.3f}  "
                  f"{r['iterations'][-1]:4d} its  {r['train_seconds_per_iteration']:.2f} s/it training  "
                  f"{r['wall_seconds'] / 60:5.1f} min in all  {r['change_per_minute']:+.4f} per minute"
                  + (f"  process {r['process_seconds']:.0f} s" if "process_seconds" in r else ""))


# ---------------------------------------------------------------------------------------------------------
# The side-by-side and the longer horizon (RESULTS.md, "Windows side by side", written before the runs): in the dense
# default task, Flow-GRPO on all steps (today's defaults) against Flow-GRPO and OP-GRPO with the window study's
# candidate (2 steps, lr 3e-5) at about equal single-thread training time, and both windowed arms for 600 iterations
# (3x the default run) there and in the small-group regime B with G 2. Seeds in order, both arms of a pair side by side.
# ---------------------------------------------------------------------------------------------------------
SIDE_ARCHIVE = os.path.join(HERE, "assets", "side_by_side_runs")
WINDOW = ["--sde-window", "2", "--learning-rate", "3e-5"]
SIDE_BY_SIDE = {  # name: (flags, iterations, evaluations); 250 all-step iterations cost about 600 windowed (3.62 / 1.53 s)
    "dense/op_w2": (WINDOW, 600, 12),
    "dense/flow_w2": (ARMS["flow_grpo"] + WINDOW, 600, 12),
    "dense/flow_all": (ARMS["flow_grpo"], 250, 10),
    "B_G2/op_w2": (STUDY_REGIMES["B_G2"] + WINDOW, 600, 12),
    "B_G2/flow_w2": (STUDY_REGIMES["B_G2"] + ARMS["flow_grpo"] + WINDOW, 600, 12),
}
SIDE_SEEDS = (0, 1, 2)
SIDE_CONTRASTS = [("dense/flow_w2", "dense/flow_all"), ("dense/op_w2", "dense/flow_all"),  # (variant, reference)
                  ("dense/op_w2", "dense/flow_w2"), ("B_G2/op_w2", "B_G2/flow_w2")]
# The toy video world: both arms as `python op_grpo.py --model tiny-video` runs them (Flow-GRPO: rho 0), one thread
# each, the two arms of a seed side by side; the paper's video measure is reward against training time. It loads the
# tiny Wan model from tiny_wan/ (built by `python toy_video.py`).
# The studies, each at its flags: guidance 3 (the tiny Wan's best samples, where neither arm learned), then guidance 2,
# both with the image world's square read (box fill 0.84); then the video world's own read (0.9) at guidance 1.5 and
# at 1.25 (Flow-GRPO rose); the fifth trains a window of 2 of the 10 steps at 1.25, the sixth samples 4 prompts
# an iteration, not 8 (RESULTS.md, "Video").
VIDEO_ARCHIVE = os.path.join(HERE, "assets", "video_runs")
VIDEO_STUDIES = {"video_g3": ["--guidance-scale", "3"], "video_g2": ["--guidance-scale", "2"],
                 "video_fill_g1.5": ["--guidance-scale", "1.5"], "video_g1.25": ["--guidance-scale", "1.25"],
                 "video_g1.25_w2": ["--guidance-scale", "1.25", "--sde-window", "2"],
                 "video_g1.25_p4": ["--guidance-scale", "1.25", "--prompts-per-iteration", "4"]}
VIDEO_PRESET_STUDY = "video_g1.25_p4"  # the study run with the flags of today's --model tiny-video preset
VIDEO_SIDE_BY_SIDE = {f"{study}/{arm}": (["--model", "tiny-video", *flags, *ARMS[arm]], 100, 10)
                      for study, flags in VIDEO_STUDIES.items() for arm in ("op_grpo", "flow_grpo")}
VIDEO_CONTRASTS = [(f"{study}/op_grpo", f"{study}/flow_grpo") for study in VIDEO_STUDIES]


def preset_study(summary: dict, study: str) -> dict:
    """One video study's arms: per arm the strict change over seeds ({"mean", "se_over_seeds"}), whether it rises
    (mean more than 2 SE over seeds above zero), each requirement's pass rate start -> end (mean over seeds) and the
    per-seed rows; and the OP - Flow equal-time contrast per seed."""
    arms = {}
    for arm in ("op_grpo", "flow_grpo"):
        runs = sorted((r for r in summary["runs"].values() if r["name"] == f"{study}/{arm}"), key=lambda r: r["seed"])
        change = seed_stat([r["final_change"] for r in runs])
        kinds = sorted(runs[0]["start_end"]) if runs and "start_end" in runs[0] else []
        arms[arm] = {"strict_change": change, "rises": bool(change["se_over_seeds"] and
                                                            change["mean"] > 2 * change["se_over_seeds"]),
                     "requirements_start_end": {k: np.mean([r["start_end"][k] for r in runs], axis=0).tolist()
                                                for k in kinds},
                     "per_seed": [{"seed": r["seed"], "start": r["eval_reward"][0], "end": r["eval_reward"][-1],
                                   "change": r["final_change"], "change_se": r["final_change_se"],
                                   "train_seconds_per_iteration": r["train_seconds_per_iteration"]} for r in runs]}
    key = f"{study}/op_grpo - {study}/flow_grpo"
    contrast_ = summary["contrasts"].get(key, {})
    return {"study": study, "flags": VIDEO_SIDE_BY_SIDE[f"{study}/op_grpo"][0], "arms": arms,
            "op_minus_flow_equal_time": {"per_seed": [x["equal_time_curve_difference"] for x in
                                                      contrast_.get("per_seed", {}).values()],
                                         **contrast_.get("equal_time_curve_difference", {})}}


def contrast(variant: dict, reference: dict, seconds: str = "train_seconds") -> dict:
    """Two curves of one seed. At equal training time (`seconds`: the curves' key of training seconds): the mean
    over [0, T] (T the shorter run's, 100 points, linear between evaluations) of the accuracy difference, and the
    time the variant takes to reach the reference's final accuracy, over the reference's time. With the same
    evaluation iterations: the mean difference over evaluations, over the first third of the run and over the last
    third (does the gap grow?)."""
    end = min(variant[seconds][-1], reference[seconds][-1])
    grid = np.linspace(0, end, 101)[1:]
    gap = np.interp(grid, variant[seconds], variant["eval_reward"]) - np.interp(
        grid, reference[seconds], reference["eval_reward"])
    reached = first_reach({**variant, "train_seconds": variant[seconds]}, reference["eval_reward"][-1])
    out = {"equal_time_curve_difference": float(gap.mean()), "equal_time_seconds": float(end),
           "wall_clock_ratio": reached[1] / reference[seconds][-1] if reached else None}
    if variant["iterations"] == reference["iterations"]:
        its, diff = np.array(variant["iterations"]), np.subtract(variant["eval_reward"], reference["eval_reward"])
        third = its[-1] / 3
        out |= {"curve_difference": float(diff[1:].mean()), "final_difference": float(diff[-1]),
                "first_third_difference": float(diff[(its > 0) & (its <= max(third, its[1]))].mean()),
                "last_third_difference": float(diff[its >= 2 * third].mean()),
                "iteration_ratio": reached[0] / its[-1] if reached else None}
        out["gap_growth"] = out["last_third_difference"] - out["first_third_difference"]
    return out


def side_summary(folders: dict, contrasts: list = SIDE_CONTRASTS) -> dict:
    """Per run its curve and timings (window_summary) and its training seconds recounted as iterations x its median
    seconds per iteration (robust to other work slowing some iterations); per contrast its per-seed numbers (the
    equal-time ones also on the recounted seconds, "..._median") and their seed stats."""
    runs = window_summary(folders)
    for (name, seed), folder in folders.items():
        median = float(np.median([sum(r.get(k, 0.0) for k in STAGES) for r in load_rows(folder)]))
        runs[f"{name}_seed{seed}"]["median_seconds"] = [i * median for i in runs[f"{name}_seed{seed}"]["iterations"]]
    stats = {}
    for variant, reference in contrasts:
        seeds = [s for s in SIDE_SEEDS if f"{variant}_seed{s}" in runs and f"{reference}_seed{s}" in runs]
        pairs = {s: (runs[f"{variant}_seed{s}"], runs[f"{reference}_seed{s}"]) for s in seeds}
        per_seed = {s: contrast(*pair) | {f"{k}_median": v for k, v in contrast(*pair, "median_seconds").items()
                                          if k.startswith(("equal_time", "wall_clock"))} for s, pair in pairs.items()}
        if per_seed:
            keys = [k for k in per_seed[seeds[0]] if "ratio" not in k]
            stats[f"{variant} - {reference}"] = {
                "per_seed": per_seed, **{k: seed_stat([p[k] for p in per_seed.values()]) for k in keys},
                **{k: median_or_none([p[k] for p in per_seed.values()]) for k in per_seed[seeds[0]] if "ratio" in k}}
    return {"runs": runs, "contrasts": stats}


def run_side_by_side(args: BenchArgs) -> dict:
    """Every SIDE_BY_SIDE (--video: VIDEO_SIDE_BY_SIDE) run on SIDE_SEEDS (one thread each, args.parallel at a
    time), seed by seed."""
    runs, contrasts, archive = ((VIDEO_SIDE_BY_SIDE, VIDEO_CONTRASTS, VIDEO_ARCHIVE) if args.video else
                                (SIDE_BY_SIDE, SIDE_CONTRASTS, SIDE_ARCHIVE))
    jobs = [(name, seed) for seed in (SIDE_SEEDS[:1] if args.quick else SIDE_SEEDS) for name in runs]

    def job_run(name, seed):
        flags, iterations, evaluations = runs[name]
        return window_job(name, seed, flags, iterations, args, evaluations=evaluations, prefix="side",
                          archive=archive)

    with ThreadPoolExecutor(args.parallel) as pool:
        done = list(pool.map(lambda job: job_run(*job), jobs))
    summary = side_summary({job: folder for job, folder in zip(jobs, done) if folder}, contrasts)
    return summary | {"config": {"runs": runs, "seeds": SIDE_SEEDS, "contrasts": contrasts,
                                 "eval_per_family": args.eval_per_family}}


def plot_arms(ax, summary: dict, names: list[str], x_key: str, full_names: bool = False) -> None:
    """One line per run name: the mean over its seeds of the change since iteration 0 against x_key (training
    seconds, shown in minutes, or iterations), with the seeds' range as a band."""
    for name in names:
        runs = [r for r in summary["runs"].values() if r["name"] == name]
        if not runs:
            continue
        x = np.mean([r[x_key] for r in runs], axis=0) / (60 if x_key == "train_seconds" else 1)
        change = np.array([np.subtract(r["eval_reward"], r["eval_reward"][0]) for r in runs])
        label = name if full_names else name.split("/")[1]
        line, = ax.plot(x, change.mean(0), marker=".", label=f"{label} ({len(runs)} seeds)")
        ax.fill_between(x, change.min(0), change.max(0), color=line.get_color(), alpha=0.15)


def plot_side_by_side(summary: dict, assets_dir: str) -> None:
    """side_by_side.png: the dense task's three arms against training minutes and iterations, and B with G 2's two
    arms against iterations; the mean over seeds (line) and its range (band) of the change since iteration 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(15, 4), sharey=True)
    panels = [(axes[0], "dense", "train_seconds", "training minutes (evaluations excluded)"),
              (axes[1], "dense", "iterations", "iteration"), (axes[2], "B_G2", "iterations", "iteration")]
    for ax, task, x_key, x_label in panels:
        plot_arms(ax, summary, [n for n in SIDE_BY_SIDE if n.startswith(task)], x_key)
        ax.set_title({"dense": "dense default task", "B_G2": "B with G 2 (0/1 reward)"}[task])
        ax.set_xlabel(x_label)
        ax.axhline(0, color="grey", lw=0.8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("strict accuracy change since iteration 0")
    figure.tight_layout()
    figure.savefig(os.path.join(assets_dir, "side_by_side.png"), dpi=110)


def plot_video(summary: dict, assets_dir: str) -> None:
    """video_side_by_side.png: the toy video world's strict accuracy change against training minutes and against
    iterations, both arms: the mean over seeds (line) and its range (band)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, x_key, x_label in ((axes[0], "train_seconds", "training minutes (evaluations excluded)"),
                               (axes[1], "iterations", "iteration")):
        plot_arms(ax, summary, list(VIDEO_SIDE_BY_SIDE), x_key, full_names=True)
        ax.set_xlabel(x_label)
        ax.axhline(0, color="grey", lw=0.8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("strict accuracy change since iteration 0")
    figure.suptitle("toy video world (--model tiny-video)")
    figure.tight_layout()
    figure.savefig(os.path.join(assets_dir, "video_side_by_side.png"), dpi=110)


def side_tables(summary: dict) -> str:
    """RESULTS.md's tables of the side-by-side: one row per run, then one per contrast (mean +- SE over seeds)."""
    fmt = lambda x: "never" if x is None else f"{x:.2f}"  # noqa: E731
    lines = ["| run | seed | iterations | training s / it (mean, median) | training min | min in all | final change "
             "| peak change |", "|---|---|---|---|---|---|---|---|"]
    for r in summary["runs"].values():
        change = np.subtract(r["eval_reward"], r["eval_reward"][0])
        median = r["median_seconds"][-1] / r["iterations"][-1]
        lines.append(f"| {r['name']} | {r['seed']} | {r['iterations'][-1]} | {r['train_seconds_per_iteration']:.2f}, "
                     f"{median:.2f} | {r['train_seconds'][-1] / 60:.1f} | {r['wall_seconds'] / 60:.1f} | "
                     f"{r['final_change']:+.3f} ± {r['final_change_se']:.3f} | {change.max():+.3f} |")
    lines += ["", "| variant − reference | seeds | equal-time curve difference (per seed; mean ± SE) | the same on "
              "median-recounted seconds | wall-clock ratio (per seed; median) | equal iterations: curve / final "
              "difference | first third → last third (growth) |", "|---|---|---|---|---|---|---|"]
    for key, c in summary["contrasts"].items():
        per_seed = list(c["per_seed"].values())
        same = "curve_difference" in c
        iterations = (f"{pm(c['curve_difference'])} / {pm(c['final_difference'])}" if same else "–")
        growth = (f"{c['first_third_difference']['mean']:+.3f} → {c['last_third_difference']['mean']:+.3f} "
                  f"({pm(c['gap_growth'])})" if same else "–")
        differences = ", ".join(f"{p['equal_time_curve_difference']:+.3f}" for p in per_seed)
        ratios = ", ".join(fmt(p["wall_clock_ratio"]) for p in per_seed)
        lines.append(f"| {key} | {len(per_seed)} | {differences}; {pm(c['equal_time_curve_difference'])} | "
                     f"{pm(c['equal_time_curve_difference_median'])} | {ratios}; {fmt(c['wall_clock_ratio'])} | "
                     f"{iterations} | {growth} |")
    return "\n".join(lines)


def report_side_by_side(summary: dict) -> None:
    for key, r in summary["runs"].items():
        print(f"{key:26s} change {r['final_change']:+.3f} +- {r['final_change_se']:.3f}  {r['iterations'][-1]:4d} its  "
              f"{r['train_seconds_per_iteration']:.2f} s/it training  {r['wall_seconds'] / 60:5.1f} min in all")
    for key, c in summary["contrasts"].items():
        parts = [f"{k} {pm(c[k])}" for k in c if isinstance(c[k], dict) and "mean" in c[k]]
        ratios = [f"{k} {c[k]:.2f}" if c[k] is not None else f"{k} never" for k in c if "ratio" in k]
        print(f"{key}: " + "; ".join(parts + ratios))


def window_studies(args: BenchArgs) -> dict:
    """--windows or --side-by-side: run (or restore) the runs, then write <name>_results.json and the plot, and print
    the summary; --quick makes every run 4 iterations long and writes under <output-dir>_quick."""
    name = ("video_side_by_side" if args.video else "side_by_side" if args.side_by_side else "demo" if args.demo
            else "windows")
    run, plot, report, results = {"side_by_side": (run_side_by_side, plot_side_by_side, report_side_by_side,
                                                   "side_by_side_results.json"),
                                  "video_side_by_side": (run_side_by_side, plot_video, report_side_by_side,
                                                         "video_side_by_side_results.json"),
                                  "windows": (run_windows, plot_windows, report_windows, "window_results.json"),
                                  "demo": (run_demo, plot_windows, report_windows, "demo_results.json")}[name]
    args.output_dir = args.output_dir.replace("benchmark", name)
    if args.quick:
        args.iterations, args.eval_every, args.eval_per_family = 4, 2, 4
        args.output_dir, args.assets_dir = args.output_dir + "_quick", args.output_dir + "_quick"
    summary = run(args)
    os.makedirs(args.assets_dir, exist_ok=True)
    plumbing.write_json(os.path.join(args.assets_dir, results), summary, HERE)
    plot(summary, args.assets_dir)
    report(summary)
    if args.side_by_side or args.video:
        print(side_tables(summary))
        print(requirement_table(summary))
    if args.video:  # the study at today's preset, in the form the README quotes
        plumbing.write_json(os.path.join(args.assets_dir, "video_preset_study.json"),
                            preset_study(summary, VIDEO_PRESET_STUDY), HERE)
    return summary


# ---------------------------------------------------------------------------------------------------------
# Replay in the paper's regime (RESULTS.md, "Replay in the paper's regime", written before the runs): OP-GRPO against
# Flow-GRPO with windowed iterations, 1,000 per run, in a chain of regimes from today's default (8 prompts x 8 images,
# each training prompt drawn about 17 times) to the paper's (groups of 24, each prompt drawn about twice, Flow-GRPO's
# clip tightness, beta 0.04, LoRA if it learns here), one factor per step. A pilot first decides LoRA or not.
# ---------------------------------------------------------------------------------------------------------
REGIME_ARCHIVE = os.path.join(HERE, "assets", "regime_runs")
REGIME_SEEDS = (0, 1, 2)
# Flow-GRPO's clip 1e-4 bounds ratios of per-dimension means over SD3.5's D = 16 x 64 x 64 latents (512 px); such a
# mean's spread scales as 1 / sqrt(D), so the same tightness at the tiny model's D = 4 x 8 x 8 is 1e-4 x 16 = 1.6e-3
PAPER_LOSS = ["--clip-range", "1.6e-3", "--kl-beta", "0.04"]
REGIME_STEPS = {  # on top of the window (2 steps); 463 training prompts
    "today": ["--sde-window", "2", "--learning-rate", "3e-5"],  # 8 x 8 = 64 images; each prompt drawn ~17 times
    "G24": ["--sde-window", "2", "--learning-rate", "3e-5", "--group-size", "24", "--prompts-per-iteration", "3"],  # 72; ~6.5
    "G24_once": ["--sde-window", "2", "--learning-rate", "3e-5", "--group-size", "24", "--prompts-per-iteration", "1"],  # 24; ~2.2
}
REGIME_PILOT = {"full": [], "lora4": ["--lora-rank", "4", "--learning-rate", "3e-4"],  # Flow-GRPO's LoRA rate
                "lora16": ["--lora-rank", "16", "--learning-rate", "3e-4"]}  # in G24_once, Flow-GRPO, seed 0
REGIME_REWARDS = {"dense": [], "strict": ["--reward", "geneval_strict"]}
# run order: the paper-like comparisons first, then back along the chain (a cut loses the least informative runs)
REGIME_ORDER = [("paper", "dense"), ("paper", "strict"), ("G24_once", "dense"), ("G24_once", "strict"),
                ("G24", "dense"), ("today", "dense"), ("today", "strict"), ("G24", "strict"), ("paper_full", "dense")]
# fixed after the chain (RESULTS.md, "A replication of G24 dense"): the one comparison that led by the rule, on new
# seeds, as its own comparison ("<step>_<reward>_replication") so that the pre-registered three seeds stay as they were
REGIME_REPLICATION = {("G24", "dense"): (3, 4, 5)}


def regime_choice(pilot: dict) -> str:
    """The pre-registered LoRA rule: the LoRA rank with the larger change, if that change is at least 2 paired SE
    and at least half the full fine-tuning change; else "full"."""
    best = max(("lora4", "lora16"), key=lambda name: pilot[name]["final_change"])
    c = pilot[best]
    return best if c["final_change"] >= 2 * c["final_change_se"] and c["final_change"] >= pilot["full"][
        "final_change"] / 2 else "full"


def run_regime(args: BenchArgs) -> dict:
    """The pilot (3 runs, seed 0, 300 iterations), then REGIME_ORDER's comparisons on REGIME_SEEDS (both arms of a
    seed side by side), 1,000 iterations and 10 evaluations each, then REGIME_REPLICATION's. "paper" is G24_once +
    PAPER_LOSS + the pilot's choice; "paper_full" the same with full fine-tuning (only if LoRA was chosen: what LoRA
    alone changes)."""
    missing = []

    def run(jobs: dict) -> dict:  # {(name, seed): (flags, iterations, evaluations)} -> {(name, seed): folder}
        def one(job):
            (name, seed), (flags, iterations, evaluations) = job
            sized = args if args.quick else replace(args, iterations=iterations, eval_every=iterations // evaluations)
            return run_archived(name, seed, [*flags, "--threads", "1"], sized, REGIME_ARCHIVE)

        with ThreadPoolExecutor(args.parallel) as pool:
            done = dict(zip(jobs, pool.map(one, jobs.items())))
        missing.extend(f"{name} seed {seed}" for (name, seed), folder in done.items() if folder is None)
        return {job: folder for job, folder in done.items() if folder is not None}

    pilot_jobs = {(f"pilot/{name}", 0): (REGIME_STEPS["G24_once"] + flags + ARMS["flow_grpo"], 300, 3)
                  for name, flags in REGIME_PILOT.items()}
    folders = run(pilot_jobs)
    pilot = {name.split("/")[1]: curve(load_rows(f)) for (name, _), f in folders.items()}
    choice = regime_choice(pilot) if len(pilot) == len(REGIME_PILOT) else None
    summary = {"pilot": pilot, "choices": {"paper": choice}}
    if choice is None:
        return summary | {"comparisons": {}, "missing": missing}
    steps = REGIME_STEPS | {"paper": REGIME_STEPS["G24_once"] + PAPER_LOSS + REGIME_PILOT[choice],
                            "paper_full": REGIME_STEPS["G24_once"] + PAPER_LOSS}
    order = [(step, reward) for step, reward in REGIME_ORDER if step != "paper_full" or choice != "full"]
    seeds = REGIME_SEEDS[:1] if args.quick else REGIME_SEEDS
    replications = {} if args.quick else REGIME_REPLICATION
    comparisons = [(f"{step}_{reward}", step, reward, seeds) for step, reward in order] + [
        (f"{step}_{reward}_replication", step, reward, new_seeds) for (step, reward), new_seeds in replications.items()]
    jobs = {(f"{name}/{arm}", seed): (steps[step] + REGIME_REWARDS[reward] + ARMS[arm], 1000, 10)
            for name, step, reward, its_seeds in comparisons for seed in its_seeds for arm in ("op_grpo", "flow_grpo")}
    folders = run(jobs)
    return summary | study_summary(folders) | {"missing": missing, "config": {
        "steps": steps, "order": order, "rewards": REGIME_REWARDS, "seeds": seeds}}


def plot_regime(summary: dict, assets_dir: str) -> None:
    """regime_curves.png: the chain's steps from today's to the paper's (columns) under each reward (rows); per panel both arms' strict accuracy
    change since iteration 0 against iterations, the mean over seeds (line) and their range (band), and the title
    giving OP − Flow's curve difference ± SE over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = [tuple(pair) for pair in summary["config"]["order"]]
    steps = [step for step in summary["config"]["steps"] if any(step == s for s, _ in order)]  # today ... paper
    rewards = list(summary["config"]["rewards"])
    figure, axes = plt.subplots(len(rewards), len(steps), figsize=(3.3 * len(steps), 3 * len(rewards)),
                                sharey=True, squeeze=False)
    for (row, reward), (col, step) in itertools.product(enumerate(rewards), enumerate(steps)):
        ax, comparison = axes[row][col], f"{step}_{reward}"
        if (step, reward) not in order:
            ax.axis("off")
            continue
        for arm, colour in (("flow_grpo", "tab:blue"), ("op_grpo", "tab:red")):
            runs = [c for key, c in summary["curves"].items() if key.rsplit("_seed", 1)[0] == f"{comparison}/{arm}"]
            if runs:
                change = np.array([np.subtract(c["eval_reward"], c["eval_reward"][0]) for c in runs])
                ax.plot(runs[0]["iterations"], change.mean(0), color=colour, label=f"{arm} ({len(runs)} seeds)")
                ax.fill_between(runs[0]["iterations"], change.min(0), change.max(0), color=colour, alpha=0.15)
        entry = summary["comparisons"].get(f"{comparison}: op_grpo vs flow_grpo")
        ax.set_title(f"{comparison}\nOP − Flow {pm(entry['mean_curve_difference'])}" if entry else
                     f"{comparison}\n(not made)", fontsize=9)
        ax.axhline(0, color="grey", lw=0.8)
        ax.grid(alpha=0.3)
        ax.set_xlabel("iteration")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="lower right")
    for row in axes:
        row[0].set_ylabel("strict accuracy change")
    figure.tight_layout()
    figure.savefig(os.path.join(assets_dir, "regime_curves.png"), dpi=100)
    plt.close(figure)


def main(args: BenchArgs) -> dict:
    if args.side_by_side or args.windows or args.video or args.demo:
        return window_studies(args)
    if args.study:
        args.output_dir = args.output_dir.replace("benchmark", "study")
    if args.quick:
        args.seeds, args.iterations, args.eval_every, args.eval_per_family = args.seeds[:1], 4, 2, 4
        args.output_dir, args.assets_dir = args.output_dir + "_quick", args.output_dir + "_quick"
    os.makedirs(args.assets_dir, exist_ok=True)
    if args.regime:
        args.output_dir = args.output_dir.replace("benchmark", "regime")
        if args.quick:
            args.iterations, args.eval_every, args.eval_per_family = 4, 2, 4
            args.output_dir, args.assets_dir = args.output_dir + "_quick", args.output_dir + "_quick"
        os.makedirs(args.assets_dir, exist_ok=True)
        summary = run_regime(args)
        kept = {k: v for k, v in summary.items() if k != "diagnostics_per_iteration"}  # per iteration: in the archive
        plumbing.write_json(os.path.join(args.assets_dir, "regime_results.json"), kept, HERE)
        if summary.get("comparisons"):
            plot_regime(summary, args.assets_dir)
            report_study(summary)
        return summary
    if args.study:
        summary = run_study(args)
        study = {k: v for k, v in summary.items() if k != "diagnostics_per_iteration"}  # per iteration: in the archive
        plumbing.write_json(os.path.join(args.assets_dir, "study_results.json"), study, HERE)
        plot_study(summary, args.assets_dir)
        report_study(summary)
        return summary
    jobs = [(arm, seed, flags) for seed in args.seeds for arm, flags in ARMS.items()]  # both arms of a seed side by side
    jobs += [(name, args.seeds[0], flags) for name, flags in ABLATIONS.items()]
    for setting, (flags, arms, n_seeds) in (INVESTIGATION.items() if args.investigate else ()):
        jobs += [(f"{setting}_{arm}", seed, ARMS[arm] + flags) for seed in args.seeds[:n_seeds] for arm in arms]
    print(f"{len(jobs)} runs of {args.iterations} iterations, {args.parallel} at a time, in {args.output_dir}", flush=True)
    with ThreadPoolExecutor(args.parallel) as pool:
        done = list(pool.map(lambda job: run_one(*job, args), jobs))
    folders = {(name, seed): folder for (name, seed, _), folder in zip(jobs, done)}
    results = summarise(args, folders)
    plumbing.write_json(os.path.join(args.assets_dir, "benchmark_results.json"), results, HERE)
    truncate_steps = json.load(open(os.path.join(folders[("op_grpo", args.seeds[0])], "args.json")))["truncate_steps"]
    plot(results, args, truncate_steps)
    report(results)
    return results


if __name__ == "__main__":
    main(tyro.cli(BenchArgs))
