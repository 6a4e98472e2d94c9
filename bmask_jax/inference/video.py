"""Video in --mode predict: a clip is decoded frame by frame, predicted in batches on the
Predictor, and written back annotated (masks, boxes, labels, boundaries, as the pictures),
with one JSON line per predicted frame.

PyAV (`pip install -e '.[video]'`) decodes and encodes: it binds FFmpeg's libraries
directly and its wheels carry them (H.264 included), so there is no ffmpeg executable to
find, and decoding errors arrive as exceptions at the frame where they happen, which is what
lets a damaged file keep the frames before the damage. imageio's ffmpeg plugin pipes raw
frames through an ffmpeg subprocess: one more moving part, and errors that surface as a
short read.
"""
from __future__ import annotations

import fractions
import json
import logging
import os

import numpy as np

from bmask_jax.errors import MissingExtraError

VIDEO_EXTENSIONS = (".mp4", ".mov", ".avi", ".mkv", ".webm")


def is_video(path: str) -> bool:
    return path.lower().endswith(VIDEO_EXTENSIONS)


def require_av() -> None:
    """Raises MissingExtraError (one line: what to install) where PyAV is not importable."""
    _import_av()


def _import_av():
    try:
        import av
    except ImportError as e:
        raise MissingExtraError("predicting on videos needs PyAV: pip install -e '.[video]' (or pip install av)") from e
    return av


def predict_video(path: str, output_dir: str, predictor, frame_stride: int = 1, max_frames: int = 0,
                  min_picture_size: int = 0, outputs: tuple[str, str] | None = None,
                  max_pixels: int = 0) -> tuple[dict, str | None]:
    """Predicts every `frame_stride`-th frame of the video at `path` (at most `max_frames` of
    them; 0: all) and writes `<stem>.mp4` (H.264, upright: a rotation the file declares is
    applied, as images get their EXIF orientation; each frame at its own time, so a clip with a
    variable frame rate keeps its timing and a stride keeps the duration) and `<stem>.jsonl` (a
    line per predicted frame: frame index, its time in the file, instances as COCO-style
    results with class names) into output_dir (or the two file names `outputs`,
    predict.output_names' distinct ones). A video whose frames have more than `max_pixels`
    pixels (predict.max_image_pixels; 0: no limit) is refused before decoding. Returns
    ({"video", "frames_jsonl", "frames"}, error or None): a file that cannot be opened, or that
    breaks off, keeps what was written before and returns the error, naming the file and the
    frame where decoding stopped."""
    from tqdm import tqdm

    from bmask_jax.ops.masks import masks_to_rle
    from bmask_jax.evaluation.visualize import draw_instances
    stem = os.path.splitext(os.path.basename(path))[0]
    video_out, jsonl_out = (os.path.join(output_dir, name) for name in (outputs or (f"{stem}.mp4", f"{stem}.jsonl")))
    done = {"video": video_out, "frames_jsonl": jsonl_out, "frames": 0}
    try:
        av = _import_av()
    except ImportError as e:                 # the images of the same run are still predicted
        return done, f"cannot read video {path}: {e}"
    try:
        source = av.open(path)
    except (av.FFmpegError, OSError) as e:
        return done, f"cannot read video {path}: {e if str(e) else type(e).__name__}"
    if not source.streams.video:
        source.close()
        return done, f"cannot read video {path}: it holds no video stream"
    stream = source.streams.video[0]
    rate = stream.average_rate or stream.guessed_rate or fractions.Fraction(25)
    width, height = stream.codec_context.width, stream.codec_context.height
    if max_pixels and width * height > max_pixels:
        source.close()
        return done, (f"cannot read video {path}: its frames are {width}x{height}, {width * height} pixels each, "
                      f"more than predict.max_image_pixels={max_pixels}")
    # Frames the file says it holds: counted in its header (mp4), else its duration times the
    # rate (mkv, webm); 0 where it says neither. A file that ends sooner was cut short.
    duration_s = (float(stream.duration * stream.time_base) if stream.duration else
                  source.duration / 1e6 if source.duration else 0.0)
    declared = stream.frames or int(round(duration_s * float(rate)))
    total = -(-declared // frame_stride) if declared else None
    if max_frames:
        total = min(total, max_frames) if total else max_frames
    time_base = stream.time_base or fractions.Fraction(1, 90000)
    sink = av.open(video_out, "w")
    writer = {}                    # the output stream, made for the first (upright) frame's size
    error, index, pending, bounded, first_pts = None, -1, [], False, None

    def open_output(h: int, w: int):
        out = sink.add_stream("libx264", rate=fractions.Fraction(rate) / frame_stride)
        # 4:2:0 chroma needs even sides: an odd one is encoded one pixel shorter.
        out.width, out.height = w - w % 2, h - h % 2
        out.pix_fmt = "yuv420p"
        out.codec_context.time_base = time_base     # frames keep the input's timestamps
        return out

    def flush():
        instances = predictor.predict_arrays([image for *_, image in pending])
        for (k, seconds, pts, image), inst in zip(pending, instances):
            drawn = draw_instances(image, inst["boxes"], inst["classes"], inst["scores"], inst["masks"],
                                   predictor.class_names, inst.get("boundaries"))
            if "stream" not in writer:
                writer["stream"] = open_output(*drawn.shape[:2])
            out = writer["stream"]
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(drawn[:out.height, :out.width]), format="rgb24")
            frame.pts, frame.time_base = pts, time_base
            for packet in out.encode(frame):
                sink.mux(packet)
            results = []
            for box, score, cls, name, rle in zip(inst["boxes"], inst["scores"], inst["classes"],
                                                  inst["class_names"], masks_to_rle(inst["masks"])):
                x1, y1, x2, y2 = (float(v) for v in box)
                results.append({"bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(score),
                                "category_id": int(predictor.category_ids[int(cls)]), "class_name": name,
                                "segmentation": rle})
            jsonl.write(json.dumps({"frame": k, "time_s": seconds, "instances": results}) + "\n")
            done["frames"] += 1
            bar.update(1)
        pending.clear()

    with open(jsonl_out, "w") as jsonl, tqdm(total=total, desc=os.path.basename(path), unit="frame") as bar:
        try:
            for index, frame in enumerate(source.decode(stream)):
                if index % frame_stride:
                    continue
                if max_frames and done["frames"] + len(pending) >= max_frames:
                    bounded = True
                    break
                # Each frame at its own time (a variable frame rate is kept), counted from the
                # first: index / rate is right only at a constant rate.
                pts = frame.pts if frame.pts is not None else round(index / rate / time_base)
                first_pts = pts if first_pts is None else first_pts
                seconds = float((pts - first_pts) * time_base)
                image = frame.to_ndarray(format="rgb24")
                turns = round((frame.rotation or 0) / 90) % 4      # the display matrix, counter-clockwise
                pending.append((index, seconds, pts - first_pts, np.ascontiguousarray(np.rot90(image, turns))))
                if len(pending) >= predictor.batch_size:
                    flush()
        except (av.FFmpegError, EOFError, OSError) as e:
            error = f"video {path}: decoding stopped after frame {index} ({e}); the {done['frames'] + len(pending)} frame(s) before it are kept"
        if pending:
            flush()
    if error is None and index < 0:
        error = f"cannot read video {path}: it holds no frame that could be decoded"
    elif error is None and not bounded and index + 1 < declared - 1:    # a frame of rounding allowed
        error = (f"video {path}: it declares {declared} frames but decoding stopped after {index + 1} "
                 f"(truncated?); the {done['frames']} predicted frame(s) before it are kept")
    if "stream" in writer:
        for packet in writer["stream"].encode():          # the encoder's buffered frames
            sink.mux(packet)
    sink.close()
    source.close()
    if "stream" not in writer:                 # not a frame: no empty files left behind
        for name in (video_out, jsonl_out):
            if os.path.exists(name):
                os.remove(name)
    if error:
        logging.error("%s", error)
    return done, error
