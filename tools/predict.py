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
