"""The demo page, driven in a real headless browser (Debian's chromium, through Playwright):
upload a picture, wait for the annotated result, move the score slider above some instances'
scores and check that exactly those disappear, switch layers off, download the shown
instances as JSON. The model runs once for all of it.

Skipped, saying what is missing, where Playwright's Python package or a Chromium executable
is absent: they are a browser and its driver (hundreds of MB), not test dependencies every
contributor should install. `pip install playwright` and `apt-get install chromium` (or set
BMASK_JAX_CHROMIUM to a Chromium binary) enable it."""
import json
import os
import shutil

import jax
import numpy as np
import pytest
from PIL import Image

from bmask_jax.data.synthetic import SyntheticShapes
from bmask_jax.inference.demo import DemoServer
from bmask_jax.models.bmask_rcnn import BMaskRCNN
from bmask_jax.inference.predictor import Predictor
from bmask_jax.engine.state import create_train_state
from helpers import tiny_config

pytestmark = pytest.mark.slow      # compiles a detector for tens of seconds

sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright's Python package is not installed "
                               "(pip install playwright): the browser test of the demo page is skipped")
CHROMIUM = os.environ.get("BMASK_JAX_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
if not CHROMIUM:
    pytest.skip("no Chromium executable (apt-get install chromium, or set BMASK_JAX_CHROMIUM): the browser "
                "test of the demo page is skipped", allow_module_level=True)

SCREENSHOT = os.environ.get("BMASK_JAX_DEMO_SCREENSHOT", "")   # where to keep the page's picture


@pytest.fixture(scope="module")
def server():
    c = tiny_config()
    c.data.update(test_short_side=64, max_size=64, canvas_buckets=((64, 64),))
    c.model.roi_heads.score_threshold = 0.0          # fresh weights: scores spread below 1
    state, _ = create_train_state(c, BMaskRCNN(c.model), jax.random.PRNGKey(0))
    predictor = Predictor(c, variables={"params": state.params, "frozen": state.frozen}, score_threshold=0.0)
    demo = DemoServer(predictor, "127.0.0.1", 0)
    demo.serve_in_thread()
    yield demo
    demo.close()


def test_upload_slider_switches_and_download(server, tmp_path):
    photo = tmp_path / "photo.png"
    Image.fromarray(SyntheticShapes("val", num_images=1, image_size=(64, 64))[0]["image"]).save(photo)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(accept_downloads=True)
        page.goto(server.url)
        page.set_input_files("#file", str(photo))
        page.wait_for_selector("body[data-ready='1']", timeout=120_000)
        scores = page.evaluate("result.instances.map(x => x.score)")
        assert len(scores) == 5 and server.predictions == 1       # tiny config: 5 detections an image
        shown = int(page.get_attribute("#count", "data-shown"))
        assert shown == sum(s >= 0.5 for s in scores)

        # The slider between two scores: exactly the instances below it disappear.
        ranked = sorted(scores)
        t = round((ranked[1] + ranked[2]) / 2, 6)
        assert ranked[1] < t < ranked[2]
        page.eval_on_selector("#threshold", "(s, t) => { s.value = t; s.dispatchEvent(new Event('input')); }", t)
        t = float(page.eval_on_selector("#threshold", "s => s.value"))       # the slider's own step
        assert int(page.get_attribute("#count", "data-shown")) == sum(s >= t for s in scores)

        # The switches redraw: without boxes the canvas differs; without masks it differs
        # exactly when a shown instance has mask pixels (fresh weights may give none).
        from pycocotools import mask as mask_utils
        canvas = "document.getElementById('canvas').toDataURL()"
        shown_rles = page.evaluate(f"result.instances.filter(x => x.score >= {t}).map(x => x.segmentation)")
        for switch, changes in (("#show_boxes", True),
                                ("#show_masks", any(mask_utils.area(r) > 0 for r in shown_rles))):
            before = page.evaluate(canvas)
            page.uncheck(switch)
            assert (page.evaluate(canvas) != before) == changes, switch
            page.check(switch)
            assert page.evaluate(canvas) == before
        if SCREENSHOT:
            page.screenshot(path=SCREENSHOT, full_page=True)

        with page.expect_download() as download:
            page.click("#download")
        saved = tmp_path / "instances.json"
        download.value.save_as(saved)
        got = json.load(open(saved))
        assert sorted(x["score"] for x in got) == sorted(s for s in scores if s >= t)
        assert {"class_name", "category_id", "bbox", "segmentation", "score"} <= set(got[0])
        assert server.predictions == 1        # slider, switches, download: no new model run
        browser.close()


def test_the_server_names_a_bad_upload_and_answers_a_good_one(server):
    with pytest.raises(ValueError, match="the uploaded file"):
        server.predict(b"not an image")
    import io
    buf = io.BytesIO()
    Image.fromarray(np.zeros((40, 24, 3), np.uint8)).save(buf, format="PNG")
    body = server.predict(buf.getvalue())
    assert (body["width"], body["height"]) == (24, 40) and len(body["instances"]) == 5
    assert body["instances"][0]["mask"].startswith("data:image/png;base64,")
