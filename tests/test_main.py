"""The whole loop on the embedded dataset, tiny: train, evaluate, pictures, predict."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from bmask_jax.data.synthetic import SyntheticShapes
from bmask_jax.evaluation.evaluate import evaluate
from bmask_jax.inference.predict import predict
from bmask_jax.engine.variables import restore_variables
from bmask_jax.train import train_and_evaluate
from helpers import tiny_config


@pytest.mark.slow
def test_train_evaluate_predict_end_to_end(tmp_path):
    c = tiny_config("maskrcnn")
    c.train.max_iter = 3
    workdir = str(tmp_path / "run")
    metrics = train_and_evaluate(c, workdir)
    for kind in ("bbox", "segm"):
        assert set(metrics[kind]) >= {"AP", "AP50", "AP75", "APs", "APm", "APl", "AP_per_iou"}
        assert len(metrics[kind]["AP_per_iou"]) == 10
    saved = json.load(open(os.path.join(workdir, "metrics.json")))
    assert saved["num_images"] == 4
    for name in ("ap_vs_iou.png", "detections.json"):
        assert os.path.getsize(os.path.join(workdir, name)) > 0
    assert len(os.listdir(os.path.join(workdir, "pictures"))) == 2

    # evaluate mode restores the checkpoint and reproduces the same numbers
    again = evaluate(c, workdir, restore_variables(c, workdir))
    assert again["bbox"]["AP"] == metrics["bbox"]["AP"]

    # predict on image files written to a folder
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        Image.fromarray(SyntheticShapes("val", num_images=2, image_size=(64, 64))[i]["image"]).save(images / f"{i}.png")
    c.predict.inputs = str(images)
    c.predict.score_threshold = 0.0
    out, failures = predict(c, workdir, str(tmp_path / "pred"))
    assert failures == []
    assert sorted(os.listdir(tmp_path / "pred")) == ["0.png", "1.png", "predictions.json"]
    preds = json.load(open(out))
    assert all(p["file_name"] in ("0.png", "1.png") for p in preds)
    drawn = np.asarray(Image.open(tmp_path / "pred" / "0.png"))
    assert drawn.shape == (512, 512, 3)             # 64 px drawn 8x, readable
