"""The infrastructure of op_grpo.py: nothing here changes what is computed.

Argument checks, prompts, several processes, the NaN policy, checkpoints and resume, logging and timing, signals,
the command line and the before/after picture. op_grpo.py holds the method and the training loop; it imports
this file, which imports nothing of op_grpo.py.
"""

import contextlib
import datetime
import io
import importlib.util
import json
import logging
import math
import os
import random
import re
import signal
import sys
import time
import zipfile
from dataclasses import asdict

import numpy as np
import torch
import tyro
from PIL import Image, ImageDraw
from tqdm.auto import tqdm


class UsageError(ValueError):
    """A problem the user can fix (a flag, a file, a model that cannot be fetched): one `op_grpo.py: error:` line."""


# (flag, requirement, test): check_args says "--flag must be <requirement>, got <value>"
LIMITS = [
    ("group_size", "at least 2 (advantages compare images within a group)", lambda v: v >= 2),
    ("num_steps", "at least 2", lambda v: v >= 2),
    ("off_policy_fraction", "in [0, 1)", lambda v: 0 <= v < 1),
    ("ema_decay", "in [0, 1) (0 = no average)", lambda v: 0 <= v < 1),
    ("noise_level", "positive (0 is the deterministic ODE, which has no log-prob)", lambda v: v > 0),
    ("guidance_scale", "at least 1 (1 disables guidance)", lambda v: v >= 1),
    ("checkpoint_every", "non-negative (0 = only at the end and on a signal)", lambda v: v >= 0),
    ("lora_alpha", "positive", lambda v: v is None or v > 0),
    *[(f, "positive", lambda v: v > 0)
      for f in ("learning_rate", "clip_range", "adv_clip", "max_grad_norm", "failed_weight")],
    *[(f, "non-negative", lambda v: v >= 0)
      for f in ("kl_beta", "reward_decay", "warmup_iterations", "lora_rank", "micro_batch", "max_sequence_length")],
    *[(f, "at least 1", lambda v: v >= 1)
      for f in ("iterations", "eval_every", "eval_per_family", "eval_steps", "buffer_capacity", "nonfinite_patience")],
]


def check_settings(args, toy, builds: dict[str, str]) -> list[str]:
    """What is wrong with the settings (presets applied), each naming its flag; toy: the toy world module in use
    (or None); builds: the embedded models' folders -> the command that builds each."""
    flag = lambda name: "--" + name.replace("_", "-")  # noqa: E731
    wrong = [(f, rule) for f, rule, ok in LIMITS if not ok(getattr(args, f))]
    problems, wrong = [f"{flag(f)} must be {rule}, got {getattr(args, f)}" for f, rule in wrong], {f for f, _ in wrong}
    world, K, n = int(os.environ.get("WORLD_SIZE", "1")), args.num_steps, args.prompts_per_iteration * args.group_size
    bounds = [("prompts_per_iteration", world, math.inf, f"at least the number of processes ({world})", ()),
              ("train_steps", 1, K, f"in [1, --num-steps={K}]", ("num_steps",)),
              ("truncate_steps", 0, K - 1, f"in [0, --num-steps={K})", ("num_steps",)),
              ("updates_per_batch", 1, n, f"in [1, {n}] (the samples per iteration)",
               ("group_size", "prompts_per_iteration")),
              ("sde_window", 0, K, f"in [0, --num-steps={K}]", ("num_steps",))]
    for f, low, high, rule, set_by in bounds:  # only the root error: no bound set by a flag already reported
        if getattr(args, f) is not None and not low <= getattr(args, f) <= high and not wrong & set(set_by):
            problems.append(f"{flag(f)} must be {rule}, got {getattr(args, f)}")
            wrong.add(f)
    low, high = window_range(args)
    fits = 0 <= low <= high - args.sde_window <= K - args.sde_window
    if args.sde_window_range is not None and not args.sde_window:
        problems.append(f"--sde-window-range {low} {high} places an SDE window: give its length with --sde-window L")
    elif args.sde_window and not wrong & {"num_steps", "sde_window"} and not fits:
        problems.append(f"--sde-window-range must hold the window of {args.sde_window} steps within [0, {K}], got "
                        f"{low} {high}")
    elif (args.sde_window and args.off_policy_fraction and not wrong & {"num_steps", "sde_window", "truncate_steps"}
          and high - args.sde_window >= K - args.truncate_steps):
        problems.append(f"--sde-window-range {low} {high} lets a window start in the last --truncate-steps "
                        f"{args.truncate_steps} steps, which replay drops, so a replayed trajectory could keep no step: "
                        f"end the range below {K - args.truncate_steps + args.sde_window}")
    if args.sde_type == "cps" and not 0 < args.noise_level <= 1:
        problems.append(f"--noise-level must be in (0, 1] with --sde-type cps (its noise is sigma_next sin(a pi / 2)), "
                        f"got {args.noise_level}")
    if args.sde_type == "cps" and (args.train_steps or K - 1) >= K:
        problems.append(f"--train-steps {args.train_steps} trains the last step, which --sde-type cps makes noiseless "
                        f"(sigma_next = 0): at most {K - 1}")
    multiple, largest, why = image_sides(args.pretrained)
    for f, side in (("resolution", args.resolution), ("width", args.width)):
        if side is not None and (not multiple <= side <= largest or side % multiple):
            problems.append(f"{flag(f)} must be a multiple of {multiple} ({why}), got {side}")
    video = args.model in ("wan", "tiny-video")
    if (args.num_frames is not None) != video or video and not (args.num_frames >= 1 and args.num_frames % 4 == 1):
        problems.append(f"--num-frames must be 4 n + 1 (the VAE packs 4 frames into one after the first) for a video "
                        f"--model, and unset for an image one; got {args.num_frames} with --model {args.model}")
    if args.prompt_file is not None:
        try:
            prompts = read_prompts(args.prompt_file) or "no prompts in it (one per line; blank and # lines are skipped)"
        except (OSError, UnicodeDecodeError) as error:
            prompts = str(error)
        if isinstance(prompts, str):
            problems.append(f"--prompt-file {args.prompt_file} cannot be used: {prompts}")
    if args.toy_prompts is not None and toy is not None:
        problems += check_toy_prompts(args.toy_prompts, toy)
    elif args.toy_prompts is not None:
        problems.append("--toy-prompts narrows a toy world's prompts: use it with --model tiny or tiny-video and no "
                        "--prompt-file")
    if args.task is not None and args.model != "sd3":
        problems.append(f"--task {args.task} is one of Flow-GRPO's SD3 configs: use it with --model sd3")
    if args.wandb_project and importlib.util.find_spec("wandb") is None:
        problems.append("--wandb-project needs the wandb package: pip install wandb")
    return problems + check_device(args.device) + check_pretrained(args.pretrained, builds) + check_folders(args)


def window_range(args) -> tuple[int, int]:
    """[lo, hi) in which the SDE window lies: --sde-window-range, or Flow-GRPO-Fast's (0, K // 2)."""
    return args.sde_window_range or (0, args.num_steps // 2)


def check_toy_prompts(path: str, world) -> list[str]:
    """--toy-prompts: a readable file of the toy world's prompts, with training and held-out prompts among them."""
    try:
        prompts = set(read_prompts(path))
    except (OSError, UnicodeDecodeError) as error:
        return [f"--toy-prompts {path} cannot be read ({error})"]
    if unknown := sorted(prompts - set(world.SPEC_BY_PROMPT)):
        return [f"--toy-prompts {path}: {len(unknown)} lines are not prompts of the toy world, e.g. {unknown[0]!r}"]
    train, held_out = ({world.describe(s) for s in specs} & prompts for specs in world.split_specs())
    if not train or not held_out:
        return [f"--toy-prompts {path} needs training and held-out prompts (has {len(train)} and {len(held_out)})"]
    return []


def check_device(name: str | None) -> list[str]:
    """--device names a torch device that exists on this machine."""
    try:
        device = torch.device(name or "cpu")
    except RuntimeError:
        return [f"--device {name} is not a torch device (cpu, cuda, cuda:1, mps, ...)"]
    count = {"cpu": 1, "cuda": torch.cuda.device_count(), "mps": int(torch.backends.mps.is_available())}
    if (device.index or 0) >= count.get(device.type, 1):
        return [f"--device {name}: this machine has {count[device.type]} {device.type} device(s)"]
    return []


def check_pretrained(path: str, builds: dict[str, str]) -> list[str]:
    """--pretrained is a pipeline folder or looks like a Hub id (org/name): a mistyped folder is named here; a missing
    embedded model (a key of builds) with the command that builds it."""
    if os.path.isfile(os.path.join(path, "model_index.json")):
        return []
    if path in builds:
        return [f"the embedded model is missing from {path}; build it with `{builds[path]}`"]
    if os.path.exists(path):
        return [f"--pretrained {path} is not a diffusers pipeline folder (no model_index.json in it)"]
    if path.startswith((".", "/", "~")) or not re.fullmatch(r"[\w.-]+/[\w.-]+", path):
        return [f"--pretrained {path}: no such folder, and not a Hub id of the form org/name"]
    return []


def image_sides(pretrained: str) -> tuple[int, float, str]:
    """(multiple, largest, why) for image sides: VAE factor x patch, and the largest side the transformer's position
    embedding covers, read from a local pipeline folder's configs; else SD3's 8 x 2 and no known largest."""
    try:
        with open(os.path.join(pretrained, "vae", "config.json")) as f:
            factor = 2 ** (len(json.load(f)["block_out_channels"]) - 1)
        with open(os.path.join(pretrained, "transformer", "config.json")) as f:
            config = json.load(f)
        largest = factor * config["patch_size"] * config["pos_embed_max_size"]
        why = f"VAE factor {factor} x patch {config['patch_size']}, at most {largest}"
        return factor * config["patch_size"], largest, why
    except (OSError, ValueError, KeyError, TypeError):
        return 16, math.inf, "VAE factor 8 x patch 2"


CHECKPOINT = "checkpoint.pt"  # in --output-dir: everything needed to continue the run exactly (see RunState)
# the weights and the stored trajectories need these unchanged on resume
STRUCTURAL_FLAGS = ("model", "num_steps", "lora_rank", "resolution", "width", "num_frames")
# the stored trajectories' p_off was recorded under these (their values in args.json from before the flag existed)
BEHAVIOUR_FLAGS = {"noise_level": None, "guidance_scale": None, "sde_type": "sde"}


def same_folder(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def check_folders(args) -> list[str]:
    """--output-dir can be written and holds no run unless asked; --resume has a readable run that can go on."""
    out, problems, parent = args.output_dir, [], os.path.abspath(args.output_dir)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if os.path.exists(out) and not os.path.isdir(out):
        problems.append(f"--output-dir {out} is a file, not a folder")
    elif not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        problems.append(f"--output-dir {out} cannot be created ({parent} is not a writable folder)")
    resuming_here = args.resume is not None and same_folder(args.resume, out)
    if (held := run_files(out)) and not resuming_here and not args.overwrite:
        go_on = (f"continue it with --resume {out}" if os.path.exists(os.path.join(out, CHECKPOINT))
                 else f"it has no {CHECKPOINT}, so it cannot be resumed")
        problems.append(f"--output-dir {out} already holds a run ({held}): {go_on}, or pass --overwrite to replace "
                        "it, or choose another --output-dir")
    if args.resume is None:
        return problems
    if not os.path.isfile(os.path.join(args.resume, CHECKPOINT)):
        return problems + [f"--resume {args.resume}: no {CHECKPOINT} in that folder"]
    try:
        with open(os.path.join(args.resume, "args.json")) as f:
            json.load(f)  # readable: the defaults of the resumed run
    except (OSError, ValueError) as error:
        return problems + [f"--resume {args.resume}: its args.json cannot be read ({type(error).__name__}: {error})"]
    try:
        done = read_checkpoint(args.resume, verify=False)["iteration"]
    except UsageError as error:
        return problems + [str(error)]
    if args.iterations <= done:
        problems.append(f"--iterations {args.iterations}: the run in {args.resume} has already done {done}; raise it")
    return problems


def resume_clash(args) -> str:
    """'' unless --resume names a run whose model or latent shape (STRUCTURAL_FLAGS) differs from these settings."""
    if not args.resume:
        return ""
    try:
        with open(os.path.join(args.resume, "args.json")) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return ""
    for f in STRUCTURAL_FLAGS:
        if saved.get(f) != getattr(args, f):
            return (f"--{f.replace('_', '-')} {getattr(args, f)} differs from the resumed run's {saved.get(f)}: a run "
                    f"goes on with its own; start a new run (without --resume) to change it")
    for f, before in BEHAVIOUR_FLAGS.items():  # only a run that replayed has a buffer to keep consistent
        if saved.get("off_policy_fraction", 0) > 0 and saved.get(f, before) != getattr(args, f):
            return (f"--{f.replace('_', '-')} {getattr(args, f)} differs from the resumed run's {saved.get(f, before)}"
                    ", under which its replay buffer's p_off was recorded: resume with it, or start a new run")
    return ""


def free_folder(base: str) -> str:
    """base, or the first of base-2, base-3, ... holding no run: a default --output-dir never meets an earlier run."""
    n = 1
    while run_files(folder := base if n == 1 else f"{base}-{n}"):
        n += 1
    return folder


def run_files(folder: str) -> str:
    """What of a run a folder holds, as text ('' for none): the checkpoint, the logged iterations, the final weights
    and picture. args.json alone is not a run: it is written by a start that may not have finished an iteration."""
    if not os.path.isdir(folder):
        return ""
    held = [CHECKPOINT] if os.path.exists(os.path.join(folder, CHECKPOINT)) else []
    with contextlib.suppress(OSError):
        with open(os.path.join(folder, "metrics.jsonl")) as f:
            held += [f"metrics.jsonl with {n} iterations" for n in [sum(1 for line in f if line.strip())] if n]
    held += [f"{name}/" for name in ("transformer", "lora") if os.path.isdir(os.path.join(folder, name))]
    held += ["before_after.png"] * os.path.exists(os.path.join(folder, "before_after.png"))
    return ", ".join(held + (["args.json"] if held and os.path.exists(os.path.join(folder, "args.json")) else []))


def from_hub(name: str, load, flag: str | None = "--pretrained"):
    """Run a from_pretrained call with the libraries' chatter off; a model that is gated, missing or out of reach
    becomes one UsageError that says which and what to do (flag: the one that names another copy, if any)."""
    import diffusers
    import transformers

    levels = diffusers.utils.logging.get_verbosity(), transformers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()  # "Couldn't connect to the Hub ..." is said once, below
    transformers.utils.logging.set_verbosity_error()
    try:
        return load()
    except OSError as error:
        raise UsageError(f"cannot load {name}: {hub_failure(error)}. Fetch it where the Hub can be reached (`hf auth "
                         f"login`, then `hf download {name}`) and point HF_HOME at that cache"
                         + (f", or give {flag} a local folder" if flag else "")) from None
    finally:
        diffusers.utils.logging.set_verbosity(levels[0])
        transformers.utils.logging.set_verbosity(levels[1])


def hub_failure(error: BaseException) -> str:
    """Why a from_pretrained call failed, in a few words, read off the chain of exceptions behind `error`."""
    chain = [error]
    while (cause := chain[-1].__cause__ or chain[-1].__context__) is not None and len(chain) < 20:
        chain.append(cause)
    names, text = {type(e).__name__ for e in chain}, " ".join(str(e) for e in chain).lower()
    if "GatedRepoError" in names or "gated repo" in text:
        return "it is gated: accept its license on its Hub page and log in with `hf auth login`"
    if "RepositoryNotFoundError" in names or "not a valid model identifier" in text:
        return "no such model on the Hub (a private one needs `hf auth login`)"
    if any("Offline" in n or "Connect" in n or "Timeout" in n for n in names) or "not fully cached" in text:
        return "the Hub cannot be reached from this machine and the model is not in the local cache"
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def write_json(path: str, results, root: str) -> None:
    """Results as JSON with no path of this machine in them: a path under `root` (the repository) is written relative
    to it, any other absolute path as <elsewhere>/ and its last part (a scratch folder says nothing elsewhere)."""
    def portable(value):
        if isinstance(value, dict):
            return {portable(k): portable(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [portable(v) for v in value]
        if isinstance(value, str) and os.path.isabs(value):
            inside = os.path.commonpath([os.path.abspath(value), root]) == root
            return os.path.relpath(value, root) if inside else "<elsewhere>/" + os.path.basename(value.rstrip("/"))
        return value

    with open(path, "w") as f:
        json.dump(portable(results), f, indent=1)


def read_prompts(path: str) -> list[str]:
    """A prompt file: one prompt per line, blank lines and lines starting with # skipped; or GenEval's metadata
    (.jsonl): the "prompt" of each JSON line."""
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
    return [json.loads(line).get("prompt", "") for line in lines] if path.endswith(".jsonl") else lines


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


def prompt_sets(args, world, rng: random.Random):
    """(training prompts, evaluation sets name -> prompts, draw(n) -> n training prompts, family weights). The toy
    world: a family drawn by its weight, then a prompt of it; a held-out and a training evaluation set whose families
    are weighted alike (EVAL_MIX; with --toy-prompts each family's share of the band's training prompts, so that
    draws are uniform over them); world: toy_world or toy_video. A prompt list (world None): uniform draws, the list
    cycled for evaluation, no weights."""
    if world is not None:
        band = set(read_prompts(args.toy_prompts)) if args.toy_prompts else None
        specs = [s for s in world.split_specs()[0] if band is None or world.describe(s) in band]
        mix = world.EVAL_MIX if band is None else {f: sum(s.family == f for s in specs) / len(specs)
                                                   for f in world.FAMILIES if any(s.family == f for s in specs)}

        def draw(n):
            return [world.describe(s) for s in world.sample_specs(specs, mix, n, rng)]

        prompts = sorted({world.describe(s) for s in specs})
        return prompts, world.eval_prompts(args.eval_per_family, band), draw, mix
    prompts = read_prompts(args.prompt_file) if args.prompt_file else DEFAULT_PROMPTS
    sets = {"prompts": [prompts[i % len(prompts)] for i in range(args.eval_per_family)]}
    return prompts, sets, lambda n: [rng.choice(prompts) for _ in range(n)], None


def batch_arithmetic(args, world: int) -> str:
    """The start-up line: what one iteration samples and trains."""
    P, G, K, updates = args.prompts_per_iteration, args.group_size, args.num_steps, args.updates_per_batch
    n = args.off_policy_fraction * P
    replay = (f"{n:g} replayed group{'s' * (n != 1)} on average ({G - 1} fresh + 1 stored, last {args.truncate_steps} "
              f"steps regenerated) -> {P * G - n:g} fresh samples" if n else "no replay (on-policy Flow-GRPO)")
    low, high = window_range(args)
    window = (f"; an SDE window of {args.sde_window} steps starting in [{low}, {high - args.sde_window}], ODE "
              "elsewhere" if args.sde_window else "")
    trained = args.train_steps or K - 1
    steps = f"the window's steps among the first {trained}" if args.sde_window else f"the first {trained} steps"
    samples = "videos" if args.model in ("wan", "tiny-video") else "images"
    return (f"batch: {P} prompts x {G} {samples} = {P * G} trajectories of {K} steps per iteration{window}; {replay}; "
            f"{updates} update{'s' * (updates != 1)} of {P * G // updates} samples on {steps}"
            + (f", {args.micro_batch} per pass" if args.micro_batch else "")
            + (f"; {world} processes, whole groups each" if world > 1 else ""))


ARGS_HISTORY = "args_history.jsonl"  # in --output-dir: a row per start of the run, with what it changed


def prepare_output_dir(args, processes, start: int) -> str:
    """Create --output-dir and write args.json there (rank 0), once the model has loaded: the settings of this start,
    which --resume takes as its defaults. Each start also adds a row to args_history.jsonl (the iteration it began at,
    the flags changed since the start before, every setting), so that a resumed run keeps the record of what each of
    its parts ran with. -> the changed flags as text, '' when none."""
    settings, history = asdict(args), []
    if args.resume:  # a run from before args_history.jsonl: its args.json stands for its first start
        with open(os.path.join(args.resume, "args.json")) as f:
            history = [{"iteration": 0, "changed": {}, "args": json.load(f)}]
        with contextlib.suppress(OSError), open(os.path.join(args.resume, ARGS_HISTORY)) as f:
            history = [json.loads(line) for line in f if line.strip()]
    before = history[-1]["args"] if history else {}
    changed = {k: [before[k], v] for k, v in settings.items() if k in before and before[k] != v
               and k not in ("resume", "overwrite")}
    history.append({"iteration": start, "started": datetime.datetime.now().isoformat(timespec="seconds"),
                    "changed": changed, "args": settings})
    if processes.main:
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "args.json"), "w") as f:
            json.dump(settings, f, indent=2)
        with open(os.path.join(args.output_dir, ARGS_HISTORY), "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in history)
    return ", ".join(f"--{k.replace('_', '-')} {a} -> {b}" for k, (a, b) in changed.items())


class Processes:
    """Several processes (torchrun / accelerate launch) and their bookkeeping. Every process draws the same prompts
    and noise from the same seeds and keeps the prompt slots rank, rank + world, ...: whole groups, so advantages
    need no exchange. Gradients are summed once per optimizer step; rank 0 evaluates, logs, prints and writes
    checkpoints. With one process every method is a no-op."""

    def __init__(self, args):
        self.world, self.rank = int(os.environ.get("WORLD_SIZE", "1")), 0
        self.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.world > 1:
            use_cuda = torch.cuda.is_available() and args.device in (None, "cuda")
            if use_cuda:
                torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
            if not torch.distributed.is_initialized():  # an hour: the other ranks wait while rank 0 evaluates alone
                torch.distributed.init_process_group("nccl" if use_cuda else "gloo",
                                                     timeout=datetime.timedelta(hours=1))
            self.rank = torch.distributed.get_rank()
            self.device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
        self.main = self.rank == 0

    def say(self, *a, **k) -> None:
        if self.main:
            print(*a, **k)

    def slots(self, n: int) -> list[int]:
        return list(range(self.rank, n, self.world))

    def gather(self, obj) -> list:
        """Every process's `obj` (picklable), in rank order."""
        out = [obj] * self.world
        if self.world > 1:
            torch.distributed.all_gather_object(out, obj)
        return out

    def any(self, flag: bool) -> bool:
        return any(self.gather(flag))

    def sum_gradients(self, parameters: list) -> None:
        """Once per optimizer step. (DDP would sync inside every backward and needs the same number of them on every
        rank; here each rank runs one pass per (step, micro-batch) it holds.)"""
        for p in parameters if self.world > 1 else []:
            p.grad = torch.zeros_like(p) if p.grad is None else p.grad  # None: this rank had no sample in the minibatch
            torch.distributed.all_reduce(p.grad)

    def divergence(self, parameters: list) -> dict:
        """{"rank_weight_divergence": largest |weight - rank 0's weight|}, 0 when every copy is identical."""
        if self.world == 1:
            return {}
        local = torch.cat([p.detach().flatten().float() for p in parameters])
        reference = local.clone()
        torch.distributed.broadcast(reference, src=0)
        divergence = (local - reference).abs().max()
        torch.distributed.all_reduce(divergence, op=torch.distributed.ReduceOp.MAX)
        return {"rank_weight_divergence": divergence.item()}


class NonFiniteError(RuntimeError):
    """A NaN or inf in a named quantity. The NaN policy skips the rest of the iteration's update when one is raised."""


def require_finite(name: str, tensor: torch.Tensor, where: str = "") -> None:
    """Raise NonFiniteError naming the quantity (and the step) if `tensor` holds a NaN or inf."""
    if not torch.isfinite(tensor).all():
        raise NonFiniteError(f"non-finite {name}" + (f" {where}" if where else ""))


class NonFinitePolicy:
    """The NaN policy and the crash checkpoint, around each iteration.

    A NonFiniteError (a NaN/inf velocity, log-prob, reward, ratio, IS weight, KL, loss or gradient norm, named by
    require_finite) skips the rest of the iteration's update with a warning; optimizer steps already taken had
    finite gradients and stay. After --nonfinite-patience such iterations in a row the run stops with a checkpoint.
    With several processes the job stops instead (the others cannot know). Any other exception, or a second
    Ctrl-C, before the iteration changed any state (`pristine`) checkpoints that state, random streams rewound.
    """

    def __init__(self, args, state):
        self.args, self.state, self.processes = args, state, state.processes
        self.in_a_row, self.skipped, self.pristine = 0, None, True

    @property
    def pristine(self) -> bool:
        """Nothing changed yet in this iteration; set False where the changes begin (a second signal waits then)."""
        return not CHANGING[0]

    @pristine.setter
    def pristine(self, value: bool) -> None:
        CHANGING[0] = not value

    @contextlib.contextmanager
    def iteration(self, iteration: int):
        rng_at_start, self.pristine, self.skipped = self.state.rng_states(), True, None
        try:
            yield
        except NonFiniteError as problem:
            if self.processes.world > 1:
                raise
            self.state.optimizer.zero_grad(set_to_none=True)
            self.in_a_row, self.skipped = self.in_a_row + 1, str(problem)
            tqdm.write(f"iteration {iteration}: {problem}; update skipped ({self.in_a_row} in a row)", file=sys.stderr)
            if self.in_a_row >= self.args.nonfinite_patience:
                self.state.history.append({"iteration": iteration, "skipped": self.skipped})
                self.state.save(iteration + 1)
                raise RuntimeError(f"stopping after {self.in_a_row} iterations in a row with non-finite values (last: "
                                   f"{problem}); the weights are finite and saved in "
                                   f"{self.args.output_dir}/{CHECKPOINT}")
        except BaseException:
            if self.pristine:
                self.state.save(iteration, rng_at_start)
            raise
        else:
            self.in_a_row = 0
        finally:
            self.pristine = True


def save_checkpoint(folder: str, transformer, state: dict) -> None:
    """Write <folder>/checkpoint.pt: the trainable weights (all of them, or the adapters) plus `state`. Weights
    holding a NaN or inf are never written; the file is replaced atomically (a crash while writing keeps the last)."""
    trainable = {name: p.detach().cpu().clone() for name, p in transformer.named_parameters() if p.requires_grad}
    for name, weight in trainable.items():
        require_finite(f"weight {name}", weight, "(checkpoint not written; the previous one is kept)")
    path = os.path.join(folder, CHECKPOINT)
    torch.save({**state, "trainable": trainable}, path + ".tmp")
    os.replace(path + ".tmp", path)


def read_checkpoint(folder: str, verify: bool = True) -> dict:
    """The checkpoint of a run to resume; a damaged or incomplete file is a UsageError saying so plainly. verify=False
    skips the checksums and maps the file instead of reading it: a quick look, for the checks of the flags."""
    path = os.path.join(folder, CHECKPOINT)
    damaged = f"--resume {folder}: {path} is damaged ({{}}), so the run cannot go on from it. Resume from a copy of " \
              "the folder if there is one, or start again in another --output-dir (metrics.jsonl there keeps the " \
              "iterations logged so far)"
    try:
        with zipfile.ZipFile(path) as archive:  # torch.load does not check the CRC-32s that torch.save writes
            bad = archive.testzip() if verify else None
        saved = None if bad else torch.load(path, map_location="cpu", weights_only=True, mmap=not verify)
    except zipfile.BadZipFile:
        raise UsageError(damaged.format("it is not a complete checkpoint: it was cut short or overwritten")) from None
    except Exception:  # a record torch cannot read: in our words, no traceback
        raise UsageError(damaged.format("torch cannot read it")) from None
    if bad:
        raise UsageError(damaged.format(f"its record {bad} fails its checksum"))
    needed = {"iteration", "trainable", "optimizer", "scheduler", "buffer", "rng", "history", "baseline"}
    if missing := (needed if verify else {"iteration"}) - set(saved):  # a quick look needs only the iteration
        raise UsageError(damaged.format(f"it lacks {', '.join(sorted(missing))}"))
    return saved


class WeightAverage:
    """Flow-GRPO's EMA of the trainable weights (its train_sd3.py: decay 0.9, every 8th optimizer step), evaluated and
    saved in their place while training goes on with the weights themselves. It runs as the optimizer's step hook:
    after optimizer step s (counted from 1) with s + 1 a multiple of `every`, average <- average + (1 - d)(weights -
    average), d = min(decay, (1 + s) / (10 + s)), Flow-GRPO's warm-up of the decay (0.47 at step 7, 0.9 from step
    80). decay 0: no average; evaluation and saving use the weights."""

    def __init__(self, optimizer, decay: float, every: int = 8):
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.decay, self.every, self.steps = decay, every, 0
        self.average = [p.detach().clone() for p in self.params] if decay else []
        optimizer.register_step_post_hook(self.step)

    @torch.no_grad()
    def step(self, *_) -> None:
        self.steps += 1
        if self.decay and (self.steps + 1) % self.every == 0:
            d = min(self.decay, (1 + self.steps) / (10 + self.steps))
            for average, weight in zip(self.average, self.params, strict=True):
                average.lerp_(weight.detach(), 1 - d)

    @contextlib.contextmanager
    def in_place(self):
        """The average in the weights' place for the duration of the block; the weights back after it, error or not."""
        if not self.decay:
            yield
            return
        trained = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for weight, average in zip(self.params, self.average, strict=True):
                weight.copy_(average)
        try:
            yield
        finally:
            with torch.no_grad():
                for weight, kept in zip(self.params, trained, strict=True):
                    weight.copy_(kept)

    def state_dict(self) -> dict:
        return {"steps": self.steps, "average": [a.cpu() for a in self.average]}

    @torch.no_grad()
    def load_state_dict(self, saved: dict | None) -> None:
        """From a checkpoint; one written without an average (None, or --ema-decay 0 then) restarts it at the weights."""
        self.steps = saved["steps"] if saved else 0
        kept = saved["average"] if saved and len(saved["average"]) == len(self.average) else self.params
        for average, value in zip(self.average, kept, strict=True):
            average.copy_(value.detach())


class RunState:
    """Everything --resume needs, in one checkpoint dict: trainable weights, AdamW and warm-up, the buffer, all random
    streams (prompts, noise and minibatches, torch's global), the iteration, the metrics so far and the baseline
    evaluation. Rank 0 writes it; every rank holds the same state."""

    def __init__(self, args, transformer, optimizer, scheduler, buffer, rng, generator, processes, average):
        self.args, self.transformer, self.optimizer, self.scheduler = args, transformer, optimizer, scheduler
        self.average = average  # a WeightAverage
        self.buffer, self.rng, self.generator, self.processes = buffer, rng, generator, processes
        self.history, self.baseline = [], None

    def rng_states(self) -> dict:
        return {"python": self.rng.getstate(), "generator": self.generator.get_state(), "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}

    def save(self, next_iteration: int, rng_states: dict | None = None) -> None:
        """Write the checkpoint (rank 0); a second signal meanwhile waits for it (CHANGING)."""
        changing, CHANGING[0] = CHANGING[0], True
        try:
            if self.processes.main:
                save_checkpoint(self.args.output_dir, self.transformer, {
                    "iteration": next_iteration, "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(), "buffer": self.buffer.state_dict(),
                    "average": self.average.state_dict(),
                    "rng": rng_states or self.rng_states(), "history": self.history, "baseline": self.baseline})
        finally:
            CHANGING[0] = changing

    def load(self, saved: dict) -> int:
        """Restore from a checkpoint dict (after the KL reference copy was made: it stays the base model)."""
        if set(saved["trainable"]) != {n for n, p in self.transformer.named_parameters() if p.requires_grad}:
            raise UsageError(f"--resume {self.args.resume}: its trainable weights do not match this model's")
        self.transformer.load_state_dict(saved["trainable"], strict=False)
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.buffer.load_state_dict(saved["buffer"])
        self.average.load_state_dict(saved.get("average"))
        self.rng.setstate(saved["rng"]["python"])
        self.generator.set_state(saved["rng"]["generator"])
        torch.set_rng_state(saved["rng"]["torch"])
        if saved["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(saved["rng"]["cuda"])
        self.history, self.baseline = saved["history"], saved["baseline"]
        return saved["iteration"]


def iteration_metrics(args, fresh: dict, replayed: dict | None, batch: dict, stats: dict, processes) -> dict:
    """The logged numbers of an iteration's rollouts and update, over every process's samples."""
    groups = group_diagnostics(batch["rewards"].view(-1, args.group_size).cpu(),
                               batch["replayed"].view(-1, args.group_size).cpu())
    # replayed trajectories: weights, re-scored rewards, log p_old - log p_off per step (R, K)
    mine = replayed and (batch["is_weight"][batch["replayed"]].cpu(), replayed["rewards"].cpu(),
                         (replayed["log_prob_old"] - replayed["log_prob_behavior"]).cpu(),
                         batch["advantages"][batch["replayed"]].cpu(), replayed["stored"].cpu(), replayed["ages"])
    parts = processes.gather((fresh["rewards"].cpu(), stats, groups, mine))
    rewards, rep = torch.cat([p[0] for p in parts]), [p[3] for p in parts if p[3]]
    stats = {key: [x for p in parts for x in p[1][key]] for key in stats}
    mean = lambda values: float(np.mean(values)) if values else None  # noqa: E731
    row = {"reward_mean": rewards.mean().item(), "reward_std": rewards.std().item(),
           "loss": float(np.sum(stats["loss"])) / args.updates_per_batch,
           "clipfrac_on_policy": mean(stats["clipfrac_on"]),
           "clipfrac_off_policy": mean(stats["clipfrac_off"]), "approx_kl": mean(stats["approx_kl"]),
           "kl_to_reference": mean(stats["kl"]),
           **{key: mean([x for p in parts for x in p[2][key]]) for key in groups}}
    if rep:
        w, rep_rewards, log_ratio, advantage, stored, ages = (torch.cat(ts) for ts in zip(*rep))
        quantiles = torch.quantile(w.log().double(), torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)).tolist()
        row.update({"is_weight_mean": w.mean().item(), "is_weight_min": w.min().item(), "is_weight_max": w.max().item(),
                    **dict(zip(("log_is_weight_p10", "log_is_weight_p50", "log_is_weight_p90"), quantiles)),
                    # with log-probs summed over the D latent dimensions (the paper's densities), not averaged: D log w
                    "log_is_weight_summed_p50": quantiles[1] * batch["latents"][0, 0].numel(),
                    "replay_reward_mean": rep_rewards.mean().item(),
                    # the replayed sample in its group: advantage, share at the advantage clip, re-scored - stored
                    # reward (the stored one is never refreshed), its entry's age as the decay counts it (0: stored
                    # in the previous iteration)
                    "replay_advantage_mean": advantage.mean().item(),
                    "replay_advantage_at_clip": (advantage.abs() >= args.adv_clip).float().mean().item(),
                    "replay_rescored_minus_stored": (rep_rewards - stored).mean().item(),
                    "replay_age_mean": ages.mean().item(),
                    # the late-step "cliff" (paper Fig. 2): per-step mean and spread of log p_old - log p_off
                    **dict(zip(("log_ratio_old_behavior_per_step", "log_ratio_old_behavior_per_step_std"),
                               column_mean_std(log_ratio)))})
    return row


def column_mean_std(values: torch.Tensor) -> tuple[list, list]:
    """Per step of (N, K) values, NaN at steps outside a trajectory's SDE window: mean and population std, None for
    a step no trajectory was stochastic at."""
    if torch.isfinite(values).all():
        return values.mean(0).tolist(), values.std(0, correction=0).tolist()
    columns = [c[torch.isfinite(c)] for c in values.T]
    return ([c.mean().item() if len(c) else None for c in columns],
            [c.std(correction=0).item() if len(c) else None for c in columns])


def group_diagnostics(rewards: torch.Tensor, replayed: torch.Tensor) -> dict[str, list[float]]:
    """Per group, rewards and replayed (groups, G) -> lists to average: flat_groups (all rewards equal: no signal),
    flat_all_fail / flat_all_pass (flat at <= 0 / >= 1: a 0/1 reward's two ways to be flat), and per hybrid group
    rescued_groups (its fresh members all equal, the stored one different: the stored trajectory is its only
    signal) and replay_minus_best_fresh (the replayed trajectory's reward minus its group's best fresh one)."""
    flat, hybrid = rewards.std(dim=1) == 0, replayed.any(dim=1)
    fresh = [r[~m] for r, m, h in zip(rewards, replayed, hybrid) if h]
    stored = rewards[replayed]  # (hybrid groups,), in group order
    return {"flat_groups": flat.float().tolist(),
            "flat_all_fail": (flat & (rewards.max(dim=1).values <= 0)).float().tolist(),
            "flat_all_pass": (flat & (rewards.min(dim=1).values >= 1)).float().tolist(),
            "rescued_groups": [float(bool((f == f[0]).all() and (s != f[0]))) for f, s in zip(fresh, stored)],
            "replay_minus_best_fresh": [(s - f.max()).item() for f, s in zip(fresh, stored)]}


@contextlib.contextmanager
def timed(timings: dict, stage: str):
    """Seconds spent in the block, stored as timings["time/<stage>"]."""
    clock = time.perf_counter()
    yield
    timings[f"time/{stage}"] = time.perf_counter() - clock


class Logger:
    """metrics.jsonl (a resumed run's earlier rows first), the progress bar, and optionally Weights & Biases."""

    def __init__(self, args, processes, history: list, start: int):
        self.main, self.tracker, self.eval, self.label = processes.main, None, None, "eval"
        self.history, self.curve = history, os.path.join(args.output_dir, "curve.png")
        if args.wandb_project and self.main:
            import wandb

            self.wandb = wandb
            self.tracker = wandb.init(project=args.wandb_project, config=asdict(args), dir=args.output_dir)
        self.file = open(os.path.join(args.output_dir, "metrics.jsonl") if self.main else os.devnull, "w")
        self.file.writelines(json.dumps(row) + "\n" for row in history)
        self.bar = tqdm(desc="OP-GRPO" if args.off_policy_fraction else "Flow-GRPO", initial=start,
                        total=args.iterations, dynamic_ncols=True, disable=not self.main)

    def log(self, row: dict, samples=None) -> None:
        """One iteration's row; `samples` [(image, caption)] go to wandb with each evaluation."""
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        self.eval = row.get("eval_reward", self.eval)
        self.label = "strict" if "eval/held_out" in row else self.label  # a toy world's evaluation: strict accuracy
        if "eval_reward" in row and self.main:
            with unless_stopped_now():  # a second signal skips the picture, not the checkpoint
                plot_curve(self.history, self.curve, "strict accuracy" if self.label == "strict" else "mean reward")
        self.bar.update(1)
        shown = (("reward", row.get("reward_mean")), (self.label, self.eval))
        self.bar.set_postfix({k: f"{v:.3f}" for k, v in shown if v is not None})
        if self.tracker:
            self.tracker.log({k: v for k, v in row.items() if not isinstance(v, list)}, step=row["iteration"])
            if "eval_reward" in row and samples:
                images = [self.wandb.Image(image, caption=caption) for image, caption in samples]
                self.tracker.log({"samples": images}, step=row["iteration"])

    def close(self, message: str | None = None) -> None:
        self.bar.close()
        self.file.close()
        if message and self.main:
            print(message, file=sys.stderr)

    def finish(self, grid_path: str) -> None:
        if self.tracker:
            self.tracker.log({"before_after": self.wandb.Image(grid_path)})
            self.tracker.finish()


def curve_points(history: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The evaluations of a run's rows: (minutes of the run when each was made, eval_reward, eval_se); the minutes
    add up every stage's logged seconds (time/...), so a resumed run's curve goes on where it stopped."""
    minutes = np.cumsum([sum(v for k, v in row.items() if k.startswith("time/")) for row in history]) / 60
    points = [(0.0 if row["iteration"] == 0 and "time/eval" not in row else minutes[i], row["eval_reward"],
               row["eval_se"]) for i, row in enumerate(history) if "eval_reward" in row]
    return tuple(np.array(column) for column in zip(*points)) if points else (np.zeros(0),) * 3


def plot_curve(history: list[dict], path: str, label: str) -> None:
    """curve.png: the evaluation (strict accuracy or mean reward) with a band of +-1 standard error, against the run's
    minutes, redrawn at every evaluation so that the rise shows while it happens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes, value, se = curve_points(history)
    figure, ax = plt.subplots(figsize=(5, 3.2))
    ax.fill_between(minutes, value - se, value + se, alpha=0.25, label="±1 standard error")
    ax.plot(minutes, value, marker="o", label=label)
    ax.set_xlabel("minutes (training and evaluation)")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


STOP_REQUESTED: list[int] = []  # signal numbers received; main() checks after every iteration
CHANGING = [False]  # True while the buffer and weights change or are saved: a second signal then waits for the end


def request_stop(signum, frame) -> None:
    """SIGINT/SIGTERM. The first lets the current iteration finish and write a checkpoint, after which the process exits
    with 128 + the signal number (130, 143). A second stops at once (KeyboardInterrupt): before the update the
    iteration's starting state is checkpointed, to be redone on --resume; during the update, which is changing the
    weights, the stop waits for it to end, then checkpoints without evaluating (stopped_at_once says what was kept)."""
    STOP_REQUESTED.append(signum)
    name = signal.Signals(signum).name
    if len(STOP_REQUESTED) == 1:
        tqdm.write(f"{name}: finishing this iteration and writing a checkpoint (send it again to stop now)",
                   file=sys.stderr)
    elif CHANGING[0]:
        tqdm.write(f"{name} again: the weights are being updated or saved; stopping as soon as that is done "
                   "(seconds), with a checkpoint and no evaluation", file=sys.stderr)
    else:
        raise KeyboardInterrupt


def stopping_now() -> bool:
    """A second signal came: skip what can wait (an evaluation) and checkpoint."""
    return len(STOP_REQUESTED) > 1


@contextlib.contextmanager
def unless_stopped_now():
    """Run the block (an evaluation) unless a second signal cuts it short; the run then goes on to its checkpoint."""
    with contextlib.suppress(KeyboardInterrupt):
        yield


def stop_message(done: int, args) -> str:
    name = signal.Signals(STOP_REQUESTED[0]).name if STOP_REQUESTED else "a signal on another process"
    return (f"stopped by {name} with {done} of {args.iterations} iterations done; continue with: python op_grpo.py "
            f"--resume {args.output_dir} (--iterations is the run's total: add --iterations N to go past "
            f"{args.iterations})")


def stopped_at_once(output_dir: str | None) -> int:
    """After a second signal stopped the run at once: say what it left, plainly, and return the exit status."""
    name = signal.Signals(STOP_REQUESTED[-1]).name if STOP_REQUESTED else "SIGINT"
    held, done = run_files(output_dir or ""), None
    with contextlib.suppress(UsageError):  # a checkpoint that cannot be read counts as none
        done = read_checkpoint(output_dir, verify=False)["iteration"] if CHECKPOINT in held.split(", ") else None
    kept = (f"its checkpoint holds {done} finished iterations; continue with: python op_grpo.py --resume {output_dir}"
            if done is not None else "nothing was saved: it stopped before its first checkpoint"
            + (f" ({output_dir} holds {held})" if held else ""))
    print(f"\nstopped at once by {'a second ' * (len(STOP_REQUESTED) > 1)}{name}: {kept}", file=sys.stderr)
    return 128 + (STOP_REQUESTED[0] if STOP_REQUESTED else signal.SIGINT)


def quiet_libraries() -> None:
    """No loading bars from diffusers and transformers, and no warning about torchvision, which nothing here uses."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    for handler in logging.getLogger("transformers").handlers:
        handler.addFilter(lambda record: "torchvision" not in record.getMessage())


def parse_cli(cls, argv: list[str]):
    """tyro's command line. With --resume FOLDER the defaults become that run's args.json with --output-dir FOLDER:
    a resumed run keeps its settings and its folder, and only the flags given again change (e.g. --iterations)."""
    defaults = cls()
    for i, token in enumerate(argv):
        if token == "--resume" or token.startswith("--resume="):
            folder = token.partition("=")[2] or (argv[i + 1] if i + 1 < len(argv) else "")
            if not os.path.isdir(folder):
                raise UsageError(f"--resume {folder}: no such folder; give the --output-dir of an earlier run (each "
                                 "run prints it at the end, e.g. runs/tiny)")
            try:
                with open(os.path.join(folder, "args.json")) as f:
                    defaults = cls(**{**json.load(f), "overwrite": False, "output_dir": folder})
            except (OSError, ValueError, TypeError) as error:
                raise UsageError(f"--resume {folder}: not a run folder, its args.json cannot be read ({error}); give "
                                 "the --output-dir of an earlier run") from None
    if {"-h", "--help"} & set(argv):
        return tyro.cli(cls, args=argv, default=defaults)
    said = io.StringIO()  # tyro's own error box, made one line in the style of every other error
    try:
        with contextlib.redirect_stderr(said), contextlib.redirect_stdout(said):
            return tyro.cli(cls, args=argv, default=defaults)
    except SystemExit:
        lines = [line.strip(" │╭╮╰╯─-") for line in said.getvalue().splitlines()]
        start = next((i for i, line in enumerate(lines) if i and line), 0)
        message = " ".join(lines[start : lines.index("", start) if "" in lines[start:] else None])
        raise UsageError(re.sub(" +", " ", message.replace("{None}|", "")).strip()) from None


# ---------------------------------------------------------------------------------------------------------
# Evaluation output: the summary line and the before/after picture
# ---------------------------------------------------------------------------------------------------------
def eval_label(sets: dict) -> str:
    """What eval_reward is: a toy world's strict accuracy (held-out and training sets), else the mean reward."""
    return "strict accuracy" if "held_out" in sets else "mean reward"


def eval_summary(metrics: dict, sets: dict) -> str:
    return (f"{eval_label(sets)} {metrics['eval_reward']:.3f} +- {metrics['eval_se']:.3f} ("
            + ", ".join(f"{name} {metrics[f'eval/{name}']:.3f}" for name in sets) + ")")


def grid_picks(sets: dict, n: int = 16) -> list[tuple[int, str]]:
    """The n evaluation images of the before/after grid, spread evenly over the first set: (index, prompt)."""
    prompts = next(iter(sets.values()))
    return [(int(i), prompts[int(i)]) for i in np.linspace(0, len(prompts) - 1, n).round()]


def grid_images(images: dict, sets: dict) -> list[torch.Tensor]:
    """The grid's picks of an evaluation's images as (H, W, 3) uint8 tensors (videos: (F, H, W, 3)), to be kept in
    the checkpoint."""
    return [torch.from_numpy(np.array(images[next(iter(sets))][i])) for i, _ in grid_picks(sets)]


def to_pil(picture: torch.Tensor):
    """A grid_images tensor back to a PIL image, or to a video's list of PIL frames."""
    array = picture.numpy()
    return Image.fromarray(array) if array.ndim == 3 else [Image.fromarray(frame) for frame in array]


def before_after_strips(prompts, before, after, path, score=None, title=(), zoom=2, columns=2) -> None:
    """Each video before training above the same prompt's video after, its frames side by side and labelled with the
    prompt and (toy world) the strict score, in `columns` columns; score(prompt, video) -> 0/1."""
    verdict = (lambda p, v: f" [{score(p, v):.0f}]") if score else (lambda p, v: "")
    blocks = [[(f"{label}{verdict(p, v)}: {p}", v) for label, v in (("before", b), ("after", a))]
              for p, b, a in zip(prompts, before, after)]
    frame_rows(blocks, path, zoom=zoom, columns=columns, title=title)


def frame_rows(blocks, path, zoom=2, columns=1, title=()) -> None:
    """A PNG of labelled rows of frames: blocks = [[(label, frames), ...], ...], each block's rows one above the
    other, the blocks in `columns` columns, `title` lines above them all."""
    side, label_h, gap = blocks[0][0][1][0].width * zoom, 12, 8
    cell_w = max(6 * 62, max((side + 2) * len(frames) for block in blocks for _, frames in block))
    cell_h = max(len(block) for block in blocks) * (side + label_h + 2) + gap
    top = 8 + 14 * len(title) if title else 0
    strip = Image.new("RGB", (4 + cell_w * columns, top + cell_h * math.ceil(len(blocks) / columns)), "white")
    draw = ImageDraw.Draw(strip)
    for n, text in enumerate(title):
        draw.text((4, 4 + 14 * n), text, fill="black")
    for i, block in enumerate(blocks):
        x, y = 4 + (i % columns) * cell_w, top + (i // columns) * cell_h
        for row, (label, frames) in enumerate(block):
            y_row = y + row * (side + label_h + 2)
            draw.text((x, y_row), label, fill="black")
            for f, frame in enumerate(frames):
                strip.paste(frame.resize((side, side), Image.NEAREST), (x + f * (side + 2), y_row + label_h))
    strip.save(path)


def before_after_grid(prompts, before, after, path, score=None, columns=8, title=()):
    """Cells of the image before training above the one after (rows labelled on the left), the prompt and (toy
    world) both strict scores underneath; score(prompt, image) -> 0/1. `title`: lines written above the grid."""
    side, cell_w, gap, margin, top = 128, 150, 4, 44, 8 + 14 * len(title) if title else 0
    cell_h, rows = 2 * side + gap + 40, math.ceil(len(prompts) / columns)
    grid = Image.new("RGB", (margin + cell_w * columns, top + cell_h * rows), "white")
    draw = ImageDraw.Draw(grid)
    for n, text in enumerate(title):
        draw.text((4, 4 + 14 * n), text, fill="black")
    for i, prompt in enumerate(prompts):
        x, y = margin + (i % columns) * cell_w, top + (i // columns) * cell_h
        for row, (label, image) in enumerate((("before", before[i]), ("after", after[i]))):
            resample = Image.NEAREST if image.width <= side else Image.LANCZOS  # tiny images are shown as blocks
            grid.paste(image.resize((side, side), resample), (x + (cell_w - side) // 2, y + row * (side + gap)))
            draw.text((4, y + row * (side + gap) + side // 2 - 5), label, fill="black")
        words = prompt.split()
        lines = [" ".join(words[:4]), " ".join(words[4:8])]
        lines += [f"before {score(prompt, before[i]):.0f}  after {score(prompt, after[i]):.0f}"] if score else []
        for n, text in enumerate(lines):
            draw.text((x + 3, y + 2 * side + gap + 2 + 11 * n), text, fill="black")
    grid.save(path)


def grid_title(before: dict, after: dict, sets: dict, scored: bool, video: bool = False) -> list[str]:
    """The before/after picture's title: what the numbers under the images (videos) are, and the run's change."""
    change = f"{before['eval_reward']:.3f} -> {after['eval_reward']:.3f} (change {after['eval_change']:+.3f} +- " \
             f"{after['eval_change_se']:.3f}, paired SE), over {', '.join(sets)}"
    if not scored:
        return [f"Before and after training, the same prompts and noise. Mean reward {change}"]
    return [f"Before and after training, the same prompts and noise. With each {'video' if video else 'image'}, the "
            "strict verifier of the toy world: 1 = it shows what its prompt asks, 0 = it does not.",
            f"Strict accuracy of the whole evaluation {change}; {len(next(iter(sets.values())))} "
            f"{next(iter(sets))} prompts, 16 shown."]


def save_weights(transformer, args, folder: str, pipeline: str) -> None:
    """LoRA: diffusers' LoRA format, which the pipeline's (class name `pipeline`) load_lora_weights(folder) reads with
    its rank and alpha; full fine-tuning: the transformer in diffusers format."""
    if not args.lora_rank:
        return transformer.save_pretrained(folder)
    import diffusers
    from peft.utils import get_peft_model_state_dict

    metadata = transformer.peft_config["default"].to_dict()  # rank and alpha, read back by load_lora_weights
    getattr(diffusers, pipeline).save_lora_weights(folder, get_peft_model_state_dict(transformer),
                                                   transformer_lora_adapter_metadata=metadata)


def report_results(args, state, sets: dict, mix, images: dict, logger, score, transformer, pipeline: str) -> None:
    """After the last iteration: before/after scores per set and family (mix: the families' weights in a set's
    score), the before/after grid (score(prompt, image) -> 0/1 labels it; None: no scores) and the fine-tuned
    weights (save_weights)."""
    final, before = state.history[-1], state.baseline["metrics"]
    print(f"after:  {eval_summary(final, sets)}; change {final['eval_change']:+.3f} "
          f"+- {final['eval_change_se']:.3f} (paired standard error)")
    families = [k for k in final if k.count("/") == 2 and k.startswith("eval/") and not k.endswith(("/se", "/dense"))]
    met = [k for k in final if "/met/" in k and k in before]  # the toy video world: which requirements pass
    for key in sorted(families) + sorted(met):
        print(f"  {key:30s} {before[key]:.3f} -> {final[key]:.3f}")
    if families and mix:
        print("  a set's score is not the plain mean of its rows: families weigh " + ", ".join(
            f"{f} {w:g}" for f, w in mix.items()) + ", as training draws them, over the families the set has")
    picks, grid_path = grid_picks(sets), os.path.join(args.output_dir, "before_after.png")
    before_pictures = [to_pil(t) for t in state.baseline["grid"]]
    after = [images[next(iter(sets))][i] for i, _ in picks]
    video = isinstance(after[0], list)  # videos: rows of frames
    title = grid_title(before, final, sets, score is not None, video)
    (before_after_strips if video else before_after_grid)([p for _, p in picks], before_pictures, after, grid_path,
                                                          score, title=title)
    weights = "lora" if args.lora_rank else "transformer"
    with state.average.in_place():  # the weights that were evaluated: their EMA, if --ema-decay
        save_weights(transformer, args, os.path.join(args.output_dir, weights), pipeline)
    logger.finish(grid_path)
    print(f"results in {args.output_dir}/: metrics.jsonl, before_after.png, {weights}/, {CHECKPOINT}")
