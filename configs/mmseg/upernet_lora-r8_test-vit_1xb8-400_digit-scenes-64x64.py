# A tiny mmseg run on the embedded digit scenes (ADE20K layout, 11 classes: background and the digits 0-9):
# timm's test_vit (random weights) + LoRA (rank 8) + ViTDet's simple pyramid + UperNet, on CPU in minutes.
# The scenes' folder comes from the VISIONPEFT_SCENES environment variable:
#   export VISIONPEFT_SCENES=$(python -c "from visionpeft.data.scenes import ensure_digit_scenes as e; print(e())")
#   python $(python -c "import mmseg, os; print(os.path.dirname(mmseg.__file__))")/.mim/tools/train.py \
#       configs/mmseg/upernet_lora-r8_test-vit_1xb8-400_digit-scenes-64x64.py
_base_ = [
    "mmseg::_base_/models/upernet_r50.py",
    "mmseg::_base_/datasets/ade20k.py",
    "mmseg::_base_/default_runtime.py",
    "mmseg::_base_/schedules/schedule_20k.py",
]
custom_imports = dict(imports=["visionpeft.integrations.mmseg"], allow_failed_imports=False)

classes = ("background", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9")
palette = [[0, 0, 0]] + [[(37 * i) % 256, (91 * i) % 256, (173 * i) % 256] for i in range(1, 11)]
data_root = "{{$VISIONPEFT_SCENES:data/digit_scenes}}/ADEChallengeData2016"
crop_size = (64, 64)
norm_cfg = dict(type="BN", requires_grad=True)
model = dict(
    pretrained=None,
    data_preprocessor=dict(size=crop_size),
    backbone=dict(
        _delete_=True,
        type="VisionPeftBackbone",
        backbone="test_vit",
        backbone_cfg=dict(img_size=64),
        pretrained=None,
        method="lora",
        method_cfg=dict(rank=8),
        pyramid="simple_pyramid",
        pyramid_cfg=dict(out_channels=64),
    ),
    decode_head=dict(in_channels=[64, 64, 64, 64], channels=64, num_classes=11, norm_cfg=norm_cfg),
    auxiliary_head=dict(in_channels=64, channels=32, num_classes=11, norm_cfg=norm_cfg),
)

train_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="LoadAnnotations", reduce_zero_label=False),
    dict(type="PhotoMetricDistortion"),
    dict(type="PackSegInputs"),
]
test_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="LoadAnnotations", reduce_zero_label=False),
    dict(type="PackSegInputs"),
]
dataset = dict(
    type="BaseSegDataset",  # the ADE20K folder layout (data_prefix of the base) with our own classes
    data_root=data_root,
    img_suffix=".png",
    reduce_zero_label=False,
    metainfo=dict(classes=classes, palette=palette),
)
train_dataloader = dict(
    batch_size=8, num_workers=0, persistent_workers=False, dataset=dict(**dataset, pipeline=train_pipeline)
)
val_dataloader = dict(
    batch_size=1, num_workers=0, persistent_workers=False, dataset=dict(**dataset, pipeline=test_pipeline)
)
test_dataloader = val_dataloader

optim_wrapper = dict(_delete_=True, type="OptimWrapper", optimizer=dict(type="AdamW", lr=1e-3, weight_decay=0.01))
param_scheduler = [dict(type="PolyLR", eta_min=1e-5, power=0.9, begin=0, end=400, by_epoch=False)]
train_cfg = dict(type="IterBasedTrainLoop", max_iters=400, val_interval=200)
default_hooks = dict(
    logger=dict(type="LoggerHook", interval=20, log_metric_by_epoch=False),
    checkpoint=dict(type="CheckpointHook", by_epoch=False, interval=200),
)
custom_hooks = [dict(type="PeftAdapterHook")]
env_cfg = dict(cudnn_benchmark=False, dist_cfg=dict(backend="gloo"))
