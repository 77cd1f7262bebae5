#!/usr/bin/env python
"""Predict with a trained adapter: classes (top-k, printed and written as CSV), or, for a dense adapter, masks
and boxes drawn as PNG pictures.

Examples::

    python tools/predict.py --adapter out/run1 photos/ extra.jpg          # a run folder: adapter/ + config.yaml
    python tools/predict.py --adapter out/run1/adapter --top-k 3 --out preds.csv img1.png img2.png
    python tools/predict.py --adapter my_adapter/ --model vit_base_patch16_224 \\
        --pretrained-file /ckpt/vit_b16.safetensors photos/           # no config.yaml: name the base model

The base model comes from the run's ``config.yaml`` (``--config`` to name another) or from ``--model`` (+
``--pretrained-file``); images are read with the run's evaluation transform (square bicubic resize to
``data.img_size``, ``data.mean`` / ``data.std``; without a config: the model's own input size, mean and std).
Mergeable methods are merged into the weights first (``merge_and_unload()``, no per-call overhead);
``--no-merge`` keeps the adapter's hooks. Class names come from ``classes.json`` in the adapter folder (written
by training on an ImageFolder or a CSV with class names), otherwise the class indices are shown.

CSV columns: ``image``, then ``class_1, index_1, prob_1`` ... ``class_k, index_k, prob_k`` (rank 1 = the most
likely class), one row per image.

A dense adapter (segmentation or detection: the folder holds ``dense_config.json``) writes into ``--out-dir``
(default ``predictions/``), per image: segmentation: ``<name>_mask.png`` (the label of each pixel, at the image's
own size) and ``<name>_overlay.png`` (the colour-coded mask over the image, with a legend); detection:
``<name>_boxes.png`` (boxes, labels, scores, instance masks) and ``<name>_boxes.json``. Images are read with the
run's evaluation transform (segmentation: resized to ``data.scale`` keeping the ratio; ``task.inference`` whole
or slide).

A SAM adapter (the folder holds ``sam_config.json``) is loaded onto the base SAM named by ``--sam-checkpoint`` (an
official ``sam_vit_b_01ec64.pth`` ...; the adapter's ``sam_config.json`` gives the SAM size and input size), or,
for an adapter trained on the project's small SAM, onto ``embedded:sam_scenes``. A promptable adapter answers the
prompts of ``--prompts FILE.json``, in the pixels of each ORIGINAL image (``x`` the column, ``y`` the row)::

    {"photo.png": {"boxes": [[x0, y0, x1, y1], ...], "points": [[x, y], ...], "labels": [1, 0, ...],
                   "objects": [{"box": [x0, y0, x1, y1], "points": [[x, y]], "labels": [0]}, ...]}}

(one mask per box, one mask for all the points together, one per entry of ``objects``; ``labels``: 1 foreground,
0 background, default all 1); without ``--prompts`` ``SamAutomaticMaskGenerator`` segments everything
(``--points-per-side``). It writes ``<name>_sam_overlay.png`` (the masks over the image, boxes and points drawn:
foreground green, background red), ``<name>_sam_masks.png`` (pixel value k = mask k, 0 = none; later masks
on top) and ``<name>_sam_masks.json`` (per mask: its prompt, predicted IoU, area, box). A semantic adapter writes
``<name>_mask.png`` and ``<name>_overlay.png`` as a segmentation adapter does (the image's longest side resized to
the adapter's input size and padded, as SAM does; the mask back at the image's size).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

CONFIG_NAME = "adapter_config.json"
CLASSES_NAME = "classes.json"
SAM_CONFIG_NAME = "sam_config.json"


class PredictError(Exception):
    """Bad input: the message says what was expected."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--adapter",
        required=True,
        help="adapter folder (adapter.safetensors + adapter_config.json), or a run folder holding adapter/",
    )
    p.add_argument("images", nargs="+", help="image files and/or folders (searched recursively)")
    p.add_argument("--config", help="the run's YAML config (default: config.yaml of the run folder)")
    p.add_argument("--model", help="timm model name of the base model (when there is no config)")
    p.add_argument("--pretrained-file", help="local weights of the base model (with --model)")
    p.add_argument("--pretrained", action="store_true", help="timm's hub weights for --model (as model.pretrained)")
    p.add_argument("--img-size", type=int, help="input size (with --model; default: the model's)")
    p.add_argument("--num-classes", type=int, help="classes of the head (default: read from the adapter)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config value"
    )
    p.add_argument("--top-k", type=int, default=5, help="classes per image (default 5)")
    p.add_argument("--out", default="predictions.csv", help="CSV file to write (default predictions.csv)")
    p.add_argument("--out-dir", default="predictions", help="folder of the pictures of a dense adapter")
    p.add_argument("--score-threshold", type=float, default=0.3, help="detections drawn from this score (0.3)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--seed", type=int, help="seed before building the base model (default: the config's, or 0)")
    p.add_argument("--no-merge", action="store_true", help="keep the adapter's hooks instead of merging it")
    sam = p.add_argument_group("SAM adapters (sam_config.json)")
    sam.add_argument(
        "--sam-checkpoint",
        help="the base SAM: an official checkpoint (sam_vit_b_01ec64.pth ...) or embedded:sam_scenes "
        "(default for adapters of the embedded SAM)",
    )
    sam.add_argument("--prompts", help="JSON file of box / point prompts per image (see above)")
    sam.add_argument("--points-per-side", type=int, default=16, help="automatic masks: grid of points (16)")
    sam.add_argument("--pred-iou-thresh", type=float, default=0.88, help="automatic masks: predicted IoU (0.88)")
    sam.add_argument("--stability-thresh", type=float, default=0.95, help="automatic masks: stability (0.95)")
    return p.parse_args(argv)


def resolve_adapter(path: str) -> tuple[Path, Path | None]:
    """``(adapter folder, run folder or None)`` of an adapter folder or a run folder holding ``adapter/``."""
    p = Path(path).expanduser()
    if not p.exists():
        raise PredictError(f"--adapter {str(p)!r} does not exist")
    if (p / CONFIG_NAME).is_file():
        return p, (p.parent if (p.parent / "config.yaml").is_file() else None)
    if (p / "adapter" / CONFIG_NAME).is_file():
        return p / "adapter", p
    found = ", ".join(sorted(c.name for c in p.iterdir())[:12]) if p.is_dir() else "a file"
    raise PredictError(
        f"--adapter {str(p)!r} is not an adapter folder: expected {CONFIG_NAME} + adapter.safetensors in it, or a "
        f"run folder holding adapter/ and config.yaml (found: {found or 'nothing'})"
    )


def collect_images(items: list[str]) -> list[Path]:
    """Image files named directly, and the image files under named folders (sorted, hidden files skipped)."""
    from visionpeft.data.files import IMG_EXTENSIONS, is_image_file

    out: list[Path] = []
    for item in items:
        p = Path(item).expanduser()
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and is_image_file(f) and not f.name.startswith("."))
            if not found:
                raise PredictError(f"folder {str(p)!r} holds no image files ({', '.join(IMG_EXTENSIONS)})")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise PredictError(f"image {str(p)!r} not found")
    return out


def head_classes(adapter: Path, model_name: str) -> int | None:
    """Classes of the head saved with the adapter: the rows of the classifier's 2-D weight among the tensor shapes
    of ``adapter_config.json`` (its name holds the classifier's module path, e.g. ``head`` or ``head.fc``)."""
    from timm.models import get_pretrained_cfg_value

    meta = json.loads((adapter / CONFIG_NAME).read_text(encoding="utf-8"))
    classifier = get_pretrained_cfg_value(model_name, "classifier") or "head"
    classifier = classifier[0] if isinstance(classifier, (list, tuple)) else classifier
    want = classifier.split(".")
    for key, shape in (meta.get("shapes") or {}).items():
        parts = key.replace("-", ".").split(".")  # site keys spell module paths with '-'
        inside = any(parts[i : i + len(want)] == want for i in range(len(parts)))
        if inside and parts[-1] == "weight" and len(shape) == 2:
            return int(shape[0])
    return None


def read_classes(adapter: Path) -> list[str] | None:
    f = adapter / CLASSES_NAME
    if not f.is_file():
        return None
    try:
        names = json.loads(f.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PredictError(f"cannot read class names {str(f)!r}: {e}") from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise PredictError(f"{str(f)!r} must hold a JSON list of class names")
    return names


def build(args: argparse.Namespace, adapter: Path, run: Path | None) -> tuple[Any, Any, list[str] | None, str]:
    """``(model, transform, class names, description)``."""
    import torch

    import visionpeft as vp
    from visionpeft.data.build import eval_transform, vtab_transform
    from visionpeft.engine.build import build_backbone
    from visionpeft.engine.experiment import ModelConfig, load_config
    from visionpeft.engine.trainer import seed_everything

    config = Path(args.config) if args.config else (run / "config.yaml" if run is not None else None)
    if config is None and not args.model:
        raise PredictError(
            f"no config.yaml next to the adapter {str(adapter)!r}: pass --config <the run's config.yaml>, or "
            "--model <timm name> (and --pretrained-file) to name the base model"
        )
    overrides = list(args.overrides)
    if config is not None:
        if args.model:
            overrides.append(f"model.name={args.model}")
        if args.pretrained_file:
            overrides.append(f"model.pretrained_file={args.pretrained_file}")
        if args.img_size:
            overrides += [f"model.img_size={args.img_size}", f"data.img_size={args.img_size}"]
        cfg = load_config(config, overrides)
        model_cfg, seed = cfg.model, cfg.runtime.seed
    else:
        model_cfg = ModelConfig(
            name=args.model, pretrained=args.pretrained, pretrained_file=args.pretrained_file, img_size=args.img_size
        )
        seed = 0
    classes = read_classes(adapter)
    num_classes = (
        args.num_classes or model_cfg.num_classes or head_classes(adapter, model_cfg.name) or len(classes or [])
    )
    if not num_classes:
        raise PredictError(f"cannot tell the class count of the adapter {str(adapter)!r}: pass --num-classes")
    if classes is not None and len(classes) != num_classes:
        raise PredictError(
            f"{adapter / CLASSES_NAME} names {len(classes)} classes, the model's head has {num_classes}"
        )
    names = classes or [str(i) for i in range(num_classes)]  # class indices when the data had no names
    seed_everything(args.seed if args.seed is not None else seed)  # same random base weights as training, if any
    base = build_backbone(model_cfg, num_classes)
    model = vp.load_adapter(base, adapter)
    method = model.peft_config[model.active_adapter].method
    if not args.no_merge and vp.get_method(method).mergeable:
        model, how = model.merge_and_unload(), f"{method}, merged into the weights"
    else:
        how = f"{method}, kept as hooks" + ("" if args.no_merge else " (not mergeable)")
    model.eval()
    if config is not None:
        transform = eval_transform(cfg.data)
    else:
        from timm.data import resolve_data_config

        data = resolve_data_config({}, model=base)
        size = args.img_size or int(data["input_size"][-1])
        transform = vtab_transform(size, list(data["mean"]), list(data["std"]))
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device), transform, names, f"{model_cfg.name} + adapter {adapter} ({how}) on {device}"


def build_dense(args: argparse.Namespace, adapter: Path, run: Path | None) -> tuple[Any, Any, str]:
    """``(DenseModel, task, description)`` of a dense adapter; the base model and the transforms come from the
    run's config (``--config`` or the run folder's ``config.yaml``)."""
    import torch

    import visionpeft as vp
    from visionpeft.engine.experiment import load_config
    from visionpeft.engine.tasks import build_dense_backbone, make_task
    from visionpeft.engine.trainer import seed_everything

    config = Path(args.config) if args.config else (run / "config.yaml" if run is not None else None)
    if config is None:
        raise PredictError(
            f"{str(adapter)!r} holds a dense adapter; its base model, neck and transforms come from the run's "
            "config: pass --config <the run's config.yaml>, or --adapter <the run folder>"
        )
    overrides = list(args.overrides)
    if args.model:
        overrides.append(f"model.name={args.model}")
    if args.pretrained_file:
        overrides.append(f"model.pretrained_file={args.pretrained_file}")
    cfg = load_config(config, overrides)
    if not cfg.task.dense:
        raise PredictError(f"{adapter} holds a dense adapter but the config {config} has task.name={cfg.task.name}")
    seed_everything(args.seed if args.seed is not None else cfg.runtime.seed)
    model = vp.load_adapter(build_dense_backbone(cfg), adapter)
    kind = make_task(cfg)
    kind.classes = model.spec.classes or [str(i) for i in range(model.spec.num_classes)]
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    method = model.peft.peft_config[model.peft.active_adapter].method
    return model, kind, f"{cfg.model.name} + {method} + {model.neck_name} + {model.spec.head} on {device}"


def predict_dense(model: Any, kind: Any, images: list[Path], out_dir: Path, score_threshold: float) -> list[str]:
    """Write the pictures (and masks / detections) of each image into ``out_dir``; one summary line per image."""
    import contextlib

    import numpy as np
    import torch
    import torch.nn.functional as F
    from PIL import Image

    from visionpeft.data.dense_transforms import det_eval_transform, seg_eval_transform
    from visionpeft.data.files import ImageReadError, load_rgb
    from visionpeft.engine.pictures import save_detection_png, save_segmentation_png

    cfg, classes = kind.cfg, kind.classes
    device = next(model.parameters()).device
    lines = []
    for path in images:
        try:
            rgb = np.asarray(load_rgb(path), dtype=np.uint8)
        except ImageReadError as e:
            raise PredictError(str(e)) from None
        stem = out_dir / path.stem
        h, w = rgb.shape[:2]
        with torch.no_grad():
            if kind.name == "segmentation":
                tf = seg_eval_transform(cfg.data.scale, cfg.data.mean, cfg.data.std)
                x, _ = tf(rgb, np.zeros((h, w), dtype=np.int64))
                logits = kind.logits(model, x[None].to(device), contextlib.nullcontext)
                mask = F.interpolate(logits, size=(h, w), mode="bilinear").argmax(1)[0].cpu().numpy()
                out_dir.mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask.astype(np.uint8 if len(classes) <= 256 else np.uint16)).save(f"{stem}_mask.png")
                save_segmentation_png(f"{stem}_overlay.png", rgb, mask, classes, ignore_index=cfg.data.ignore_index)
                counts = np.bincount(mask.ravel(), minlength=len(classes)) / mask.size
                top = [f"{classes[c]} {100 * counts[c]:.1f}%" for c in np.argsort(-counts)[:4] if counts[c] > 0]
                lines.append(f"{path}: {', '.join(top)} -> {stem}_overlay.png")
            else:
                x, _ = det_eval_transform()(rgb, {"boxes": np.zeros((0, 4)), "labels": np.zeros((0,), dtype=np.int64)})
                pred = {k: v.cpu() for k, v in model([x.to(device)])[0].items()}
                masks = pred["masks"][:, 0].numpy() if "masks" in pred else None
                boxes, labels, scores = pred["boxes"].numpy(), pred["labels"].numpy(), pred["scores"].numpy()
                save_detection_png(
                    f"{stem}_boxes.png",
                    rgb,
                    boxes,
                    labels,
                    scores,
                    classes,
                    masks=masks,
                    score_threshold=score_threshold,
                )
                keep = scores >= score_threshold
                dets = [
                    {"label": classes[int(lab) - 1], "score": float(s), "box": [float(v) for v in b]}
                    for b, lab, s in zip(boxes[keep], labels[keep], scores[keep], strict=True)
                ]
                Path(f"{stem}_boxes.json").write_text(json.dumps(dets, indent=1) + "\n", encoding="utf-8")
                lines.append(f"{path}: {len(dets)} detection(s) >= {score_threshold} -> {stem}_boxes.png")
    return lines


# SAM adapters -----------------------------------------------------------------------------------------------------
def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def build_sam_model(args: argparse.Namespace, adapter: Path) -> tuple[Any, str]:
    """``(SamModel, description)``: the base SAM of ``--sam-checkpoint`` (or the embedded SAM when the adapter was
    trained on its architecture), rebuilt at the adapter's SAM size and input size, with the adapter loaded."""
    import torch

    import visionpeft as vp
    from visionpeft.backbones.sam import sam_options
    from visionpeft.engine.build import EMBEDDED_PREFIX, resolve_weights_file
    from visionpeft.engine.pretrain_sam import SAM_SCENES_ARGS, SAM_SCENES_KIND, SAM_SCENES_NAME

    spec = vp.sam.read_sam_spec(adapter)
    options = dict(spec.sam)
    name = options.pop("name", None)
    if name is None:
        raise PredictError(f"{adapter / SAM_CONFIG_NAME} does not name the SAM size (spec.sam.name)")
    embedded = {k: _plain(v) for k, v in sam_options(SAM_SCENES_NAME, **SAM_SCENES_ARGS).items()}
    is_embedded = name == SAM_SCENES_NAME and {k: _plain(v) for k, v in options.items()} == embedded
    checkpoint = args.sam_checkpoint or (EMBEDDED_PREFIX + SAM_SCENES_KIND if is_embedded else None)
    if checkpoint is None:
        raise PredictError(
            f"the SAM adapter {str(adapter)!r} was trained on {name} (encoder width "
            f"{options.get('encoder_embed_dim')}, depth {options.get('encoder_depth')}): pass --sam-checkpoint "
            "<its base checkpoint>, e.g. sam_vit_b_01ec64.pth for sam_vit_b"
        )
    if checkpoint.startswith(EMBEDDED_PREFIX):
        path = resolve_weights_file(checkpoint)
    else:
        path = str(Path(checkpoint).expanduser())
        if not Path(path).is_file():
            raise PredictError(f"--sam-checkpoint {path!r} does not exist (the base SAM checkpoint of the adapter)")
    sam = vp.sam.build_sam(name, checkpoint=path, img_size=spec.img_size, **options)
    model = vp.load_adapter(sam, adapter)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    method = model.peft.peft_config[model.peft.active_adapter].method
    what = f"{name} ({checkpoint}) + {method} SAM adapter {adapter}, {spec.mode} mode, {spec.img_size} px, on {device}"
    return model, what


def load_image(path: Path) -> tuple[Any, str | None]:
    """``(uint8 (H, W, 3) RGB array, note)``: the note says when the file was not RGB and was converted."""
    import numpy as np
    from PIL import Image

    from visionpeft.data.files import ImageReadError, pil_to_rgb

    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            rgb = pil_to_rgb(im, str(path))
    except ImageReadError as e:
        raise PredictError(str(e)) from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise PredictError(f"cannot read image {str(path)!r}: {e}") from None
    note = None if mode == "RGB" else f"note: {path} is a {mode} image, converted to RGB"
    return np.asarray(rgb, dtype=np.uint8), note


def read_prompts(path: str) -> dict[str, Any]:
    """The prompts file: a JSON object keyed by image file names."""
    f = Path(path).expanduser()
    if not f.is_file():
        raise PredictError(f"--prompts {str(f)!r} does not exist")
    try:
        data = json.loads(f.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PredictError(f"cannot read the prompts {str(f)!r}: {e}") from None
    if not isinstance(data, dict):
        raise PredictError(
            f"{str(f)!r} must hold a JSON object keyed by image name: "
            '{"image.png": {"boxes": [[x0, y0, x1, y1]], "points": [[x, y]], "labels": [1]}}'
        )
    return data


def _entry_for(prompts: dict[str, Any], image: Path, source: str) -> Any:
    for key in (str(image), image.name, image.as_posix()):
        if key in prompts:
            return prompts[key]
    keys = ", ".join(sorted(prompts)[:8])
    raise PredictError(f"no prompts for image {str(image)!r} in {source} (its keys are file names: {keys})")


def _numbers(value: Any, shape: tuple[int, ...], what: str) -> Any:
    import numpy as np

    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        arr = None
    if arr is None or arr.ndim != len(shape) or any(s != -1 and a != s for a, s in zip(arr.shape, shape, strict=True)):
        raise ValueError(f"{what} must be {'a list of ' if len(shape) > 1 else ''}{shape[-1]} numbers, got {value!r}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{what} holds a non-finite number: {value!r}")
    return arr


def parse_prompts(entry: Any, image: Path, size: tuple[int, int]) -> list[dict[str, Any]]:
    """One image's prompts as a list of objects ``{"box": (4,) | None, "points": (n, 2) | None, "labels": (n,)}``,
    checked against the image's ``size`` ``(H, W)``: a prompt outside the image is refused, naming both."""
    import numpy as np

    height, width = size
    where = f"prompts of image {str(image)!r} ({width} x {height} pixels)"
    if not isinstance(entry, dict) or set(entry) - {"boxes", "points", "labels", "objects"}:
        raise PredictError(f"{where}: expected an object with the keys boxes, points, labels, objects; got {entry!r}")
    raw = [{"box": b} for b in entry.get("boxes") or []]
    if entry.get("points") is not None or entry.get("labels") is not None:
        raw.append({"points": entry.get("points"), "labels": entry.get("labels")})
    objects = entry.get("objects") or []
    if not isinstance(objects, list):
        raise PredictError(f"{where}: 'objects' must be a list of {{box, points, labels}} objects")
    raw += objects
    out = []
    for k, obj in enumerate(raw):
        try:
            if not isinstance(obj, dict) or set(obj) - {"box", "points", "labels"} or not obj:
                raise ValueError(f"expected an object with a box and/or points (+ labels), got {obj!r}")
            box = None if obj.get("box") is None else _numbers(obj["box"], (4,), "a box")
            points = labels = None
            if obj.get("points") is not None:
                points = _numbers(obj["points"], (-1, 2), "points")
                labels = obj.get("labels")
                labels = np.ones(len(points)) if labels is None else _numbers(labels, (len(points),), "labels")
                if not np.isin(labels, (0, 1)).all():
                    raise ValueError(f"labels must be 1 (foreground) or 0 (background), got {obj.get('labels')!r}")
            elif obj.get("labels") is not None:
                raise ValueError("labels without points")
            if box is None and (points is None or not len(points)):
                raise ValueError("no box and no point")
            if box is not None and (box[2] < box[0] or box[3] < box[1]):
                raise ValueError(f"box {obj['box']!r} is not [x0, y0, x1, y1] with x0 <= x1 and y0 <= y1")
            xy = np.concatenate([p for p in (None if box is None else box.reshape(2, 2), points) if p is not None])
            if (xy < 0).any() or (xy[:, 0] > width).any() or (xy[:, 1] > height).any():
                raise ValueError(
                    f"{'box ' + repr(obj.get('box')) if box is not None else ''}"
                    f"{' points ' + repr(obj.get('points')) if points is not None else ''} lies outside the image "
                    f"(x in [0, {width}], y in [0, {height}])"
                )
        except ValueError as e:
            raise PredictError(f"{where}, prompt {k}: {e}") from None
        out.append({"box": box, "points": points, "labels": None if labels is None else labels.astype(np.int64)})
    if not out:
        raise PredictError(f"{where}: no box and no point")
    return out


def save_sam_png(path: Path, image: Any, masks: Any, prompts: list[dict[str, Any]], title: str) -> None:
    """The masks ``(N, H, W)`` bool tinted over ``image`` ``(H, W, 3)`` uint8, with their prompts (boxes in the
    mask's colour; foreground points green, background points red)."""

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from visionpeft.engine.pictures import palette, save_figure

    colors = palette(max(1, len(masks))) / 255.0
    pic = image.astype("float32") / 255.0
    for m, c in zip(masks, colors, strict=False):
        pic[m] = 0.45 * pic[m] + 0.55 * c
    h, w = image.shape[:2]
    scale = 4.0 / max(h, w)
    fig, ax = plt.subplots(figsize=(w * scale, h * scale + 0.3))
    ax.imshow(pic, interpolation="nearest")
    for prompt, c in zip(prompts, colors, strict=False):
        if prompt.get("box") is not None:
            x0, y0, x1, y1 = prompt["box"]
            ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=c, linewidth=1.5))
        if prompt.get("points") is not None:
            for (x, y), lab in zip(prompt["points"], prompt["labels"], strict=True):
                ax.plot(x, y, marker="*" if lab else "X", ms=9, mec="white", mew=0.8, color="lime" if lab else "red")
    ax.set_title(title, fontsize=8)
    ax.axis("off")
    save_figure(fig, path)


def _write_sam_outputs(stem: Path, rgb: Any, masks: Any, records: list[dict], prompts: list[dict], title: str) -> None:
    import numpy as np
    from PIL import Image

    stem.parent.mkdir(parents=True, exist_ok=True)
    labels = np.zeros(rgb.shape[:2], dtype=np.uint8 if len(masks) < 256 else np.uint16)
    for k, m in enumerate(masks, start=1):
        labels[m] = k
    Image.fromarray(labels).save(f"{stem}_sam_masks.png")
    Path(f"{stem}_sam_masks.json").write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
    save_sam_png(Path(f"{stem}_sam_overlay.png"), rgb, masks, prompts, title)


def _mask_record(mask: Any) -> dict[str, Any]:
    import numpy as np

    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    box = [int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])] if len(rows) else None
    return {"area": int(mask.sum()), "bbox_xyxy": box}


def predict_sam(model: Any, images: list[Path], args: argparse.Namespace) -> list[str]:
    """Write the pictures of a SAM adapter for each image (see the module docstring); one summary line each."""
    import numpy as np

    out_dir = Path(args.out_dir)
    if model.spec.mode == "semantic":
        return predict_sam_semantic(model, images, out_dir, args.no_merge)
    prompts = read_prompts(args.prompts) if args.prompts else None
    entries = {p: _entry_for(prompts, p, args.prompts) for p in images} if prompts is not None else {}
    mergeable = model.peft.method.mergeable
    predictor = model.predictor(merge=mergeable and not args.no_merge)
    lines = []
    for path in images:
        rgb, note = load_image(path)
        if note:
            lines.append(note)
        stem = out_dir / path.stem
        if prompts is not None:
            objects = parse_prompts(entries[path], path, rgb.shape[:2])
            predictor.set_image(rgb)
            masks, records = [], []
            for obj in objects:
                m, score, _ = predictor.predict(
                    point_coords=obj["points"],
                    point_labels=obj["labels"],
                    box=obj["box"],
                    multimask_output=False,
                )
                masks.append(m[0])
                prompt = {
                    "box": None if obj["box"] is None else obj["box"].tolist(),
                    "points": None if obj["points"] is None else obj["points"].tolist(),
                    "labels": None if obj["labels"] is None else obj["labels"].tolist(),
                }
                records.append({"mask": len(masks), "prompt": prompt, "score": float(score[0]), **_mask_record(m[0])})
            masks = np.stack(masks)
            title = f"{len(masks)} mask(s) for the prompts"
        else:
            from segment_anything import SamAutomaticMaskGenerator

            generator = SamAutomaticMaskGenerator(
                predictor.model,
                points_per_side=args.points_per_side,
                pred_iou_thresh=args.pred_iou_thresh,
                stability_score_thresh=args.stability_thresh,
            )
            found = sorted(generator.generate(rgb), key=lambda r: -r["area"])  # small masks drawn on top
            masks = np.stack([r["segmentation"] for r in found]) if found else np.zeros((0, *rgb.shape[:2]), bool)
            records = [
                {
                    "mask": k,
                    "score": float(r["predicted_iou"]),
                    "stability_score": float(r["stability_score"]),
                    "point": [float(v) for v in r["point_coords"][0]],
                    **_mask_record(r["segmentation"]),
                }
                for k, r in enumerate(found, start=1)
            ]
            objects = []
            title = f"{len(masks)} automatic mask(s) ({args.points_per_side} x {args.points_per_side} points)"
        _write_sam_outputs(stem, rgb, masks, records, objects, title)
        lines.append(f"{path}: {title.split(' (')[0]} -> {stem}_sam_overlay.png")
    return lines


def predict_sam_semantic(model: Any, images: list[Path], out_dir: Path, no_merge: bool) -> list[str]:
    """Semantic SAM adapter: the class of each pixel (``<name>_mask.png``) and the overlay (``<name>_overlay.png``)."""
    import numpy as np
    import torch
    from PIL import Image
    from segment_anything.utils.transforms import ResizeLongestSide

    from visionpeft.engine.pictures import save_segmentation_png

    if model.peft.method.mergeable and not no_merge:
        model.peft.merge()
    classes = model.spec.classes or [str(i) for i in range(model.spec.num_classes)]
    sam, size = model.sam, model.img_size
    device = next(model.parameters()).device
    resize = ResizeLongestSide(size)
    lines = []
    for path in images:
        rgb, note = load_image(path)
        if note:
            lines.append(note)
        resized = resize.apply_image(rgb)
        x = torch.as_tensor(resized, device=device).permute(2, 0, 1)[None].float()
        with torch.no_grad():
            logits = model(sam.preprocess(x))  # normalised as SAM does, padded to size x size
            logits = sam.postprocess_masks(logits, tuple(resized.shape[:2]), tuple(rgb.shape[:2]))
        mask = logits.argmax(1)[0].cpu().numpy()
        stem = out_dir / path.stem
        out_dir.mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask.astype(np.uint8 if len(classes) <= 256 else np.uint16)).save(f"{stem}_mask.png")
        save_segmentation_png(f"{stem}_overlay.png", rgb, mask, classes)
        counts = np.bincount(mask.ravel(), minlength=len(classes)) / mask.size
        top = [f"{classes[c]} {100 * counts[c]:.1f}%" for c in np.argsort(-counts)[:4] if counts[c] > 0]
        lines.append(f"{path}: {', '.join(top)} -> {stem}_overlay.png")
    return lines


def predict(
    model: Any, transform: Any, images: list[Path], top_k: int, batch_size: int
) -> list[tuple[list[int], list[float]]]:
    """Top-k ``(indices, probabilities)`` of each image, most likely first."""
    import torch

    from visionpeft.data.files import ImageReadError, load_rgb

    device = next(model.parameters()).device
    out: list[tuple[list[int], list[float]]] = []
    for start in range(0, len(images), batch_size):
        batch = []
        for path in images[start : start + batch_size]:
            try:
                batch.append(transform(load_rgb(path)))
            except ImageReadError as e:
                raise PredictError(str(e)) from None
        with torch.no_grad():
            probs = model(torch.stack(batch).to(device)).float().softmax(-1)
        p, i = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
        out += [(ii.tolist(), pp.tolist()) for ii, pp in zip(i.cpu(), p.cpu(), strict=True)]
    return out


def write_csv(path: Path, images: list[Path], preds: list[tuple[list[int], list[float]]], names: list[str]) -> None:
    import os

    k = max(len(idx) for idx, _ in preds)
    header = ["image"] + [f"{c}_{r}" for r in range(1, k + 1) for c in ("class", "index", "prob")]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        for img, (idx, prob) in zip(images, preds, strict=True):
            w.writerow([str(img)] + [v for i, q in zip(idx, prob, strict=True) for v in (names[i], i, f"{q:.6f}")])
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from visionpeft import AdapterFileError
    from visionpeft.engine.experiment import ConfigError

    if args.top_k < 1 or args.batch_size < 1:
        print("error: --top-k and --batch-size must be >= 1", file=sys.stderr)
        return 2
    try:
        adapter, run = resolve_adapter(args.adapter)
        images = collect_images(args.images)
        if (adapter / SAM_CONFIG_NAME).is_file():
            model, what = build_sam_model(args, adapter)
            print(f"predicting {len(images)} image(s) with {what}", flush=True)
            for line in predict_sam(model, images, args):
                print(line)
            return 0
        if (adapter / "dense_config.json").is_file():
            model, kind, what = build_dense(args, adapter, run)
            print(f"predicting {len(images)} image(s) with {what}", flush=True)
            for line in predict_dense(model, kind, images, Path(args.out_dir), args.score_threshold):
                print(line)
            return 0
        model, transform, names, what = build(args, adapter, run)
        print(f"predicting {len(images)} image(s) with {what}", flush=True)
        preds = predict(model, transform, images, args.top_k, args.batch_size)
    except (PredictError, ConfigError, AdapterFileError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for img, (idx, prob) in zip(images, preds, strict=True):
        print(f"{img}: " + ", ".join(f"{names[i]} {100 * q:.1f}%" for i, q in zip(idx, prob, strict=True)))
    out = Path(args.out)
    write_csv(out, images, preds, names)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
