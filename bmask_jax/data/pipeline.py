"""Batches for training and evaluation.

The training batch of step t is a pure function of (seed, t): image order comes from a
per-epoch permutation and augmentation from a per-(epoch, index) generator. Resuming at step
t therefore replays exactly the images the uninterrupted run would have seen, with no
iterator state to save. Each process prepares only its own slice of the global batch.
"""
from __future__ import annotations

import concurrent.futures
import logging
from typing import Iterator

import numpy as np

from bmask_jax.data.transforms import choose_canvas, large_scale_jitter, prepare_example, resize_shortest_edge

STACK_KEYS = ("image", "image_hw", "scale", "orig_hw", "image_id", "gt_boxes", "gt_classes",
              "gt_valid", "gt_masks", "num_dropped")


def build_dataset(data_cfg, split: str):
    """The dataset named by data.dataset for a split ('train' or 'val')."""
    if data_cfg.dataset == "synthetic":
        from bmask_jax.data.synthetic import SyntheticShapes
        s = data_cfg.synthetic
        num = s.num_train if split == "train" else s.num_val
        return SyntheticShapes(split, num_images=num, image_size=tuple(s.image_size), seed=0,
                               max_instances=s.max_instances)
    if data_cfg.dataset == "coco":
        from bmask_jax.data.coco import CocoJsonDataset
        json_path = data_cfg.coco_train_json if split == "train" else data_cfg.coco_eval_json
        return CocoJsonDataset(json_path, data_cfg.coco_images)
    if data_cfg.dataset == "tfds":
        from bmask_jax.data.tfds_coco import TfdsCocoDataset
        return TfdsCocoDataset(data_cfg.tfds_data_dir, data_cfg.tfds_name, split)
    if data_cfg.dataset == "cityscapes":
        from bmask_jax.data.cityscapes import CityscapesInstances
        return CityscapesInstances(data_cfg.cityscapes_root, split)
    raise ValueError(f"data.dataset must be 'synthetic', 'coco' or 'cityscapes' (or 'tfds'), got {data_cfg.dataset!r}")


def largest_canvas(hws) -> tuple[int, int]:
    """The canvas that holds every one of `hws` (canvas sizes): the largest, when they nest."""
    hws = [tuple(int(v) for v in hw) for hw in hws]
    big = max(hws, key=lambda hw: hw[0] * hw[1])
    if any(h > big[0] or w > big[1] for h, w in hws):
        raise ValueError(f"images of one batch need canvases {sorted(set(hws))} that do not nest; add a bucket "
                         "that holds them all to data.canvas_buckets")
    return big


def pad_images(images, canvas_hw) -> np.ndarray:
    """Stack images [H_i, W_i, 3] into [B, *canvas_hw, 3], each at the top left, zero beyond
    (different buckets in one batch share the largest, which is also a bucket)."""
    out = np.zeros((len(images), *canvas_hw, 3), np.uint8)
    for i, im in enumerate(images):
        out[i, :im.shape[0], :im.shape[1]] = im
    return out


def _stack(examples: list[dict]) -> dict:
    out = {k: np.stack([e[k] for e in examples]) for k in STACK_KEYS if k in examples[0] and k != "image"}
    out["image"] = pad_images([e["image"] for e in examples],
                              largest_canvas([e["image"].shape[:2] for e in examples]))
    return out


class TrainBatches:
    """Deterministic, resumable training batches with background preparation.

    batch(step) -> dict of numpy arrays with leading dim local_batch (this process's share).
    """

    def __init__(self, dataset, data_cfg, global_batch: int, seed: int, process_index: int = 0,
                 process_count: int = 1, num_workers: int = 2):
        if global_batch % process_count:
            raise ValueError(f"train.batch_size={global_batch} must divide among {process_count} processes")
        self.dataset = dataset
        self.cfg = data_cfg
        self.global_batch = global_batch
        self.local_batch = global_batch // process_count
        self.process_index = process_index
        self.seed = seed
        self.num_dropped = 0
        # Steps are prepared ahead on one pool, the examples of a step decoded in parallel on
        # another (image decoding and resizing release the GIL).
        self._pool = concurrent.futures.ThreadPoolExecutor(2)
        self._decoders = concurrent.futures.ThreadPoolExecutor(max(num_workers, 1))
        self._pending: dict[int, concurrent.futures.Future] = {}

    def indices(self, step: int) -> np.ndarray:
        """Dataset indices of this process's share of the global batch at `step`."""
        n = len(self.dataset)
        start = step * self.global_batch + self.process_index * self.local_batch
        positions = np.arange(start, start + self.local_batch)
        out = np.empty(self.local_batch, np.int64)
        for epoch in np.unique(positions // n):
            perm = np.random.default_rng([self.seed, int(epoch)]).permutation(n)
            sel = positions // n == epoch
            out[sel] = perm[positions[sel] % n]
        return out

    def _example(self, step: int, slot: int, index: int) -> dict:
        rng = np.random.default_rng([self.seed, step, slot, 1])
        c = self.cfg
        lsj = c.get("lsj")
        if lsj is not None and lsj.enabled:
            flip = bool(c.flip and rng.random() < 0.5)
            example = large_scale_jitter(self.dataset[int(index)], rng, lsj.size, lsj.min_scale, lsj.max_scale, flip,
                                         lsj.get("pad_value"))
            return prepare_example(example, None, c.max_size, c.canvas_buckets, False, c.max_instances,
                                   c.gt_mask_size)
        short = int(rng.choice(np.asarray(c.train_short_side)))
        flip = bool(c.flip and rng.random() < 0.5)
        return prepare_example(self.dataset[int(index)], short, c.max_size, c.canvas_buckets, flip,
                               c.max_instances, c.gt_mask_size)

    def _make(self, step: int) -> dict:
        # Augmentation is keyed by the slot in the *global* batch, so that any number of
        # processes prepares exactly the examples a single process would.
        first = self.process_index * self.local_batch
        examples = list(self._decoders.map(lambda a: self._example(step, first + a[0], a[1]),
                                           enumerate(self.indices(step))))
        return _stack(examples)

    def batch(self, step: int, prefetch: int = 2) -> dict:
        for s in range(step, step + prefetch + 1):
            if s not in self._pending:
                self._pending[s] = self._pool.submit(self._make, s)
        for s in [s for s in self._pending if s < step]:
            self._pending.pop(s).cancel()
        out = self._pending.pop(step).result()
        dropped = int(out["num_dropped"].sum())
        if dropped:
            self.num_dropped += dropped
            logging.warning("step %d: %d instances beyond data.max_instances=%d were not trained on "
                            "(%d so far)", step, dropped, self.cfg.max_instances, self.num_dropped)
        return out

    def close(self):
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._decoders.shutdown(wait=False, cancel_futures=True)


def eval_plan(canvases, global_batch: int) -> list[list[int]]:
    """The global evaluation batches: image positions grouped by canvas (in order of first
    appearance, each group in order), cut into batches of global_batch, the last of a group
    padded with -1. Every process computes the same plan and takes its own slice of each
    batch, so all processes run the same number of steps on one canvas per step."""
    groups: dict[tuple, list[int]] = {}
    for i, canvas in enumerate(canvases):
        groups.setdefault(tuple(canvas), []).append(i)
    plan = []
    for members in groups.values():
        for start in range(0, len(members), global_batch):
            chunk = members[start:start + global_batch]
            plan.append(chunk + [-1] * (global_batch - len(chunk)))
    return plan


def eval_batches(dataset, data_cfg, batch_size: int, num_images: int = -1, process_index: int = 0,
                 process_count: int = 1, image_sizes=None) -> Iterator[dict]:
    """Evaluation batches over the first num_images images (all if < 0), each image once, in
    batches of `batch_size` (global, over all processes) that share one canvas. Yields this
    process's share of each global batch (batch_size // process_count images), padding slots
    repeating a real image of the batch with `is_real` False.

    image_sizes: (height, width) of every image in dataset order, to choose canvases without
    decoding; read from the images themselves if None."""
    n = len(dataset) if num_images < 0 else min(num_images, len(dataset))
    if batch_size % process_count:
        raise ValueError(f"the evaluation batch ({batch_size}) must divide among {process_count} processes")
    local = batch_size // process_count
    c = data_cfg

    def prep(i):
        return prepare_example(dataset[i], c.test_short_side, c.max_size, c.canvas_buckets, False,
                               c.max_instances, c.gt_mask_size, with_gt=False)

    if image_sizes is None:
        image_sizes = [dataset[i]["image"].shape[:2] for i in range(n)]
    canvases = [choose_canvas(resize_shortest_edge(tuple(int(v) for v in image_sizes[i]), c.test_short_side,
                                                   c.max_size), c.canvas_buckets) for i in range(n)]
    with concurrent.futures.ThreadPoolExecutor(max(c.num_workers, 1)) as pool:
        for chunk in eval_plan(canvases, batch_size):
            mine = chunk[process_index * local:(process_index + 1) * local]
            real = [i >= 0 for i in mine]
            fill = next(i for i in reversed(chunk) if i >= 0)     # padding repeats a real image
            examples = list(pool.map(prep, [i if i >= 0 else fill for i in mine]))
            b = _stack(examples)
            b["is_real"] = np.array(real)
            yield b
