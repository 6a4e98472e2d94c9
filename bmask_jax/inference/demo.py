"""A local web page to try a model on your own photos:

    bmask-jax demo --config configs/bmask_rcnn.py:shapes --workdir runs/shapes_bmask
    bmask-jax demo --config configs/mask_rcnn.py:r50_fpn_3x --config.model.weights=mask_rcnn_R_50_FPN_3x

serves http://127.0.0.1:7860: drop or pick a photo and see it annotated, with a score slider,
switches for masks, boundaries and boxes, and the shown instances as a JSON download.

Python's standard library serves it (no Gradio, nothing to install): the page sends the photo
once, the server runs the Predictor (compiled once per canvas bucket) with no score cut, and
returns every instance with its mask and boundary as transparent PNGs; the slider and the
switches redraw in the browser and never run the model again.
"""
from __future__ import annotations

import base64
import http.server
import io
import json
import os
import sys
import threading

import numpy as np
from PIL import Image

from bmask_jax import errors

MAX_UPLOAD_BYTES = 50 * 2 ** 20
REQUEST_TIMEOUT_S = 30.0         # seconds a client may leave a request unfinished
MAX_IN_FLIGHT = 16               # uploads taken at once (read, queued for the model); more get 503


def _define_flags():
    """The command's flags, defined only when it runs: importing this module (DemoServer) next
    to bmask_jax.main or export must not define --config twice."""
    from absl import flags
    from ml_collections import config_flags
    config_flags.DEFINE_config_file("config", None, "Config file, optionally with a variant: file.py:variant.",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "Training workdir (its newest checkpoint); else config.model.weights.")
    flags.DEFINE_string("host", "127.0.0.1", "Address to serve on (127.0.0.1: this machine only).")
    flags.DEFINE_integer("port", 7860, "Port to serve on (0: any free one).")
    flags.mark_flags_as_required(["config"])


def png_data_url(rgba: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def layer(mask: np.ndarray, color, alpha: int) -> np.ndarray:
    """A bool mask as an RGBA image: `color` at `alpha` where set, transparent elsewhere."""
    out = np.zeros(mask.shape + (4,), np.uint8)
    out[mask] = (*color, alpha)
    return out


def instances_json(image: np.ndarray, inst: dict, category_ids) -> dict:
    """What the page draws: per instance its class, score, box, colour, mask and boundary
    layers (PNG data URLs, the visualize.py colours) and its COCO-style RLE for the download."""
    from bmask_jax.ops.masks import masks_to_rle
    from bmask_jax.evaluation.visualize import _boundary_color, _instance_color
    out = []
    order = np.argsort(-np.asarray(inst["scores"]), kind="stable")
    rles = masks_to_rle(inst["masks"])
    for rank, i in enumerate(order):
        color = _instance_color(rank)
        boundary = inst.get("boundaries")
        x1, y1, x2, y2 = (float(v) for v in inst["boxes"][i])
        out.append({"class_name": inst["class_names"][i], "category_id": int(category_ids[int(inst["classes"][i])]),
                    "score": float(inst["scores"][i]), "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "color": "#%02x%02x%02x" % color, "segmentation": rles[i],
                    "mask": png_data_url(layer(inst["masks"][i], color, 115)),
                    "boundary": None if boundary is None else png_data_url(layer(boundary[i], _boundary_color(color), 255))})
    return {"width": int(image.shape[1]), "height": int(image.shape[0]), "instances": out}


class DemoServer:
    """The page and /predict over a Predictor; `predictions` counts model runs."""

    def __init__(self, predictor, host: str = "127.0.0.1", port: int = 7860):
        self.predictor = predictor
        self.max_pixels = predictor.config.predict.max_image_pixels
        self.predictions = 0
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(MAX_IN_FLIGHT)
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            # A client that stops sending (a Content-Length it never fills) frees its thread
            # after this many seconds instead of holding it forever.
            timeout = REQUEST_TIMEOUT_S

            def log_message(self, *args):        # quiet: the terminal shows our own lines
                pass

            def handle(self):
                # A client that hangs up or stalls mid-request is its own business: no traceback.
                try:
                    super().handle()
                except (ConnectionError, TimeoutError):
                    self.close_connection = True

            def _send(self, code: int, body: bytes, kind: str, headers: dict | None = None) -> None:
                self.send_response(code)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _error(self, code: int, message: str, headers: dict | None = None) -> None:
                self._send(code, json.dumps({"error": message}).encode(), "application/json", headers)

            def do_GET(self):
                if self.path in ("/", "/index.html"):
                    self._send(200, PAGE.encode(), "text/html; charset=utf-8")
                else:
                    self._send(404, b"not found", "text/plain")

            def do_POST(self):
                if self.path != "/predict":
                    return self._send(404, b"not found", "text/plain")
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    return self._error(411, "chunked uploads are not taken: send the file with a Content-Length")
                length = self.headers.get("Content-Length")
                if length is None:
                    return self._error(400, "no Content-Length: send the file with one")
                length = length.strip()
                if not length.isdigit():
                    return self._error(400, f"Content-Length {length[:40]!r} is not a number of bytes")
                size = int(length)
                if not 0 < size <= MAX_UPLOAD_BYTES:
                    return self._error(413, f"upload of {size} bytes (at most {MAX_UPLOAD_BYTES} taken)")
                if not server._slots.acquire(blocking=False):
                    # More requests than MAX_IN_FLIGHT at once: say so at once instead of queueing
                    # their uploads in memory behind the one model.
                    self._error(503, f"busy: {MAX_IN_FLIGHT} requests are in flight; try again", {"Retry-After": "1"})
                    self.close_connection = True
                    return
                try:
                    self._predict_upload(size)
                finally:
                    server._slots.release()

            def _predict_upload(self, size: int) -> None:
                data = self.rfile.read(size)
                if len(data) < size:               # the client hung up before sending it all
                    return self._error(400, f"got {len(data)} of the {size} bytes the request announced")
                try:
                    body = server.predict(data)
                except ValueError as e:            # not an image, or too large: say so on the page
                    return self._error(400, str(e))
                self._send(200, json.dumps(body).encode(), "application/json")

        self.httpd = http.server.ThreadingHTTPServer((host, port), Handler)
        self.url = f"http://{host}:{self.httpd.server_address[1]}/"

    def predict(self, data: bytes) -> dict:
        from bmask_jax.data.images import decode_rgb
        image = decode_rgb(data, "the uploaded file", self.max_pixels)
        with self._lock:                         # one model run at a time
            inst = self.predictor.predict_arrays([image])[0]
            self.predictions += 1
        return instances_json(image, inst, self.predictor.category_ids)

    def serve_in_thread(self) -> threading.Thread:
        thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>bmask_jax demo</title>
<style>
 body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
 #drop { border: 2px dashed #999; border-radius: 8px; padding: 1.2em; text-align: center; max-width: 760px; }
 #drop.over { background: #eef; }
 #controls { margin: 1em 0; display: flex; gap: 1.5em; align-items: center; flex-wrap: wrap; }
 canvas { max-width: 100%; border: 1px solid #ccc; }
 #status { color: #555; }
</style></head>
<body>
<h2>BMask R-CNN: try it on your photos</h2>
<div id="drop">Drop a photo here, or <input type="file" id="file" accept="image/*"></div>
<div id="controls">
 <label>score &ge; <input type="range" id="threshold" min="0" max="1" step="0.01" value="0.5">
   <span id="threshold_value">0.50</span></label>
 <label><input type="checkbox" id="show_masks" checked> masks</label>
 <label><input type="checkbox" id="show_boundaries" checked> boundaries</label>
 <label><input type="checkbox" id="show_boxes" checked> boxes</label>
 <button id="download" disabled>download instances (JSON)</button>
 <span id="status">no photo yet</span> <span id="count"></span>
</div>
<canvas id="canvas" width="0" height="0"></canvas>
<script>
let result = null, photo = null, layers = [];
const $ = (id) => document.getElementById(id);
function shown() {
  const t = parseFloat($("threshold").value);
  return result ? result.instances.map((x, i) => [x, i]).filter(([x]) => x.score >= t) : [];
}
function draw() {
  $("threshold_value").textContent = parseFloat($("threshold").value).toFixed(2);
  if (!result) return;
  // A small photo is drawn enlarged, pixel by pixel, as the pictures are (min_picture_size
  // 512): its labels would otherwise cover its instances.
  const k = Math.max(1, Math.ceil(512 / Math.max(result.width, result.height)));
  const c = $("canvas"), g = c.getContext("2d"), W = result.width * k, H = result.height * k;
  c.width = W; c.height = H;
  g.imageSmoothingEnabled = false;
  g.drawImage(photo, 0, 0, W, H);
  const keep = shown();
  for (const [x, i] of keep) {
    if ($("show_masks").checked) g.drawImage(layers[i].mask, 0, 0, W, H);
    if ($("show_boundaries").checked && layers[i].boundary) g.drawImage(layers[i].boundary, 0, 0, W, H);
  }
  const size = Math.max(12, Math.round(Math.max(W, H) / 50));
  g.font = size + "px sans-serif";
  if ($("show_boxes").checked) for (const [x] of keep) {
    const [bx, by, bw, bh] = x.bbox.map((v) => v * k);
    g.strokeStyle = x.color; g.lineWidth = Math.max(2, size / 6); g.strokeRect(bx, by, bw, bh);
    const label = x.class_name + " " + x.score.toFixed(2), w = g.measureText(label).width + 6;
    const ty = by >= size + 4 ? by - size - 4 : by;
    g.fillStyle = x.color; g.fillRect(bx, ty, w, size + 4);
    g.fillStyle = "#fff"; g.fillText(label, bx + 3, ty + size);
  }
  $("count").textContent = keep.length + " of " + result.instances.length + " instances shown";
  $("count").dataset.shown = keep.length;
}
function loadImage(src) {
  return new Promise((ok, bad) => { const im = new Image(); im.onload = () => ok(im); im.onerror = bad; im.src = src; });
}
async function send(file) {
  $("status").textContent = "predicting " + file.name + " ...";
  result = null; $("download").disabled = true;
  const reply = await fetch("/predict", { method: "POST", body: file });
  const body = await reply.json();
  if (!reply.ok) { $("status").textContent = "error: " + body.error; return; }
  photo = await loadImage(URL.createObjectURL(file));
  layers = await Promise.all(body.instances.map(async (x) => ({
    mask: await loadImage(x.mask), boundary: x.boundary ? await loadImage(x.boundary) : null })));
  result = body;
  $("status").textContent = file.name;
  $("download").disabled = false;
  draw();
  document.body.dataset.ready = "1";
}
$("file").addEventListener("change", (e) => e.target.files[0] && send(e.target.files[0]));
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over");
  if (e.dataTransfer.files[0]) send(e.dataTransfer.files[0]); });
for (const id of ["threshold", "show_masks", "show_boundaries", "show_boxes"]) $(id).addEventListener("input", draw);
$("download").addEventListener("click", () => {
  const out = shown().map(([x]) => ({ class_name: x.class_name, category_id: x.category_id, score: x.score,
                                      bbox: x.bbox, segmentation: x.segmentation }));
  const a = document.createElement("a");
  a.href = URL.createObjectURL(new Blob([JSON.stringify(out, null, 1)], { type: "application/json" }));
  a.download = "instances.json"; a.click();
});
</script></body></html>
"""


def check_port(host: str, port: int) -> None:
    """Raises an OSError naming host:port (--host, --port) if the page could not be served there."""
    import errno
    import socket
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)     # as http.server binds
            probe.bind((host, port))
    except OSError as e:
        code = e.errno if e.errno in errors.USER_ERRNOS else errno.EADDRNOTAVAIL     # e.g. a host name unknown
        raise OSError(code, f"cannot serve on {host}:{port} (--host, --port): {e.strerror or e}") from None


def main(argv):
    del argv
    from absl import flags
    from ml_collections import config_flags
    FLAGS = flags.FLAGS
    import jax
    jax.config.update("jax_compilation_cache_dir",
                      os.environ.get("BMASK_JAX_CACHE", os.path.expanduser("~/.cache/bmask_jax/xla")))
    from bmask_jax.inference.predictor import Predictor
    overrides = config_flags.get_override_values(FLAGS["config"])
    with errors.boundary():
        check_port(FLAGS.host, FLAGS.port)   # before the model is loaded, not after
        predictor = Predictor(FLAGS.config, FLAGS.workdir, score_threshold=0.0, overrides=overrides)
        server = DemoServer(predictor, FLAGS.host, FLAGS.port)
    print(f"serving {server.url} (Ctrl-C stops)", flush=True)
    try:
        server.httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.httpd.server_close()


if __name__ == "__main__":
    from absl import app
    sys.argv = errors.take_verbose_flag(sys.argv)
    _define_flags()
    app.run(main)
