"""Default configuration: detectron2's Mask R-CNN R50-FPN 1x (mask_rcnn_R_50_FPN_1x.yaml) as
the base, and the authors' BMask R-CNN settings (../SPEC sections 1-8) set by `mask_head`.
Config files in configs/ start from `base()` and change what their variant needs; every
number the model uses is a field here (the boundary branch's fields are read only by the
'bmask' head).
"""
from __future__ import annotations

import ml_collections


def base() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    # ---- model ----
    m = c.model = ml_collections.ConfigDict()
    # Weights to start from when the workdir has no checkpoint, as detectron2's MODEL.WEIGHTS:
    # "" (from scratch), a local file, an https:// or detectron2:// URL, or a model-zoo name
    # (bmask-jax zoo). Training applies it once; a resumed run ignores it.
    m.weights = ""
    m.num_classes = 80
    m.compute_dtype = "float32"              # or "bfloat16": bf16 compute, f32 params and losses
    # Conv kernels: "auto" takes the XLA:CPU routes (models/cpu_kernels.py) when compiling for
    # the CPU and XLA's own convolutions (cuDNN, TPU) everywhere else; "xla" or "cpu" forces one.
    m.kernels = "auto"
    m.input_format = "BGR"                   # detectron2/MSRA weights; torchvision weights: RGB
    m.pixel_mean = (103.530, 116.280, 123.675)
    m.pixel_std = (1.0, 1.0, 1.0)

    m.backbone = ml_collections.ConfigDict(dict(
        name="resnet",                       # "resnet" | "hrnet" (HRNetV2, paper Table 1) | "regnet" | "vit" (ViTDet)
        regnet="regnetx_4gf",                # with name "regnet": regnetx_4gf | regnety_4gf (models/regnet.py)
        depth=50, stem_channels=64, res2_out_channels=256, bottleneck_channels=64,
        stride_in_1x1=True, norm="FrozenBN", freeze_at=2))
    # HRNetV2 (models/hrnet.py), used when backbone.name == "hrnet"; defaults are HRNetV2-W32.
    # norm and freeze_at come from model.backbone (freeze_at 1: stem, 2: stem + stage 1).
    m.backbone.hrnet = ml_collections.ConfigDict(dict(
        stem_channels=64, stage1_channels=64, stage1_blocks=4,   # stage 1: bottlenecks, 4x64 out
        widths=(32, 64, 128, 256),           # branches at strides 4/8/16/32; stage s uses [:s]
        num_modules=(1, 4, 3),               # high-resolution modules in stages 2, 3, 4
        num_blocks=(4, 4, 4)))               # basic blocks per branch in each module, stages 2-4
    # ViTDet's plain ViT with the simple feature pyramid (models/vit.py), used when
    # backbone.name == "vit"; defaults are ViT-B as detectron2's mask_rcnn_vitdet_b_100ep.
    m.backbone.vit = ml_collections.ConfigDict(dict(
        embed_dim=768, depth=12, num_heads=12, patch_size=16, mlp_ratio=4.0,
        img_size=1024,                       # the global blocks' relative tables are made for it
        window_size=14, global_blocks=(2, 5, 8, 11),   # window attention in every other block
        drop_path_rate=0.1,                  # stochastic depth, rising linearly to this at the top
        pretrain_img_size=224, pretrain_use_cls_token=True,   # the position table's own grid
        pyramid_norm="LN",
        remat=False))                        # recompute blocks in the backward pass (less memory)
    m.fpn = ml_collections.ConfigDict(dict(channels=256,
                                           norm=""))           # "SyncBN": the large-scale-jitter baselines
    m.anchors = ml_collections.ConfigDict(dict(
        sizes=(32, 64, 128, 256, 512), aspect_ratios=(0.5, 1.0, 2.0), strides=(4, 8, 16, 32, 64),
        offset=0.0))
    m.rpn = ml_collections.ConfigDict(dict(
        iou_thresholds=(0.3, 0.7), batch_size_per_image=256, positive_fraction=0.5,
        bbox_reg_weights=(1.0, 1.0, 1.0, 1.0), smooth_l1_beta=0.0, loss_weight=1.0,
        pre_nms_topk_train=2000, pre_nms_topk_test=1000, post_nms_topk_train=1000,
        post_nms_topk_test=1000, nms_threshold=0.7,
        num_convs=1))                        # shared 3x3 convs of the head (ViTDet: 2)
    m.roi_heads = ml_collections.ConfigDict(dict(
        iou_threshold=0.5, batch_size_per_image=512, positive_fraction=0.25,
        pooler_resolution=7, sampling_ratio=2, max_adaptive_samples=4,   # 0: uncapped, inference only
        num_fc=2, fc_dim=1024, bbox_reg_weights=(10.0, 10.0, 5.0, 5.0), smooth_l1_beta=0.0,
        conv_dims=(), conv_norm="",          # 3x3 convs before the FCs (ViTDet's 4conv1fc: 4 x 256, "LN")
        train_on_pred_boxes=False, score_threshold=0.05, nms_threshold=0.5,
        detections_per_image=100, topk_candidates=1000,
        num_mask_rois=128, class_agnostic_bbox_reg=False,
        # The mask head runs on the smallest of these per-image slot counts (or num_mask_rois)
        # that holds the step's foreground; () always runs all num_mask_rois slots.
        foreground_buckets=(32, 64),
        # Cascade R-CNN box stages (Cascade BMask R-CNN in the authors' model zoo).
        cascade=ml_collections.ConfigDict(dict(
            enabled=False, iou_thresholds=(0.5, 0.6, 0.7),
            bbox_reg_weights=((10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0), (30.0, 30.0, 15.0, 15.0))))))
    m.mask_head = ml_collections.ConfigDict(dict(
        name="maskrcnn",                     # "maskrcnn" | "bmask" | "sobel" (Fig. 7b): see mask_head()
        pooler_resolution=14, conv_dim=256, num_conv=4, loss_weight=1.0,
        conv_norm="",                        # "LN": ViTDet's head (every conv of the BMask head too)
        sobel_hidden_dim=16))                # 'sobel': width of the conv between the two 3x3s
    m.boundary = ml_collections.ConfigDict(dict(
        in_features=("p2",), resolution=28, num_conv=2, mask_to_boundary=True,
        boundary_to_mask=True, supervision="boundary", loss="dice_bce", dice_squared=False,
        loss_weight=1.0))
    # Mask Scoring R-CNN's MaskIoU head on top of any mask head (paper Table 2, last row).
    m.mask_scoring = ml_collections.ConfigDict(dict(
        enabled=False, num_conv=4, conv_dim=256, fc_dim=1024, loss_weight=1.0,
        mask_threshold=0.5))                 # predicted mask binarised at this for the IoU target

    # ---- data ----
    d = c.data = ml_collections.ConfigDict()
    d.dataset = "coco"                       # "synthetic" | "coco" | "cityscapes" | "tfds"
    d.train_split = "train"
    d.eval_split = "val"
    d.coco_images = ""                       # image folder of a COCO-format dataset
    d.coco_train_json = ""
    d.coco_eval_json = ""
    # data.dataset "tfds": COCO-format data prepared once with `python -m bmask_jax.data.tfds_coco`
    # (array_record, no TensorFlow); splits are data.train_split / data.eval_split.
    d.tfds_name = "coco2017"                 # its --name (a config of the coco_instances builder)
    d.tfds_data_dir = ""                     # its --data_dir ("": $TFDS_DATA_DIR or ~/tensorflow_datasets)
    d.cityscapes_root = ""                   # holds leftImg8bit/{split}/ and gtFine/{split}/
    d.synthetic = ml_collections.ConfigDict(dict(
        image_size=(128, 128), num_train=2000, num_val=200, max_instances=6))
    d.train_short_side = (800,)
    d.test_short_side = 800
    d.max_size = 1333
    d.size_divisibility = 32
    d.canvas_buckets = ((800, 1344), (1344, 800))   # (H, W) canvases images are padded into
    d.flip = True
    d.max_instances = 100                    # GT padded to this many per image
    d.gt_mask_size = 112                     # each GT mask resampled over its box, M x M
    d.num_workers = 2
    # Large-scale jitter (ViTDet, the LSJ baselines): flip, scale to size x [min, max], crop
    # size x size, boxes from the cropped masks; replaces train_short_side when enabled.
    d.lsj = ml_collections.ConfigDict(dict(enabled=False, size=1024, min_scale=0.1, max_scale=2.0,
                                           # the crop's fill in the image (FixedSizeCrop pad=True); None:
                                           # none, the canvas pads (ViTDet's pad=False)
                                           pad_value=ml_collections.FieldReference(None, field_type=float)))

    # ---- training ----
    t = c.train = ml_collections.ConfigDict()
    t.batch_size = 16                        # global, over all devices and hosts
    t.optimizer = "sgd"                      # "sgd" (detectron2's) | "adamw"
    t.base_lr = 0.02
    t.momentum = 0.9                         # sgd
    t.adam_betas = (0.9, 0.999)              # adamw
    t.weight_decay = 1e-4
    t.weight_decay_norm = 0.0
    t.no_decay_params = ()                   # parameter names with no weight decay (ViTDet: pos_embed)
    t.layer_decay = 1.0                      # ViT layer-wise lr decay (ViTDet B/L/H: 0.7/0.8/0.9); 1: off
    t.warmup_iters = 1000
    t.warmup_factor = 0.001
    t.lr_steps = (60000, 80000)
    t.lr_gamma = 0.1
    t.max_iter = 90000
    t.log_every = 20
    t.checkpoint_every = 5000
    t.keep_checkpoints = 3
    t.eval_at_end = True
    t.skip_nonfinite = False                 # True: skip steps with a non-finite loss, counted

    # ---- evaluation / prediction ----
    e = c.eval = ml_collections.ConfigDict()
    e.batch_size = 1
    e.num_images = -1                        # -1: the whole split
    e.mask_threshold = 0.5
    e.num_pictures = 8                       # val images drawn into workdir/pictures
    # predict: image files and folders (comma-separated) -> pictures and predictions.json;
    # pictures of images smaller than min_picture_size are drawn enlarged (evaluation's too).
    # Images of more pixels than max_image_pixels are skipped and listed (checked on the header,
    # before decoding: a 20 KB PNG can declare 12000x12000); at most this many decoded pixels
    # (plus one image) are held at a time.
    # Videos (.mp4 .mov .avi .mkv .webm) among the inputs: every frame_stride-th frame is
    # predicted, at most max_frames of them (0: all).
    c.predict = ml_collections.ConfigDict(dict(inputs="", output_dir="", score_threshold=0.5,
                                               min_picture_size=512, max_image_pixels=50_000_000,
                                               frame_stride=1, max_frames=0))
    return c


def mask_head(c: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """Pick the mask head. The authors' BMask R-CNN configs (and their Sobel variant) also train
    the mask branch on the box head's refined boxes (train_on_pred_boxes, SPEC section 5);
    detectron2's Mask R-CNN, the paper's baseline, does not."""
    c.model.mask_head.name = name
    c.model.roi_heads.train_on_pred_boxes = name != "maskrcnn"
    return c


def shapes(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The embedded default: the procedurally generated shapes at 128x128, a narrow ResNet-18
    with GroupNorm trained from scratch, sized to train and evaluate in minutes on a CPU."""
    c.data.dataset = "synthetic"
    c.data.train_short_side = (128,)
    c.data.test_short_side = 128
    c.data.max_size = 128
    c.data.canvas_buckets = ((128, 128),)
    c.data.max_instances = 8
    c.data.gt_mask_size = 64
    m = c.model
    m.num_classes = 5
    m.input_format = "RGB"
    m.pixel_mean = (127.5, 127.5, 127.5)
    m.pixel_std = (64.0, 64.0, 64.0)
    m.backbone.update(depth=18, stem_channels=32, res2_out_channels=32, norm="GN", freeze_at=0)
    m.fpn.channels = 64
    m.anchors.sizes = (16, 32, 64, 128, 256)
    m.rpn.update(pre_nms_topk_train=600, pre_nms_topk_test=300, post_nms_topk_train=300,
                 post_nms_topk_test=150, batch_size_per_image=128)
    m.roi_heads.update(batch_size_per_image=64, fc_dim=256, topk_candidates=200,
                       detections_per_image=20, num_mask_rois=8)
    m.mask_head.conv_dim = 32
    m.mask_scoring.update(conv_dim=32, fc_dim=256)
    t = c.train
    t.batch_size = 8
    # AdamW trains this from-scratch model in 480 steps to the mask AP that detectron2's SGD
    # (lr 0.02) reached in 800 (docs/getting_started.md): a first run in under 5 minutes on 2 CPU cores.
    t.optimizer = "adamw"
    t.base_lr = 0.002
    t.weight_decay = 0.05
    t.warmup_iters = 50
    t.max_iter = 480
    t.lr_steps = (400, 460)
    t.log_every = 20
    t.checkpoint_every = 500
    c.eval.batch_size = 8
    return c


def tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A very small model on 64x64 shapes: seconds per compile, for tests and smoke runs."""
    shapes(c)
    c.data.synthetic.update(image_size=(64, 64), num_train=16, num_val=4, max_instances=3)
    c.data.update(train_short_side=(64,), test_short_side=64, max_size=64, canvas_buckets=((64, 64),),
                  max_instances=4, gt_mask_size=32)
    c.model.anchors.sizes = (8, 16, 32, 64, 128)
    c.model.rpn.update(pre_nms_topk_train=100, pre_nms_topk_test=50, post_nms_topk_train=50,
                       post_nms_topk_test=30, batch_size_per_image=64)
    c.model.roi_heads.update(batch_size_per_image=16, num_mask_rois=4, fc_dim=64, topk_candidates=50,
                             detections_per_image=5)
    c.model.backbone.update(stem_channels=16, res2_out_channels=16)
    c.model.fpn.channels = 32
    c.model.mask_head.conv_dim = 16
    c.model.mask_scoring.update(conv_dim=16, fc_dim=64)
    c.train.update(optimizer="sgd", weight_decay=1e-4, batch_size=2, warmup_iters=5, base_lr=0.02, log_every=2,
                   checkpoint_every=3, lr_steps=(100,), max_iter=20)
    c.eval.update(batch_size=2, num_pictures=2)
    return c


def coco(c: ml_collections.ConfigDict, depth: int = 50) -> ml_collections.ConfigDict:
    """COCO 2017, 80 classes, 800x1333, 1x schedule (SPEC section 8). Point data.coco_* at
    the images and instances JSON files."""
    c.data.dataset = "coco"
    c.data.coco_images = "datasets/coco/train2017"
    c.data.coco_train_json = "datasets/coco/annotations/instances_train2017.json"
    c.data.coco_eval_json = "datasets/coco/annotations/instances_val2017.json"
    c.data.canvas_buckets = ((800, 1344), (1344, 800), (1344, 1344))
    c.model.backbone.depth = depth
    # ImageNet initialisation, as the paper and detectron2 (MSRA's Caffe2 ResNets: BGR, std 1).
    c.model.weights = f"detectron2://ImageNetPretrained/MSRA/R-{depth}.pkl"
    return c


def schedule_3x(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The 3x schedule (SPEC section 8) with detectron2's multi-scale training (short side
    640..800, Base-RCNN-FPN.yaml), as its 3x Mask R-CNN and Cascade Mask R-CNN baselines."""
    c.train.update(lr_steps=(210000, 250000), max_iter=270000)
    c.data.train_short_side = tuple(range(640, 801, 32))
    return c


def hrnet_coco(c: ml_collections.ConfigDict, width: int = 32) -> ml_collections.ConfigDict:
    """HRNetV2-W<width>-FPN on COCO 1x (paper Table 1), as HRNet-MaskRCNN-Benchmark's
    mask_rcnn_hrnet_w32_1x: ImageNet weights in RGB with ImageNet mean/std (x255), FrozenBN,
    no frozen stage."""
    coco(c)
    c.model.input_format = "RGB"
    c.model.pixel_mean = (123.675, 116.280, 103.530)
    c.model.pixel_std = (58.395, 57.120, 57.375)
    c.model.backbone.update(name="hrnet", norm="FrozenBN", freeze_at=0)
    c.model.backbone.hrnet.widths = (width, 2 * width, 4 * width, 8 * width)
    # HRNet's ImageNet weights have no stable URL (HRNet-Image-Classification's OneDrive): pass
    # the downloaded file as model.weights (kind "hrnet"; docs/model_zoo.md).
    c.model.weights = ""
    return c


def cityscapes(head: str = "bmask", schedule: str = "code") -> ml_collections.ConfigDict:
    """Cityscapes fine instance segmentation, 8 classes (paper Table 9; SPEC section 8), from
    ImageNet R-50: training short side 800..1024 (step 32), inference at the full 1024x2048.
    schedule "paper": the paper's (batch 4, LR 0.005, 48k iterations, x0.1 at 36k); "code":
    the authors' published config, which trained their released model (batch 8, LR 0.01, 24k
    iterations, x0.1 at 18k)."""
    c = coco(base(), 50)
    c.data.update(dataset="cityscapes", cityscapes_root="datasets/cityscapes", coco_images="",
                  coco_train_json="", coco_eval_json="",
                  train_short_side=tuple(range(800, 1025, 32)), test_short_side=1024, max_size=2048,
                  canvas_buckets=((1024, 2048),))
    c.model.num_classes = 8
    mask_head(c, head)
    if schedule == "paper":
        c.train.update(batch_size=4, base_lr=0.005, max_iter=48000, lr_steps=(36000,))
    else:
        c.train.update(batch_size=8, base_lr=0.01, max_iter=24000, lr_steps=(18000,))
    return c


VIT_SIZES = {
    # embed_dim, depth, num_heads, drop_path_rate, global blocks, layer-wise lr decay (detectron2's
    # projects/ViTDet/configs/COCO/mask_rcnn_vitdet_{b,l,h}_*.py)
    "b": (768, 12, 12, 0.1, (2, 5, 8, 11), 0.7),
    "l": (1024, 24, 16, 0.4, (5, 11, 17, 23), 0.8),
    "h": (1280, 32, 16, 0.5, (7, 15, 23, 31), 0.9),
}


def vitdet(c: ml_collections.ConfigDict, size: str = "b") -> ml_collections.ConfigDict:
    """ViTDet's Mask R-CNN on COCO (detectron2's projects/ViTDet, 100 epochs; ViT-H 75): a plain
    ViT on one 1024x1024 canvas (test images resized to a longer side of 1024), the simple
    feature pyramid, a 2-conv RPN head, the 4conv1fc box head and LayerNorm in the heads; RGB
    with ImageNet mean/std. Training: AdamW at lr 1e-4 for batch 64, weight decay 0.1 (none on
    norms and pos_embed), layer-wise lr decay, warmup 250 iterations from 0.001; bfloat16 compute
    (detectron2 trains it with AMP), from MAE's ImageNet ViT."""
    coco(c)
    dim, depth, heads, drop_path, global_blocks, layer_decay = VIT_SIZES[size]
    c.model.weights = f"ImageNet/MAE/ViT-{size.upper()}"      # MAE's ImageNet ViT, as ViTDet starts
    # bf16 compute with f32 parameters and losses, as detectron2 trains ViTDet with AMP.
    c.model.update(input_format="RGB", pixel_mean=(123.675, 116.280, 103.530), pixel_std=(58.395, 57.120, 57.375),
                   compute_dtype="bfloat16")
    c.model.backbone.update(name="vit", norm="", freeze_at=0)
    c.model.backbone.vit.update(embed_dim=dim, depth=depth, num_heads=heads, drop_path_rate=drop_path,
                                global_blocks=global_blocks)
    c.model.rpn.num_convs = 2
    c.model.roi_heads.update(conv_dims=(256, 256, 256, 256), conv_norm="LN", num_fc=1, fc_dim=1024)
    c.model.mask_head.conv_norm = "LN"
    c.data.update(canvas_buckets=((1024, 1024),), test_short_side=1024, max_size=1024)
    c.data.lsj.update(enabled=True, size=1024)
    c.train.update(optimizer="adamw", batch_size=64, base_lr=1e-4, adam_betas=(0.9, 0.999), weight_decay=0.1,
                   weight_decay_norm=0.0, no_decay_params=("pos_embed",), layer_decay=layer_decay,
                   warmup_iters=250, warmup_factor=0.001, max_iter=184375, lr_steps=(163889, 177546))
    if size == "h":                          # 75 epochs; norms and pos_embed decay like the rest
        c.train.update(max_iter=184375 * 3 // 4, lr_steps=(163889 * 3 // 4, 177546 * 3 // 4),
                       no_decay_params=(), weight_decay_norm=0.1)
    return c


LSJ_EPOCHS_100 = (184375, (163889, 177546))
REGNET_PIXEL_STD = (57.375, 57.120, 58.395)   # iterations at batch 64 and the lr steps, 100 epochs


def lsj_baseline(c: ml_collections.ConfigDict, depth: int = 50, epochs: int = 100,
                 regnet: str = "") -> ml_collections.ConfigDict:
    """detectron2's large-scale-jitter Mask R-CNN baselines (configs/new_baselines/
    mask_rcnn_{R_50,R_101,regnetx_4gf_dds,regnety_4gf_dds}_FPN_{100,200,400}ep_LSJ.py; `regnet`:
    regnetx_4gf or regnety_4gf instead of ResNet-`depth`): trained from scratch with SyncBN in the
    stem, every stage (nothing frozen) and the FPN; a 2-conv RPN head, the 4conv1fc box head and
    the mask head with BatchNorm convs (detectron2's NaiveSyncBatchNorm, stats_mode "N");
    large-scale jitter at 1024; SGD at lr 0.1 for batch 64, weight decay 4e-5, warmup 500
    iterations from 0.067; 184375 iterations a 100 epochs, the lr steps scaled with them; BGR
    with ImageNet's mean (std 1 for the ResNets, ImageNet's for the RegNets, as detectron2's
    configs set them); bfloat16 compute (detectron2 trains them with AMP).
    Test images: shorter side 800, longer at most 1333, as the classic configs."""
    coco(c, depth)
    c.model.weights = ""                                 # from scratch
    # detectron2's constants: BGR with the ImageNet mean and std 1 for the ResNets (the common
    # model's imagenet_bgr256_std), the ImageNet std for the RegNets (their configs set it).
    c.model.update(input_format="BGR", pixel_mean=(103.530, 116.280, 123.675),
                   pixel_std=REGNET_PIXEL_STD if regnet else (1.0, 1.0, 1.0), compute_dtype="bfloat16")
    c.model.backbone.update(norm="SyncBN", freeze_at=0)
    if regnet:
        c.model.backbone.update(name="regnet", regnet=regnet)
    c.model.fpn.norm = "SyncBN"
    c.model.rpn.num_convs = 2
    c.model.roi_heads.update(conv_dims=(256, 256, 256, 256), conv_norm="SyncBN", num_fc=1, fc_dim=1024)
    c.model.mask_head.conv_norm = "SyncBN"
    c.data.canvas_buckets = ((1024, 1024),) + tuple(c.data.canvas_buckets)     # the LSJ crop, then test sizes
    c.data.lsj.update(enabled=True, size=1024, pad_value=128.0)    # FixedSizeCrop's default pad
    iters, steps = LSJ_EPOCHS_100
    scale = epochs / 100
    c.train.update(optimizer="sgd", batch_size=64, base_lr=0.1, momentum=0.9, weight_decay=4e-5,
                   warmup_iters=500, warmup_factor=0.067, max_iter=round(iters * scale),
                   lr_steps=tuple(round(s * scale) for s in steps))
    return c


def small_vitdet(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """ViTDet's layout at the embedded scale (after shapes or tiny): a 4-block ViT of width
    `fpn.channels` with patch 16, window attention (window 4) in blocks 0 and 2 and global
    attention in 1 and 3, relative tables made for the canvas, the position table resized
    from a 224 grid, the simple feature pyramid, the 2-conv RPN head, a 4conv1fc box head and
    LayerNorm in the heads."""
    width = c.model.fpn.channels
    canvas = c.data.canvas_buckets[0][0]
    c.model.backbone.update(name="vit", norm="", freeze_at=0)
    c.model.backbone.vit.update(embed_dim=width, depth=4, num_heads=4, window_size=4, global_blocks=(1, 3),
                                img_size=canvas, drop_path_rate=0.1)
    c.model.rpn.num_convs = 2
    c.model.roi_heads.update(conv_dims=(width,) * 4, conv_norm="LN", num_fc=1)
    c.model.mask_head.conv_norm = "LN"
    c.data.lsj.update(enabled=True, size=canvas)
    return c


def vitdet_cascade(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """ViTDet's Cascade Mask R-CNN: the cascade's three stages with ViTDet's 4conv1fc heads,
    and the RPN's 1000 training proposals kept (detectron2's cascade_mask_rcnn_vitdet_*)."""
    cascade(c)
    c.model.rpn.post_nms_topk_train = 1000
    return c


def cascade(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Cascade (B)Mask R-CNN as the authors' model zoo: three class-agnostic box stages at IoU
    0.5/0.6/0.7 and 2000 training proposals."""
    c.model.roi_heads.cascade.enabled = True
    c.model.rpn.post_nms_topk_train = 2000
    return c


VARIANTS = {
    "shapes": shapes,
    "tiny": tiny,
    "r50_fpn_1x": lambda c: coco(c, 50),
    "r101_fpn_1x": lambda c: coco(c, 101),
    "hrnet_w32_fpn_1x": lambda c: hrnet_coco(c, 32),
    "r50_fpn_3x": lambda c: schedule_3x(coco(c, 50)),
    "r101_fpn_3x": lambda c: schedule_3x(coco(c, 101)),
    "cascade_r50_fpn_1x": lambda c: cascade(coco(c, 50)),
    "cascade_r101_fpn_1x": lambda c: cascade(coco(c, 101)),
    "cascade_r50_fpn_3x": lambda c: schedule_3x(cascade(coco(c, 50))),
    **{f"vitdet_{size}": (lambda c, size=size: vitdet(c, size)) for size in VIT_SIZES},
    **{f"cascade_vitdet_{size}": (lambda c, size=size: vitdet_cascade(vitdet(c, size))) for size in VIT_SIZES},
    **{f"r{depth}_fpn_{epochs}ep_lsj": (lambda c, depth=depth, epochs=epochs: lsj_baseline(c, depth, epochs))
       for depth in (50, 101) for epochs in (100, 200, 400)},
    **{f"{net}_fpn_{epochs}ep_lsj": (lambda c, net=net, epochs=epochs: lsj_baseline(c, 50, epochs, net))
       for net in ("regnetx_4gf", "regnety_4gf") for epochs in (100, 200, 400)},
    "shapes_vitdet": lambda c: small_vitdet(shapes(c)),
    "tiny_vitdet": lambda c: small_vitdet(tiny(c)),
}


def variant(c: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    if name not in VARIANTS:
        raise ValueError(f"unknown config variant {name!r}; choose one of {sorted(VARIANTS)}")
    return VARIANTS[name](c)


def from_file(spec: str) -> ml_collections.ConfigDict:
    """The config that `configs/<file>.py:<variant>` builds, without importing configs/ (which a
    non-editable install does not ship): for the model zoo. Files: mask_rcnn, bmask_rcnn,
    cityscapes."""
    path, _, name = spec.partition(":")
    stem = path.rsplit("/", 1)[-1].removesuffix(".py")
    if stem in ("mask_rcnn", "bmask_rcnn"):
        return variant(mask_head(base(), "maskrcnn" if stem == "mask_rcnn" else "bmask"), name or "shapes")
    if stem == "cityscapes":
        return cityscapes_variant(name or "bmask")
    raise ValueError(f"{spec}: from_file builds configs/mask_rcnn.py, bmask_rcnn.py and cityscapes.py")


CITYSCAPES_VARIANTS = ("bmask_code", "bmask_paper", "maskrcnn_code", "maskrcnn_paper")


def cityscapes_variant(name: str) -> ml_collections.ConfigDict:
    """configs/cityscapes.py's variants: {bmask,maskrcnn}_{code,paper}; a bare `bmask` or
    `maskrcnn` is the `_code` schedule (the released model's)."""
    head, _, schedule = name.partition("_")
    if head not in ("bmask", "maskrcnn") or schedule not in ("", "code", "paper"):
        raise ValueError(f"configs/cityscapes.py variant must be one of {', '.join(CITYSCAPES_VARIANTS)} "
                         f"(bare bmask / maskrcnn: the _code schedule), got {name!r}")
    return cityscapes(head, schedule or "code")
