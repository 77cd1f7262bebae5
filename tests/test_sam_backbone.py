"""SAM (segment_anything) as a backbone: building, checkpoints in the official key format, other input sizes,
activation checkpointing, and which parts of SAM the methods touch."""

from __future__ import annotations

import pytest
import torch

import visionpeft as vp
from visionpeft.backbones.sam import (
    SAM_ARCHS,
    TINY_SAM,
    build_sam,
    load_sam_checkpoint,
    resize_sam,
    save_sam_checkpoint,
    set_grad_checkpointing,
)


def tiny(img_size=64, seed=0, **kw):
    torch.manual_seed(seed)
    sam = build_sam("sam_vit_b", img_size=img_size, **{**TINY_SAM, **kw})
    with torch.no_grad():  # SAM zero-initialises the position tables: random ones, so resizing is visible
        enc = sam.image_encoder
        enc.pos_embed.normal_(0, 0.5)
        for b in enc.blocks:
            b.attn.rel_pos_h.normal_(0, 0.5)
            b.attn.rel_pos_w.normal_(0, 0.5)
    return sam


def images(n=2, size=64, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_official_sizes_and_spec():
    assert sorted(SAM_ARCHS) == ["sam_vit_b", "sam_vit_h", "sam_vit_l"]
    sam = tiny()
    spec = vp.detect_backbone(sam)
    assert spec.name == "sam" and vp.detect_backbone(sam.image_encoder).name == "sam"
    assert spec.head(sam) == ["mask_decoder"] and spec.head(sam.image_encoder) == []
    assert spec.blocks(sam) == ["image_encoder.blocks.0", "image_encoder.blocks.1"]
    assert sam.image_encoder(images()).shape == (2, 32, 8, 8)


def test_bad_size_and_option_are_named():
    with pytest.raises(ValueError, match="sam_vit_b"):
        build_sam("sam_vit_x")
    with pytest.raises(ValueError, match="encoder_depth"):
        build_sam("sam_vit_b", encoder_dpeth=2)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        build_sam("sam_vit_b", img_size=60, **TINY_SAM)


def test_checkpoint_round_trip_in_the_official_key_format(tmp_path):
    sam = tiny()
    path = save_sam_checkpoint(sam, tmp_path / "sam_tiny.pth")
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert "image_encoder.blocks.0.attn.qkv.weight" in state and "mask_decoder.iou_token.weight" in state
    assert set(state) == set(sam.state_dict())
    again = build_sam("sam_vit_b", checkpoint=path, img_size=64, **TINY_SAM)
    for k, v in sam.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    third = tiny(seed=5)
    load_sam_checkpoint(third, state)  # a state dict in memory loads the same way
    assert torch.equal(third.mask_decoder.iou_token.weight, sam.mask_decoder.iou_token.weight)


def test_checkpoint_of_another_size_names_the_mismatch(tmp_path):
    path = save_sam_checkpoint(tiny(encoder_embed_dim=48, encoder_num_heads=2), tmp_path / "wide.pth")
    with pytest.raises(ValueError) as err:
        build_sam("sam_vit_b", checkpoint=path, img_size=64, **TINY_SAM)
    msg = str(err.value)
    assert "wide.pth" in msg and "image_encoder.patch_embed.proj.weight" in msg and "(48," in msg
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        build_sam("sam_vit_b", checkpoint=tmp_path / "nowhere.pth", img_size=64, **TINY_SAM)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth"):
        build_sam("sam_vit_b", checkpoint=tmp_path / "junk.pth", img_size=64, **TINY_SAM)


def test_other_input_size_matches_a_model_built_for_it(tmp_path):
    sam = tiny(img_size=64)
    path = save_sam_checkpoint(sam, tmp_path / "sam64.pth")
    built = build_sam("sam_vit_b", checkpoint=path, img_size=96, **TINY_SAM)  # checkpoint resized on loading
    resized = resize_sam(sam, 96)  # in place
    assert resized.image_encoder.pos_embed.shape == (1, 12, 12, 32)
    assert resized.image_encoder.blocks[1].attn.rel_pos_h.shape == (23, 16)  # global block: 2 * 12 - 1 rows
    assert resized.image_encoder.blocks[0].attn.rel_pos_h.shape == (7, 16)  # windowed block: 2 * 4 - 1, kept
    assert resized.prompt_encoder.image_embedding_size == (12, 12)
    x = images(size=96)
    with torch.no_grad():
        a, b = resized.image_encoder(x), built.image_encoder(x)
    assert a.shape == (2, 32, 12, 12)
    torch.testing.assert_close(a, b)
    # SAM's own predictor pipeline follows the new size (preprocess pads to it, masks come back at the image size)
    with torch.no_grad():
        out = resized([{"image": torch.rand(3, 96, 80) * 255, "original_size": (96, 80)}], multimask_output=False)
    assert out[0]["masks"].shape == (1, 1, 96, 80)


def test_grad_checkpointing_gives_the_same_gradients():
    grads = []
    for ckpt in (False, True):
        sam = tiny()
        pm = vp.get_peft_model(sam, vp.LoRAConfig(rank=4, init_weights=False))
        if ckpt:
            set_grad_checkpointing(sam)
        pm.train()
        pm.image_encoder(images()).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in pm.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any("lora_A" in n for n in grads[0])
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-6)
    set_grad_checkpointing(sam, False)
    assert "forward" not in sam.image_encoder.blocks[0].__dict__


def test_methods_leave_the_prompt_encoder_frozen_and_train_the_decoder():
    for method, kw in [("lora", {"rank": 4}), ("bitfit", {}), ("ln_tune", {}), ("full", {}), ("adaptformer", {})]:
        pm = vp.get_peft_model(tiny(), method, **kw)
        trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
        assert not [n for n in trainable if "prompt_encoder" in n], method
        assert any("mask_decoder" in n for n in trainable), method
        assert any("image_encoder" in n for n in trainable), method
    frozen_decoder = vp.get_peft_model(tiny(), "lora", rank=4, modules_to_save=[])
    assert not [n for n, p in frozen_decoder.named_parameters() if p.requires_grad and "mask_decoder" in n]
    asked = vp.get_peft_model(tiny(), "lora", rank=4, modules_to_save=["mask_decoder", "prompt_encoder"])
    assert [n for n, p in asked.named_parameters() if p.requires_grad and "prompt_encoder" in n]


def test_lora_on_the_q_and_v_slices_of_the_fused_qkv_merges_exactly():
    sam = tiny()
    pm = vp.get_peft_model(sam, vp.LoRAConfig(rank=4, qkv_slices="qv", init_weights=False, modules_to_save=[]))
    x = images()
    with torch.no_grad():
        out = pm.image_encoder(x)
        plain = pm.merge_and_unload()
        torch.testing.assert_close(plain.image_encoder(x), out, rtol=1e-4, atol=1e-4)


def test_vpt_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="vpt.*sam"):
        vp.get_peft_model(tiny(), "vpt", num_tokens=4)
