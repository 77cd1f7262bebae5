"""The SAM tasks of the trainer (sam_prompt, sam_semantic) on a tiny random-weight SAM: config validation, one short
run of each mode through the Trainer, the adapter folder (a SAM folder that vp.load_adapter and tools/eval.py read
back to the same metrics), batches without objects, decoder-only training with the embedding cache, DDP."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import pytest
import torch

import visionpeft as vp
from visionpeft.backbones.sam import TINY_SAM
from visionpeft.engine.experiment import ConfigError, load_config
from visionpeft.engine.sam_tasks import SamPromptTask, SamSemanticTask, SamTrainModel, build_sam_base, fit_to_model
from visionpeft.engine.tasks import make_task, pad_collate
from visionpeft.engine.trainer import Trainer, seed_everything

ROOT = Path(__file__).resolve().parents[1]
TINY = json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in TINY_SAM.items()})
DIGITS = '["5", "6", "7", "8", "9"]'


def tiny(task: str = "sam_prompt", *extra: str, out: Path | None = None, method: str = "lora") -> list[str]:
    """Overrides for a tiny SAM (random weights, 64 x 64) on small digit scenes; LoRA r2 unless ``method``."""
    over = [
        f"task.name={task}",
        "model.name=sam_vit_b",
        "model.img_size=64",
        f"model.kwargs={TINY}",
        "data.dataset=digit_scenes",
        "data.num_train=8",
        "data.num_eval=4",
        "data.crop_size=64",
        "data.scale=[64, 64]",
        "data.ratio_range=[1.0, 1.0]",
        "data.cat_max_ratio=1.0",
        "data.hflip=0.0",
        "data.photometric=false",
        "data.batch_size=4",
        "data.num_workers=0",
        "schedule.epochs=1",
        "schedule.warmup_epochs=0",
        "optimizer.lr=0.003",
        f"method.name={method}",
        *(["method.rank=2"] if method == "lora" else []),
        "runtime.device=cpu",
        "runtime.log_every=1",
    ]
    if task == "sam_prompt":
        over += ["task.max_objects=2", "task.refine_iters=1"]
    if out is not None:
        over.append(f"runtime.out_dir={out}")
    return [*over, *extra]


# config ------------------------------------------------------------------------------------------------------------
def test_config_errors_name_the_keys():
    with pytest.raises(ConfigError, match=r"data.crop_size=32 differs from model.img_size=64.*data.crop_size=64"):
        load_config(None, tiny("sam_prompt", "data.crop_size=32"))
    with pytest.raises(ConfigError, match=r"data.crop_size=512 differs from model.img_size=1024"):  # default 1024
        load_config(None, ["task.name=sam_prompt", "model.name=sam_vit_b"])
    with pytest.raises(ConfigError, match=r"unknown key 'task.refine_iter'.*did you mean 'refine_iters'"):
        load_config(None, tiny("sam_prompt", "task.refine_iter=1"))
    with pytest.raises(ConfigError, match=r"task.refine_iters is a key of task.name sam_prompt, not of sam_semantic"):
        load_config(None, tiny("sam_semantic", "task.refine_iters=1"))
    with pytest.raises(ConfigError, match=r"task.cache_embeddings is a key of .*not of segmentation"):
        load_config(None, ["task.name=segmentation", "task.cache_embeddings=4"])
    with pytest.raises(ConfigError, match=r"model.name=sam_vit_b is Segment Anything: set task.name"):
        load_config(None, ["model.name=sam_vit_b"])
    with pytest.raises(ConfigError, match=r"model.name must be one of sam_vit_b"):
        load_config(None, [*tiny("sam_prompt"), "model.name=vit_base_patch16_224"])
    with pytest.raises(ConfigError, match=r"task.prompts\[1\] must be one of box, point"):
        load_config(None, tiny("sam_prompt", "task.prompts=[box, mask]"))
    with pytest.raises(ConfigError, match=r"task.decoder must be one of train, frozen"):
        load_config(None, tiny("sam_prompt", "task.decoder=trained"))
    with pytest.raises(ConfigError, match=r"task.head does not apply to sam_semantic"):
        load_config(None, tiny("sam_semantic", "task.head=upernet"))


def test_build_errors_name_the_keys():
    cfg = load_config(None, tiny("sam_prompt", "task.decoder=frozen", method="linear_probe"))
    with pytest.raises(ConfigError, match="linear_probe trains only the mask decoder.*task.decoder=train"):
        make_task(cfg).build_model(11)
    cfg = load_config(None, tiny("sam_prompt", "task.cache_embeddings=8"))
    with pytest.raises(ConfigError, match="task.cache_embeddings=8 .* trains the encoder"):
        make_task(cfg).build_model(11)
    cfg = load_config(None, tiny("sam_prompt", 'model.kwargs={"encoder_dept": 2}'))
    with pytest.raises(ConfigError, match="model.name / model.kwargs.*encoder_depth"):
        make_task(cfg).build_model(11)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_a_frozen_decoder_stays_frozen(method):
    cfg = load_config(None, tiny("sam_prompt", "task.decoder=frozen", method=method))
    model = make_task(cfg).build_model(11)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and not [n for n in trainable if "mask_decoder" in n or "prompt_encoder" in n]


def test_prompt_classes_by_name_or_label_id():
    classes = ["background", *(str(d) for d in range(10))]
    task = SamPromptTask(load_config(None, tiny("sam_prompt", f"task.prompt_classes={DIGITS}")))
    assert task.resolve_prompt_classes(classes) == [6, 7, 8, 9, 10]
    task = SamPromptTask(load_config(None, tiny("sam_prompt", "task.prompt_classes=[1, '2', 1]")))
    assert task.resolve_prompt_classes(classes) == [1, 3]  # label 1 (digit 0) and the class named "2" (label 3)
    task = SamPromptTask(load_config(None, tiny("sam_prompt", "task.prompt_classes=['backgrund']")))
    with pytest.raises(ConfigError, match=r"task.prompt_classes\[0\]: no class named 'backgrund'.*'background'"):
        task.resolve_prompt_classes(classes)
    task = SamPromptTask(load_config(None, tiny("sam_prompt", "task.prompt_classes=[11]")))
    with pytest.raises(ConfigError, match=r"label id 11 is outside the data's labels 0..10"):
        task.resolve_prompt_classes(classes)
    task = SamPromptTask(load_config(None, tiny("sam_prompt", "task.prompt_classes=[background]")))
    with pytest.raises(ConfigError, match="names the background"):
        task.resolve_prompt_classes(classes)


# training through the Trainer --------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["sam_prompt", "sam_semantic"])
def run(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    extra = [f"task.prompt_classes={DIGITS}"] if request.param == "sam_prompt" else ["task.dice_weight=1.0"]
    cfg = load_config(None, tiny(request.param, *extra, out=out))
    trainer = Trainer(cfg, progress=False)
    before = {k: v.detach().clone() for k, v in trainer.peft.adapter_state_dict().items()}
    result = trainer.fit()
    return cfg, trainer, result, before, out


def test_one_training_run_of_each_mode(run):
    cfg, trainer, result, before, out = run
    assert isinstance(trainer.peft, SamTrainModel)
    assert result["kind"] == cfg.task.name and result["metric"] == "mIoU" and 0.0 <= result["mIoU"] <= 100.0
    assert result["steps"] == 2 and all(torch.isfinite(torch.tensor(r["train_loss"])) for r in trainer.history)
    # the LoRA factors and the decoder copy moved; the adapter's own count excludes the decoder
    after = trainer.peft.adapter_state_dict()
    assert any("lora_B" in k and not torch.equal(before[k], v) for k, v in after.items())
    assert any("modules_to_save-mask_decoder" in k and not torch.equal(before[k], v) for k, v in after.items())
    lora = sum(v.numel() for k, v in after.items() if "lora_" in k)
    assert result["adapter_params"] == lora < result["trainable_params"]
    if cfg.task.name == "sam_prompt":
        assert result["eval_objects"] > 0 and 0.0 <= result["point_mIoU"] <= 100.0
        assert set(result["per_class_IoU"]) <= {"5", "6", "7", "8", "9"}
    else:
        assert "mAcc" in result and len(result["per_class_IoU"]) == 11
    assert json.loads((out / "results.json").read_text())["mIoU"] == pytest.approx(result["mIoU"])


def test_adapter_folder_is_a_sam_folder_that_reloads(run):
    cfg, trainer, result, _, out = run
    folder = out / "adapter"
    assert sorted(p.name for p in folder.iterdir()) == [
        "adapter.safetensors",
        "adapter_config.json",
        "sam_config.json",
    ]
    spec = vp.sam.read_sam_spec(folder)
    assert spec.mode == ("semantic" if cfg.task.name == "sam_semantic" else "prompt") and spec.img_size == 64
    seed_everything(cfg.runtime.seed)  # the run's random base weights
    loaded = vp.load_adapter(build_sam_base(cfg), folder)
    assert isinstance(loaded, vp.sam.SamModel)
    task = make_task(cfg)
    _, eval_set, _, _ = task.datasets()
    loader = torch.utils.data.DataLoader(eval_set, batch_size=4, collate_fn=pad_collate)
    metrics = task.evaluate(loaded, loader, torch.device("cpu"), contextlib.nullcontext)
    assert metrics["mIoU"] == pytest.approx(result["mIoU"], abs=1e-9)
    assert metrics["eval_loss"] == pytest.approx(result["eval_loss"], rel=1e-6)
    # tools/eval.py on the run folder: the same numbers
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import eval as eval_tool
    finally:
        sys.path.pop(0)
    report = out / "eval.json"
    assert eval_tool.main(["--config", str(out / "config.yaml"), "--adapter", str(out), "--out", str(report)]) == 0
    got = json.loads(report.read_text())
    assert got["kind"] == cfg.task.name and got["method"] == "lora"
    assert got["mIoU"] == pytest.approx(result["mIoU"], abs=1e-9)


# losses ------------------------------------------------------------------------------------------------------------
def _prompt_model(*extra: str) -> tuple[SamPromptTask, SamTrainModel]:
    cfg = load_config(None, tiny("sam_prompt", *extra))
    task = make_task(cfg)
    task.classes = ["background", *(str(d) for d in range(10))]
    torch.manual_seed(0)
    return task, task.build_model(11)


@pytest.mark.parametrize("mask_loss", ["focal_dice", "bce"])
def test_images_without_objects_give_finite_losses(mask_loss):
    task, model = _prompt_model(f"task.mask_loss={mask_loss}", "task.refine_iters=2", "task.prompts=[point]")
    images = torch.randn(2, 3, 64, 64)
    empty = torch.zeros(2, 64, 64, dtype=torch.int64)
    empty[1, :4] = 255  # ignored pixels are no object either
    loss = model(task.prompt_loss, images, empty, 0, contextlib.nullcontext)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(p.grad is not None and torch.all(p.grad == 0) for p in trainable)  # DDP sees every parameter
    one = empty.clone()
    one[0, 10:30, 20:40] = 7  # one object (a digit-6 square) in the first image, none in the second
    model.zero_grad()
    loss = model(task.prompt_loss, images, one, 0, contextlib.nullcontext)
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in trainable)
    assert any(p.grad.abs().sum() > 0 for p in trainable)


def test_iterations_add_up_and_points_accumulate(monkeypatch):
    """refine_iters=2: three decoder calls, the later ones with the previous mask and one more point each."""
    task, model = _prompt_model("task.refine_iters=2", "task.prompts=[point]")
    calls = []
    decode = model.sam_model.decode

    def spy(embedding, points=None, boxes=None, mask_input=None, multimask=False):
        calls.append((points[0].shape[1], mask_input is not None, multimask))
        return decode(embedding, points=points, boxes=boxes, mask_input=mask_input, multimask=multimask)

    monkeypatch.setattr(model.sam_model, "decode", spy)
    mask = torch.zeros(1, 64, 64, dtype=torch.int64)
    mask[0, 5:25, 5:25], mask[0, 40:60, 30:50] = 3, 8
    model(task.prompt_loss, torch.randn(1, 3, 64, 64), mask, 0, contextlib.nullcontext)
    assert calls == [(1, False, True), (2, True, False), (3, True, False)]


# evaluation of images larger than the model ----------------------------------------------------------------------
def test_evaluation_fits_larger_images_to_the_model():
    x = torch.randn(2, 3, 96, 80)
    fitted, factor = fit_to_model(x, 64)
    assert fitted.shape == (2, 3, 64, 64) and factor == pytest.approx(64 / 96)
    assert torch.all(fitted[..., 53:] == 0)  # 80 * 2/3 = 53 columns of content, then padding

    task, model = _prompt_model()
    mask = torch.zeros(96, 80, dtype=torch.int64)
    mask[10:50, 20:60] = 6
    loader = [(torch.randn(1, 3, 96, 80), [mask], [(96, 80)])]
    metrics = task.evaluate(model, loader, torch.device("cpu"), contextlib.nullcontext)
    assert metrics["eval_objects"] == 1 and metrics["eval_samples"] == 1 and 0 <= metrics["mIoU"] <= 100

    cfg = load_config(None, tiny("sam_semantic"))
    semantic = SamSemanticTask(cfg)
    semantic.classes = ["a", "b", "c"]
    model = semantic.build_model(3).eval()
    with torch.no_grad():
        assert semantic.logits(model, torch.randn(1, 3, 96, 80), contextlib.nullcontext).shape == (1, 3, 96, 80)
        assert semantic.logits(model, torch.randn(1, 3, 40, 50), contextlib.nullcontext).shape == (1, 3, 40, 50)


# decoder-only training ---------------------------------------------------------------------------------------------
def test_decoder_only_training_keeps_the_encoder_and_uses_the_cache(tmp_path):
    extra = ["task.cache_embeddings=64", "schedule.epochs=2"]
    cfg = load_config(None, tiny("sam_prompt", *extra, out=tmp_path, method="linear_probe"))
    trainer = Trainer(cfg, progress=False)
    sam_model = trainer.peft.sam_model
    encoder = sam_model.sam.image_encoder
    assert not sam_model.encoder_trains and sam_model.cache_size == 64
    state = {k: v.clone() for k, v in encoder.state_dict().items()}
    calls = []
    encoder.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    result = trainer.fit()
    assert result["adapter_params"] == 0 and result["trainable_params"] > 0  # the decoder only
    assert all(torch.equal(v, state[k]) for k, v in encoder.state_dict().items())
    # two epochs, evaluated after each: every distinct image (8 train, 4 eval) went through the encoder once
    assert sum(calls) == len(trainer.train_set) + len(trainer.eval_set) == 12
    assert len(sam_model._cache) == 12


# DistributedDataParallel -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task_name", ["sam_prompt", "sam_semantic"])
def test_ddp_trains_without_find_unused_parameters(tmp_path, task_name):
    """One process of gloo DDP: two steps; a parameter left out of the graph would fail the second one (the
    semantic mode does not use the IoU head, a box prompt not the multimask tokens)."""
    import torch.distributed as dist

    cfg = load_config(None, tiny(task_name, *(["task.prompts=[box]"] if task_name == "sam_prompt" else [])))
    task = make_task(cfg)
    task.classes = ["background", *(str(d) for d in range(10))]
    torch.manual_seed(0)
    model = task.build_model(11)
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
        mask = torch.zeros(2, 64, 64, dtype=torch.int64)
        mask[:, 8:30, 8:30] = 7
        for _ in range(2):
            loss = task.loss(ddp, (torch.randn(2, 3, 64, 64), mask), contextlib.nullcontext)
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert torch.isfinite(loss)
    finally:
        dist.destroy_process_group()
