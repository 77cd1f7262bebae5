# ViT-B/16 + AdaptFormer (bottleneck 64) + ViT-Adapter pyramid (4 interaction groups) + UperNet.
# ADE20K 512x512, 160k iterations, 8 GPUs x 2 images (mmseg's tools/dist_train.sh); frozen backbone with timm's
# weights (pretrained=True downloads them; a local file path works too), only the adapter, pyramid and heads train.
_base_ = [
    "mmseg::_base_/models/upernet_r50.py",
    "mmseg::_base_/datasets/ade20k.py",
    "mmseg::_base_/default_runtime.py",
    "mmseg::_base_/schedules/schedule_160k.py",
]
custom_imports = dict(imports=["visionpeft.integrations.mmseg"], allow_failed_imports=False)

crop_size = (512, 512)
model = dict(
    pretrained=None,
    data_preprocessor=dict(size=crop_size),
    backbone=dict(
        _delete_=True,
        type="VisionPeftBackbone",
        backbone="vit_base_patch16_224",
        pretrained=True,
        method="adaptformer",
        method_cfg=dict(bottleneck=64),
        pyramid="vit_adapter",
        out_indices=(2, 5, 8, 11),
    ),
    decode_head=dict(in_channels=[768, 768, 768, 768], num_classes=150),
    auxiliary_head=dict(in_channels=768, num_classes=150),
    test_cfg=dict(mode="slide", crop_size=crop_size, stride=(341, 341)),
)
optim_wrapper = dict(
    _delete_=True,
    type="OptimWrapper",
    optimizer=dict(type="AdamW", lr=1e-4, betas=(0.9, 0.999), weight_decay=0.01),
)
param_scheduler = [
    dict(type="LinearLR", start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type="PolyLR", eta_min=0.0, power=1.0, begin=1500, end=160000, by_epoch=False),
]
train_dataloader = dict(batch_size=2)
custom_hooks = [dict(type="PeftAdapterHook")]
