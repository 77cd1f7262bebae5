"""tools/predict.py with SAM adapters: prompts, automatic masks, semantic masks, the base model and bad input.

The base model is a tiny random-weight SAM saved as an official-format checkpoint; the adapter is LoRA with a
random B (so merged and unmerged could differ) and the decoder saved with it.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import visionpeft as vp
from visionpeft.sam import TINY_SAM, SamModel, build_sam, save_sam_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def _tool():
    spec = importlib.util.spec_from_file_location("predict_tool_sam", ROOT / "tools" / "predict.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tool():
    return _tool()


def _base(path: Path | None = None) -> torch.nn.Module:
    return build_sam("sam_vit_b", checkpoint=path, img_size=64, **TINY_SAM)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A base checkpoint, a promptable and a semantic LoRA adapter, an RGB and a greyscale image, prompts."""
    tmp = tmp_path_factory.mktemp("sampredict")
    torch.manual_seed(0)
    base = _base()
    save_sam_checkpoint(base, tmp / "base.pth")
    SamModel.from_sam(_base(tmp / "base.pth"), vp.LoRAConfig(rank=4, init_weights=False)).save_adapter(tmp / "prompt")
    SamModel.from_sam(
        _base(tmp / "base.pth"), vp.LoRAConfig(rank=4, init_weights=False), mode="semantic", num_classes=3,
        classes=["bg", "a", "b"],
    ).save_adapter(tmp / "semantic")  # fmt: skip
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)  # H 60, W 90: resized to 64 wide and padded
    rgb[15:45, 20:50] = (250, 30, 30)
    Image.fromarray(rgb).save(tmp / "wide.png")
    grey = rng.integers(0, 256, (70, 50), dtype=np.uint8)
    Image.fromarray(grey, "L").save(tmp / "grey.png")
    prompts = {
        "wide.png": {"boxes": [[20, 15, 49, 44]]},
        "grey.png": {
            "boxes": [[5, 5, 30, 40]],
            "points": [[25, 30], [40, 60]],
            "labels": [1, 0],
            "objects": [{"box": [10, 10, 45, 65], "points": [[20, 20]], "labels": [0]}],
        },
    }
    (tmp / "prompts.json").write_text(json.dumps(prompts))
    return {"tmp": tmp, "base": tmp / "base.pth", "prompt": tmp / "prompt", "semantic": tmp / "semantic"}


def reference_logits(adapter: Path, base: Path, rgb: np.ndarray, box: list[float]) -> torch.Tensor:
    """The mask logits ``(H, W)`` at the image's size for one box, from SamModel.decode (adapter unmerged)."""
    from segment_anything.utils.transforms import ResizeLongestSide

    model = vp.load_adapter(_base(base), adapter)
    sam = model.sam
    resize = ResizeLongestSide(model.img_size)
    small = resize.apply_image(rgb)
    x = sam.preprocess(torch.as_tensor(small).permute(2, 0, 1)[None].float())
    with torch.no_grad():
        emb = model.image_embeddings(x)
        boxes = torch.as_tensor(resize.apply_boxes(np.array([box], dtype=float), rgb.shape[:2])).float()
        low, _ = model.decode(emb, boxes=boxes)
        return sam.postprocess_masks(low, small.shape[:2], rgb.shape[:2])[0, 0]


def test_predictor_matches_decode_merged_and_unmerged(files):
    rgb = np.asarray(Image.open(files["tmp"] / "wide.png"))
    box = [20.0, 15.0, 49.0, 44.0]
    ref = reference_logits(files["prompt"], files["base"], rgb, box)
    assert 0 < int((ref > 0).sum()) < ref.numel()  # a mask that is neither empty nor everything
    for merge in (False, True):
        predictor = vp.load_adapter(_base(files["base"]), files["prompt"]).predictor(merge=merge)
        predictor.set_image(rgb)
        logits, _, _ = predictor.predict(box=np.array(box), multimask_output=False, return_logits=True)
        assert logits.shape == (1, 60, 90)
        torch.testing.assert_close(torch.as_tensor(logits[0]), ref, atol=2e-4, rtol=1e-4)
    # the adapter matters: the base SAM alone answers differently
    from segment_anything import SamPredictor

    plain = SamPredictor(_base(files["base"]))
    plain.set_image(rgb)
    logits, _, _ = plain.predict(box=np.array(box), multimask_output=False, return_logits=True)
    assert (torch.as_tensor(logits[0]) - ref).abs().max() > 1e-2


def test_predict_prompts_writes_masks_overlay_and_json(files, tool, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--adapter", str(files["prompt"]), str(files["tmp"] / "wide.png"), str(files["tmp"] / "grey.png")]
    code = tool.main(args + ["--prompts", str(files["tmp"] / "prompts.json"), "--sam-checkpoint", str(files["base"])]
                     + ["--out-dir", str(out), "--device", "cpu"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "lora SAM adapter" in captured.out and "prompt mode" in captured.out
    assert "grey.png is a L image, converted to RGB" in captured.out
    for stem in ("wide", "grey"):
        assert Image.open(out / f"{stem}_sam_overlay.png").mode in ("RGBA", "RGB")
    wide = np.asarray(Image.open(out / "wide_sam_masks.png"))
    rgb = np.asarray(Image.open(files["tmp"] / "wide.png"))
    ref = reference_logits(files["prompt"], files["base"], rgb, [20, 15, 49, 44]) > 0
    assert wide.shape == (60, 90) and np.array_equal(wide == 1, ref.numpy())  # merged LoRA in the tool
    records = json.loads((out / "grey_sam_masks.json").read_text())
    assert [r["mask"] for r in records] == [1, 2, 3]  # a box, the two points together, one combined object
    assert records[1]["prompt"] == {"box": None, "points": [[25.0, 30.0], [40.0, 60.0]], "labels": [1, 0]}
    assert records[2]["prompt"]["box"] == [10.0, 10.0, 45.0, 65.0]
    grey = np.asarray(Image.open(out / "grey_sam_masks.png"))
    assert grey.shape == (70, 50)
    assert all(isinstance(r["score"], float) for r in records)
    assert records[-1]["area"] == int((grey == 3).sum())  # the last mask is drawn on top of the others


def test_predict_automatic_masks(files, tool, tmp_path, capsys):
    out = tmp_path / "auto"
    args = ["--adapter", str(files["prompt"]), str(files["tmp"] / "wide.png"), "--sam-checkpoint", str(files["base"])]
    args += ["--out-dir", str(out), "--points-per-side", "4", "--pred-iou-thresh", "0", "--stability-thresh", "0"]
    assert tool.main(args + ["--no-merge"]) == 0, capsys.readouterr().err
    records = json.loads((out / "wide_sam_masks.json").read_text())
    assert records and (out / "wide_sam_overlay.png").is_file()
    labels = np.asarray(Image.open(out / "wide_sam_masks.png"))
    assert set(np.unique(labels)) <= set(range(len(records) + 1))
    assert "automatic mask(s)" in capsys.readouterr().out


def test_predict_semantic_adapter(files, tool, tmp_path, capsys):
    from segment_anything.utils.transforms import ResizeLongestSide

    out = tmp_path / "sem"
    image = files["tmp"] / "wide.png"
    args = ["--adapter", str(files["semantic"]), str(image), "--sam-checkpoint", str(files["base"])]
    assert tool.main(args + ["--out-dir", str(out)]) == 0, capsys.readouterr().err
    mask = np.asarray(Image.open(out / "wide_mask.png"))
    assert (out / "wide_overlay.png").is_file()
    model = vp.load_adapter(_base(files["base"]), files["semantic"])  # unmerged reference
    rgb = np.asarray(Image.open(image))
    small = ResizeLongestSide(64).apply_image(rgb)
    with torch.no_grad():
        logits = model(model.sam.preprocess(torch.as_tensor(small).permute(2, 0, 1)[None].float()))
        logits = model.sam.postprocess_masks(logits, small.shape[:2], rgb.shape[:2])
    assert mask.shape == (60, 90)
    agree = (mask == logits.argmax(1)[0].numpy()).mean()
    assert agree > 0.999  # merged LoRA: equal up to ties of float rounding


def test_embedded_sam_is_the_default_base(files, tool, tmp_path, monkeypatch, capsys):
    from visionpeft.engine import pretrain_sam as ps

    monkeypatch.setenv("VISIONPEFT_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(1)
    base = ps.build_sam_scenes()
    save_sam_checkpoint(base, ps.embedded_sam_path())  # stands in for the pretrained one (no training here)
    SamModel.from_sam(ps.build_sam_scenes(ps.embedded_sam_path()), "lora", rank=2).save_adapter(tmp_path / "ad")
    args = ["--adapter", str(tmp_path / "ad"), str(files["tmp"] / "wide.png"), "--out-dir", str(tmp_path / "o")]
    assert tool.main(args + ["--prompts", str(files["tmp"] / "prompts.json")]) == 0, capsys.readouterr().err
    assert "(embedded:sam_scenes)" in capsys.readouterr().out
    assert (tmp_path / "o" / "wide_sam_overlay.png").is_file()
    # an adapter of another SAM architecture needs --sam-checkpoint
    assert tool.main(["--adapter", str(files["prompt"]), str(files["tmp"] / "wide.png")]) == 2
    assert "pass --sam-checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize(
    "entry, expected",
    [
        ({"boxes": [[20, 15, 95, 44]]}, "prompt 0: box [20, 15, 95, 44] lies outside the image (x in [0, 90]"),
        ({"points": [[10, -1]]}, "prompt 0:  points [[10, -1]] lies outside the image"),
        ({"points": [[10, 10]], "labels": [2]}, "labels must be 1 (foreground) or 0 (background)"),
        ({"boxes": [[30, 15, 20, 44]]}, "is not [x0, y0, x1, y1] with x0 <= x1"),
        ({"boxes": [[1, 2, 3]]}, "a box must be 4 numbers"),
        ({"box": [1, 2, 3, 4]}, "expected an object with the keys boxes, points, labels, objects"),
    ],
)
def test_bad_prompts_name_the_image_and_prompt(files, tool, tmp_path, capsys, entry, expected):
    (tmp_path / "p.json").write_text(json.dumps({"wide.png": entry}))
    args = ["--adapter", str(files["prompt"]), str(files["tmp"] / "wide.png"), "--sam-checkpoint", str(files["base"])]
    assert tool.main(args + ["--prompts", str(tmp_path / "p.json"), "--out-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"prompts of image {str(files['tmp'] / 'wide.png')!r} (90 x 60 pixels)" in err and expected in err, err
    assert not (tmp_path / "o").exists()


def test_missing_inputs_are_named(files, tool, tmp_path, capsys):
    image = str(files["tmp"] / "wide.png")
    gone = tmp_path / "gone.pth"
    assert tool.main(["--adapter", str(files["prompt"]), image, "--sam-checkpoint", str(gone)]) == 2
    assert f"--sam-checkpoint {str(gone)!r} does not exist" in capsys.readouterr().err
    (tmp_path / "p.json").write_text(json.dumps({"other.png": {"boxes": [[1, 1, 5, 5]]}}))
    args = ["--adapter", str(files["prompt"]), image, "--sam-checkpoint", str(files["base"])]
    assert tool.main(args + ["--prompts", str(tmp_path / "p.json")]) == 2
    assert "no prompts for image" in capsys.readouterr().err
