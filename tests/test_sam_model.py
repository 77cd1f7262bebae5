"""SamModel: SAM with an adapter in promptable and semantic mode, its adapter folder, and the predictor."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import visionpeft as vp
from visionpeft.sam import TINY_SAM, SamModel, build_sam, sam_predictor

IMG = 64


def tiny(seed=0, img_size=IMG):
    torch.manual_seed(seed)
    return build_sam("sam_vit_b", img_size=img_size, **TINY_SAM)


def images(n=2, seed=1, size=IMG):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


BOX = torch.tensor([[6.0, 8.0, 40.0, 50.0]])


def test_semantic_mode_gives_class_logits_and_round_trips(tmp_path):
    model = SamModel.from_sam(tiny(), "lora", mode="semantic", num_classes=4, classes=list("abcd"), rank=4)
    model.train()
    x = images()
    out = model(x)
    assert out.shape == (2, 4, IMG, IMG)
    torch.nn.functional.cross_entropy(out, torch.randint(0, 4, (2, IMG, IMG))).backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any("lora_B" in n for n in grads) and any("mask_decoder" in n for n in grads)
    with torch.no_grad():  # trained-looking weights, so the reload check can fail
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    model.eval()
    with torch.no_grad():
        ref = model(x)
    model.save_adapter(tmp_path / "sem")
    loaded = vp.load_adapter(tiny(), tmp_path / "sem")
    assert isinstance(loaded, SamModel) and loaded.spec.classes == list("abcd")
    assert not any(p.requires_grad for p in loaded.parameters())
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ref)


def test_semantic_decoder_starts_from_sam_tokens():
    sam = tiny()
    before = sam.mask_decoder.mask_tokens.weight.detach().clone()
    model = SamModel.from_sam(sam, "linear_probe", mode="semantic", num_classes=6)
    tokens = model.sam.mask_decoder.mask_tokens.weight
    assert tokens.shape[0] == 7
    for k in range(7):
        assert torch.equal(tokens[k], before[k % 4])


def test_prompt_mode_decode_and_predictor_agree(tmp_path):
    model = SamModel.from_sam(tiny(), vp.LoRAConfig(rank=4, qkv_slices="qv", init_weights=False))
    model.eval()
    x = images(1)
    with torch.no_grad():
        emb = model.image_embeddings(x)
        low, iou = model.decode(emb, boxes=BOX)
    assert low.shape == (1, 1, 32, 32) and iou.shape == (1, 1)
    model.save_adapter(tmp_path / "p")
    # a predictor from the base model + the folder, unmerged and merged, answers SamPredictor's calls alike
    again = vp.load_adapter(tiny(), tmp_path / "p")
    unmerged = again.predictor(merge=False)
    merged = sam_predictor(tiny(), tmp_path / "p", merge=True)
    assert not vp.detect_backbone(merged.model).name != "sam"
    assert not any(m._forward_hooks for m in merged.model.modules())  # LoRA merged: plain SAM, no hooks
    img = (np.random.default_rng(0).random((IMG, IMG, 3)) * 255).astype(np.uint8)
    answers = []
    for predictor in (unmerged, merged):
        predictor.set_image(img)
        masks, scores, logits = predictor.predict(
            point_coords=np.array([[20, 30]]), point_labels=np.array([1]), box=BOX[0].numpy(), multimask_output=True
        )
        assert masks.shape == (3, IMG, IMG) and scores.shape == (3,) and logits.shape == (3, 32, 32)
        answers.append(logits)
    np.testing.assert_allclose(answers[0], answers[1], rtol=1e-4, atol=1e-4)
    # the predictor's logits are SamModel.decode's on the predictor's image embedding (same prompts)
    with torch.no_grad():
        low2, _ = again.decode(
            unmerged.features, points=(torch.tensor([[[20.0, 30.0]]]), torch.tensor([[1]])), boxes=BOX, multimask=True
        )
    np.testing.assert_allclose(low2[0].numpy(), answers[0], rtol=1e-5, atol=1e-5)
    # and the adapter matters: the base SAM answers differently
    base = tiny()
    from segment_anything import SamPredictor

    plain = SamPredictor(base)
    plain.set_image(img)
    _, _, base_logits = plain.predict(
        box=BOX[0].numpy(), point_coords=np.array([[20, 30]]), point_labels=np.array([1])
    )
    assert not np.allclose(base_logits, answers[0][:1], atol=1e-3)


def test_bad_inputs_are_named(tmp_path):
    model = SamModel.from_sam(tiny(), "lora", rank=4)
    with pytest.raises(ValueError, match="3 channels"):
        model.image_embeddings(torch.randn(1, 1, IMG, IMG))
    with pytest.raises(ValueError, match="64 x 64"):
        model.image_embeddings(torch.randn(1, 3, 32, 32))
    emb = model.image_embeddings(images(1))
    with pytest.raises(ValueError, match="outside"):
        model.decode(emb, boxes=torch.tensor([[0.0, 0.0, 90.0, 20.0]]))
    with pytest.raises(ValueError, match="outside"):
        model.decode(emb, points=(torch.tensor([[[-3.0, 5.0]]]), torch.tensor([[1]])))
    with pytest.raises(ValueError, match="at least one prompt"):
        model.decode(emb)
    with pytest.raises(ValueError, match="num_classes"):
        SamModel.from_sam(tiny(), "lora", mode="semantic")
    model.save_adapter(tmp_path / "a")
    other = build_sam("sam_vit_b", img_size=IMG, **{**TINY_SAM, "encoder_embed_dim": 48})
    with pytest.raises(vp.AdapterFileError, match="encoder_embed_dim"):
        vp.load_adapter(other, tmp_path / "a")
    (tmp_path / "a" / "sam_config.json").write_text("{}")
    with pytest.raises(vp.AdapterFileError, match="sam_config.json"):
        vp.load_adapter(tiny(), tmp_path / "a")


def test_adapter_trained_at_another_size_resizes_the_base(tmp_path):
    model = SamModel.from_sam(tiny(img_size=96), "lora", rank=4)
    model.save_adapter(tmp_path / "a")
    loaded = vp.load_adapter(tiny(img_size=IMG), tmp_path / "a")
    assert loaded.img_size == 96 and loaded.sam.image_encoder.pos_embed.shape[1] == 12


def test_frozen_encoder_embeddings_are_cached():
    model = SamModel.from_sam(tiny(), "linear_probe", cache_size=4)
    assert not model.encoder_trains
    calls = []
    model.sam.image_encoder.register_forward_hook(lambda *a: calls.append(1))
    x = images(2)
    a = model.image_embeddings(x)
    b = model.image_embeddings(x)
    assert len(calls) == 2 and torch.equal(a, b)  # one call per image the first time, none the second
    assert not a.requires_grad


def test_automatic_mask_generator_runs_on_the_adapted_sam(tmp_path):
    from segment_anything import SamAutomaticMaskGenerator

    model = SamModel.from_sam(tiny(), vp.LoRAConfig(rank=4, init_weights=False))
    model.save_adapter(tmp_path / "p")
    predictor = sam_predictor(tiny(), tmp_path / "p", merge=True)
    generator = SamAutomaticMaskGenerator(
        predictor.model, points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0
    )
    img = (np.random.default_rng(0).random((IMG, 48, 3)) * 255).astype(np.uint8)
    masks = generator.generate(img)
    assert masks and masks[0]["segmentation"].shape == (IMG, 48)
    assert {"bbox", "predicted_iou", "point_coords"} <= set(masks[0])


def test_lora_on_the_mask_decoder_needs_the_decoder_out_of_modules_to_save():
    targets = ["qkv", r"mask_decoder\..*_proj"]
    model = SamModel.from_sam(tiny(), vp.LoRAConfig(rank=2, targets=targets, modules_to_save=[], init_weights=False))
    emb = model.image_embeddings(images(1))
    low, _ = model.decode(emb, boxes=BOX)
    low.sum().backward()
    decoder_lora = [p for n, p in model.named_parameters() if "mask_decoder" in n and "lora_" in n]
    assert decoder_lora and all(p.grad is not None and p.grad.abs().sum() > 0 for p in decoder_lora)
    # with the decoder trained as a whole copy (the default), its LoRA layers would never run: refused
    with pytest.raises(ValueError, match="inside modules_to_save"):
        SamModel.from_sam(tiny(), vp.LoRAConfig(rank=2, targets=targets))


def test_a_training_encoder_is_never_served_from_the_cache():
    model = SamModel.from_sam(tiny(), vp.LoRAConfig(rank=2, init_weights=False), cache_size=4)
    x = images(1)
    with torch.no_grad():
        first = model.image_embeddings(x)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1)
        second = model.image_embeddings(x)
    assert not torch.allclose(first, second)
