"""A bounded load on the demo page's server (`bmask-jax demo`): N clients on 127.0.0.1 post
validation images of the embedded dataset to /predict, R requests in all, and the latency of
each answer (upload, model, JSON with PNG layers) is recorded: p50, p99, and the errors, which
should be none. One warm-up request first (it compiles the model for the image's canvas).

    python experiments/demo_load.py --config configs/bmask_rcnn.py:shapes [--workdir runs/shapes_bmask] \
        --clients 8 --requests 200 --out demo_load.json

Without --workdir the model has random weights and score threshold 0 (every detection kept,
so the replies carry 100 masks each: the heaviest answer the page gets).
"""
from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/bmask_rcnn.py:shapes")
    p.add_argument("--workdir", default="")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--out", default="")
    args = p.parse_args()

    from PIL import Image

    from bmask_jax import config as config_lib
    from bmask_jax.data.synthetic import SyntheticShapes
    from bmask_jax.engine.variables import random_variables
    from bmask_jax.inference.demo import MAX_IN_FLIGHT, DemoServer
    from bmask_jax.inference.predictor import Predictor

    config = config_lib.from_file(args.config)
    if args.workdir:
        predictor = Predictor(config, args.workdir, score_threshold=0.0)
    else:
        config.model.roi_heads.score_threshold = 0.0
        predictor = Predictor(config, variables=random_variables(config, 0), score_threshold=0.0)
    images = []
    for example in SyntheticShapes("val", num_images=4, seed=0):
        buffer = io.BytesIO()
        Image.fromarray(example["image"]).save(buffer, format="PNG")
        images.append(buffer.getvalue())
    server = DemoServer(predictor, "127.0.0.1", 0)
    server.serve_in_thread()
    address = server.httpd.server_address

    def post(body: bytes) -> tuple[int, int]:
        connection = http.client.HTTPConnection(*address, timeout=120)
        try:
            connection.request("POST", "/predict", body=body)
            reply = connection.getresponse()
            data = reply.read()
            return reply.status, len(json.loads(data).get("instances", [])) if reply.status == 200 else 0
        finally:
            connection.close()

    start = time.monotonic()
    for body in images:                        # compiles for each canvas the images need
        post(body)
    warmup_s = time.monotonic() - start
    latencies, errors, counts = [], [], []
    lock = threading.Lock()
    per_client = [args.requests // args.clients + (k < args.requests % args.clients) for k in range(args.clients)]

    def client(k: int, n: int) -> None:
        for i in range(n):
            t = time.monotonic()
            try:
                status, instances = post(images[(k + i) % len(images)])
            except Exception as e:  # noqa: BLE001 - counted, not raised
                status, instances = repr(e), 0
            with lock:
                latencies.append(time.monotonic() - t)
                counts.append(instances)
                if status != 200:
                    errors.append(status)

    start = time.monotonic()
    threads = [threading.Thread(target=client, args=(k, n)) for k, n in enumerate(per_client)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - start
    server.close()
    result = {"config": args.config, "workdir": args.workdir or None, "clients": args.clients,
              "requests": len(latencies), "errors": len(errors), "error_statuses": sorted(set(map(str, errors))),
              "p50_ms": 1e3 * float(np.percentile(latencies, 50)), "p99_ms": 1e3 * float(np.percentile(latencies, 99)),
              "max_ms": 1e3 * max(latencies), "requests_per_s": len(latencies) / wall, "wall_s": wall,
              "warmup_s": warmup_s, "instances_per_reply": float(np.mean(counts)), "max_in_flight": MAX_IN_FLIGHT,
              "model_runs": server.predictions}
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
