"""The ML backend without Label Studio: prompts from its contexts, cached embeddings, click refinement,
the HTTP endpoints, and the annotation journal the webhook fills."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sam_train.engine import brush_rle
from sam_train.engine import labelstudio as ls
from sam_train.engine.interactive import EmbeddingStore, InteractiveSegmenter, previous_prompt
from sam_train.engine.journal import AnnotationJournal
from sam_train.engine.loop import current_model
from sam_train.engine.mlbackend import (Backend, ImageSource, ModelSource, Served, context_prompt, model_version,
                                        read_tags, served_version)
from sam_train.engine.records import Prompt
from sam_train.model import build_sam, export_official
from tests.conftest import perturb_all_weights_
from tests.engine.conftest import serving_backend

H, W = 90, 120


def scene(seed: int = 0) -> np.ndarray:
    """A dark textured image with one bright ellipse."""
    rng = np.random.default_rng(seed)
    pixels = rng.normal(60, 12, (H, W, 3)).clip(0, 255).astype(np.uint8)
    yy, xx = np.mgrid[:H, :W]
    pixels[((yy - 45) / 25) ** 2 + ((xx - 55) / 35) ** 2 <= 1] = (200, 120, 40)
    return pixels


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def keypoint(x: float, y: float, positive: bool = True, width: int = W, height: int = H) -> dict:
    return {"id": f"k{x}-{y}", "type": "keypointlabels", "from_name": ls.CLICK, "to_name": ls.IMAGE,
            "original_width": width, "original_height": height, "image_rotation": 0, "is_positive": positive,
            "value": {"x": 100 * x / width, "y": 100 * y / height, "width": 0.5, "keypointlabels": ["object"]}}


def rectangle(x0: float, y0: float, x1: float, y1: float) -> dict:
    return {"id": "r", "type": "rectanglelabels", "from_name": ls.DRAG, "to_name": ls.IMAGE, "original_width": W,
            "original_height": H, "image_rotation": 0,
            "value": {"x": 100 * x0 / W, "y": 100 * y0 / H, "width": 100 * (x1 - x0) / W,
                      "height": 100 * (y1 - y0) / H, "rotation": 0, "rectanglelabels": ["object"]}}


@pytest.fixture(scope="module")
def tiny():
    return build_sam("tiny", pretrained=True)


def test_context_becomes_a_prompt_in_pixels():
    prompt, width, height, label = context_prompt({"result": [rectangle(12, 9, 60, 45), keypoint(30, 18),
                                                              keypoint(6, 3, positive=False)]}, "task 7")
    assert (width, height, label) == (W, H, "object")
    assert np.allclose(prompt.points, [(30, 18), (6, 3)])
    assert prompt.labels == (1, 0)
    assert prompt.box == pytest.approx((12, 9, 60, 45))
    bad = [
        ({"result": []}, "no regions"),
        ({"result": [{**rectangle(1, 1, 5, 5), "value": {**rectangle(1, 1, 5, 5)["value"], "rotation": 30}}]}, "rotated"),
        ({"result": [{**keypoint(1, 1), "type": "polygonlabels"}]}, "not a prompt"),
        ({"result": [keypoint(1, 1), keypoint(2, 2, width=W + 1)]}, "differs from the first region"),
        ({"result": [{**keypoint(1, 1), "value": {"x": 140, "y": 3}}]}, "percentage"),
    ]
    for context, message in bad:
        with pytest.raises(ValueError, match=message) as caught:
            context_prompt(context, "task 7")
        assert "task 7" in str(caught.value)


def test_labelling_configs_name_our_tags():
    tags = read_tags(ls.ASSISTED_LABEL_CONFIG)
    assert (tags.brush, tags.image, tags.data_key, tags.label) == (ls.MASK, ls.IMAGE, "image", "object")
    with pytest.raises(ValueError, match="no BrushLabels"):
        read_tags('<View><Image name="i" value="$img"/><KeyPointLabels name="k" toName="i"/></View>')
    with pytest.raises(ValueError, match="not XML"):
        read_tags("<View>")


def test_clicks_refine_with_the_previous_logits(tiny):
    segmenter = InteractiveSegmenter(EmbeddingStore(tiny))
    pixels = scene()
    load = lambda: (pixels, png(pixels))  # noqa: E731
    first = Prompt(points=((55.0, 45.0),), labels=(1,))
    second = Prompt(points=((55.0, 45.0), (110.0, 80.0)), labels=(1, 0))
    assert previous_prompt(second) == first and previous_prompt(first) is None
    a1 = segmenter.segment("img", load, first)
    a2 = segmenter.segment("img", load, second)
    assert (a1.encoded, a1.refined, a2.encoded, a2.refined) == (True, False, False, True)
    # The same two clicks by hand: the first answer's best low-res logits as the second's mask prompt.
    predictor = segmenter.store.predictor
    masks, scores, low_res = predictor.predict(np.array([[55.0, 45.0]]), np.array([1]), multimask_output=True)
    best = int(np.argmax(scores))
    assert np.array_equal(a1.mask, masks[best])
    masks2, _, _ = predictor.predict(np.array([[55.0, 45.0], [110.0, 80.0]]), np.array([1, 0]),
                                     mask_input=low_res[best : best + 1], multimask_output=False)
    assert np.array_equal(a2.mask, masks2[0])
    with pytest.raises(ValueError, match="outside the 120 x 90 image"):
        segmenter.segment("img", load, Prompt(points=((130.0, 5.0),), labels=(1,)))
    with pytest.raises(ValueError, match="no positive point"):
        segmenter.segment("img", load, Prompt(points=((5.0, 5.0),), labels=(0,)))


def test_embeddings_come_from_memory_then_disk_and_belong_to_their_encoder(tiny, tmp_path: Path):
    images = {name: scene(seed) for name, seed in (("a", 1), ("b", 2))}
    loads = []

    def loader(name):
        def load():
            loads.append(name)
            return images[name], png(images[name])
        return load

    click = Prompt(points=((55.0, 45.0),), labels=(1,))
    store = EmbeddingStore(tiny, tmp_path, capacity=1)
    segmenter = InteractiveSegmenter(store)
    first = segmenter.segment("a", loader("a"), click)
    assert segmenter.segment("a", loader("a"), click).encoded is False and loads == ["a"], "memory hit: no fetch"
    segmenter.segment("b", loader("b"), click)  # evicts a (capacity 1)
    again = segmenter.segment("a", loader("a"), click)
    assert loads == ["a", "b", "a"] and not again.encoded and store.encoded == 2, "a came back from disk"
    assert np.array_equal(first.mask, again.mask)
    # A restarted backend reads the disk cache; another encoder never does.
    fresh = EmbeddingStore(tiny, tmp_path)
    assert fresh.embed("a", loader("a")) is False
    other = perturb_all_weights_(build_sam("tiny", pretrained=True), seed=3)
    assert EmbeddingStore(other, tmp_path).embed("a", loader("a")) is True
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 2
    broken = store.folder / f"{hashlib.sha256(png(images['a'])).hexdigest()}.safetensors"
    broken.write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match=broken.name):
        EmbeddingStore(tiny, tmp_path).embed("a", loader("a"))


def test_a_bounded_disk_cache_drops_the_least_recently_used_embeddings(tiny, tmp_path: Path):
    images = {name: scene(seed) for name, seed in (("a", 1), ("b", 2), ("c", 3))}

    def loader(name):
        return lambda: (images[name], png(images[name]))

    probe = EmbeddingStore(tiny, tmp_path / "probe")
    probe.embed("a", loader("a"))
    one = next(probe.folder.iterdir()).stat().st_size  # every tiny embedding has the same size
    # Room for two embeddings (of any encoder), not three; memory holds one image, so hits come from disk.
    store = EmbeddingStore(tiny, tmp_path / "cache", capacity=1, disk_limit_mb=2.5 * one / 2**20)
    assert [store.embed(name, loader(name)) for name in "ab"] == [True, True]
    assert store.embed("a", loader("a")) is False, "a from disk, now the most recently used"
    assert store.embed("c", loader("c")) is True
    cached = {p.name for p in store.folder.iterdir()}
    digest = {name: f"{hashlib.sha256(png(images[name])).hexdigest()}.safetensors" for name in images}
    assert cached == {digest["a"], digest["c"]}, "b, the least recently used, was deleted"
    assert store.embed("b", loader("b")) is True, "an evicted embedding is computed again"
    assert {p.name for p in store.folder.iterdir()} == {digest["c"], digest["b"]}
    with pytest.raises(ValueError, match="disk_limit_mb must be positive"):
        EmbeddingStore(tiny, tmp_path, disk_limit_mb=0)


def test_images_come_only_from_allowed_places(tmp_path: Path):
    pixels = scene()
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "a.png").write_bytes(png(pixels))
    (tmp_path / "secret.png").write_bytes(png(pixels))
    source = ImageSource(roots=[allowed])
    assert np.array_equal(source.load(str(allowed / "a.png"), "task 1")[0], pixels)
    for sneaky in (str(allowed / ".." / "secret.png"), "/data/upload/1/a.png", "secret.png"):
        with pytest.raises(ValueError, match="task 2: cannot read .*not under an allowed folder"):
            source.load(sneaky, "task 2")
    with pytest.raises(ValueError, match="malformed data: URI"):
        source.load("data:image/png;base64,@@@", "task 3")
    with pytest.raises(ValueError, match="task 4.*corrupt or unsupported image"):
        source.load("data:image/png;base64," + base64.b64encode(b"not an image").decode(), "task 4")


def call(url: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_the_http_protocol(tiny, tmp_path: Path):
    pixels = scene()
    journal = AnnotationJournal(tmp_path / "annotations.jsonl")
    served = Served(InteractiveSegmenter(EmbeddingStore(tiny)), "v-test")
    backend = Backend(lambda: served, ImageSource(), journal)
    with serving_backend(backend) as url:
        assert call(url, "/health") == (200, {"status": "UP", "model_class": "sam-train", "model_version": "v-test"})
        assert call(url, "/setup", {"schema": ls.ASSISTED_LABEL_CONFIG, "project": "1.1"}) == (200, {"model_version": "v-test"})
        status, reply = call(url, "/setup", {"schema": "<View/>"})
        assert status == 400 and "BrushLabels" in reply["error"]

        task = {"id": 5, "data": {"image": "data:image/png;base64," + base64.b64encode(png(pixels)).decode()}}
        body = {"tasks": [task], "label_config": ls.ASSISTED_LABEL_CONFIG,
                "params": {"context": {"result": [keypoint(55, 45)]}}}
        status, reply = call(url, "/predict", body)
        assert status == 200
        (prediction,) = reply["results"]
        (region,) = prediction["result"]
        assert (region["type"], region["from_name"], region["to_name"]) == ("brushlabels", ls.MASK, ls.IMAGE)
        assert (region["original_width"], region["original_height"]) == (W, H)
        expected = InteractiveSegmenter(EmbeddingStore(tiny)).segment("x", lambda: (pixels, b""),
                                                                        Prompt(points=((55.0, 45.0),), labels=(1,)))
        assert np.array_equal(brush_rle.decode(region["value"]["rle"], H, W), expected.mask)
        assert prediction["score"] == pytest.approx(expected.score, abs=1e-6)

        status, reply = call(url, "/predict", {"tasks": [task, task], "label_config": ls.ASSISTED_LABEL_CONFIG})
        assert status == 200 and [r["result"] for r in reply["results"]] == [[], []], "no context: nothing to segment"
        status, reply = call(url, "/predict", {**body, "params": {"context": {"result": [keypoint(55, 45, width=W * 2)]}}})
        assert status == 400 and "task 5" in reply["error"] and "240 x 90" in reply["error"]
        assert call(url, "/nothing", {})[0] == 404

        event = {"action": "ANNOTATION_CREATED", "task": {"id": 5, "data": {"key": "k"}},
                 "annotation": {"id": 9, "result": []}, "project": {"id": 1}}
        assert call(url, "/webhook", event) == (200, {"status": "ok", "recorded": True})
        assert call(url, "/webhook", {"action": "PROJECT_UPDATED", "project": {}}) == (200, {"status": "ok", "recorded": False})
        status, reply = call(url, "/webhook", {"action": "ANNOTATION_CREATED", "task": {"id": 5}})
        assert status == 400 and "without its annotation" in reply["error"]
        assert [e["annotation"]["id"] for e in journal.entries()] == [9]


def test_a_served_engine_folder_moves_to_each_new_round_model(tiny, tmp_path: Path):
    engine = tmp_path / "work"
    export_official(tiny, engine / "models" / "initial.pth")
    made = []

    def segmenter(model):
        made.append(model)
        return InteractiveSegmenter(EmbeddingStore(model, tmp_path / "embeddings"))

    source = ModelSource("tiny", lambda: current_model(engine), segmenter)
    backend = Backend(source, ImageSource(), AnnotationJournal(tmp_path / "annotations.jsonl"))
    with serving_backend(backend) as url:
        first = source()
        assert source() is first and len(made) == 1, "nothing changed: nothing reloaded"
        assert served_version(url) == first.version == model_version("tiny", tiny)
        retrained = perturb_all_weights_(build_sam("tiny", pretrained=True), seed=4)
        export_official(retrained, engine / "rounds" / "r001" / "model.pth")  # the engine trained round 1
        assert served_version(url) == model_version("tiny", retrained) != first.version
        second = source()
        assert len(made) == 2 and second.segmenter.store.encoder_id != first.segmenter.store.encoder_id
        click = Prompt(points=((55.0, 45.0),), labels=(1,))
        answer = second.segmenter.segment("x", lambda: (scene(), png(scene())), click)
        expected = InteractiveSegmenter(EmbeddingStore(retrained)).segment("x", lambda: (scene(), b""), click)
        assert np.array_equal(answer.mask, expected.mask), "clicks are answered by the new round's model"
    with pytest.raises(ValueError, match="does not answer /health"):
        served_version(url, timeout=2)


def test_annotation_journal_keeps_each_tasks_latest_annotations(tmp_path: Path):
    journal = AnnotationJournal(tmp_path / "annotations.jsonl")
    task = {"id": 1, "data": {"key": "a"}, "predictions": [3]}
    journal.record({"action": "ANNOTATION_CREATED", "task": task, "annotation": {"id": 10, "result": [1]}})
    journal.record({"action": "ANNOTATION_CREATED", "task": {"id": 2, "data": {"key": "b"}}, "annotation": {"id": 11}})
    journal.record({"action": "ANNOTATION_UPDATED", "task": task, "annotation": {"id": 10, "result": [2]}})
    journal.record({"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 11}]})
    with open(journal.path, "ab") as f:
        f.write(b'{"action": "ANNOTATION_CRE')  # a write torn by kill -9: ignored, then cut
    tasks = journal.tasks()
    assert [(t["id"], [a["id"] for a in t["annotations"]]) for t in tasks] == [(1, [10]), (2, [])]
    assert tasks[0]["annotations"][0]["result"] == [2] and "predictions" not in tasks[0]
    journal.record({"action": "ANNOTATION_CREATED", "task": task, "annotation": {"id": 12}})
    assert len(journal.entries()) == 5


def test_serve_command_refuses_a_missing_checkpoint(tmp_path: Path, capsys):
    from sam_train.cli import main

    assert main(["serve", str(tmp_path / "missing.pth"), "--workdir", str(tmp_path)]) == 2
    assert "missing.pth" in capsys.readouterr().err
