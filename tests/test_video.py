"""Videos in --mode predict: a clip the test writes (shapes moving across frames) comes back
annotated at its size and frame rate, with one JSON line per frame whose instances are the
Predictor's on the same decoded frames; a truncated clip keeps what was done and fails."""
import fractions
import json
import os

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from bmask_jax.data.synthetic import SyntheticShapes
from bmask_jax.inference.predict import predict
from bmask_jax.inference.predictor import Predictor
from helpers import fresh_checkpoint, tiny_config

pytestmark = pytest.mark.slow      # compiles a detector for tens of seconds

av = pytest.importorskip("av", reason="PyAV (pip install -e '.[video]') decodes and encodes videos")

H, W, FPS, FRAMES = 64, 96, 12, 10


def write_clip(path, frames=FRAMES, fps=FPS):
    """Shapes from the embedded dataset on a background, sliding right 3 px a frame."""
    shapes = SyntheticShapes("val", num_images=1, image_size=(H, H), seed=3)[0]["image"]
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        for t in range(frames):
            canvas = np.full((H, W, 3), 30, np.uint8)
            x = min(3 * t, W - H)
            canvas[:, x:x + H] = shapes
            for packet in stream.encode(av.VideoFrame.from_ndarray(canvas, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def decoded_frames(path):
    with av.open(str(path)) as f:
        return [frame.to_ndarray(format="rgb24") for frame in f.decode(video=0)]


def config_for(inputs="", **predict):
    """The tiny model on the clip's 64x96 canvas, every detection kept (fresh weights)."""
    c = tiny_config()
    c.data.update(test_short_side=64, max_size=96, canvas_buckets=((64, 96),))
    c.model.roi_heads.score_threshold = 0.0
    c.predict.update(inputs=str(inputs), score_threshold=0.0, **predict)
    return c


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
    """A workdir holding a step-0 checkpoint of config_for()'s model."""
    return fresh_checkpoint(config_for(), str(tmp_path_factory.mktemp("video") / "run"))


def test_video_is_predicted_frame_by_frame(trained_workdir, tmp_path):
    clip = tmp_path / "clip.mp4"
    write_clip(clip)
    c = config_for(clip)
    out_dir = tmp_path / "out"
    _, failures = predict(c, trained_workdir, str(out_dir))
    assert failures == []
    with av.open(str(out_dir / "clip.mp4")) as f:
        stream = f.streams.video[0]
        assert (stream.codec_context.width, stream.codec_context.height) == (W, H)
        assert stream.average_rate == fractions.Fraction(FPS)
        assert sum(1 for _ in f.decode(video=0)) == FRAMES
    lines = [json.loads(x) for x in open(out_dir / "clip.jsonl")]
    assert [x["frame"] for x in lines] == list(range(FRAMES))
    assert lines[3]["time_s"] == pytest.approx(3 / FPS)
    # The Predictor on the same decoded frames gives the same instances.
    predictor = Predictor(c, trained_workdir, score_threshold=0.0)
    expected = predictor(decoded_frames(clip))
    assert sum(len(x["instances"]) for x in lines) > 0
    for line, want in zip(lines, expected):
        got = line["instances"]
        assert [r["class_name"] for r in got] == list(want["class_names"])
        np.testing.assert_allclose([r["score"] for r in got], want["scores"], atol=1e-5)
        np.testing.assert_allclose([[x, y, x + w, y + h] for x, y, w, h in (r["bbox"] for r in got)],
                                   want["boxes"].reshape(-1, 4), atol=1e-3)
        for r, mask in zip(got, want["masks"]):
            assert (mask_utils.decode(r["segmentation"]).astype(bool) != mask).sum() == 0


def test_stride_and_max_frames_bound_a_long_video(trained_workdir, tmp_path):
    clip = tmp_path / "long.mkv"
    write_clip(clip, frames=12)
    _, failures = predict(config_for(clip, frame_stride=3, max_frames=3), trained_workdir, str(tmp_path / "out"))
    assert failures == []
    assert [json.loads(x)["frame"] for x in open(tmp_path / "out" / "long.jsonl")] == [0, 3, 6]
    with av.open(str(tmp_path / "out" / "long.mp4")) as f:
        assert f.streams.video[0].average_rate == fractions.Fraction(FPS, 3)     # the clip keeps its pace
        assert sum(1 for _ in f.decode(video=0)) == 3


def test_a_truncated_video_keeps_its_frames_and_fails(trained_workdir, tmp_path):
    """An mkv cut where its 11th packet starts: the frames before the cut are predicted and
    written, the file is listed as failed with where decoding stopped, and an image beside it
    is still predicted."""
    whole = tmp_path / "whole.mkv"
    write_clip(whole, frames=20)
    with av.open(str(whole)) as f:
        cut_at = [p.pos for p in f.demux(video=0) if p.size][10]
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "cut.mkv").write_bytes(whole.read_bytes()[:cut_at])
    from PIL import Image
    Image.fromarray(decoded_frames(whole)[0]).save(inputs / "frame.png")
    out_dir = tmp_path / "out"
    path, failures = predict(config_for(inputs), trained_workdir, str(out_dir))
    assert [f["file"] for f in failures] == [str(inputs / "cut.mkv")]
    assert "cut.mkv" in failures[0]["error"] and "kept" in failures[0]["error"]
    kept = [json.loads(x) for x in open(out_dir / "cut.jsonl")]
    assert 0 < len(kept) < 20
    with av.open(str(out_dir / "cut.mp4")) as f:
        assert sum(1 for _ in f.decode(video=0)) == len(kept)
    assert {p["file_name"] for p in json.load(open(path))} == {"frame.png"}
    assert os.path.exists(out_dir / "frame.png")
    # Not a video at all, named as one: one failure naming it.
    (inputs / "cut.mkv").write_bytes(b"not a video")
    _, failures = predict(config_for(inputs / "cut.mkv"), trained_workdir, str(tmp_path / "out2"))
    assert len(failures) == 1 and "cannot read video" in failures[0]["error"]


def md5_of(path):
    import hashlib
    return hashlib.md5(open(path, "rb").read()).hexdigest()


def photo(path):
    from PIL import Image
    shapes = SyntheticShapes("val", num_images=1, image_size=(H, W), seed=4)[0]["image"]
    Image.fromarray(shapes).save(path, format="PNG" if str(path).endswith(".png") else "JPEG")


@pytest.mark.parametrize("inputs, outputs", [
    # The output folder is the input folder: nothing given is replaced.
    (["clip.mp4", "photo.png"], ["clip.mp4.jsonl", "clip.mp4.mp4", "photo.png.png"]),
    # Two videos of one stem: each keeps its own video and JSON lines.
    (["clip.mp4", "clip.mov"], ["clip.mov.jsonl", "clip.mov.mp4", "clip.mp4.jsonl", "clip.mp4.mp4"]),
    # An input named as another input's picture would be.
    (["a.jpg", "a.jpg.png"], ["a.jpg.png.png", "a.png"]),
])
def test_predict_never_overwrites_an_input_or_another_output(trained_workdir, tmp_path, inputs, outputs):
    for name in inputs:
        (write_clip if name.endswith((".mp4", ".mov")) else photo)(tmp_path / name)
    before = {name: md5_of(tmp_path / name) for name in inputs}
    path, failures = predict(config_for(tmp_path), trained_workdir, str(tmp_path))
    assert failures == [] and path == str(tmp_path / "predictions.json")
    assert {name: md5_of(tmp_path / name) for name in inputs} == before
    assert sorted(os.listdir(tmp_path)) == sorted(inputs + outputs + ["predictions.json"])
    for name in outputs:
        if name.endswith(".mp4"):
            assert len(decoded_frames(tmp_path / name)) == FRAMES
        elif name.endswith(".jsonl"):
            assert len(open(tmp_path / name).readlines()) == FRAMES
    pictured = {r["file_name"] for r in json.load(open(path))}
    assert pictured <= {n for n in inputs if not n.endswith((".mp4", ".mov"))}


def test_a_variable_frame_rate_clip_keeps_its_times(trained_workdir, tmp_path):
    """Frames at 0, .04, .08, .5, 1.0 ... 3.0 s: each JSON line has its frame's own time, and the
    annotated clip shows each frame at that time (not re-timed to a constant rate)."""
    times = [0, .04, .08, .5, 1.0, 1.5, 2.0, 2.5, 3.0]
    clip = tmp_path / "vfr.mp4"
    with av.open(str(clip), "w") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.codec_context.time_base = fractions.Fraction(1, 1000)
        for t in times:
            frame = av.VideoFrame.from_ndarray(np.full((H, W, 3), 40, np.uint8), format="rgb24")
            frame.pts, frame.time_base = round(t * 1000), fractions.Fraction(1, 1000)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    _, failures = predict(config_for(clip), trained_workdir, str(tmp_path / "out"))
    assert failures == []
    lines = [json.loads(x) for x in open(tmp_path / "out" / "vfr.jsonl")]
    assert [x["time_s"] for x in lines] == pytest.approx(times, abs=1e-3)
    with av.open(str(tmp_path / "out" / "vfr.mp4")) as f:
        assert [float(frame.time) for frame in f.decode(video=0)] == pytest.approx(times, abs=1e-3)


def test_a_rotated_clip_is_predicted_and_written_upright(trained_workdir, tmp_path):
    """A clip whose display matrix turns it 90 degrees counter-clockwise (a phone held upright):
    the frames are turned before the model sees them, as images get their EXIF orientation."""
    clip = tmp_path / "upright.mp4"
    with av.open(str(clip), "w") as out:
        stream = out.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.set_display_rotation(90)
        shapes = SyntheticShapes("val", num_images=1, image_size=(H, H), seed=3)[0]["image"]
        for t in range(3):
            canvas = np.full((H, W, 3), 30, np.uint8)
            canvas[:, 3 * t:3 * t + H] = shapes
            for packet in stream.encode(av.VideoFrame.from_ndarray(canvas, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    c = config_for(clip)
    c.data.canvas_buckets = ((64, 96), (96, 64))
    _, failures = predict(c, trained_workdir, str(tmp_path / "out"))
    assert failures == []
    with av.open(str(tmp_path / "out" / "upright.mp4")) as f:
        stream = f.streams.video[0]
        assert (stream.codec_context.width, stream.codec_context.height) == (H, W)      # turned
    upright = [np.ascontiguousarray(np.rot90(frame, 1)) for frame in decoded_frames(clip)]
    expected = Predictor(c, trained_workdir, score_threshold=0.0)(upright)
    lines = [json.loads(x) for x in open(tmp_path / "out" / "upright.jsonl")]
    assert sum(len(x["instances"]) for x in lines) > 0
    for line, want in zip(lines, expected):
        np.testing.assert_allclose([[x, y, x + w, y + h] for x, y, w, h in (r["bbox"] for r in line["instances"])],
                                   want["boxes"].reshape(-1, 4), atol=1e-3)


def test_videos_that_cannot_be_predicted_say_why_in_one_line(trained_workdir, tmp_path):
    audio = tmp_path / "audio.mp4"
    with av.open(str(audio), "w") as out:
        stream = out.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    big = tmp_path / "big.mp4"
    write_clip(big, frames=2)
    _, failures = predict(config_for(f"{audio},{big}", max_image_pixels=H * W - 1), trained_workdir,
                          str(tmp_path / "out"))
    errors = {os.path.basename(f["file"]): f["error"] for f in failures}
    assert errors == {
        "audio.mp4": f"cannot read video {audio}: it holds no video stream",
        "big.mp4": f"cannot read video {big}: its frames are {W}x{H}, {W * H} pixels each, more than "
                   f"predict.max_image_pixels={H * W - 1}"}
    assert sorted(os.listdir(tmp_path / "out")) == ["failed_images.json", "predictions.json"]


def test_a_large_frame_video_is_refused_from_its_header_in_bounded_memory(tmp_path):
    """A 6000x6000 clip (108 MB a decoded RGB frame) with predict.max_image_pixels below it:
    refused before a frame is decoded. Peak RSS of a process that runs predict_video on it,
    against one that only imports the same modules and opens the file."""
    import subprocess
    import sys
    clip = tmp_path / "big.mp4"
    with av.open(str(clip), "w") as out:
        stream = out.add_stream("mpeg4", rate=1)
        stream.width, stream.height, stream.pix_fmt = 6000, 6000, "yuv420p"
        for packet in stream.encode(av.VideoFrame.from_ndarray(np.zeros((6000, 6000, 3), np.uint8), format="rgb24")):
            out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    script = f"""
import resource, sys, av
from bmask_jax.inference.video import predict_video
class NoModel:
    batch_size = 1
    def predict_arrays(self, images):
        raise AssertionError("a frame reached the model")
if sys.argv[1] == "predict":
    _, error = predict_video({str(clip)!r}, {str(tmp_path)!r}, NoModel(), max_pixels=10_000_000)
    assert "more than predict.max_image_pixels=10000000" in error, error
else:
    av.open({str(clip)!r}).close()
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""
    peaks = {}
    for mode in ("open", "predict"):
        done = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, check=False,
                              env=dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(__file__))))
        assert done.returncode == 0, done.stderr[-2000:]
        peaks[mode] = int(done.stdout.split()[-1]) / 1024          # MiB
    assert peaks["predict"] - peaks["open"] < 40, peaks           # a decoded frame alone is 103 MiB
