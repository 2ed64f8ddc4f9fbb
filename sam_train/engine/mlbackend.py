"""Our model as a Label Studio ML backend (`sam-train serve CKPT`): clicks in the labelling UI, masks back.

Label Studio calls an ML backend over HTTP (label-studio 1.23, `label_studio/ml/api_connector.py`):

- `GET /health` when it connects, and `POST /setup` with the project's labelling config, its own
  address (`hostname`) and an API token: we keep both to fetch task images from it.
- `POST /predict` with `{"tasks": [...], "label_config", "params": {"context": ...}}`. In
  interactive mode (the backend registered with `is_interactive`) the context holds the smart
  regions a person just placed: keypoints (`is_positive` says positive or negative) and/or a
  rectangle, in percent of the image. We answer `{"results": [{"result": [brush region], "score",
  "model_version"}]}`: the mask in Label Studio's brush RLE under the config's BrushLabels tag.
  Without a context (pre-annotation of a whole batch) there is nothing to segment: each task gets
  an empty prediction (automatic masks come from `sam-train autolabel` and the engine's export).
- `POST /webhook` with every project event (Label Studio adds this webhook when the backend is
  connected). Annotation events are appended to the `AnnotationJournal` and fsynced before we
  answer, so a submitted annotation survives the backend being killed the moment after.

`serve` answers with one checkpoint, or follows an engine work folder (`ModelSource`): SAM
retrained its model six times during the assisted-manual stage, and people keep clicking in the
same Label Studio project while the engine trains the next round's model.

Images are read from where the task says: Label Studio paths (`/data/upload/...`,
`/data/local-files/?d=...`) from the server with the token, `http(s)` URLs, `data:` URIs, and local
files only under the folders given with `--images-root`. Bad requests get HTTP 400 with a message
naming the task and what is wrong; Label Studio shows it to the person.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import urllib.error
import urllib.parse
import urllib.request
import threading
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

from sam_train.engine import labelstudio as ls
from sam_train.engine.amg import decode_image
from sam_train.engine.interactive import Answer, InteractiveSegmenter
from sam_train.engine.journal import AnnotationJournal
from sam_train.engine.records import Prompt
from sam_train.model import Sam, build_sam
from sam_train.model.checkpoint import weights_digest

log = logging.getLogger(__name__)
MAX_BODY = 64 << 20  # bytes: a webhook with a big annotation is a few MB; more is not Label Studio
FETCH_TIMEOUT_S = 60


@dataclass(frozen=True)
class Tags:
    """Where masks go and which task field holds the image, read from a labelling config."""

    brush: str  # BrushLabels name: the from_name of our results
    image: str  # Image name: the to_name
    data_key: str  # the task data field of the image (`$image` -> "image")
    label: str  # the brush label given to our masks unless the prompt carries one the brush tag has
    labels: tuple[str, ...]  # every label of the brush tag


def read_tags(label_config: str | None) -> Tags:
    """The first BrushLabels of the config and the Image it points to (our LABEL_CONFIG when none is given)."""
    try:
        root = ET.fromstring(label_config or ls.LABEL_CONFIG)
    except ET.ParseError as exc:
        raise ValueError(f"the project's labelling config is not XML ({exc})") from exc
    brush = next(iter(root.iter("BrushLabels")), None)
    if brush is None:
        raise ValueError("the project's labelling config has no BrushLabels tag: add one for the masks we return")
    to_name = brush.get("toName", "")
    image = next((e for e in root.iter("Image") if e.get("name") == to_name), None)
    if image is None or not (image.get("value") or "").startswith("$"):
        raise ValueError(f"BrushLabels {brush.get('name')!r} points to {to_name!r}, not an <Image value=\"$field\"> tag")
    labels = tuple(e.get("value") for e in brush.iter("Label") if e.get("value"))
    if not labels:
        raise ValueError(f"BrushLabels {brush.get('name')!r} has no Label")
    return Tags(brush.get("name"), to_name, image.get("value")[1:], labels[0], labels)


def context_prompt(context: dict, where: str) -> tuple[Prompt, int, int, str | None]:
    """A Label Studio interactive context -> (prompt in pixels, image width, height, the label chosen if any).

    Every keypoint and the rectangle of the context form one object's prompt, as the person built
    it up click by click; `is_positive` false makes a keypoint negative.
    """
    regions = context.get("result") if isinstance(context, dict) else None
    if not isinstance(regions, list) or not regions:
        raise ValueError(f"{where}: the interactive context has no regions (place a smart keypoint or rectangle)")
    points, labels, box, label, size = [], [], None, None, None
    for n, region in enumerate(regions):
        item = f"{where}, context region {n}"
        if not isinstance(region, dict) or not isinstance(region.get("value"), dict):
            raise ValueError(f"{item}: not a region with a value")
        kind, value = region.get("type"), region["value"]
        here = (_whole(region, "original_width", item), _whole(region, "original_height", item))
        if size is not None and here != size:
            raise ValueError(f"{item}: image size {here} differs from the first region's {size}")
        size = here
        chosen = value.get(kind) if isinstance(kind, str) else None
        label = chosen[0] if isinstance(chosen, list) and chosen and isinstance(chosen[0], str) else label
        if kind == "keypointlabels":
            points.append(ls.keypoint_xy(value, item, *size))
            labels.append(0 if region.get("is_positive", True) is False else 1)
        elif kind == "rectanglelabels":
            if box is not None:
                raise ValueError(f"{item}: a second rectangle; one object's prompt has one box")
            box = ls.rectangle_box(value, item, *size)
        else:
            raise ValueError(f"{item}: {kind!r} is not a prompt (smart keypointlabels or rectanglelabels)")
    return Prompt(box, tuple(points), tuple(labels)), size[0], size[1], label


def answer_result(answer: Answer, tags: Tags, label: str | None, version: str) -> dict:
    """One prediction for Label Studio: the mask as a brush region with the model's predicted IoU."""
    region = ls.brush_result(answer.mask, "sam", label if label in tags.labels else tags.label, score=answer.score)
    region.update(from_name=tags.brush, to_name=tags.image, readonly=False)
    del region["id"]  # Label Studio names the region itself
    return {"result": [region], "score": answer.score, "model_version": version}


class ImageSource:
    """Task image URL -> (pixels, bytes): from Label Studio (token auth), the web, data: URIs or allowed folders."""

    def __init__(self, label_studio_url: str | None = None, token: str | None = None,
                 roots: Sequence[str | os.PathLike] = ()) -> None:
        self.label_studio_url = label_studio_url.rstrip("/") if label_studio_url else None
        self.token = token
        self.roots = [Path(r).resolve() for r in roots]
        self._auth: ls.LabelStudio | None = None

    def connect(self, hostname: str | None, token: str | None) -> None:
        """What `/setup` tells us; settings given on the command line win."""
        self.label_studio_url = self.label_studio_url or (hostname.rstrip("/") if hostname else None)
        self.token = self.token or token

    def load(self, url: str, where: str) -> tuple[np.ndarray, bytes]:
        data = self._bytes(url, where)
        return decode_image(data, f"{where} ({_short(url)})")[0], data

    def _bytes(self, url: str, where: str) -> bytes:
        if not isinstance(url, str) or not url:
            raise ValueError(f"{where}: the task has no image URL")
        if url.startswith("data:"):
            try:
                return base64.b64decode(url.split(",", 1)[1], validate=True)
            except (IndexError, ValueError) as exc:
                raise ValueError(f"{where}: malformed data: URI ({exc})") from exc
        scheme = urllib.parse.urlparse(url).scheme
        if scheme in ("http", "https"):
            same = bool(self.label_studio_url) and url.startswith(self.label_studio_url + "/")
            return self._get(url, where, auth=same)  # our token goes only to Label Studio itself
        if not scheme and any(Path(url).resolve().is_relative_to(root) for root in self.roots):
            try:
                return Path(url).read_bytes()
            except OSError as exc:
                raise ValueError(f"{where}: cannot read {url} ({exc.strerror or exc})") from exc
        if url.startswith("/") and self.label_studio_url:  # /data/upload/..., /data/local-files/?d=...
            return self._get(self.label_studio_url + url, where, auth=True)
        raise ValueError(f"{where}: cannot read {_short(url)}: not a URL, not under an allowed folder"
                         f" ({', '.join(map(str, self.roots)) or 'none: pass --images-root'}), and no Label Studio"
                         " address to resolve it against (pass --label-studio-url, or let Label Studio call /setup)")

    def _get(self, url: str, where: str, auth: bool, renew: bool = False) -> bytes:
        client = self._client() if auth and self.token else None
        try:
            headers = {"Authorization": client.authorization(renew)} if client else {}
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=FETCH_TIMEOUT_S) as reply:
                return reply.read()
        except urllib.error.HTTPError as exc:
            if exc.code == 401 and client and not renew and ls.is_personal_access_token(self.token):
                return self._get(url, where, auth, renew=True)  # the access token expired
            raise ValueError(f"{where}: fetching {_short(url)} -> HTTP {exc.code}"
                             + (" (is the token right? --label-studio-token)" if exc.code in (401, 403) else "")) from None
        except ls.LabelStudioError as exc:  # a personal access token could not be exchanged
            raise ValueError(f"{where}: fetching {_short(url)}: {exc}"
                             " (is the token right? --label-studio-token)") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            raise ValueError(f"{where}: cannot fetch {_short(url)} ({exc})") from None

    def _client(self) -> ls.LabelStudio:
        """A client for the Authorization header: a legacy token as is, a personal access token exchanged."""
        if self._auth is None or (self._auth.url, self._auth.token) != (self.label_studio_url, self.token):
            self._auth = ls.LabelStudio(self.label_studio_url, self.token, timeout=FETCH_TIMEOUT_S)
        return self._auth


def model_version(name: str, model: Sam) -> str:
    """What /health and every prediction report: the model's name and weights digest. It changes
    whenever the model is retrained, so an engine can tell which round's model a backend serves."""
    return f"sam-train-{name}-{weights_digest(model)[:12]}"


def served_version(url: str, timeout: float = 10.0) -> str:
    """The model version a running backend at `url` reports on /health; ValueError if it does not answer."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=timeout) as reply:
            version = json.loads(reply.read()).get("model_version")
    except (OSError, ValueError, AttributeError) as exc:
        raise ValueError(f"the ML backend at {url} does not answer /health: {exc}") from exc
    if not isinstance(version, str):
        raise ValueError(f"the ML backend at {url} reports no model_version on /health")
    return version


@dataclass(frozen=True)
class Served:
    """The model answering now and the version it reports."""

    segmenter: InteractiveSegmenter
    version: str


class ModelSource:
    """The model `serve` answers with, reloaded when its checkpoint file changes.

    `locate` says where the checkpoint is now (None: the built-in weights): a fixed path, or an
    engine work folder's newest round model (`sam_train.engine.loop.current_model`), so the backend
    moves to each round's model as soon as the engine has trained it, without a restart. Calling
    the source costs a stat; loading happens on the first call and after a change.
    """

    def __init__(self, name: str, locate: Callable[[], Path | None], make: Callable[[Sam], InteractiveSegmenter],
                 device: str = "cpu") -> None:
        self.name = name
        self.locate = locate
        self.make = make  # model -> the segmenter answering with it (its own embedding cache: the encoder changed)
        self.device = device
        self._lock = threading.Lock()
        self._stamp: tuple[Path, int] | None = None
        self._served: Served | None = None

    def __call__(self) -> Served:
        with self._lock:
            path = self.locate()
            stamp = None if path is None else (path, path.stat().st_mtime_ns)
            if self._served is None or stamp != self._stamp:
                model = build_sam(self.name, checkpoint=path, pretrained=path is None).to(self.device)
                self._served, self._stamp = Served(self.make(model), model_version(self.name, model)), stamp
                log.info("serving %s from %s", self._served.version, path or "the built-in weights")
            return self._served


class Backend:
    """The protocol's logic, apart from HTTP: what each endpoint answers."""

    def __init__(self, model: Callable[[], Served], images: ImageSource, journal: AnnotationJournal) -> None:
        self.model = model  # called per request: the model may have moved on (`ModelSource`)
        self.images = images
        self.journal = journal
        self._users: dict[int, dict] = {}  # Label Studio user id -> {"id", "email"}

    def health(self) -> dict:
        return {"status": "UP", "model_class": "sam-train", "model_version": self.model().version}

    def setup(self, body: dict) -> dict:
        read_tags(body.get("schema"))  # refuse a project we cannot answer now, not at the first click
        self.images.connect(body.get("hostname"), body.get("access_token"))
        return {"model_version": self.model().version}

    def predict(self, body: dict) -> dict:
        tasks = body.get("tasks")
        if not isinstance(tasks, list):
            raise ValueError("/predict needs a list of tasks")
        served = self.model()
        context = (body.get("params") or {}).get("context")
        if not context:
            return {"results": [{"result": [], "score": 0.0, "model_version": served.version} for _ in tasks]}
        if len(tasks) != 1:
            raise ValueError(f"an interactive request is about one task, got {len(tasks)}")
        tags = read_tags(body.get("label_config"))
        task = tasks[0]
        where = f"task {task.get('id', '?')}"
        prompt, width, height, label = context_prompt(context, where)
        url = (task.get("data") or {}).get(tags.data_key)
        answer = served.segmenter.segment(str(url), lambda: self.images.load(url, where), prompt)
        if answer.mask.shape != (height, width):
            raise ValueError(f"{where}: the prompt is for a {width} x {height} image, the task's image is"
                             f" {answer.mask.shape[1]} x {answer.mask.shape[0]}")
        return {"results": [answer_result(answer, tags, label, served.version)]}

    def webhook(self, body: dict) -> dict:
        annotation = body.get("annotation")
        if isinstance(annotation, dict) and isinstance(annotation.get("completed_by"), int):
            annotation["completed_by"] = self._user(annotation["completed_by"])
        kept = self.journal.record(body)
        return {"status": "ok", "recorded": kept}

    def _user(self, user_id: int) -> dict:
        """{"id", "email"} of a Label Studio user for provenance (webhooks name annotators by id only);
        just the id when Label Studio cannot tell: the annotation is journaled either way."""
        if user_id not in self._users:
            self._users[user_id] = {"id": user_id}
            if self.images.label_studio_url and self.images.token:
                client = ls.LabelStudio(self.images.label_studio_url, self.images.token, timeout=10)
                try:
                    email = (client.request("GET", f"/api/users/{user_id}") or {}).get("email")
                except ls.LabelStudioError as exc:
                    log.warning("annotator %s stays an id: %s", user_id, exc)
                    return self._users.pop(user_id)
                if isinstance(email, str):
                    self._users[user_id]["email"] = email
        return self._users[user_id]


class _Handler(BaseHTTPRequestHandler):
    backend: Backend  # set on the subclass `serve` makes
    routes = {("GET", "/health"): "health", ("GET", "/"): "health", ("POST", "/setup"): "setup",
              ("POST", "/predict"): "predict", ("POST", "/webhook"): "webhook"}
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        path = urllib.parse.urlparse(self.path).path.rstrip("/") or "/"
        name = self.routes.get((method, path))
        if name is None:
            self._reply(HTTPStatus.NOT_FOUND, {"error": f"{method} {path}: not an endpoint of this backend"})
            return
        try:
            body = self._body() if method == "POST" else {}
            self._reply(HTTPStatus.OK, getattr(self.backend, name)(*([body] if method == "POST" else [])))
        except ValueError as exc:
            log.warning("%s %s: %s", method, path, exc)
            self._reply(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
        except Exception as exc:  # the server stays up for the next click; the message goes back to the UI
            log.exception("%s %s failed", method, path)
            self._reply(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(exc).__name__}: {exc}"})

    def _body(self) -> Any:
        size = int(self.headers.get("Content-Length") or 0)
        if size > MAX_BODY:
            raise ValueError(f"request body of {size} bytes is over the {MAX_BODY}-byte limit")
        raw = self.rfile.read(size)
        try:
            body = json.loads(raw or b"{}")
        except json.JSONDecodeError as exc:
            raise ValueError(f"the request body is not JSON ({exc})") from exc
        if not isinstance(body, dict):
            raise ValueError("the request body must be a JSON object")
        return body

    def _reply(self, status: HTTPStatus, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's signature)
        log.info("%s %s", self.address_string(), format % args)


def make_server(backend: Backend, host: str = "127.0.0.1", port: int = 9090) -> ThreadingHTTPServer:
    """An HTTP server answering Label Studio's calls with `backend` (`serve_forever()` runs it)."""
    handler = type("Handler", (_Handler,), {"backend": backend})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def _whole(region: dict, name: str, where: str) -> int:
    value = region.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{where}: {name} must be a positive integer, got {value!r}")
    return value


def _short(url: str) -> str:
    return url if len(url) <= 120 else url[:117] + "..."
