"""The model zoo: published Mask R-CNN and BMask R-CNN weights, one name away.

    bmask-jax zoo                     # the table
    python -m bmask_jax.main --config configs/bmask_rcnn.py:r50_fpn_1x --workdir runs/zoo \\
        --mode evaluate --config.model.weights=bmask_rcnn_R_50_FPN_1x
    Predictor.from_pretrained("mask_rcnn_R_50_FPN_3x")("street.jpg")

Each entry: its name (the publisher's config name), the config it runs with, the URL and file
name, and the box/mask AP its publisher reports (COCO val2017; Cityscapes val for the
Cityscapes entry, whose AP is the benchmark's own). detectron2's files are fetched and checked
against the md5 prefix in their names. The authors' BMask R-CNN files are OneDrive share links,
which need a browser (a script gets the share page, not the file): their names resolve to a
file in the cache, and the error says which link to open and where to save the file.
The ImageNet backbones that the COCO and Cityscapes configs start from are listed too.
"""
from __future__ import annotations

import dataclasses
import os

from bmask_jax.weights import download


class WeightsNotFoundError(FileNotFoundError):
    """model.weights names no file, URL or zoo entry."""


@dataclasses.dataclass(frozen=True)
class ZooEntry:
    name: str
    config: str               # configs/<file>.py:<variant>
    url: str
    publisher: str
    dataset: str
    box_ap: float | None      # as the publisher reports it; None where it reports none
    mask_ap: float | None
    file_name: str = ""       # where the URL does not end in it (share links)
    manual: bool = False      # the URL is a page to open in a browser, not the file
    license: str = ""         # the weights' terms, as their publisher states them

    @property
    def local_name(self) -> str:
        return self.file_name or os.path.basename(download.expand_url(self.url))

    def cache_path(self) -> str:
        if self.manual:
            return os.path.join(download.home(), "weights", "zoo", self.local_name)
        return download.cache_path(self.url)

    def build_config(self):
        from bmask_jax import config
        c = config.from_file(self.config)
        c.model.weights = self.name
        return c


_D2 = "detectron2://"
_AUTHORS = "hustvl/BMaskR-CNN"
# detectron2's MODEL_ZOO.md: "All models available for download through this document are
# licensed under the Creative Commons Attribution-ShareAlike 3.0 license".
D2_LICENSE = "CC BY-SA 3.0 (detectron2 MODEL_ZOO.md)"
AUTHORS_LICENSE = "not stated (the authors' README names none)"
# MAE's README puts its pretrained weights under CC BY-NC 4.0; detectron2's copies
# (ImageNetPretrained/MAE) are those weights. ViTDet's README states no license for its models,
# which are fine-tuned from them.
MAE_LICENSE = "CC BY-NC 4.0 (MAE's README): non-commercial"
VITDET_LICENSE = "not stated by ViTDet's README; fine-tuned from MAE weights (CC BY-NC 4.0): non-commercial"
ENTRIES: dict[str, ZooEntry] = {e.name: e for e in [
    # detectron2's MODEL_ZOO.md: COCO instance segmentation baselines and Cascade R-CNN.
    ZooEntry("mask_rcnn_R_50_FPN_1x", "configs/mask_rcnn.py:r50_fpn_1x",
             _D2 + "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x/137260431/model_final_a54504.pkl",
             "detectron2", "COCO", 38.6, 35.2, license=D2_LICENSE),
    ZooEntry("mask_rcnn_R_50_FPN_3x", "configs/mask_rcnn.py:r50_fpn_3x",
             _D2 + "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x/137849600/model_final_f10217.pkl",
             "detectron2", "COCO", 41.0, 37.2, license=D2_LICENSE),
    ZooEntry("mask_rcnn_R_101_FPN_3x", "configs/mask_rcnn.py:r101_fpn_3x",
             _D2 + "COCO-InstanceSegmentation/mask_rcnn_R_101_FPN_3x/138205316/model_final_a3ec72.pkl",
             "detectron2", "COCO", 42.9, 38.6, license=D2_LICENSE),
    ZooEntry("cascade_mask_rcnn_R_50_FPN_1x", "configs/mask_rcnn.py:cascade_r50_fpn_1x",
             _D2 + "Misc/cascade_mask_rcnn_R_50_FPN_1x/138602847/model_final_e9d89b.pkl",
             "detectron2", "COCO", 42.1, 36.4, license=D2_LICENSE),
    ZooEntry("cascade_mask_rcnn_R_50_FPN_3x", "configs/mask_rcnn.py:cascade_r50_fpn_3x",
             _D2 + "Misc/cascade_mask_rcnn_R_50_FPN_3x/144998488/model_final_480dd8.pkl",
             "detectron2", "COCO", 44.3, 38.5, license=D2_LICENSE),
    # detectron2's projects/ViTDet/README.md (COCO val): Mask R-CNN and Cascade Mask R-CNN.
    *[ZooEntry(f"{arch}_vitdet_{size}", f"configs/mask_rcnn.py:{'cascade_' if arch.startswith('cascade') else ''}"
               f"vitdet_{size}", f"{_D2}ViTDet/COCO/{arch}_vitdet_{size}/{run}/model_final_{md5}.pkl",
               "detectron2", "COCO", box, mask, license=VITDET_LICENSE)
      for arch, size, run, md5, box, mask in [
          ("mask_rcnn", "b", "f325346929", "61ccd1", 51.6, 45.9),
          ("mask_rcnn", "l", "f325599698", "6146ed", 55.5, 49.2),
          ("mask_rcnn", "h", "f329145471", "7224f1", 56.7, 50.2),
          ("cascade_mask_rcnn", "b", "f325358525", "435fa9", 54.0, 46.7),
          ("cascade_mask_rcnn", "l", "f328021305", "1a9f28", 57.6, 50.0),
          ("cascade_mask_rcnn", "h", "f328730692", "f05665", 58.7, 51.0)]],
    # detectron2's MODEL_ZOO.md, "New baselines using Large-Scale Jitter and Longer Training
    # Schedule" (COCO val): trained from scratch with SyncBN.
    *[ZooEntry(f"mask_rcnn_R_{depth}_FPN_{epochs}ep_LSJ", f"configs/mask_rcnn.py:r{depth}_fpn_{epochs}ep_lsj",
               f"{_D2}new_baselines/mask_rcnn_R_{depth}_FPN_{epochs}ep_LSJ/{run}/model_final_{md5}.pkl",
               "detectron2", "COCO", box, mask, license=D2_LICENSE)
      for depth, epochs, run, md5, box, mask in [
          (50, 100, 42047764, "bb69de", 44.6, 40.3),
          (50, 200, 42047638, "89a8d3", 46.3, 41.7),
          (50, 400, 42019571, "14d201", 47.4, 42.5),
          (101, 100, 42025812, "4f7b58", 46.4, 41.6),
          (101, 200, 42131867, "0bb7ae", 48.0, 43.1),
          (101, 400, 42073830, "f96b26", 48.9, 43.7)]],
    *[ZooEntry(f"mask_rcnn_{net}_dds_FPN_{epochs}ep_LSJ", f"configs/mask_rcnn.py:{net}_fpn_{epochs}ep_lsj",
               f"{_D2}new_baselines/mask_rcnn_{net}_dds_FPN_{epochs}ep_LSJ/{run}/model_final_{md5}.pkl",
               "detectron2", "COCO", box, mask, license=D2_LICENSE)
      for net, epochs, run, md5, box, mask in [
          ("regnetx_4gf", 100, 42047771, "b7fbab", 46.0, 41.3),
          ("regnetx_4gf", 200, 42132721, "5d87c1", 48.1, 43.1),
          ("regnetx_4gf", 400, 42025447, "f1362d", 48.6, 43.5),
          ("regnety_4gf", 100, 42047784, "6ba57e", 46.1, 41.6),
          ("regnety_4gf", 200, 42047642, "27b9c1", 47.8, 43.0),
          ("regnety_4gf", 400, 42045954, "ef3a80", 48.2, 43.3)]],
    # The authors' README (github.com/hustvl/BMaskR-CNN): mask AP only.
    *[ZooEntry(name, config, url, _AUTHORS, dataset, None, mask_ap, file_name=f"{name}.pth", manual=True,
               license=AUTHORS_LICENSE)
      for name, config, url, dataset, mask_ap in [
          ("bmask_rcnn_R_50_FPN_1x", "configs/bmask_rcnn.py:r50_fpn_1x",
           "https://1drv.ms/u/s!AiO3BIXgPy5wgQPnrfnAtiyPDPg2?e=C30spg", "COCO", 36.6),
          ("bmask_rcnn_R_101_FPN_1x", "configs/bmask_rcnn.py:r101_fpn_1x",
           "https://1drv.ms/u/s!AiO3BIXgPy5wgQXy09QVGx89O3Fq?e=DzeqBx", "COCO", 38.0),
          ("cascade_bmask_rcnn_R_50_FPN_1x", "configs/bmask_rcnn.py:cascade_r50_fpn_1x",
           "https://1drv.ms/u/s!AiO3BIXgPy5wgQbCmylIyL4Z4GFh?e=MNrgaD", "COCO", 37.5),
          ("cascade_bmask_rcnn_R_101_FPN_1x", "configs/bmask_rcnn.py:cascade_r101_fpn_1x",
           "https://1drv.ms/u/s!AiO3BIXgPy5wgQcIpRDSMUKHVgMM?e=on6XLj", "COCO", 39.1),
          ("bmask_rcnn_R_50_FPN_cityscapes", "configs/cityscapes.py:bmask_code",
           "https://1drv.ms/u/s!AiO3BIXgPy5wgQQx_gTYbpcIuOWJ?e=z9seyq", "Cityscapes", 36.2)]],
]}

# ImageNet backbones (MSRA's ResNets as detectron2 converted them): what the COCO and
# Cityscapes configs start training from. No checksum: their file names carry none.
BACKBONES: dict[str, str] = {
    "ImageNet/MSRA/R-50": _D2 + "ImageNetPretrained/MSRA/R-50.pkl",
    "ImageNet/MSRA/R-101": _D2 + "ImageNetPretrained/MSRA/R-101.pkl",
    # MAE's ImageNet-1k ViTs, as ViTDet starts from them (ViT-H's patch embedding converted from
    # 14 to 16 by detectron2); their import is the "mae" kind.
    "ImageNet/MAE/ViT-B": _D2 + "ImageNetPretrained/MAE/mae_pretrain_vit_base.pth",
    "ImageNet/MAE/ViT-L": _D2 + "ImageNetPretrained/MAE/mae_pretrain_vit_large.pth",
    "ImageNet/MAE/ViT-H": _D2 + "ImageNetPretrained/MAE/mae_pretrain_vit_huge_p14to16.pth",
}
BACKBONE_LICENSES = {"ImageNet/MSRA/R-50": D2_LICENSE, "ImageNet/MSRA/R-101": D2_LICENSE,
                     **{f"ImageNet/MAE/ViT-{s}": MAE_LICENSE for s in "BLH"}}


def get(name: str) -> ZooEntry:
    if name not in ENTRIES:
        raise KeyError(f"no model {name!r} in the model zoo; models: {', '.join(ENTRIES)}")
    return ENTRIES[name]


def is_zoo_name(spec: str) -> bool:
    return spec in ENTRIES or spec in BACKBONES


def weights_file(spec: str, progress: bool = True) -> str:
    """The local file of a model.weights value: a zoo name, a backbone name, an https:// or
    detectron2:// URL (downloaded into the cache once), or a local path. Raises FileNotFoundError
    (WeightsNotFoundError: a path or name that is neither) or download.DownloadError."""
    if spec in ENTRIES and ENTRIES[spec].manual:
        entry = ENTRIES[spec]
        path = entry.cache_path()
        if not os.path.isfile(path):
            raise download.DownloadError(
                f"model.weights={spec}: the authors publish this model as a OneDrive share link, which a "
                f"program cannot download. Open {entry.url} in a browser, download the file and save it as "
                f"{path}")
        return path
    if spec in ENTRIES or spec in BACKBONES:
        return download.fetch(ENTRIES[spec].url if spec in ENTRIES else BACKBONES[spec], progress=progress)
    if download.is_url(spec):
        return download.fetch(spec, progress=progress)
    path = os.path.expanduser(spec)
    if not os.path.isfile(path):
        raise WeightsNotFoundError(f"model.weights={spec}: no such file, and not a URL or a model-zoo name "
                                f"(bmask-jax zoo lists them)")
    return path


def table() -> str:
    """The zoo as a Markdown table."""
    def ap(x):
        return "—" if x is None else f"{x:.1f}"
    rows = ["| name | config | publisher | dataset | box AP | mask AP | file | license |",
            "|---|---|---|---|---|---|---|---|"]
    for e in ENTRIES.values():
        link = f"[{e.local_name}]({download.expand_url(e.url)})" + (" (browser)" if e.manual else "")
        rows.append(f"| `{e.name}` | `{e.config}` | {e.publisher} | {e.dataset} | {ap(e.box_ap)} | {ap(e.mask_ap)} "
                    f"| {link} | {e.license} |")
    rows += ["", "| backbone | file | license |", "|---|---|---|"]
    rows += [f"| `{n}` | [{os.path.basename(u)}]({download.expand_url(u)}) | {BACKBONE_LICENSES[n]} |"
             for n, u in BACKBONES.items()]
    return "\n".join(rows)


if __name__ == "__main__":
    import sys

    from bmask_jax import errors
    sys.argv = errors.take_verbose_flag(sys.argv)
    if len(sys.argv) > 1 and sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0)
    with errors.boundary():
        print(table())
        print(f"\ncache: {os.path.join(download.home(), 'weights')} ($BMASK_JAX_HOME)")
