"""The reward models of op_grpo.py: each a function (images, prompts) -> torch.Tensor (N,), registered in REWARDS.

An image reward takes PIL images; a video reward (a name in VIDEO_REWARDS) takes videos as lists of PIL frames.
op_grpo.py keeps what wraps them: `name=weight` sums, an image reward scored over a video's frames, the NaN policy.
The toy worlds' verifiers (toy_world.py, toy_video.py) stand in for GenEval and motion checks on the tiny models.

  jpeg            DDPO's JPEG compressibility (arXiv 2305.13301)
  pickscore       PickScore (Kirstain et al. 2023), as Flow-GRPO scales it
  ocr             Flow-GRPO's OCR reward: 1 - edit distance / length of the prompt's quoted text
  video_ocr       Flow-GRPO's Wan2.1 video OCR: that score on every 4th frame, the mean of the frames that read any
  geneval         Flow-GRPO's GenEval training reward (partial credit), on a Mask2Former detector and CLIP colours
  geneval_strict  the same rules, all or nothing (exact counts, colours, positions)

Models are loaded by `load(names, device, dtype)` before training; tests put tiny random models in the dicts instead.
"""

import io
import json

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from plumbing import DEFAULT_PROMPTS, from_hub, read_prompts


def fetch(name: str, load):
    """A reward model's from_pretrained, failing in one line that says how to get it (plumbing.from_hub)."""
    return from_hub(name, load, flag=None)


# ---------------------------------------------------------------------------------------------------------
# JPEG compressibility and PickScore
# ---------------------------------------------------------------------------------------------------------
def jpeg_reward(images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
    """DDPO's JPEG compressibility: minus the size in kB of the image saved as JPEG at quality 95."""
    sizes = []
    for image in images:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=95)
        sizes.append(buffer.tell() / 1000)
    return -torch.tensor(sizes)


PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"  # CLIP-H fine-tuned on Pick-a-Pic preferences (Kirstain et al. 2023)
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # the CLIP-H it came from: tokenizer, image transform
PICKSCORE: dict = {}  # "model" and "processor", set by load_pickscore before training (or by a test, with a tiny CLIP)


def load_pickscore(device: torch.device, dtype: torch.dtype) -> None:
    from transformers import AutoProcessor, CLIPModel

    PICKSCORE["processor"] = fetch(PICKSCORE_PROCESSOR, lambda: AutoProcessor.from_pretrained(PICKSCORE_PROCESSOR))
    model = fetch(PICKSCORE_MODEL, lambda: CLIPModel.from_pretrained(PICKSCORE_MODEL, dtype=dtype))
    PICKSCORE["model"] = model.eval().requires_grad_(False).to(device)


@torch.no_grad()
def pickscore_reward(images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
    """PickScore: logit_scale x cos(image embedding, prompt embedding) of the preference-tuned CLIP, divided by
    26 as Flow-GRPO does, which puts typical SD3.5 scores near 0.85."""
    model, processor = PICKSCORE["model"], PICKSCORE["processor"]
    inputs = processor(images=images, text=prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    logits = model(**inputs.to(model.device)).logits_per_image  # (B, B): logit_scale * cos(image_i, text_j)
    return logits.diagonal().float().cpu() / 26


# ---------------------------------------------------------------------------------------------------------
# OCR (Flow-GRPO's flow_grpo/ocr.py, on RapidOCR's PP-OCRv4 ONNX models instead of PaddleOCR)
# ---------------------------------------------------------------------------------------------------------
OCR: dict = {}  # "engine": a RapidOCR instance, made on first use (its models ship inside the wheel: no download)


def ocr_target(prompt: str) -> str:
    """The text an OCR prompt asks for: what follows its first double quote, up to the next (Flow-GRPO's
    prompt.split('"')[1]). A ValueError if there is none, or it is blank."""
    parts = prompt.split('"')
    if len(parts) < 2 or not parts[1].replace(" ", ""):
        raise ValueError(f"no text in double quotes to render in the prompt {prompt!r}")
    return parts[1]


def text_score(read: str, target: str, substring: bool = True) -> float:
    """Flow-GRPO's OCR score, 1 - d / n: both strings without spaces and in lower case, n the target's length, d the
    Levenshtein distance between them capped at n (so an unreadable image scores 0), and 0 when the target appears
    whole inside what was read (substring; the image reward has this rule, the video reward not)."""
    from Levenshtein import distance

    read, target = read.replace(" ", "").lower(), target.replace(" ", "").lower()
    d = 0 if substring and target in read else min(distance(read, target), len(target))
    return 1 - d / len(target)


def read_text(image: Image.Image) -> str:
    """Every line the OCR engine reads in the image, joined without separator in its reading order."""
    if "engine" not in OCR:
        from rapidocr_onnxruntime import RapidOCR

        OCR["engine"] = RapidOCR()
    lines, _ = OCR["engine"](np.asarray(image.convert("RGB")))
    return "".join(text for _, text, score in lines or [] if score > 0)


def ocr_reward(images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
    """Flow-GRPO's OCR reward of each image for the quoted text of its prompt, in [0, 1]."""
    return torch.tensor([text_score(read_text(image), ocr_target(p)) for image, p in zip(images, prompts)])


def video_ocr_reward(videos: list[list[Image.Image]], prompts: list[str], every: int = 4) -> torch.Tensor:
    """Flow-GRPO's video OCR (its OcrScorer_video_or_image): frames 0, 4, 8, ... each scored without the substring
    rule; a video's reward is the mean over the frames that score above 0, and 0 if none does."""
    rewards = []
    for frames, prompt in zip(videos, prompts):
        scores = [text_score(read_text(frame), ocr_target(prompt), substring=False) for frame in frames[::every]]
        read = [s for s in scores if s > 0]
        rewards.append(sum(read) / len(read) if read else 0.0)
    return torch.tensor(rewards)


# ---------------------------------------------------------------------------------------------------------
# GenEval as Flow-GRPO trains on it: its reward server (yifan123/reward-server, reward_server/gen_eval.py) on top of
# GenEval's rules (djghosh13/geneval, evaluation/evaluate_images.py); transformers' Mask2Former Swin-S (COCO
# instances) and CLIP ViT-L/14 (colours). Detections: {class: [(box [x1, y1, x2, y2, score] in pixels, bool mask
# (H, W) or None)]}. Metadata: one line of GenEval's jsonl, {"tag", "include", ["exclude"], "prompt"}.
# ---------------------------------------------------------------------------------------------------------
# Defaults of GenEval's options, hard-coded by Flow-GRPO's reward server.
THRESHOLD = 0.3  # detection score must be strictly above this
COUNTING_THRESHOLD = 0.9  # ... or above this one for "counting" prompts
MAX_OBJECTS = 16  # most confident detections kept per class
NMS_THRESHOLD = 1.0  # IoU above which a detection is dropped as a duplicate; 1 (or more) disables it
POSITION_THRESHOLD = 0.1  # margin, as a fraction of the summed box sizes, before a relative position counts
COLORS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white"]
COLOR_TEMPLATES = ["a photo of a {color} {cls}", "a photo of a {color}-colored {cls}", "a photo of a {color} object"]
CROP_BACKGROUND = "#999"  # what surrounds an object's mask in its colour crop
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
DETECTOR = "facebook/mask2former-swin-small-coco-instance"  # nearest to GenEval's mmdet mask2former_swin-s-p4-w7-224
CLIP = "openai/clip-vit-large-patch14"  # GenEval's open_clip ViT-L-14, pretrained="openai"
# GenEval's prompts/object_names.txt renames three of the 80 COCO classes; transformers' id2label keeps COCO's names.
COCO_TO_GENEVAL = {"mouse": "computer mouse", "remote": "tv remote", "keyboard": "computer keyboard"}
# "detector", "detector_processor", "clip", "clip_processor", "metadata", set by load_geneval (or a test); and
# "color_classifiers", the colour text embeddings per class, cached by _color_embeddings (cleared by load_geneval).
GENEVAL: dict = {}


def compute_iou(box_a, box_b) -> float:
    """IoU of two [x1, y1, x2, y2, ...] boxes, counting pixels inclusively (width x2 - x1 + 1), as GenEval does."""
    def area(x1, y1, x2, y2):
        return max(x2 - x1 + 1, 0) * max(y2 - y1 + 1, 0)
    inter = area(max(box_a[0], box_b[0]), max(box_a[1], box_b[1]), min(box_a[2], box_b[2]), min(box_a[3], box_b[3]))
    union = area(*box_a[:4]) + area(*box_b[:4]) - inter
    return inter / union if union else 0


def filter_detections(boxes_by_class: dict, tag: str, threshold: float = THRESHOLD,
                      counting_threshold: float = COUNTING_THRESHOLD, max_objects: int = MAX_OBJECTS,
                      nms_threshold: float = NMS_THRESHOLD) -> dict:
    """Raw detections {class: [(box, mask)]} -> the objects GenEval keeps, per class, most confident first: score
    > threshold (counting_threshold for tag "counting"), at most max_objects, then greedy IoU suppression only when
    nms_threshold < 1; classes left empty are dropped (GenEval, evaluation/evaluate_images.py)."""
    floor = counting_threshold if tag == "counting" else threshold
    kept = {}
    for classname, detections in boxes_by_class.items():
        scores = np.array([box[4] for box, _ in detections], dtype=float)
        order = np.argsort(scores)[::-1]  # the same sort call as GenEval, so ties fall the same way
        order = [int(i) for i in order if scores[i] > floor][:max_objects]
        chosen = []
        while order:
            best = order.pop(0)
            chosen.append(detections[best])
            if nms_threshold < 1:
                order = [i for i in order if compute_iou(detections[best][0], detections[i][0]) < nms_threshold]
        if chosen:
            kept[classname] = chosen
    return kept


def relative_position(obj_a, obj_b, margin: float = POSITION_THRESHOLD) -> set:
    """Relations of (box, mask) A to B among "left of", "right of", "above", "below" (GenEval): the centre offset
    A - B shrinks by margin x (size A + size B) per axis, to 0 at most; over the unshrunk offset's length, past 0.5
    on an axis gives that axis's relation. y grows downward."""
    a, b = (np.asarray(obj[0][:4], dtype=float).reshape(2, 2) for obj in (obj_a, obj_b))
    offset = a.mean(0) - b.mean(0)
    sizes = np.abs(a[1] - a[0]) + np.abs(b[1] - b[0])
    shrunk = np.maximum(np.abs(offset) - margin * sizes, 0) * np.sign(offset)
    if np.all(np.abs(shrunk) < 1e-3):
        return set()
    dx, dy = shrunk / np.linalg.norm(offset)
    named = {"left of": dx < -0.5, "right of": dx > 0.5, "above": dy < -0.5, "below": dy > 0.5}
    return {name for name, holds in named.items() if holds}


def _position_holds(found: list, targets: list, relation: str) -> bool:
    """True when every found object stands in `relation` to every target object."""
    return all(relation in relative_position(obj, target) for obj in found for target in targets)


def judge(objects: dict, metadata: dict, classify_colors) -> tuple[bool, float]:
    """Flow-GRPO's training reward (evaluate_reward, reward_server/gen_eval.py): filtered objects, metadata and
    classify_colors(objects, classname) -> colour names -> (strict_correct, partial score = mean of the terms).
    Every detection of a class counts and counts must be exact; its quirks are kept, marked QUIRK."""
    correct, terms, groups = True, [], []
    for req in metadata.get("include", []):
        found, count = objects.get(req["class"], []), req["count"]
        matched = len(found) == count
        terms.append(1 - abs(count - len(found)) / count)  # QUIRK: below 0 once more than 2 x count are found
        if not matched and ("color" in req or "position" in req):
            terms.append(0.0)
        if matched and "color" in req:
            hits = classify_colors(found, req["class"]).count(req["color"])
            terms.append(1 - abs(count - hits) / count)
            matched = hits == count
        if matched and "position" in req:
            relation, target = req["position"]
            matched = groups[target] is not None and _position_holds(found, groups[target], relation)
            if not matched:
                terms.append(0.0)
            if groups[target] is not None:
                terms.append(1.0)  # QUIRK: added after the relation check even when it failed, next to its 0.0
        correct = correct and matched
        groups.append(found if matched else None)
    # QUIRK: "exclude" clauses are ignored; for counting, the exact count stands in for them.
    return correct, sum(terms) / len(terms) if terms else 0.0


def judge_geneval(objects: dict, metadata: dict, classify_colors) -> bool:
    """GenEval's official all-or-nothing rule (evaluate, evaluation/evaluate_images.py): for each include clause
    its `count` most confident objects must exist (>=), carry its colour and stand in its relation to the group
    it names; any exclude clause with >= count objects fails the image."""
    correct, groups = True, []
    for req in metadata.get("include", []):
        found, count = objects.get(req["class"], [])[:req["count"]], req["count"]
        matched = len(found) >= count
        if matched and "color" in req:
            matched = classify_colors(found, req["class"]).count(req["color"]) >= count
        if matched and "position" in req:
            relation, target = req["position"]
            matched = groups[target] is not None and _position_holds(found, groups[target], relation)
        correct = correct and matched
        groups.append(found if matched else None)
    return correct and all(len(objects.get(req["class"], [])) < req["count"] for req in metadata.get("exclude", []))


def load_geneval(device, dtype, metadata: dict, fetch=fetch) -> None:
    """Fill GENEVAL with the hub models (eval mode, frozen, on device in dtype) and the prompt -> metadata dict;
    fetch(name, load) wraps every from_pretrained so that the caller can handle failures."""
    from transformers import CLIPModel, CLIPProcessor, Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor

    GENEVAL.clear()
    GENEVAL["detector_processor"] = fetch(DETECTOR, lambda: Mask2FormerImageProcessor.from_pretrained(DETECTOR))
    detector = fetch(DETECTOR, lambda: Mask2FormerForUniversalSegmentation.from_pretrained(DETECTOR, dtype=dtype))
    GENEVAL["detector"] = detector.eval().requires_grad_(False).to(device)
    GENEVAL["clip_processor"] = fetch(CLIP, lambda: CLIPProcessor.from_pretrained(CLIP))
    clip = fetch(CLIP, lambda: CLIPModel.from_pretrained(CLIP, dtype=dtype))
    GENEVAL["clip"] = clip.eval().requires_grad_(False).to(device)
    GENEVAL["metadata"] = metadata


def _mask_box(mask: np.ndarray, score: float) -> np.ndarray:
    """Bool mask (H, W), not empty -> [x1, y1, x2, y2, score], x2 and y2 one past the last pixel (mmdet's mask2bbox,
    which gives GenEval's Mask2Former its boxes)."""
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1, score], dtype=float)


@torch.no_grad()
def detect(images: list[Image.Image]) -> list[dict]:
    """PIL images -> per image {GenEval class name: [(box, bool mask (H, W))]}: every non-empty instance of the
    Mask2Former in GENEVAL (its top num_queries (query, class) pairs), before filter_detections."""
    model, processor = GENEVAL["detector"], GENEVAL["detector_processor"]
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    outputs = model(pixel_values=pixels.to(model.device, model.dtype))
    outputs.class_queries_logits = outputs.class_queries_logits.float()
    outputs.masks_queries_logits = outputs.masks_queries_logits.float()
    results = processor.post_process_instance_segmentation(  # binary maps: instances may overlap, as in mmdet
        outputs, threshold=0.0, target_sizes=[image.size[::-1] for image in images], return_binary_maps=True)
    detections = []
    for result in results:
        found = {}
        for index, info in enumerate(result["segments_info"]):
            name = model.config.id2label[info["label_id"]]
            mask = result["segmentation"][index].bool().cpu().numpy()
            found.setdefault(COCO_TO_GENEVAL.get(name, name), []).append((_mask_box(mask, info["score"]), mask))
        detections.append(found)
    return detections


def color_crops(image: Image.Image, objects: list) -> list[Image.Image]:
    """One crop per (box, mask): the object's mask pixels over a #999 grey canvas, cut to its box (GenEval's
    ImageCrops with bgcolor "#999" and crop on, as Flow-GRPO's server hard-codes them)."""
    image = image.convert("RGB")
    canvas = Image.new("RGB", image.size, CROP_BACKGROUND)
    return [(image if mask is None else Image.composite(image, canvas, Image.fromarray(mask))).crop(tuple(box[:4]))
            for box, mask in objects]


@torch.no_grad()
def _color_embeddings(classname: str) -> torch.Tensor:
    """(len(COLORS), D) unit text embeddings: per colour the renormalised mean of its three unit template
    embeddings (clip_benchmark's zero_shot_classifier, which GenEval uses); cached per class in GENEVAL."""
    cache = GENEVAL.setdefault("color_classifiers", {})
    if classname not in cache:
        clip, processor = GENEVAL["clip"], GENEVAL["clip_processor"]
        texts = [template.format(color=c, cls=classname) for c in COLORS for template in COLOR_TEMPLATES]
        tokens = processor(text=texts, padding=True, truncation=True, return_tensors="pt").to(clip.device)
        embeddings = F.normalize(clip.get_text_features(**tokens).pooler_output.float(), dim=-1)
        cache[classname] = F.normalize(embeddings.view(len(COLORS), len(COLOR_TEMPLATES), -1).mean(1), dim=-1)
    return cache[classname]


@torch.no_grad()
def classify_colors(image: Image.Image, objects: list, classname: str) -> list[str]:
    """Colour name of each (box, mask) object in image: argmax of cosine between the CLIP image embedding of its
    crop and the colours' text embeddings (GenEval's color_classification)."""
    clip, processor = GENEVAL["clip"], GENEVAL["clip_processor"]
    pixels = processor(images=color_crops(image, objects), return_tensors="pt")["pixel_values"]
    features = clip.get_image_features(pixel_values=pixels.to(clip.device, clip.dtype)).pooler_output.float()
    similarity = F.normalize(features, dim=-1) @ _color_embeddings(classname).T
    return [COLORS[i] for i in similarity.argmax(1).tolist()]


def _jpeg(image: Image.Image) -> Image.Image:
    """The image after a JPEG round trip at PIL's default quality (75): Flow-GRPO's client (flow_grpo/rewards.py,
    geneval_score) sends JPEGs to its reward server, so the models see compressed images."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG")
    return Image.open(buffer).convert("RGB")


def geneval_scores(images: list[Image.Image], prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """PIL images and their prompts -> (partial scores (N,), strict 0/1 (N,)), float32, from judge on the filtered
    detections; each prompt's metadata comes from GENEVAL["metadata"]."""
    metadata = GENEVAL["metadata"]
    missing = [prompt for prompt in prompts if prompt not in metadata]
    if missing:
        raise KeyError(f"no GenEval metadata for prompt {missing[0]!r} (GENEVAL['metadata'] has {len(metadata)})")
    images = [_jpeg(image) for image in images]
    results = [judge(filter_detections(found, metadata[prompt]["tag"]), metadata[prompt],
                     lambda objects, classname, image=image: classify_colors(image, objects, classname))
               for image, found, prompt in zip(images, detect(images), prompts)]
    return (torch.tensor([score for _, score in results], dtype=torch.float32),
            torch.tensor([float(correct) for correct, _ in results], dtype=torch.float32))


def geneval_reward(images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
    """Flow-GRPO's GenEval training reward: the partial score (N,) float32 (it trains on `scores`)."""
    return geneval_scores(images, prompts)[0]


def geneval_strict_reward(images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
    """Flow-GRPO's strict GenEval reward (N,) float32: 1 when every include clause holds with exact counts."""
    return geneval_scores(images, prompts)[1]


def read_geneval_metadata(path) -> dict:
    """GenEval's jsonl (one {"tag", "include", ["exclude"], "prompt"} per line; blank lines skipped) -> {prompt:
    metadata}. ValueError naming file and line for bad JSON, a missing field, an unknown tag, or a prompt repeated
    with other metadata."""
    metadata = {}
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{path}, line {number}"
            try:
                item = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: not JSON ({error})") from None
            if not isinstance(item, dict) or any(key not in item for key in ("prompt", "tag", "include")):
                raise ValueError(f"{where}: needs the fields prompt, tag and include")
            if item["tag"] not in TAGS:
                raise ValueError(f"{where}: unknown tag {item['tag']!r} (known: {', '.join(TAGS)})")
            if metadata.setdefault(item["prompt"], item) != item:
                raise ValueError(f"{where}: prompt {item['prompt']!r} appears earlier with other metadata")
    return metadata


# ---------------------------------------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------------------------------------
REWARDS = {"jpeg": jpeg_reward, "pickscore": pickscore_reward, "ocr": ocr_reward, "video_ocr": video_ocr_reward,
           "geneval": geneval_reward, "geneval_strict": geneval_strict_reward}
VIDEO_REWARDS = {"video_ocr"}  # names whose function scores whole videos (lists of frames)
PROMPT_TEXT = {"ocr", "video_ocr"}  # names that need a quoted text in every prompt (ocr_target)
GENEVAL_NAMES = {"geneval", "geneval_strict"}  # names that need GenEval's metadata of every prompt
NO_PROMPT_DATA = set(REWARDS) - PROMPT_TEXT - GENEVAL_NAMES  # names that score any prompt


def check_prompts(names, prompt_file: str | None) -> list[str]:
    """What the rewards named need of the prompts and is missing, one line each naming --prompt-file: quoted text for
    OCR, GenEval's metadata for geneval. prompt_file None: the sd3 preset's built-in prompts."""
    problems, ocr = [], sorted(PROMPT_TEXT & set(names))
    for number, prompt in enumerate((read_prompts(prompt_file) if prompt_file else DEFAULT_PROMPTS) if ocr else []):
        try:
            ocr_target(prompt)
        except ValueError as error:
            problems.append(f"--prompt-file {prompt_file or '(none: the built-in prompts)'}, prompt {number + 1}: "
                            f"{error}; --reward {ocr[0]} renders the quoted text of each prompt")
            break
    if GENEVAL_NAMES & set(names):
        if prompt_file is None or not prompt_file.endswith(".jsonl"):
            problems.append("--reward geneval needs GenEval's metadata: --prompt-file FILE.jsonl, a JSON object a line "
                            "with tag, include, exclude, prompt (as Flow-GRPO's dataset/geneval/train_metadata.jsonl)")
        else:
            try:
                read_geneval_metadata(prompt_file)
            except (OSError, ValueError) as error:
                problems.append(f"--prompt-file {prompt_file}: {error}")
    return problems


def load(names, device: torch.device, dtype: torch.dtype, prompt_file: str | None) -> None:
    """Load the models of the rewards named, before training (the OCR engine loads on first use, from its wheel)."""
    if "pickscore" in names:
        load_pickscore(device, dtype)
    if GENEVAL_NAMES & set(names):
        load_geneval(device, torch.float32, read_geneval_metadata(prompt_file))  # fp32: GenEval's precision
