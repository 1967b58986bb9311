"""Peak memory and seconds per iteration of `python op_grpo.py --model sd3` at SD3.5-Medium size (and of
`--model wan` at Wan2.1-T2V-1.3B size), offline.

  python profile_sd3.py                          # one GPU: full SD3.5-M architecture, random weights, 3 iterations
  python profile_sd3.py --model wan              # one GPU: full Wan2.1-T2V-1.3B architecture (33 frames, 240 x 416)
  python profile_sd3.py --micro-batch 8          # the same with another op_grpo memory setting
  python profile_sd3.py --pickscore              # PickScore's cost included (a random CLIP-H of its shape)
  python profile_sd3.py --depth 2 --resolution 128 --max-sequence-length 8 --prompts-per-iteration 2 \\
      --group-size 2 --micro-batch 2 --off-policy-fraction 0.5 --iterations 2 --eval-steps 4 --device cpu \\
      --threads 1 --output /tmp/profile_cpu.json   # a CPU smoke run at reduced size, about 3 minutes on one thread
  python profile_sd3.py --model wan --depth 2 --resolution 32 --width 48 --num-frames 5 --max-sequence-length 8 \
      --prompts-per-iteration 2 --group-size 2 --off-policy-fraction 0.5 --iterations 2 --eval-steps 2 \
      --device cpu --threads 1 --output /tmp/profile_wan_cpu.json   # the same for Wan, reduced

No model hub is needed: the pipeline is built in code (build_pipeline) with SD3.5-Medium's architecture and
random weights, saved with save_pretrained to --folder, and trained on by op_grpo.main with --model sd3 and
--pretrained <folder>, i.e. through the unchanged sd3 code path and its presets. What is full size and what is not:
  * transformer: SD3.5-M's config (24 joint blocks of 24 heads x 64, MMDiT-X second attention in blocks 0-12,
    qk rms_norm, patch 2, 16 latent channels, context 4096 -> 1536, pooled 2048, pos_embed_max_size 384);
    --depth lowers the block count (the first min(13, depth) keep the second attention);
  * VAE: SD3's 16-channel AutoencoderKL at full size;
  * text encoders: CLIP-L (768, projection 768), CLIP-G (1280, projection 1280) and T5 (d_model 4096) at their
    widths, but --text-depth layers each and a vocabulary of the prompts' words only (tokenizers made in code).
    They embed every prompt once and are dropped before the first iteration, so they change only the
    loading peak; the JSON's `arithmetic` gives their full-size weight memory;
  * reward: JPEG compressibility (PickScore's weights are not offline); --pickscore puts a random CLIP-H of
    PickScore's shape in its place, so that its memory and time are included.
With --model wan the same holds for Wan2.1-T2V-1.3B (diffusers' Wan-AI/Wan2.1-T2V-1.3B-Diffusers): its transformer
(30 blocks of 12 heads x 128, FFN 8960, patch 1 x 2 x 2, text 4096) and its VAE at full size, UMT5-XXL at its width
(4096) with --text-depth layers, the UniPC flow scheduler of shift 3 it ships; JPEG is scored on every 4th frame.

The JSON (--output) holds the device, versions, the settings op_grpo ran with, peak memory (GPU: allocated, per
phase; host: max RSS), seconds per stage per iteration (the first iteration is warm-up and left out of the means),
the overhead ratio (see overhead_ratio), an activation estimate (see saved_activations) and the memory arithmetic
(parameter counts, not measurements).
"""

import json
import multiprocessing
import os
import platform
import resource
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from typing import Literal

import torch
import tyro

import op_grpo
import plumbing
import rewards

STAGES = ["time/sampling", "time/reward", "time/replay_old", "time/tail", "time/update"]  # evaluation aside

# SD3.5-Medium's transformer/config.json (stabilityai/stable-diffusion-3.5-medium), less the block count
SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, attention_head_dim=64,
                   num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                   pooled_projection_dim=2048, pos_embed_max_size=384, qk_norm="rms_norm")
SD35_MEDIUM_LAYERS, SD35_MEDIUM_DUAL = 24, 13  # joint blocks; blocks 0-12 have the MMDiT-X second attention
# SD3's VAE (vae/config.json of SD3 and SD3.5): 16 latent channels, 8x downsampling, latent shift and scale
SD3_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
               down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
               layers_per_block=2, norm_num_groups=32, act_fn="silu", sample_size=1024, scaling_factor=1.5305,
               shift_factor=0.0609, force_upcast=True, use_quant_conv=False, use_post_quant_conv=False)
# The text encoders' widths (CLIP ViT-L/14, OpenCLIP bigG/14, T5 v1.1 XXL), their real depths and vocabularies
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, projection_dim=768,
              hidden_act="quick_gelu")
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, projection_dim=1280, hidden_act="gelu")
T5_XXL = dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, feed_forward_proj="gated-gelu",
              relative_attention_num_buckets=32, relative_attention_max_distance=128)
FULL_DEPTH = {"clip_l": 12, "clip_g": 32, "t5": 24}
FULL_VOCAB = {"clip": 49408, "t5": 32128}
CLIP_TOKENS = 77  # the CLIP encoders' positions; SD3's pipeline pads every prompt to them
# Wan2.1-T2V-1.3B's transformer/config.json (Wan-AI/Wan2.1-T2V-1.3B-Diffusers), less the block count; its VAE is
# AutoencoderKLWan's default config (16 channels, 4x in time, 8x in space); UMT5-XXL is T5-XXL's widths and 256384 words
WAN_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                text_dim=4096, freq_dim=256, ffn_dim=8960, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                eps=1e-6)
WAN_1_3B_LAYERS, WAN_FLOW_SHIFT, UMT5_VOCAB = 30, 3.0, 256384
FULL_LAYERS = {"sd3": SD35_MEDIUM_LAYERS, "wan": WAN_1_3B_LAYERS}
PIPELINE_NAMES = {"sd3": "StableDiffusion3Pipeline", "wan": "WanPipeline"}
# PickScore = CLIP ViT-H/14 (laion2B): vision 1280 wide x 32, text 1024 wide x 24, projection 1024, 224 px
PICKSCORE_VISION = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                        image_size=224, patch_size=14, hidden_act="gelu")
PICKSCORE_TEXT = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                      max_position_embeddings=CLIP_TOKENS, hidden_act="gelu")


@dataclass
class ProfileArgs:
    """Build SD3.5-Medium's (or Wan2.1-T2V-1.3B's) architecture with random weights, run op_grpo on it, measure."""

    model: Literal["sd3", "wan"] = "sd3"
    """op_grpo's --model to profile: sd3 (SD3.5-Medium's architecture) or wan (Wan2.1-T2V-1.3B's)"""
    output: str | None = None
    """where the measurements (JSON) are written (--model wan: None = assets/profile_wan.json)"""
    folder: str | None = None
    """where the pipeline is built (reused while its build.json matches); None = runs/profile_<model>/pipeline_depth<N>"""
    run_dir: str | None = None
    """op_grpo's --output-dir for the run (overwritten); None = runs/profile_<model>/run"""
    depth: int | None = None
    """transformer blocks; None = the full model's (SD3.5-M: 24 joint blocks, the first min(13, depth) with the
    MMDiT-X second attention; Wan2.1-1.3B: 30)"""
    text_depth: int = 2
    """layers of each text encoder (real: CLIP-L 12, CLIP-G 32, T5 24, UMT5 24); they run once per prompt and are
    dropped"""
    resolution: int | None = None
    """image (video: frame height) in pixels; None = the preset (sd3: 512, wan: 240)"""
    width: int | None = None
    """--model wan: frame width in pixels; None = the preset (416)"""
    num_frames: int | None = None
    """--model wan: frames per video (4n + 1); None = the preset (33)"""
    iterations: int = 3
    """op_grpo iterations; the first is warm-up and left out of the per-iteration means"""
    max_sequence_length: int | None = None
    """T5 (UMT5) tokens per prompt; None = the preset (sd3: 256, wan: 512)"""
    prompts_per_iteration: int | None = None
    """P; None = the preset (4)"""
    group_size: int | None = None
    """G; None = the preset (sd3: 8, wan: 4)"""
    micro_batch: int | None = None
    """samples per forward/backward pass in the update and per VAE decode; None = the preset (sd3: 4, wan: 2)"""
    gradient_checkpointing: bool = False
    """op_grpo's --gradient-checkpointing (the preset is off)"""
    mixed_precision: Literal["no", "fp16", "bf16"] | None = None
    """dtype of the frozen weights; None = the preset (bf16)"""
    off_policy_fraction: float = 0.25
    """op_grpo's rho (its default); keep rho x P whole (P 4: 0.25) so that every iteration replays as many slots"""
    num_steps: int | None = None
    """K, SDE steps per trajectory; None = the preset (sd3: 10, wan: 20); fewer only to make a smoke run short"""
    eval_per_family: int = 4
    """evaluation prompts (the preset's 32 would dominate a short run); evaluation is timed apart"""
    eval_steps: int | None = None
    """ODE steps at evaluation; None = the preset (sd3: 40, wan: 50)"""
    sde_window: int = 3
    """then a second run with an SDE window of this many steps (op_grpo's --sde-window; Flow-GRPO-Fast's SD3: 3):
    its seconds per stage beside the first run's; 0 = no second run"""
    pickscore: bool = False
    """reward with a random CLIP-H of PickScore's shape (the sd3 preset's reward) instead of JPEG compressibility"""
    pickscore_depth: int | None = None
    """layers of each of its towers; None = PickScore's own (vision 32, text 24)"""
    activations: bool = True
    """also count autograd's saved tensors of one update pass at full width and preset shapes (a 4-block model,
    about 20 s on one CPU thread), extrapolated to the full depth: an activation estimate that needs no GPU"""
    timing_repeats: int = 3
    """timed repetitions of each distinct transformer pass for the overhead ratio (after one untimed)"""
    device: str | None = None
    """torch device; None picks cuda when available"""
    threads: int | None = None
    """CPU threads for torch; None keeps torch's default"""
    seed: int = 0
    """seed of the random weights and of the run"""


# ---------------------------------------------------------------------------------------------------------
# 1. The pipeline: SD3.5-Medium's architecture, random weights, tokenizers made in code
# ---------------------------------------------------------------------------------------------------------
def builtin_prompts() -> list[str]:
    """op_grpo's built-in --model sd3 prompts: the source of the tokenizers' vocabulary. Other text still tokenizes,
    CLIP's byte by byte and T5's letter by letter, and every prompt is padded to the same 77 + max_sequence_length
    slots, so the vocabulary changes no cost."""
    return list(plumbing.DEFAULT_PROMPTS)


def prompt_words(prompts: list[str]) -> list[str]:
    """The words of the prompts, punctuation split off: the tokenizers' whole vocabulary."""
    return sorted({w for p in prompts for w in p.replace(",", " , ").replace(".", " . ").split()})


def build_clip_tokenizer(words: list[str]):
    """A CLIP tokenizer whose byte-level BPE was trained on `words` (as toy_world.build_tokenizer does for its
    world), padded to CLIP's 77 positions."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    clip_split = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
    split = pre_tokenizers.Split(Regex(clip_split), behavior="removed", invert=True)
    bpe.pre_tokenizer = pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False)])
    specials = ["<|startoftext|>", "<|endoftext|>"]
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=specials, end_of_word_suffix="</w>",
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator([" ".join(w.lower() for w in words)] * 10, trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split()) for m in model["merges"]]
    pieces = specials + sorted(set(model["vocab"]) - set(specials))  # sorted: ids never depend on the trainer's ties
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(pieces)}, merges=merges, model_max_length=CLIP_TOKENS)


def build_t5_tokenizer(words: list[str]):
    """A T5 (Unigram) tokenizer with one piece per word and single characters for the rest; pad 0, eos 1, unk 2
    as T5's own."""
    from transformers import T5Tokenizer

    characters = sorted({c for w in words for c in w.lower()} | set("abcdefghijklmnopqrstuvwxyz0123456789,.'-"))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + w, -1.0) for w in words] + [(c, -5.0) for c in characters]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def transformer_config(depth: int) -> dict:
    return {**SD35_MEDIUM, "num_layers": depth, "dual_attention_layers": tuple(range(min(SD35_MEDIUM_DUAL, depth)))}


def text_encoder_configs(depth: int | None, clip_vocab: int | None = None, t5_vocab: int | None = None,
                         clip_tokenizer=None):
    """Configs of CLIP-L, CLIP-G and T5 at full width; a depth or vocabulary left at None is the real one."""
    from transformers import CLIPTextConfig, T5Config

    ids = {}  # the pooled CLIP embedding is read at the end-of-text token: eos_token_id must be the tokenizer's
    if clip_tokenizer is not None:
        ids = dict(bos_token_id=clip_tokenizer.bos_token_id, eos_token_id=clip_tokenizer.eos_token_id,
                   pad_token_id=clip_tokenizer.pad_token_id)

    def clip(widths, name):
        return CLIPTextConfig(**widths, num_hidden_layers=depth or FULL_DEPTH[name], vocab_size=clip_vocab or
                              FULL_VOCAB["clip"], max_position_embeddings=CLIP_TOKENS, **ids)

    t5 = T5Config(**T5_XXL, num_layers=depth or FULL_DEPTH["t5"], vocab_size=t5_vocab or FULL_VOCAB["t5"],
                  is_encoder_decoder=False, use_cache=False)
    return clip(CLIP_L, "clip_l"), clip(CLIP_G, "clip_g"), t5


def build_wan_pipeline(args: ProfileArgs, device: torch.device):
    """A WanPipeline of Wan2.1-T2V-1.3B's architecture with random weights, built on `device`, with the UniPC flow
    scheduler (shift 3) the checkpoint ships; op_grpo takes only its shift."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = build_t5_tokenizer(prompt_words(builtin_prompts()))
    umt5 = UMT5Config(**T5_XXL, num_layers=args.text_depth, vocab_size=len(tokenizer), is_encoder_decoder=False,
                      use_cache=False)
    torch.manual_seed(args.seed)
    with torch.device(device):
        components = dict(transformer=WanTransformer3DModel(**WAN_1_3B, num_layers=args.depth),
                          vae=AutoencoderKLWan(), text_encoder=UMT5EncoderModel(umt5))
    components = {name: module.to(torch.bfloat16).eval() for name, module in components.items()}
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        flow_shift=WAN_FLOW_SHIFT)
    return WanPipeline(**components, scheduler=scheduler, tokenizer=tokenizer)


def build_pipeline(args: ProfileArgs, device: torch.device):
    """A StableDiffusion3Pipeline of SD3.5-Medium's architecture (or, --model wan, a WanPipeline of Wan2.1-T2V-1.3B's)
    with random weights, built on `device`."""
    if args.model == "wan":
        return build_wan_pipeline(args, device)
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from diffusers import StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    words = prompt_words(builtin_prompts())
    clip_tokenizer, t5_tokenizer = build_clip_tokenizer(words), build_t5_tokenizer(words)
    clip_l, clip_g, t5 = text_encoder_configs(args.text_depth, len(clip_tokenizer), len(t5_tokenizer), clip_tokenizer)
    torch.manual_seed(args.seed)
    with torch.device(device):  # initialised where it runs: seconds on a GPU for the full transformer
        components = dict(transformer=SD3Transformer2DModel(**transformer_config(args.depth)),
                          vae=AutoencoderKL(**SD3_VAE), text_encoder=CLIPTextModelWithProjection(clip_l),
                          text_encoder_2=CLIPTextModelWithProjection(clip_g), text_encoder_3=T5EncoderModel(t5))
    # bf16 on disk halves the folder (4.6 GB for the full transformer); op_grpo casts to --mixed-precision on loading
    components = {name: module.to(torch.bfloat16).eval() for name, module in components.items()}
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)  # SD3.5's scheduler config
    return StableDiffusion3Pipeline(**components, scheduler=scheduler, tokenizer=clip_tokenizer,
                                    tokenizer_2=clip_tokenizer, tokenizer_3=t5_tokenizer)


BUILD_FLAGS = ("model", "depth", "text_depth", "seed")  # a folder built with other values is rebuilt


def ensure_pipeline(args: ProfileArgs, device: torch.device) -> float:
    """Build and save the pipeline in args.folder unless a matching one is there; returns the seconds it took."""
    if args.threads:  # this may be a process of its own
        torch.set_num_threads(args.threads)
    stamp = {flag: getattr(args, flag) for flag in BUILD_FLAGS}
    stamp_path = os.path.join(args.folder, "build.json")
    if os.path.isfile(stamp_path) and json.load(open(stamp_path)) == stamp:
        print(f"reusing the pipeline in {args.folder}", flush=True)
        return 0.0
    if os.path.isfile(stamp_path):  # ours, built with other flags: no file of it may survive into the new one
        shutil.rmtree(args.folder)
    elif os.path.isdir(args.folder) and os.listdir(args.folder):
        raise SystemExit(f"profile_sd3.py: error: --folder {args.folder} is not empty and not built by profile_sd3.py")
    clock = time.perf_counter()
    name = {"sd3": "SD3.5-Medium", "wan": "Wan2.1-T2V-1.3B"}[args.model]
    print(f"building {name}'s architecture ({args.depth} blocks, text encoders of {args.text_depth} layers) "
          f"in {args.folder}", flush=True)
    build_pipeline(args, device).save_pretrained(args.folder)
    with open(stamp_path, "w") as f:
        json.dump(stamp, f)
    return time.perf_counter() - clock


# ---------------------------------------------------------------------------------------------------------
# 2. Watching the run: every transformer pass, the iteration it belongs to, and GPU memory per phase
# ---------------------------------------------------------------------------------------------------------
class RunWatcher:
    """Wraps op_grpo.predict_velocity and op_grpo.evaluate for the length of a `with` block.

    Each transformer pass is recorded as (iteration, phase, signature, start time): the iteration is the number
    of rows already in metrics.jsonl (op_grpo writes one at the end of every iteration), the phase "eval" inside
    evaluate and "train" elsewhere, the signature what fixes the pass's cost (module, LoRA on or off, grad mode,
    input shapes and dtypes, guidance). On CUDA the peak of allocated memory is kept per phase: "load" (weights,
    text encoders and prompt embedding, up to the first evaluation), "eval" and "train".
    """

    def __init__(self, rows_path: str):
        self.rows_path, self.rows_seen, self.rows_size = rows_path, 0, -1
        self.calls, self.eval_starts, self.evaluations, self.modules, self.lora = [], [], [], {}, {}
        self.phase, self.peaks, self.cuda = "load", {}, torch.cuda.is_available()

    def iteration(self) -> int:
        try:
            size = os.path.getsize(self.rows_path)
            if size != self.rows_size:  # re-count only when op_grpo has written a row
                with open(self.rows_path) as f:
                    self.rows_seen, self.rows_size = sum(1 for line in f if line.strip()), size
        except FileNotFoundError:  # op_grpo opens it after the first evaluation
            self.rows_seen = 0
        return self.rows_seen

    def adapters_off(self, transformer) -> bool:
        """True while a LoRA model computes with its base weights only (op_grpo's KL reference pass)."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        if id(transformer) not in self.lora:  # one adapter layer stands for all: they are switched together
            self.lora[id(transformer)] = next((m for m in transformer.modules() if isinstance(m, BaseTunerLayer)), None)
        layer = self.lora[id(transformer)]
        return layer is not None and layer.disable_adapters

    def switch(self, phase: str) -> None:
        if self.cuda:
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), torch.cuda.max_memory_allocated())
            torch.cuda.reset_peak_memory_stats()
        self.phase = phase

    def __enter__(self):
        self.predict_velocity, self.evaluate = op_grpo.predict_velocity, op_grpo.evaluate

        def predict_velocity(transformer, x, sigma, embeds, pooled, guidance_scale, uncond=None):
            self.modules[id(transformer)] = transformer
            signature = (id(transformer), self.adapters_off(transformer), torch.is_grad_enabled(),
                         tuple(x.shape), str(x.dtype), tuple(embeds.shape), tuple(pooled.shape), str(embeds.dtype),
                         float(guidance_scale),
                         None if uncond is None else tuple((tuple(t.shape), str(t.dtype)) for t in uncond))
            self.calls.append((self.iteration(), self.phase, signature, time.perf_counter()))
            return self.predict_velocity(transformer, x, sigma, embeds, pooled, guidance_scale, uncond)

        def evaluate(*args, **kwargs):
            iteration, start = self.iteration(), time.perf_counter()
            self.eval_starts.append((iteration, start))
            self.switch("eval")
            try:
                return self.evaluate(*args, **kwargs)
            finally:
                self.switch("train")
                self.evaluations.append({"after_iterations": iteration, "seconds": time.perf_counter() - start})

        op_grpo.predict_velocity, op_grpo.evaluate = predict_velocity, evaluate
        return self

    def __exit__(self, *exc):
        op_grpo.predict_velocity, op_grpo.evaluate = self.predict_velocity, self.evaluate
        self.switch("done")

    def iteration_walls(self, iterations: int) -> dict[int, float]:
        """Wall seconds of each iteration: from its first training pass to the next iteration's first, or to the
        start of the evaluation that ends it. Prompt drawing before the first pass (milliseconds) is left out."""
        first = {}
        for it, phase, _, t in self.calls:
            if phase == "train":
                first.setdefault(it, t)
        walls = {}
        for it in range(iterations):
            ends = [t for i, t in self.eval_starts if i == it] + ([first[it + 1]] if it + 1 in first else [])
            if it in first and ends:
                walls[it] = min(ends) - first[it]
        return walls


# ---------------------------------------------------------------------------------------------------------
# 3. The overhead ratio: an iteration's seconds over those of the transformer passes it contains, timed alone
# ---------------------------------------------------------------------------------------------------------
def overhead_ratio(iteration_seconds: float, pass_counts: dict, pass_seconds: dict) -> tuple[float, float]:
    """(ratio, pure seconds): pure = sum over distinct passes of count per iteration x seconds of one pass alone;
    ratio = iteration_seconds / pure. 1 means the iteration is nothing but transformer passes; the rest is VAE
    decoding, rewards, the SDE step math, the optimizer, host-device copies and Python."""
    pure = sum(count * pass_seconds[signature] for signature, count in pass_counts.items())
    return iteration_seconds / pure, pure


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_pass(transformer, signature, repeats: int, device: torch.device) -> float:
    """Seconds of one transformer pass of `signature` alone: op_grpo.predict_velocity on random inputs of the
    recorded shapes, in the recorded grad mode; a pass with gradients also runs its backward (of a scalar, as the
    update's loss is). One untimed pass first."""
    _, off, grad, x_shape, x_dtype, e_shape, p_shape, e_dtype, guidance, uncond_spec = signature
    g = torch.Generator(device).manual_seed(0)

    def rand(shape, dtype):
        return torch.randn(shape, generator=g, device=device).to(getattr(torch, dtype.removeprefix("torch.")))

    x, embeds, pooled = rand(x_shape, x_dtype), rand(e_shape, e_dtype), rand(p_shape, e_dtype)
    uncond = None if uncond_spec is None else tuple(rand(shape, dtype) for shape, dtype in uncond_spec)
    sigma = torch.tensor(0.5, device=device)
    if off:
        transformer.disable_adapters()
    try:
        seconds = []
        for _ in range(repeats + 1):
            synchronize(device)
            clock = time.perf_counter()
            with torch.set_grad_enabled(grad):
                v = op_grpo.predict_velocity(transformer, x, sigma, embeds, pooled, guidance, uncond)
                if grad:
                    v.float().square().mean().backward()
            synchronize(device)
            seconds.append(time.perf_counter() - clock)
        return sum(seconds[1:]) / repeats
    finally:
        if off:
            transformer.enable_adapters()
        for p in transformer.parameters():
            p.grad = None


def time_iteration_passes(watcher: RunWatcher, measured: list[int], repeats: int, device: torch.device) -> dict:
    """The overhead ratio of the measured iterations, with every distinct training pass they made timed alone."""
    passes = Counter(sig for it, phase, sig, _ in watcher.calls if phase == "train" and it in measured)
    per_iteration = {sig: n / len(measured) for sig, n in passes.items()}
    print(f"timing {len(passes)} distinct transformer passes alone, {repeats} times each", flush=True)
    seconds = {sig: time_pass(watcher.modules[sig[0]], sig, repeats, device) for sig in passes}
    walls = watcher.iteration_walls(max(measured) + 1)
    wall = mean([walls[i] for i in measured if i in walls])
    ratio, pure = overhead_ratio(wall, per_iteration, seconds) if wall and passes else (None, None)
    described = []
    for sig in passes:
        _, off, grad, x_shape, _, e_shape, _, _, guidance, uncond = sig
        rows = x_shape[0] * (2 if guidance != 1.0 and uncond is not None else 1)  # guidance: cond and uncond rows
        described.append({"transformer_rows": rows, "latents": list(x_shape), "context": list(e_shape[1:]),
                          "gradients": grad, "adapters_off": off, "per_iteration": per_iteration[sig],
                          "seconds_each": seconds[sig]})
    return {"ratio": ratio, "target": 1.2, "iteration_seconds": wall, "pure_transformer_seconds": pure,
            "passes": described,
            "note": "ratio = wall seconds of one iteration / seconds of the transformer passes that iteration made, "
                    "each re-run alone (same module, shapes, dtypes, grad mode and guidance; a pass with gradients "
                    "with its backward). Measured iterations only; evaluation excluded. The rest is VAE decoding, "
                    "rewards, the SDE-step math, the optimizer, copies and Python. A reduced --depth or --resolution "
                    "changes the balance, so only a full-size ratio answers the target"}


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


# ---------------------------------------------------------------------------------------------------------
# 4. Memory without a GPU: arithmetic on parameter counts, and autograd's saved tensors at full width
# ---------------------------------------------------------------------------------------------------------
def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def lora_parameters(transformer, rank: int, model: str = "sd3") -> int:
    """Parameters of rank-r adapters on op_grpo's LoRA targets: r x (in + out) per matched Linear (peft's
    matching: the module name equals a target or ends with "." + target)."""
    targets = op_grpo.LORA_TARGETS[PIPELINE_NAMES[model]]
    return sum(rank * (m.in_features + m.out_features) for name, m in transformer.named_modules()
               if isinstance(m, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets))


def gb(n_bytes: float) -> float:
    return round(n_bytes / 2**30, 3)


def parameter_counts(run: op_grpo.Args) -> tuple[dict, int]:
    """Parameters of the full-size models of run.model (built on the meta device: no memory, no time), and the
    elements of the transformer's buffers (SD3's positional table), which are cast with the weights."""
    from diffusers import AutoencoderKL, AutoencoderKLWan, SD3Transformer2DModel, WanTransformer3DModel
    from transformers import CLIPConfig, CLIPModel, CLIPTextModelWithProjection, T5EncoderModel, UMT5Config
    from transformers import UMT5EncoderModel

    pickscore = CLIPConfig(text_config=PICKSCORE_TEXT, vision_config=PICKSCORE_VISION, projection_dim=1024)
    with torch.device("meta"):
        if run.model == "wan":
            transformer = WanTransformer3DModel(**WAN_1_3B, num_layers=WAN_1_3B_LAYERS)
            umt5 = UMT5Config(**T5_XXL, num_layers=FULL_DEPTH["t5"], vocab_size=UMT5_VOCAB, is_encoder_decoder=False)
            n = {"transformer": count(transformer), "vae": count(AutoencoderKLWan()),
                 "umt5_xxl": count(UMT5EncoderModel(umt5))}
        else:
            clip_l, clip_g, t5 = text_encoder_configs(None)
            transformer = SD3Transformer2DModel(**transformer_config(SD35_MEDIUM_LAYERS))
            n = {"transformer": count(transformer), "vae": count(AutoencoderKL(**SD3_VAE)),
                 "clip_l": count(CLIPTextModelWithProjection(clip_l)),
                 "clip_g": count(CLIPTextModelWithProjection(clip_g)), "t5_xxl": count(T5EncoderModel(t5))}
        n["pickscore_clip_h"] = count(CLIPModel(pickscore))
        n["lora"] = lora_parameters(transformer, run.lora_rank, run.model) if run.lora_rank else 0
    persistent = dict(transformer.named_buffers()).keys() & transformer.state_dict().keys()
    return n, sum(b.numel() for name, b in transformer.named_buffers() if name in persistent)


def memory_arithmetic(run: op_grpo.Args) -> dict:
    """GB of weights, adapters, optimizer state and host-side buffers of the full-size pipeline of run.model under
    `run` (profile passes the model's preset): arithmetic on parameter counts."""
    n, buffers = parameter_counts(run)
    video = run.model == "wan"
    text = ["umt5_xxl"] if video else ["clip_l", "clip_g", "t5_xxl"]
    frozen = torch.finfo(op_grpo.FROZEN_DTYPES[run.mixed_precision]).bits // 8
    memory = {
        "transformer_frozen": gb(frozen * (n["transformer"] + buffers)),
        "lora_weights_grads_adam_fp32": gb(16 * n["lora"]),  # 4 B weight + 4 B gradient + 8 B AdamW moments
        "vae": gb((4 if video else frozen) * n["vae"]),  # op_grpo keeps Wan's VAE in float32
        "text_encoders_until_embedded": gb(frozen * sum(n[name] for name in text)),
        "pickscore_if_used": gb(frozen * n["pickscore_clip_h"]),
    }
    resident = memory["transformer_frozen"] + memory["lora_weights_grads_adam_fp32"] + memory["vae"]
    frames = (run.num_frames - 1) // 4 + 1 if video else 1
    height, width = run.resolution // 8, (run.width or run.resolution) // 8
    latents = (run.num_steps + 1) * 16 * frames * height * width + run.num_steps  # one stored trajectory, float32
    context = run.max_sequence_length + (0 if video else CLIP_TOKENS)
    return {
        "note": f"arithmetic from parameter counts of the full-size models (built on the meta device) under the "
                f"{run.model} preset, not a measurement; activations are not in it (see activation_estimate)",
        "parameters": n, "transformer_buffer_elements": buffers, "frozen_dtype_bytes": frozen,
        "gpu_gb": {**memory, "resident_while_training_without_pickscore": round(resident, 3),
                   "at_load_with_full_text_encoders": round(resident + memory["text_encoders_until_embedded"], 3)},
        "host_gb": {"replay_buffer_full": gb(run.buffer_capacity * 4 * latents),  # the buffer and embeddings: CPU
                    "embeddings_per_prompt": gb(frozen * (context * 4096 + (0 if video else 2048)))},
    }


def saved_per_block(transformer, blocks, x: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor) -> Counter:
    """Bytes autograd keeps for the backward of one op_grpo.predict_velocity pass (no guidance: one row), per index
    of `blocks` and "outside" for the rest; counted once per storage, weights excluded."""
    weights = {p.untyped_storage().data_ptr() for p in transformer.parameters()}
    current, saved, seen = ["outside"], Counter(), set()

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            saved[current[0]] += storage.nbytes()
        return tensor

    hooks = []
    for i, block in enumerate(blocks):
        hooks.append(block.register_forward_pre_hook(lambda m, a, i=i: current.__setitem__(0, i)))
        hooks.append(block.register_forward_hook(lambda m, a, o: current.__setitem__(0, "outside")))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        op_grpo.predict_velocity(transformer, x, torch.tensor(0.5, device=x.device), embeds, pooled, 1.0)
    for hook in hooks:
        hook.remove()
    return saved


def saved_activations(device: torch.device, micro_batch: int | None = None, model: str = "sd3") -> dict:
    """Bytes autograd keeps for the backward of one update pass under the model's preset (sd3: 512 px, 256 T5
    tokens; wan: 33 frames of 240 x 416, 512 UMT5 tokens; bf16 frozen weights, LoRA r 32 through
    op_grpo.make_trainable, guidance), per transformer row (under guidance a sample is two rows, conditional and
    unconditional), extrapolated to the full depth from a 4-block model of full width. sd3: block 0 apart (nothing
    before it trains, so its second attention saves nothing), block 1 for blocks 1-12 (second attention), block 2
    for 13-22, block 3 for the last; wan: block 0, block 1 for blocks 1-28, block 3 for the last. Gradient
    checkpointing keeps each block's inputs instead, plus one block's tensors while it is recomputed.
    """
    from diffusers import SD3Transformer2DModel, WanTransformer3DModel

    run = op_grpo.with_presets(op_grpo.Args(model=model, micro_batch=micro_batch))
    dtype, g = op_grpo.FROZEN_DTYPES[run.mixed_precision], torch.Generator(device).manual_seed(0)
    torch.manual_seed(0)
    if model == "wan":
        with torch.device(device):
            transformer = WanTransformer3DModel(**WAN_1_3B, num_layers=4)
        frames, height, width = (run.num_frames - 1) // 4 + 1, run.resolution // 8, run.width // 8
        x, pooled = torch.randn((1, 16, frames, height, width), generator=g, device=device), torch.zeros((1, 0))
        context, tokens, hidden, depth = run.max_sequence_length, frames * (height // 2) * (width // 2), 1536, 30
        blocks = transformer.blocks
    else:
        with torch.device("meta"):  # skips the 11 s float64 positional table; the values do not matter here
            transformer = SD3Transformer2DModel(**{**SD35_MEDIUM, "num_layers": 4, "dual_attention_layers": (0, 1)})
        transformer = transformer.to_empty(device=device)
        for tensor in list(transformer.parameters()) + list(transformer.buffers()):
            torch.nn.init.normal_(tensor, std=0.02)
        side, context = run.resolution // 8, CLIP_TOKENS + run.max_sequence_length
        x, pooled = torch.randn((1, 16, side, side), generator=g, device=device), torch.randn((1, 2048), device=device)
        tokens, hidden, depth, blocks = (side // 2) ** 2 + context, 1536, SD35_MEDIUM_LAYERS, None
    op_grpo.make_trainable(transformer.to(dtype), run)
    embeds = torch.randn((1, context, 4096), generator=g, device=device)
    saved = saved_per_block(transformer, blocks or transformer.transformer_blocks, x, embeds, pooled.to(device))
    first, second, third, last = saved[0], saved[1], saved[2], saved[3]
    if model == "wan":
        per_row, per_block = saved["outside"] + first + (depth - 2) * second + last, {"block": gb(second)}
    else:
        per_row = saved["outside"] + first + (SD35_MEDIUM_DUAL - 1) * second + last
        per_row += (depth - SD35_MEDIUM_DUAL - 1) * third
        per_block = {"dual_attention_block": gb(second), "plain_block": gb(third)}
    block_inputs = depth * tokens * hidden * torch.finfo(dtype).bits // 8
    rows = 2 * run.micro_batch if run.guidance_scale != 1.0 else run.micro_batch
    return {
        "note": f"autograd's saved tensors of one update pass under the {model} preset, counted per block on a "
                f"4-block model of full width on {device.type} and extrapolated to {depth} blocks: an estimate of "
                "activations, not a GPU peak (kernels' workspaces, transient buffers and the allocator's cache come "
                "on top)",
        "tokens_per_row": tokens, "rows_per_update_pass": rows,
        "per_row_gb": {"outside_blocks": gb(saved["outside"]), "first_block": gb(first), **per_block,
                       "last_block": gb(last), f"all_{depth}_blocks": gb(per_row)},
        "update_pass_gb": {"without_checkpointing": gb(rows * per_row),
                           "with_checkpointing": gb(rows * (block_inputs + max(second, third)))},
    }


# ---------------------------------------------------------------------------------------------------------
# 5. The run: op_grpo.main on the built folder, watched; then the passes it made, timed alone
# ---------------------------------------------------------------------------------------------------------
def random_pickscore(args: ProfileArgs):
    """A stand-in for rewards.load_pickscore that builds a random CLIP-H of PickScore's shape and a processor made
    in code: the scores mean nothing, the memory and seconds are PickScore's."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    def load_pickscore(device, dtype):
        tokenizer = build_clip_tokenizer(prompt_words(builtin_prompts()))
        ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
        depth = {} if args.pickscore_depth is None else {"num_hidden_layers": args.pickscore_depth}
        config = CLIPConfig(text_config={**PICKSCORE_TEXT, **depth, **ids, "vocab_size": FULL_VOCAB["clip"]},
                            vision_config={**PICKSCORE_VISION, **depth}, projection_dim=1024)
        torch.manual_seed(args.seed)
        with torch.device(device):
            model = CLIPModel(config)
        rewards.PICKSCORE["model"] = model.to(dtype).eval().requires_grad_(False)
        image_processor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
        rewards.PICKSCORE["processor"] = CLIPProcessor(tokenizer=tokenizer, image_processor=image_processor)

    return load_pickscore


def op_grpo_args(args: ProfileArgs) -> op_grpo.Args:
    """op_grpo's --model sd3 (or wan) on the built folder: its presets, except the flags given here."""
    given = dict(max_sequence_length=args.max_sequence_length, prompts_per_iteration=args.prompts_per_iteration,
                 group_size=args.group_size, micro_batch=args.micro_batch, mixed_precision=args.mixed_precision,
                 eval_steps=args.eval_steps, resolution=args.resolution, width=args.width, num_frames=args.num_frames,
                 num_steps=args.num_steps)
    return op_grpo.with_presets(op_grpo.Args(
        model=args.model, pretrained=os.path.abspath(args.folder), reward="pickscore" if args.pickscore else "jpeg",
        output_dir=args.run_dir, overwrite=True, seed=args.seed, iterations=args.iterations,
        gradient_checkpointing=args.gradient_checkpointing,
        off_policy_fraction=args.off_policy_fraction, eval_per_family=args.eval_per_family, checkpoint_every=0,
        eval_every=args.iterations + 1,  # evaluation only before the first and after the last iteration
        device=args.device, threads=args.threads, **{k: v for k, v in given.items() if v is not None}))


def watched_run(args: ProfileArgs, run: op_grpo.Args) -> tuple[list[dict], RunWatcher, float]:
    """op_grpo.main(run) under a RunWatcher (and the random PickScore if asked): (rows, watcher, seconds)."""
    rows_path = os.path.join(run.output_dir, "metrics.jsonl")
    if os.path.exists(rows_path):
        os.remove(rows_path)  # the watcher counts its rows
    load_pickscore = rewards.load_pickscore
    if args.pickscore:
        rewards.load_pickscore = random_pickscore(args)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    clock = time.perf_counter()
    try:
        with RunWatcher(rows_path) as watcher:
            rows = op_grpo.main(run)
    finally:
        rewards.load_pickscore = load_pickscore
    return rows, watcher, time.perf_counter() - clock


def profile(args: ProfileArgs, save=lambda results: None) -> dict:
    """Build (in a process of its own, so that host RSS and GPU peaks are the run's), run, time, estimate; then the
    windowed run. `save` is handed the results before the windowed run too, so that a run stopped there keeps them."""
    if args.iterations < 2:
        raise SystemExit("profile_sd3.py: error: --iterations must be at least 2 (the first is warm-up)")
    depth = args.depth or FULL_LAYERS[args.model]
    args = replace(args, depth=depth, folder=args.folder or f"runs/profile_{args.model}/pipeline_depth{depth}",
                   run_dir=args.run_dir or f"runs/profile_{args.model}/run")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        build_seconds = pool.apply(ensure_pipeline, (args, device))
    run = op_grpo_args(args)
    rows, watcher, run_seconds = watched_run(args, run)
    host_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports kB
    measured = list(range(1, args.iterations))  # iteration 0 is warm-up
    overhead = time_iteration_passes(watcher, measured, args.timing_repeats, device)
    gpu = None
    if device.type == "cuda":
        gpu = {"peak_allocated_gb": {phase: gb(n) for phase, n in watcher.peaks.items() if phase != "done"},
               "peak_allocated_gb_overall": gb(max(watcher.peaks.values())),
               "peak_reserved_gb_overall": gb(torch.cuda.max_memory_reserved()),
               "total_gb": gb(torch.cuda.get_device_properties(device).total_memory)}
    import diffusers
    import peft
    import transformers

    results = {
        "what": f"op_grpo.py --model {args.model} on a pipeline of "
                f"{'Wan2.1-T2V-1.3B' if args.model == 'wan' else 'SD3.5-Medium'}'s architecture with random weights",
        "windowed": "not run" if not args.sde_window else "stopped before it finished",
        "profile_args": asdict(args),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda"
                  else f"cpu ({platform.machine()}, {os.cpu_count()} cores), {torch.get_num_threads()} torch threads",
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "diffusers": diffusers.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__},
        "build": {"full_size_transformer": args.depth == FULL_LAYERS[args.model], "depth": args.depth,
                  "dual_attention_layers": None if args.model == "wan" else
                  list(transformer_config(args.depth)["dual_attention_layers"]),
                  "text_encoder_depth": args.text_depth, "text_encoder_vocabulary": "the prompts' words only",
                  "seconds": round(build_seconds, 1) if build_seconds else "reused",
                  "reward": run.reward + (" (random CLIP-H of PickScore's shape)" if args.pickscore else "")},
        "op_grpo_args": asdict(run),
        "memory": {"gpu": gpu, "host_max_rss_gb": gb(host_rss),
                   "note": "GPU: torch.cuda.max_memory_allocated per phase (load = weights, text encoders and prompt "
                           "embedding, up to the first evaluation); host: the run's process's max RSS"},
        "seconds": {
            "run_total": round(run_seconds, 1), "iteration_wall_mean": overhead["iteration_seconds"],
            "per_iteration_mean": {k: mean([r[k] for r in rows if r["iteration"] in measured and k in r])
                                   for k in STAGES},
            "evaluation": watcher.evaluations, "evaluation_images": run.eval_per_family,
            "evaluation_steps": run.eval_steps,
            "per_iteration": [{k: v for k, v in r.items() if k.startswith("time/") or k == "iteration"} for r in rows],
            "note": f"means over iterations {measured} (0 is warm-up); iteration_wall runs from an iteration's first "
                    "transformer pass to the next one's (or to the final evaluation), so it also covers untimed steps",
        },
        "overhead": overhead,
        "activation_estimate": saved_activations(device, args.micro_batch, args.model) if args.activations else None,
        "arithmetic": memory_arithmetic(op_grpo.with_presets(op_grpo.Args(model=args.model,
                                                                          micro_batch=args.micro_batch))),
    }
    save(results)
    if args.sde_window:  # the same run with a window: only its steps are stochastic, stored, re-scored and trained
        print(f"measurements so far saved; now the same run with --sde-window {args.sde_window}", flush=True)
        run_window = replace(run, sde_window=args.sde_window, output_dir=run.output_dir + "_window")
        rows_window, _, seconds_window = watched_run(args, run_window)
        results["windowed"] = {
            "sde_window": args.sde_window, "run_total": round(seconds_window, 1),
            "per_iteration_mean": {k: mean([r[k] for r in rows_window if r["iteration"] in measured and k in r])
                                   for k in STAGES}}
    return results


def main(args: ProfileArgs) -> dict:
    args = replace(args, output=args.output or f"assets/profile_{args.model}.json")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)

    def save(results: dict) -> None:
        plumbing.write_json(args.output, results, os.path.dirname(os.path.abspath(__file__)))

    results = profile(args, save)
    save(results)
    s, o, gpu = results["seconds"], results["overhead"], results["memory"]["gpu"]
    stages = ", ".join(f"{k.removeprefix('time/')} {v:.2f} s" for k, v in s["per_iteration_mean"].items() if v)
    print(f"\n{results['device']}: iteration {s['iteration_wall_mean']:.2f} s wall; {stages}; "
          f"overhead ratio {o['ratio']:.2f} (target <= {o['target']})")
    if isinstance(results["windowed"], dict):
        w = results["windowed"]
        print(f"with --sde-window {w['sde_window']}: " + ", ".join(
            f"{k.removeprefix('time/')} {v:.2f} s" for k, v in w["per_iteration_mean"].items() if v))
    print(f"peak memory: host RSS {results['memory']['host_max_rss_gb']} GB"
          + (f", GPU allocated {gpu['peak_allocated_gb']} GB of {gpu['total_gb']}" if gpu else "")
          + f"; written to {args.output}")
    return results


if __name__ == "__main__":
    main(tyro.cli(ProfileArgs))
