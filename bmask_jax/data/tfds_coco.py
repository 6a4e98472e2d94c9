"""COCO-format instance segmentation as a TFDS dataset (array_record files), without TensorFlow.

Prepare once from an instances JSON and an image folder per split (COCO 2017 or any COCO-format
data), then train with data.dataset=tfds:

    python -m bmask_jax.data.tfds_coco --data_dir DIR --name coco2017 \\
        --images_train train2017 --json_train annotations/instances_train2017.json \\
        --images_val val2017 --json_val annotations/instances_val2017.json

writes DIR/coco_instances/<name>/1.0.0/ (a config <name> of the `coco_instances` builder).
TfdsCocoDataset reads it back with random access (`builder.as_data_source`, numpy) and serves
exactly what CocoJsonDataset serves for the same files: the same annotations are skipped for
the same reasons (CocoJsonDataset itself parses the JSON at build time), and the examples come
in the same order (image id; shuffling is disabled).

Stored per image:
  image       the image file's bytes as they are (no re-encoding), in a tfds Image feature. The
              reader skips tfds's decoder and decodes them with images.decode_rgb (EXIF
              orientation, grayscale, RGBA, 16-bit), as load_rgb does the files.
  image_id, file_name, height, width (after EXIF orientation, checked against the JSON)
  extra       the image's other JSON fields (license, coco_url, ...) as JSON text, or ''
  objects     one entry per annotation CocoJsonDataset keeps: id, bbox (COCO x, y, w, h in
              pixels, float64 as in the JSON), category_id, iscrowd, area, mask (COCO RLE counts,
              compressed, on the height x width image; polygons and uncompressed RLE are
              converted with pycocotools; CocoJsonDataset keeps only annotations with a usable
              mask) and extra (its other fields as JSON text).
Dataset metadata (metadata.json), per split: the categories, the JSON's other top-level
fields (info, licenses), the image ids in order, the skip counts and the source paths.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import json
import logging
import os
import sys
import tempfile

import numpy as np
import tensorflow_datasets as tfds
from pycocotools import mask as mask_utils

from bmask_jax.data.coco import CocoJsonDataset
from bmask_jax.data.images import decode_rgb

BUILDER_NAME = "coco_instances"
DEFAULT_NAME = "coco2017"
_IMAGE_KEYS = ("id", "file_name", "height", "width")
_ANN_KEYS = ("id", "image_id", "category_id", "bbox", "area", "iscrowd", "segmentation")
_CHUNK = 64                       # images read and decoded in parallel at build time
_RAW = tfds.features.Encoding.BYTES


@dataclasses.dataclass(eq=False)
class CocoInstancesConfig(tfds.core.BuilderConfig):
    """One COCO-format dataset: `name` plus, per split to prepare, (split, image folder, JSON)."""
    sources: tuple = ()


class CocoInstances(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """COCO-format instance segmentation. Not registered with tfds (so this module can be run
    with -m and imported without a name clash): prepared datasets are read back from their
    files, which needs neither this class nor TensorFlow."""

    name = BUILDER_NAME
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Original image bytes, COCO RLE masks, categories in the metadata."}

    def __init__(self, *, file_format: str = "array_record", **kwargs):
        super().__init__(file_format=file_format, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="COCO-format instance segmentation (bmask_jax.data.tfds_coco).",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format=None),
                "image_id": np.int64,
                "file_name": tfds.features.Text(),
                "height": np.int32,
                "width": np.int32,
                "extra": tfds.features.Text(),
                "objects": tfds.features.Sequence({
                    "id": np.int64,
                    # float64 as raw bytes: tfds stores plain float features as float32.
                    "bbox": tfds.features.Tensor(shape=(4,), dtype=np.float64, encoding=_RAW),
                    "category_id": np.int64,
                    "iscrowd": np.bool_,
                    "area": tfds.features.Tensor(shape=(), dtype=np.float64, encoding=_RAW),
                    "mask": tfds.features.Text(),
                    "extra": tfds.features.Text(),
                }),
            }),
            metadata=tfds.core.MetadataDict(),
            disable_shuffling=True,       # records in image-id order, as CocoJsonDataset
            homepage="https://cocodataset.org/#format-data",
        )

    def _split_generators(self, dl_manager):
        sources = getattr(self.builder_config, "sources", ())
        if not sources:
            raise ValueError("nothing to prepare: give CocoInstancesConfig(sources=((split, image_dir, "
                             "json_path), ...))")
        self.info.metadata["splits"] = {}
        return {split: self._generate_examples(split, image_dir, json_path)
                for split, image_dir, json_path in sources}

    def _generate_examples(self, split: str, image_dir: str, json_path: str):
        ds = CocoJsonDataset(json_path, image_dir)     # validates the JSON, skips and counts
        gt = ds.coco_dict()
        workers = min(8, os.cpu_count() or 1)
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            for start in range(0, len(ds), _CHUNK):
                chunk = range(start, min(start + _CHUNK, len(ds)))
                for i, (data, h, w) in zip(chunk, pool.map(lambda i: _read_image(ds, i), chunk)):
                    yield i, _example(ds, i, data, h, w)
        self.info.metadata["splits"][split] = {
            "categories": gt["categories"],
            "top_level": {k: v for k, v in gt.items() if k not in ("images", "annotations", "categories")},
            "image_ids": [im["id"] for im in ds.images],
            "skipped": dict(ds.skipped),
            "num_annotations": len(gt["annotations"]),
            "source": {"json": os.path.abspath(json_path), "images": os.path.abspath(image_dir)},
        }
        total = sum(ds.skipped.values())
        (logging.warning if total else logging.info)(
            "%s -> split %r: %d images, %d annotations; skipped %d: %s", json_path, split, len(ds),
            len(gt["annotations"]), total, dict(ds.skipped))


def _read_image(ds: CocoJsonDataset, i: int) -> tuple[bytes, int, int]:
    """The file bytes of image i and its size as decoded, checked against the JSON."""
    info = ds.images[i]
    path = os.path.join(ds.image_dir, info["file_name"])
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ValueError(f"cannot read image {path}: {e}") from e
    h, w = decode_rgb(data, path).shape[:2]
    if (info.get("height", h), info.get("width", w)) != (h, w):
        raise ValueError(f"{path} is {h}x{w} but {ds.json_path} says "
                         f"{info.get('height')}x{info.get('width')} (image id {info['id']})")
    return data, h, w


def _json_or_empty(d: dict) -> str:
    return json.dumps(d, separators=(",", ":")) if d else ""


def _example(ds: CocoJsonDataset, i: int, data: bytes, h: int, w: int) -> dict:
    info = ds.images[i]
    objects = collections.defaultdict(list)
    for a in ds.annotations_of(i):
        rle = ds.rle(a, h, w)          # every kept annotation has a usable mask (coco.py)
        extra = {k: v for k, v in a.items() if k not in _ANN_KEYS}
        counts = rle["counts"].decode() if isinstance(rle["counts"], bytes) else rle["counts"]
        objects["id"].append(a["id"])           # CocoJsonDataset numbers annotations without one
        objects["bbox"].append(np.asarray(a["bbox"], np.float64))
        objects["category_id"].append(a["category_id"])
        objects["iscrowd"].append(bool(a["iscrowd"]))     # CocoJsonDataset fills iscrowd and area in
        objects["area"].append(a["area"])
        objects["mask"].append(counts)
        objects["extra"].append(_json_or_empty(extra))
    if not objects:
        objects = {"id": [], "bbox": np.zeros((0, 4), np.float64), "category_id": [], "iscrowd": [],
                   "area": [], "mask": [], "extra": []}
    return {"image": data, "image_id": info["id"], "file_name": info["file_name"], "height": h, "width": w,
            "extra": _json_or_empty({k: v for k, v in info.items() if k not in _IMAGE_KEYS}),
            "objects": dict(objects)}


def prepare(data_dir: str, name: str, sources: dict, overwrite: bool = False) -> str:
    """Build the TFDS dataset `name` under data_dir from {split: (image_dir, json_path)};
    returns the directory it was written to. An existing one is kept unless overwrite."""
    for split, (image_dir, json_path) in sources.items():
        if not os.path.isdir(image_dir):
            raise FileNotFoundError(f"image folder of split {split!r} not found: {image_dir!r}")
        if not os.path.isfile(json_path):
            raise FileNotFoundError(f"annotations of split {split!r} not found: {json_path!r}")
    config = CocoInstancesConfig(name=name, description=f"COCO-format instances: {sorted(sources)}",
                                 sources=tuple((s, d, j) for s, (d, j) in sources.items()))
    builder = CocoInstances(data_dir=os.path.abspath(data_dir), config=config)
    modes = tfds.download.GenerateMode
    mode = modes.FORCE_REDOWNLOAD if overwrite else modes.REUSE_DATASET_IF_EXISTS
    if builder.is_prepared() and not overwrite:
        logging.warning("%s already exists; kept as it is (overwrite=True / --overwrite to rebuild)",
                        builder.data_dir)
    with tempfile.TemporaryDirectory() as downloads:   # tfds wants one; nothing is downloaded
        builder.download_and_prepare(download_dir=downloads, download_config=tfds.download.DownloadConfig(
            try_download_gcs=False, download_mode=mode))
    return str(builder.data_dir)


def full_name(name: str) -> str:
    """'coco2017' -> 'coco_instances/coco2017' (a name with a '/' is taken as it is)."""
    return name if "/" in name else f"{BUILDER_NAME}/{name}"


class TfdsCocoDataset:
    """A split of a dataset prepared by prepare() / this module's CLI, served as CocoJsonDataset
    serves its files. `split` may be a tfds slice of one split ('val[:100]')."""

    def __init__(self, data_dir: str, name: str, split: str):
        self.name = f"{full_name(name)}:{split}"
        try:
            builder = tfds.builder(full_name(name), data_dir=data_dir or None)
            info = builder.info
        except (tfds.core.DatasetNotFoundError, ValueError) as e:
            where = data_dir or "TFDS's default data dir"
            raise FileNotFoundError(
                f"no TFDS dataset {full_name(name)!r} in {where}: prepare it with "
                f"`python -m bmask_jax.data.tfds_coco --data_dir DIR --name {name.split('/')[-1]} --images_train ... --json_train ...` and set "
                f"data.tfds_data_dir=DIR ({e})") from e
        # (tfds's LazyMetadataDict loads on [], keys() and items(), not on get() or `in`.)
        splits = dict(info.metadata.items()).get("splits") if info.metadata is not None else None
        if not splits:
            raise ValueError(f"{builder.data_dir} was not written by bmask_jax.data.tfds_coco (no split metadata)")
        try:
            (instruction,) = tfds.core.ReadInstruction.from_spec(split).to_absolute(info.splits)
            meta = splits[instruction.splitname]
        except (ValueError, KeyError, AssertionError) as e:
            raise ValueError(f"split {split!r} is not one of {sorted(splits)} (or a slice of one) in "
                             f"{builder.data_dir}: {e}") from e
        self._source = builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})
        self.image_ids = list(meta["image_ids"][instruction.from_:instruction.to])
        if len(self.image_ids) != len(self._source):
            raise ValueError(f"{builder.data_dir}: {len(self._source)} records in {split!r} but "
                             f"{len(self.image_ids)} image ids in its metadata")
        self._position = {image_id: i for i, image_id in enumerate(self.image_ids)}
        self._categories = meta["categories"]
        self._top_level = meta.get("top_level", {})
        cats = sorted(self._categories, key=lambda c: c["id"])
        self.category_ids = [c["id"] for c in cats]
        self.class_names = tuple(c["name"] for c in cats)
        self.num_classes = len(cats)
        self._contiguous = {cid: k for k, cid in enumerate(self.category_ids)}
        self.skipped = collections.Counter(meta["skipped"])
        self.data_dir = str(builder.data_dir)
        self._gt = None

    def __len__(self) -> int:
        return len(self._source)

    def index_of(self, image_id: int) -> int:
        return self._position[image_id]

    def _record(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {self.name} ({len(self)} images)")
        return self._source[i]

    def __getitem__(self, i: int) -> dict:
        ex = self._record(i)
        file_name = ex["file_name"].decode()
        image = decode_rgb(ex["image"], f"{file_name} (image id {ex['image_id']}) in {self.data_dir}")
        h, w = image.shape[:2]
        if (h, w) != (ex["height"], ex["width"]):
            raise ValueError(f"{file_name} in {self.data_dir} decodes to {h}x{w}, stored as "
                             f"{ex['height']}x{ex['width']}")
        boxes, classes, masks, crowd = [], [], [], []
        o = ex["objects"]
        for k, counts in enumerate(o["mask"]):
            x, y, bw, bh = (float(v) for v in o["bbox"][k])
            boxes.append([x, y, x + bw, y + bh])
            classes.append(self._contiguous[int(o["category_id"][k])])
            masks.append(mask_utils.decode({"size": [h, w], "counts": counts}).astype(np.uint8))
            crowd.append(bool(o["iscrowd"][k]))
        return {"image_id": int(ex["image_id"]), "image": image, "file_name": file_name,
                "boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
                "classes": np.asarray(classes, np.int32),
                "masks": np.asarray(masks, np.uint8).reshape(-1, h, w),
                "iscrowd": np.asarray(crowd, bool)}

    def coco_dict(self) -> dict:
        """The COCO ground truth of the split (masks as compressed RLE), read once from the records."""
        if self._gt is None:
            images, annotations = [], []
            for i in range(len(self)):
                ex = self._record(i)
                h, w, image_id = int(ex["height"]), int(ex["width"]), int(ex["image_id"])
                images.append({"id": image_id, "file_name": ex["file_name"].decode(), "height": h, "width": w,
                               **_loads(ex["extra"])})
                o = ex["objects"]
                for k in range(len(o["mask"])):
                    a = {"id": int(o["id"][k]), "image_id": image_id, "category_id": int(o["category_id"][k]),
                         "bbox": [float(v) for v in o["bbox"][k]], "area": float(o["area"][k]),
                         "iscrowd": int(bool(o["iscrowd"][k])),
                         "segmentation": {"size": [h, w], "counts": o["mask"][k].decode()}}
                    a.update(_loads(o["extra"][k]))
                    annotations.append(a)
            self._gt = dict(self._top_level, images=images, annotations=annotations, categories=self._categories)
        return self._gt


def _loads(text: bytes) -> dict:
    return json.loads(text) if text else {}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bmask_jax.data.tfds_coco",
        description="Prepare COCO-format instance segmentation (instances JSON + image folder per split) as a "
                    "TFDS dataset (array_record, no TensorFlow) for data.dataset=tfds.")
    p.add_argument("--data_dir", required=True, help="TFDS data dir to write into (data.tfds_data_dir)")
    p.add_argument("--name", default=DEFAULT_NAME, help="dataset name (data.tfds_name), default %(default)s")
    for split in ("train", "val"):
        p.add_argument(f"--images_{split}", help=f"image folder of the {split} split")
        p.add_argument(f"--json_{split}", help=f"instances JSON of the {split} split")
    p.add_argument("--split", nargs=3, action="append", default=[], metavar=("NAME", "IMAGES", "JSON"),
                   help="another split (repeatable), e.g. --split test images/test ann/test.json")
    p.add_argument("--overwrite", action="store_true", help="rebuild a dataset that already exists")
    args = p.parse_args(argv)
    sources = {}
    for split in ("train", "val"):
        images, js = getattr(args, f"images_{split}"), getattr(args, f"json_{split}")
        if bool(images) != bool(js):
            p.error(f"--images_{split} and --json_{split} go together")
        if images:
            sources[split] = (images, js)
    for split, images, js in args.split:
        sources[split] = (images, js)
    if not sources:
        p.error("nothing to prepare: give --images_train/--json_train, --images_val/--json_val or --split")
    if "/" in args.name or not args.name:
        p.error(f"--name {args.name!r}: one word, no '/'")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    path = prepare(args.data_dir, args.name, sources, overwrite=args.overwrite)
    print(f"prepared {full_name(args.name)} in {path}")
    for split in sources:
        ds = TfdsCocoDataset(args.data_dir, args.name, split)
        skipped = f", skipped {dict(ds.skipped)}" if ds.skipped else ""
        print(f"  {split}: {len(ds)} images, {ds.num_classes} classes{skipped}")
    print(f"train with: --config.data.dataset=tfds --config.data.tfds_name={args.name} "
          f"--config.data.tfds_data_dir={os.path.abspath(args.data_dir)}"
          + ("" if {"train", "val"} <= set(sources) else " (and data.train_split / data.eval_split)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
