"""The data-engine loop: train -> auto-label -> export -> corrections -> ingest -> new dataset version -> evaluate.

A work folder holds everything a loop needs and makes (`sam-train engine init` writes it):

    engine.yaml          the resolved configs/engine.yaml: the single source of truth of the loop
    journal.jsonl        which step of which round has finished (`journal.Journal`)
    pool/                the images to label (copied in at init; pool.json lists their keys in order)
    models/initial.pth   the round-1 model, in Meta's layout
    versions/vNNN/       immutable dataset versions: a manifest pointing at label shards, never rewritten
    rounds/rNNN/         per round: model.pth, train/, autolabel/, export/, annotator/, corrections/,
                         labels/, edits.jsonl, ingest.json, eval/metrics.json
    rounds.json          one summary per finished round (masks per image, clicks per mask, held-out mIoU)
    embeddings/          assisted rounds: image embeddings, shared with `sam-train serve ... --workdir WORKDIR`
    annotations.jsonl    assisted rounds in Label Studio: annotations its webhook delivered to `sam-train serve`

Rounds 1..assisted_rounds are assisted-manual (SAM's first stage): the model proposes no masks;
the person labels every object from scratch with clicks that the round's model answers (in
process, or through Label Studio and `sam-train serve WORKDIR/...` whose webhook journals each
submitted annotation into annotations.jsonl, which the round then ingests). Later rounds review
the model's automatic masks. Round r takes the next `images_per_round` pool images. Its model is round r-1's fine-tuned on
version r-1 (every label so far); with no labels yet it is the previous model unchanged. Each step
writes its outputs atomically (or resumably: shards) and only then journals `done`, so after
`kill -9` anywhere the next `engine run` redoes the unfinished step and nothing is lost or doubled.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from sam_train.atomic_io import atomic_path, atomic_write_bytes
from sam_train.config import load_config
from sam_train.data.convert import coco_mask
from sam_train.data.sa1b import SCHEMA_VERSION, parse_record
from sam_train.data.shards import MANIFEST, iter_raw_samples, read_manifest, resolve_shards, write_dataset
from sam_train.engine import brush_rle
from sam_train.engine import labelstudio as ls
from sam_train.engine.amg import autolabel_images, load_image
from sam_train.engine.annotator import AnnotatorConfig, Review, Tool, label_with_tool, review_image
from sam_train.engine.interactive import EmbeddingStore, InteractiveSegmenter
from sam_train.engine.journal import AnnotationJournal, Journal
from sam_train.engine.merge import apply_edits
from sam_train.engine.mlbackend import model_version, served_version
from sam_train.engine.records import Edit, Prompt
from sam_train.model import build_sam, export_official
from sam_train.predictor import SamPredictor

STEPS = ("train", "autolabel", "export", "annotate", "ingest", "version", "evaluate")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
CRASH_ENV = "SAM_TRAIN_ENGINE_CRASH"  # fault injection for the kill -9 tests: "<round>:<step>:<point>"


class WaitingForPeople(Exception):
    """The round's corrections are not in yet; `engine run` stops here and a later run picks up."""


# ---------------------------------------------------------------------------------------------
# The work folder.


def init_workdir(
    root: str | os.PathLike, images: list[str | os.PathLike], overrides: list[str] | None = None, config: str = "engine"
) -> Path:
    """Create an engine work folder from `configs/<config>.yaml`: config, image pool, initial model, empty version v000.

    `images` are image files, folders of images, or dataset folders of shards (only their images
    are read: labels in them stay hidden from the loop). Built in a temporary sibling and renamed
    into place, so a crashed init leaves nothing half-made.
    """
    root = Path(root).resolve()
    if root.exists() and any(root.iterdir()):
        raise ValueError(f"{root} exists and is not empty: an engine work folder is made once (use `engine run`)")
    cfg = load_config(config, overrides)
    check_choices(cfg)
    for name in ("truth", "eval"):  # paths are stored absolute: the loop may run from anywhere
        cfg.data[name] = [str(Path(p).resolve()) for p in cfg.data[name] or []]
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.init-", dir=root.parent))
    try:
        atomic_write_bytes(staging / "engine.yaml", OmegaConf.to_yaml(cfg, resolve=True).encode())
        keys = _copy_pool(images, staging / "pool")
        if not keys:
            raise ValueError(f"no images found in {[str(i) for i in images]}")
        atomic_write_bytes(staging / "pool" / "pool.json", json.dumps(keys, indent=0).encode())
        checkpoint = None if cfg.model.checkpoint == "builtin" else cfg.model.checkpoint
        model = build_sam(cfg.model.name, checkpoint=checkpoint, pretrained=checkpoint is None)
        export_official(model, staging / "models" / "initial.pth")
        _write_version(staging / "versions" / "v000", [], {"round": 0, "parent": None})
        Journal(staging / "journal.jsonl").append("done", 0, "init", images=len(keys))
        if root.exists():
            root.rmdir()
        os.replace(staging, root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


CHOICES = {"backend": ("local", "labelstudio"), "annotator.kind": ("simulated", "people")}


def check_choices(cfg: DictConfig) -> None:
    """Refuse a misspelt choice at `engine init`: the loop tests `== "simulated"` and the like, so a typo
    would silently act as another choice (people who never come, tasks never pushed)."""
    for name, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, name)
        if value not in allowed:
            raise ValueError(f"{name}={value!r} is not one of {', '.join(allowed)}")
    if cfg.annotator.kind == "simulated" and not cfg.data.truth:
        raise ValueError("annotator.kind=simulated (the default) needs data.truth, the shards holding the pool's"
                         " ground truth; with real people set annotator.kind=people")


def _copy_pool(sources: list[str | os.PathLike], pool: Path) -> list[str]:
    """Copy every image into `pool/<key><suffix>`; keys (file stems or sample keys) must be unique."""
    pool.mkdir(parents=True)
    origin: dict[str, str] = {}
    for key, suffix, data, where in _iter_images(sources):
        if key in origin:
            raise ValueError(f"image key {key!r} appears twice: {origin[key]} and {where}")
        origin[key] = where
        atomic_write_bytes(pool / f"{key}{suffix}", data)
    return sorted(origin)


def _iter_images(sources: list[str | os.PathLike]) -> Iterator[tuple[str, str, bytes, str]]:
    """(key, suffix, bytes, where from) of every image in files, folders and shard datasets."""
    for source in sources:
        path = Path(source)
        if path.is_dir() and (path / MANIFEST).is_file() or path.suffix == ".tar":
            for shard in resolve_shards([path]):
                for sample in iter_raw_samples(shard.url):
                    ext = next((e for e in ("jpg", "jpeg", "png") if e in sample.members), None)
                    if sample.error or ext is None:
                        raise ValueError(f"{shard.url} {sample.key}: {sample.error or 'no image member'}")
                    yield sample.key, f".{ext}", sample.members[ext], f"{shard.url} {sample.key}"
        elif path.is_dir():
            for file in sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
                yield file.stem, file.suffix.lower(), file.read_bytes(), str(file)
        elif path.is_file():
            yield path.stem, path.suffix.lower(), path.read_bytes(), str(path)
        else:
            raise FileNotFoundError(f"{path} does not exist")


def _write_version(folder: Path, shards: list[dict], source: dict) -> dict:
    """An immutable dataset version: a manifest whose shard names are paths relative to `folder`."""
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "format": "sa1b-webdataset",
        "source": {"kind": "engine-version", **source},
        "total_samples": sum(e["samples"] for e in shards),
        "shards": shards,
    }
    path = folder / MANIFEST
    if path.exists():  # written by an earlier, interrupted run: it must say the same
        if json.loads(path.read_text()) != manifest:
            raise ValueError(f"{path} exists with different content: dataset versions are never rewritten")
        return manifest
    atomic_write_bytes(path, json.dumps(manifest, indent=1).encode())
    return manifest


def current_model(root: str | os.PathLike) -> Path:
    """The model an engine labels with now: its newest round's (written when that round's train step
    finishes), else the initial one. What `sam-train serve WORKDIR` follows."""
    rounds = sorted((Path(root) / "rounds").glob("r[0-9][0-9][0-9]/model.pth"))
    return rounds[-1] if rounds else Path(root) / "models" / "initial.pth"


class Engine:
    """One work folder: its config, journal and paths, and the steps of a round."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).resolve()
        if not (self.root / "engine.yaml").is_file():
            raise FileNotFoundError(f"{self.root} is not an engine work folder (make one with `sam-train engine init`)")
        self.cfg: DictConfig = OmegaConf.load(self.root / "engine.yaml")
        self.journal = Journal(self.root / "journal.jsonl")
        self.keys: list[str] = json.loads((self.root / "pool" / "pool.json").read_text())
        self._pool_files = {p.stem: p for p in (self.root / "pool").iterdir() if p.suffix in IMAGE_SUFFIXES}
        self._round_versions: dict[int, str] = {}  # round -> its model's version, as `sam-train serve` reports it

    def round_dir(self, r: int) -> Path:
        return self.root / "rounds" / f"r{r:03d}"

    def version_dir(self, v: int) -> Path:
        return self.root / "versions" / f"v{v:03d}"

    def model_path(self, r: int) -> Path:
        return self.root / "models" / "initial.pth" if r == 0 else self.round_dir(r) / "model.pth"

    def assisted(self, r: int) -> bool:
        """Whether round r is assisted-manual: people label from scratch, the model answering their clicks."""
        return r <= self.cfg.assisted_rounds

    def round_keys(self, r: int) -> list[str]:
        n = self.cfg.images_per_round
        return self.keys[(r - 1) * n : r * n]

    def image(self, key: str) -> np.ndarray:
        """The RGB pixels of a pool image (ValueError naming the file if it cannot be decoded)."""
        return load_image(self._pool_files[key])[0]

    def next_step(self) -> tuple[int, str]:
        """The first (round, step) without `done`."""
        done = self.journal.done()
        r = 1
        while True:
            for step in STEPS:
                if (r, step) not in done:
                    return r, step
            r += 1

    # -----------------------------------------------------------------------------------------
    # Running.

    def run(self, rounds: int | None = None, wait: bool = True, log=print) -> list[dict]:
        """Run steps until `rounds` rounds (default: the config's) are finished; returns rounds.json."""
        target = rounds or self.cfg.rounds
        while True:
            r, step = self.next_step()
            if r > target:
                return self.summaries()
            start = time.perf_counter()
            self.journal.append("start", r, step)
            _crash_point(r, step, "start")
            try:
                outputs = getattr(self, f"step_{step}")(r, wait)
            except WaitingForPeople as waiting:
                log(f"round {r} {step}: waiting: {waiting}")
                return self.summaries()
            _crash_point(r, step, "end")
            self.journal.append("done", r, step, seconds=round(time.perf_counter() - start, 1), **outputs)
            log(f"round {r} {step:9} done in {time.perf_counter() - start:6.1f} s  {_brief(outputs)}")
            if step == STEPS[-1]:
                log(format_rounds(self.summaries()[-1:], header=False))

    def step_train(self, r: int, wait: bool) -> dict:
        """Round r's model: round r-1's, fine-tuned on version r-1 when it holds any labels."""
        from sam_train.train import fit  # Lightning is imported only when a round trains

        version = self.version_dir(r - 1)
        samples = read_manifest(version)["total_samples"]
        target = self.model_path(r)
        if samples == 0:
            _atomic_copy(self.model_path(r - 1), target)
            return {"trained": False, "samples": 0}
        run_dir = self.round_dir(r) / "train"
        overrides = [
            *self.cfg.train.overrides,
            f"model={self.cfg.model.name}",
            f"model.checkpoint={self.model_path(r - 1)}",
            f"data.train=[{version}]",
            "data.val=[]",
            f"run_dir={run_dir}",
            "resume=auto",
            f"seed={self.cfg.seed + r}",
        ]
        fit(load_config("fit", overrides))
        _atomic_copy(run_dir / f"sam_{self.cfg.model.name}.pth", target)
        return {"trained": True, "samples": samples}

    def step_autolabel(self, r: int, wait: bool) -> dict:
        """The round model's masks on this round's pool images, as SA-1B shards."""
        keys = self.round_keys(r)
        model = build_sam(self.cfg.model.name, checkpoint=self.model_path(r))
        settings = load_config("autolabel", list(self.cfg.autolabel.overrides))
        manifest = autolabel_images(model, [self._pool_files[k] for k in keys], self.round_dir(r) / "autolabel",
                                    settings, round=r, semi_automatic=self.cfg.autolabel.semi_automatic,
                                    assisted=self.assisted(r))
        return {"images": manifest["total_samples"]}

    def step_export(self, r: int, wait: bool) -> dict:
        """Label Studio tasks and a COCO file (for CVAT) of this round's model masks; pushed to Label Studio if set."""
        from sam_train.engine.formats_coco import export_coco

        records = self.autolabel_records(r)
        out = self.round_dir(r) / "export"
        tasks = [ls.record_to_task(record, self.image_url(key), key, r) for key, record in records.items()]
        atomic_write_bytes(out / "tasks.json", json.dumps(tasks).encode())
        export_coco(records, out / "coco.json")
        outputs = {"tasks": len(tasks)}
        if self.cfg.backend == "labelstudio":
            outputs.update(self._push_tasks(r, tasks))
        return outputs

    def step_annotate(self, r: int, wait: bool) -> dict:
        """Get this round's corrections: from the simulated annotator, Label Studio, or files people hand back."""
        corrections = self.round_dir(r) / "corrections"
        if self.cfg.backend == "labelstudio" and self.assisted(r):
            self._check_ml_backend(r)
        if self.cfg.annotator.kind == "simulated":
            if self.cfg.backend == "labelstudio":
                self._simulate_in_labelstudio(r)
            else:
                tasks = self._simulate_locally(r)
                atomic_write_bytes(corrections / "labelstudio.json", json.dumps(tasks).encode())
        if self.cfg.backend == "labelstudio":
            exported = self._fetch_labelstudio(r, wait)
            atomic_write_bytes(corrections / "labelstudio.json", json.dumps(exported).encode())
        files = sorted(p.name for p in corrections.glob("*")) if corrections.is_dir() else []
        if not files:
            raise WaitingForPeople(
                f"hand corrections back with `sam-train engine ingest {self.root} FILE --format coco|cvat|labelstudio|sa1b`"
                f" (exports: {self.round_dir(r) / 'export'})"
            )
        return {"files": files}

    def step_ingest(self, r: int, wait: bool) -> dict:
        """Apply the round's corrections to its model masks and write the labelled shards."""
        records = self.autolabel_records(r)
        edits, skipped = self._read_corrections(r, records)
        by_image: dict[str, list[Edit]] = {}
        for edit in edits:
            if edit.image not in records:
                skipped.append((f"edit of image {edit.image}", "the image is not in this round"))
                continue
            by_image.setdefault(edit.image, []).append(edit)
        model = build_sam(self.cfg.model.name, checkpoint=self.model_path(r))
        predictor = SamPredictor(model)
        labelled: dict[str, dict] = {}
        problems: list[str] = []
        counts = {"added": 0, "replaced": 0, "deleted": 0}
        # Every exported image was reviewed: annotate finishes only when all tasks are annotated,
        # and handed-back files are complete corrections of the exported images.
        for key in sorted(records):
            image_edits = by_image.get(key, [])
            segment = _segmenter(predictor, self.image(key)) if any(e.prompt for e in image_edits) else None
            record, report = apply_edits(records[key], key, image_edits, segment)
            problems += report.problems
            for name in counts:
                counts[name] += getattr(report, name)
            labelled[key] = record
        log_lines = [json.dumps(_edit_json(e)) for e in edits]
        atomic_write_bytes(self.round_dir(r) / "edits.jsonl", ("\n".join(log_lines) + "\n").encode())
        report = {"images": len(labelled), "unreviewed": sorted(set(records) - set(labelled)),
                  "skipped": skipped, "problems": problems, **counts}
        atomic_write_bytes(self.round_dir(r) / "ingest.json", json.dumps(report, indent=1).encode())
        keys = sorted(labelled)
        write_dataset(self.round_dir(r) / "labels", keys, lambda k: self._labelled_sample(k, labelled[k]),
                      self.cfg.samples_per_shard, {"kind": "engine-labels", "round": r}, prefix="labels")
        return {"images": len(keys), **counts, "skipped": len(skipped), "problems": len(problems)}

    def step_version(self, r: int, wait: bool) -> dict:
        """Version r: version r-1's shards plus this round's labels (paths relative; nothing copied or rewritten)."""
        previous = self.version_dir(r - 1)
        here = self.version_dir(r)
        shards = [
            {**e, "name": os.path.relpath(previous / e["name"], here)} for e in read_manifest(previous)["shards"]
        ]
        labels = self.round_dir(r) / "labels"
        shards += [{**e, "name": os.path.relpath(labels / e["name"], here)} for e in read_manifest(labels)["shards"]]
        manifest = _write_version(here, shards, {"round": r, "parent": previous.name})
        return {"version": here.name, "samples": manifest["total_samples"]}

    def step_evaluate(self, r: int, wait: bool) -> dict:
        """Held-out click-based mIoU of the round model on the new domain, and the round's summary."""
        from sam_train.validate import validate

        if not self.cfg.data.eval:
            metrics = {}
        else:
            overrides = [
                *self.cfg.evaluate.overrides,
                f"model={self.cfg.model.name}",
                f"model.checkpoint={self.model_path(r)}",
                f"data.val=[{','.join(self.cfg.data.eval)}]",
                f"validate_out={self.round_dir(r) / 'eval'}",
            ]
            metrics = validate(load_config("fit", overrides))["metrics"]
        summary = self._round_summary(r, metrics)
        atomic_write_bytes(self.round_dir(r) / "summary.json", json.dumps(summary, indent=1).encode())
        atomic_write_bytes(self.root / "rounds.json", json.dumps(self.summaries(upto=r), indent=1).encode())
        return {"miou_1click": summary["miou_1click"]}

    # -----------------------------------------------------------------------------------------
    # Helpers of the steps.

    def autolabel_records(self, r: int) -> dict[str, dict]:
        """key -> the SA-1B record auto-labelling wrote for round r."""
        out = {}
        for shard in resolve_shards([self.round_dir(r) / "autolabel"]):
            for sample in iter_raw_samples(shard.url):
                out[sample.key] = parse_record(sample.members["json"])
        return out

    def image_url(self, key: str) -> str:
        """How a labelling tool loads a pool image: Label Studio local files, else the path in the work folder."""
        path = self._pool_files[key]
        if self.cfg.backend == "labelstudio":
            return ls.local_file_url(path, self.cfg.labelstudio.document_root)
        return str(path.relative_to(self.root))

    def _labelled_sample(self, key: str, record: dict) -> tuple[str, dict[str, bytes]]:
        path = self._pool_files[key]
        if path.suffix in (".jpg", ".jpeg"):
            jpeg = path.read_bytes()
        else:
            buffer = io.BytesIO()
            Image.fromarray(self.image(key)).save(buffer, format="JPEG", quality=95)
            jpeg = buffer.getvalue()
        return key, {"jpg": jpeg, "json": json.dumps(record, separators=(",", ":")).encode()}

    def _annotator_config(self) -> AnnotatorConfig:
        c = self.cfg.annotator
        return AnnotatorConfig(c.accept_iou, c.match_iou, c.max_clicks, c.clicks_per_image, c.min_area, c.name)

    def _truth(self) -> dict[str, list[np.ndarray]]:
        """key -> ground-truth masks: what the simulated person wants; read by nothing else."""
        out = {}
        for shard in resolve_shards(list(self.cfg.data.truth)):
            for sample in iter_raw_samples(shard.url):
                out[sample.key] = _masks(parse_record(sample.members["json"]))
        return out

    def _review(self, r: int, key: str, record: dict, tool: SamPredictor | Tool, truth: dict) -> dict:
        """The simulated person's annotation of one task (LS result list) and its work, saved per image.

        `tool` is what answers the person's clicks: the round model's predictor when reviewing its
        masks, the ML backend (in-process or through Label Studio) in assisted rounds. Saved before
        it is submitted anywhere, so a rerun after a crash redoes it identically.
        """
        path = self.round_dir(r) / "annotator" / f"{key}.json"
        if path.exists():
            return json.loads(path.read_text())
        if key not in truth:
            raise ValueError(f"the simulated annotator has no ground truth for image {key} (data.truth)")
        masks = dict(zip((a["id"] for a in record["annotations"]), _masks(record)))
        points = {a["id"]: tuple(a["point_coords"][0]) for a in record["annotations"] if a.get("point_coords")}
        if self.assisted(r):
            review = label_with_tool(tool, truth[key], self._annotator_config())
        else:
            review = review_image(tool, self.image(key), masks, points, truth[key], self._annotator_config())
        saved = {"result": _review_result(review, masks), "work": _work(review)}
        atomic_write_bytes(path, json.dumps(saved).encode())
        return saved

    def _simulate_locally(self, r: int) -> list[dict]:
        """Tasks with the simulated person's annotations, shaped like a Label Studio export."""
        records, truth = self.autolabel_records(r), self._truth()
        model = build_sam(self.cfg.model.name, checkpoint=self.model_path(r))
        clicks = InteractiveSegmenter(EmbeddingStore(model, self.root / "embeddings")) if self.assisted(r) else None
        tasks = json.loads((self.round_dir(r) / "export" / "tasks.json").read_text())
        for n, task in enumerate(tasks):
            key = task["data"]["key"]
            tool = self._local_tool(clicks, key) if clicks else SamPredictor(model)
            saved = self._review(r, key, records[key], tool, truth)
            task["id"] = n + 1
            task["annotations"] = [{
                "id": n + 1, "result": saved["result"], "was_cancelled": False,
                "completed_by": self.cfg.annotator.name, "created_at": _file_time(self.round_dir(r) / "annotator" / f"{key}.json"),
            }]
            _crash_point(r, "annotate", "item")
        return tasks

    def _client(self) -> ls.LabelStudio:
        token = self.cfg.labelstudio.token or os.environ.get("LABEL_STUDIO_TOKEN")
        if not self.cfg.labelstudio.url or not token:
            raise ValueError("backend=labelstudio needs labelstudio.url and a token (labelstudio.token or $LABEL_STUDIO_TOKEN)")
        return ls.LabelStudio(self.cfg.labelstudio.url, token)

    def _project(self, client: ls.LabelStudio, r: int) -> int:
        """Round r's Label Studio project, found by title or made once (with local-file storage): one for
        reviewing model masks, one for assisted labelling (smart tools, our ML backend connected)."""
        assisted = self.assisted(r)
        title = f"sam-train engine {self.root.name}" + (" assisted" if assisted else "")
        for project in client.request("GET", "/api/projects", query={"page_size": 1000}).get("results", []):
            if project.get("title") == title:
                return int(project["id"])
        backend = self._ml_backend_url() if assisted else None  # checked before a project is made
        project = client.create_project(title, ls.ASSISTED_LABEL_CONFIG if assisted else ls.LABEL_CONFIG)
        client.connect_local_files(project["id"], self.root / "pool")
        if backend:
            client.connect_ml_backend(project["id"], backend)
        return int(project["id"])

    def _ml_backend_url(self) -> str:
        if not self.cfg.labelstudio.ml_backend:
            raise ValueError("assisted rounds in Label Studio need labelstudio.ml_backend: the URL of"
                             f" `sam-train serve {self.root}`")
        return self.cfg.labelstudio.ml_backend

    def _check_ml_backend(self, r: int) -> None:
        """Refuse an assisted round whose clicks another model would answer: the backend must serve round r's."""
        url = self._ml_backend_url()
        if r not in self._round_versions:
            name = self.cfg.model.name
            self._round_versions[r] = model_version(name, build_sam(name, checkpoint=self.model_path(r)))
        serving = served_version(url)
        if serving != self._round_versions[r]:
            raise ValueError(
                f"the ML backend at {url} serves {serving}, but round {r} labels with {self._round_versions[r]}"
                f" ({self.model_path(r)}): serve the work folder, `sam-train serve {self.root}`, which follows"
                " each round's model")

    def _local_tool(self, segmenter: InteractiveSegmenter, key: str) -> Tool:
        """Clicks on pool image `key` answered in-process, as `sam-train serve` answers them."""
        load = lambda: (self.image(key), self._pool_files[key].read_bytes())  # noqa: E731
        return lambda prompt: segmenter.segment(key, load, prompt).mask

    def _labelstudio_tool(self, client: ls.LabelStudio, backend: int, task: dict) -> Tool:
        """Clicks on a task answered by ML backend `backend` through Label Studio, as in its editor."""
        width, height = task["data"]["width"], task["data"]["height"]

        def tool(prompt: Prompt) -> np.ndarray:
            regions = [ls.click_result(p, label == 1, width, height, f"c{n}")
                       for n, (p, label) in enumerate(zip(prompt.points, prompt.labels))]
            answer = client.interactive_annotate(backend, task["id"], {"result": regions})
            (region,) = answer["result"]
            return brush_rle.decode(region["value"]["rle"], height, width)

        return tool

    def _round_tasks(self, client: ls.LabelStudio, project: int, r: int) -> list[dict]:
        return [t for t in client.tasks(project) if (t.get("data") or {}).get("round") == r]

    def _push_tasks(self, r: int, tasks: list[dict]) -> dict:
        """Import the round's tasks the project does not have yet: a rerun after a crash adds no duplicates."""
        client = self._client()
        project = self._project(client, r)
        present = {t["data"].get("key") for t in self._round_tasks(client, project, r)}
        missing = [t for t in tasks if t["data"]["key"] not in present]
        if missing:
            client.import_tasks(project, missing)
        if tasks and not self.assisted(r):  # the editor shows only the project's model version: this round's
            client.prelabel_with(project, ls.model_version(r))
        return {"project": project, "imported": len(missing)}

    def _simulate_in_labelstudio(self, r: int) -> None:
        """The simulated person submits through Label Studio's API, once per task."""
        client = self._client()
        project = self._project(client, r)
        records, truth = self.autolabel_records(r), self._truth()
        if self.assisted(r):  # the project's interactive backend answers the clicks: looked up once
            backends = client.request("GET", "/api/ml", query={"project": project})
            backend, predictor = next(b["id"] for b in backends if b.get("is_interactive")), None
        else:
            predictor = SamPredictor(build_sam(self.cfg.model.name, checkpoint=self.model_path(r)))
        for task in self._round_tasks(client, project, r):
            if task.get("total_annotations") or task.get("annotations"):
                continue  # submitted before a crash: never twice
            key = task["data"]["key"]
            tool = predictor or self._labelstudio_tool(client, backend, task)
            saved = self._review(r, key, records[key], tool, truth)
            predictions = task.get("predictions") or []
            last = predictions[-1] if predictions else None
            parent = last.get("id") if isinstance(last, dict) else last  # the list API gives ids or bodies
            client.annotate(task["id"], saved["result"], parent_prediction=parent)
            _crash_point(r, "annotate", "item")

    def _fetch_labelstudio(self, r: int, wait: bool) -> list[dict]:
        """The project's export once every task of round r has a submitted annotation."""
        client = self._client()
        project = self._project(client, r)
        while True:
            tasks = self._round_tasks(client, project, r)
            if self.assisted(r):  # what people submitted reached the backend's webhook journal
                journaled = [t for t in AnnotationJournal(self.root / "annotations.jsonl").tasks()
                             if (t.get("data") or {}).get("round") == r and t["annotations"]]
                open_tasks = sorted({t["id"] for t in tasks} - {t["id"] for t in journaled})
                if not open_tasks:
                    return journaled
            else:
                open_tasks = [t["id"] for t in tasks if not t.get("is_labeled")]
                if not open_tasks:
                    return [t for t in client.export(project) if (t.get("data") or {}).get("round") == r]
            if not wait:
                raise WaitingForPeople(f"{len(open_tasks)} of {len(tasks)} tasks in Label Studio project {project}"
                                       + (" (assisted: counted when the ML backend's webhook journals them)"
                                          if self.assisted(r) else ""))
            time.sleep(self.cfg.labelstudio.poll_seconds)

    def _read_corrections(self, r: int, records: dict[str, dict]) -> tuple[list[Edit], list[tuple[str, str]]]:
        """Every correction file of the round -> edits (and what was skipped, with why)."""
        from sam_train.engine.formats import ingest_sa1b
        from sam_train.engine.formats_coco import ingest_coco
        from sam_train.engine.formats_cvat import ingest_cvat

        edits: list[Edit] = []
        skipped: list[tuple[str, str]] = []
        for path in sorted((self.round_dir(r) / "corrections").glob("*")):
            kind = path.name.split(".")[0].split("-")[0]
            if kind == "labelstudio":
                parsed = ls.parse_export(json.loads(path.read_text()), round=r)
            elif kind == "coco":
                parsed = ingest_coco(path, records, complete=True, round=r)
            elif kind == "cvat":
                parsed = ingest_cvat(path, records, complete=True, round=r)
            elif kind == "sa1b":
                parsed = ingest_sa1b(path, records, round=r)
            else:
                raise ValueError(f"{path}: unknown corrections file (names start with labelstudio, coco, cvat or sa1b)")
            edits += parsed.edits
            skipped += [(f"{path.name}: {item}", reason) for item, reason in parsed.skipped]
        return edits, skipped

    def _round_summary(self, r: int, metrics: dict) -> dict:
        labels = self.round_dir(r) / "labels"
        masks = images = 0
        for shard in resolve_shards([labels]):
            for sample in iter_raw_samples(shard.url):
                images += 1
                masks += len(json.loads(sample.members["json"])["annotations"])
        work = [json.loads(p.read_text())["work"] for p in sorted((self.round_dir(r) / "annotator").glob("*.json"))]
        total = {k: sum(w[k] for w in work) for k in ("kept", "corrected", "added", "deleted", "clicks", "painted")}
        touched = total["corrected"] + total["added"]
        return {
            "round": r,
            "images": images,
            "masks_per_image": masks / images if images else 0.0,
            "clicks_per_corrected_mask": total["clicks"] / touched if touched else None,
            **{f"masks_{k}": v for k, v in total.items() if k != "clicks"},
            "miou_1click": metrics.get("miou_1click"),
            "miou_1click_oracle": metrics.get("miou_1click_oracle"),
            "miou_5click": metrics.get("miou_5click"),
            "miou_box": metrics.get("miou_box"),
            "version": self.version_dir(r).name,
        }

    def summaries(self, upto: int | None = None) -> list[dict]:
        """The summary of every round whose evaluate step has written one, in order."""
        out = []
        for path in sorted((self.root / "rounds").glob("r*/summary.json")):
            summary = json.loads(path.read_text())
            if upto is None or summary["round"] <= upto:
                out.append(summary)
        return out

    def status(self) -> str:
        """A human summary: pool, next step, versions, rounds."""
        r, step = self.next_step()
        versions = sorted(p.name for p in (self.root / "versions").iterdir())
        lines = [
            f"work folder {self.root}",
            f"pool        {len(self.keys)} images, {self.cfg.images_per_round} per round; backend {self.cfg.backend},"
            f" annotator {self.cfg.annotator.kind}",
            f"next        round {r}, step {step}",
            "versions    " + ", ".join(f"{v} ({read_manifest(self.root / 'versions' / v)['total_samples']} images)"
                                       for v in versions),
        ]
        summaries = self.summaries()
        if summaries:
            lines.append(format_rounds(summaries))
        return "\n".join(lines)


def format_rounds(summaries: list[dict], header: bool = True) -> str:
    """rounds.json as a table: one line per round."""
    cell = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    lines = [f"{'round':>5} {'images':>6} {'masks/img':>9} {'clicks/mask':>11} {'1-click mIoU':>12} {'oracle':>7}"] if header else []
    for s in summaries:
        lines.append(f"{s['round']:>5} {s['images']:>6} {s['masks_per_image']:>9.1f} "
                     f"{cell(s['clicks_per_corrected_mask'], '.2f'):>11} {cell(s['miou_1click'], '.3f'):>12} "
                     f"{cell(s['miou_1click_oracle'], '.3f'):>7}")
    return "\n".join(lines)


def hand_back(root: str | os.PathLike, file: str | os.PathLike, fmt: str) -> Path:
    """Copy a corrections file people made into the current round (it must be at its annotate step)."""
    engine = Engine(root)
    r, step = engine.next_step()
    if step != "annotate":
        raise ValueError(f"round {r} is at step {step}, not annotate: corrections are handed back after export")
    if fmt not in ("coco", "cvat", "labelstudio", "sa1b"):
        raise ValueError(f"unknown corrections format {fmt!r}")
    folder = engine.round_dir(r) / "corrections"
    n = len(list(folder.glob(f"{fmt}-*"))) if folder.is_dir() else 0
    target = folder / f"{fmt}-{n:03d}{Path(file).suffix}"
    atomic_write_bytes(target, Path(file).read_bytes())
    return target


def _segmenter(predictor: SamPredictor, image: np.ndarray):
    """Turns a person's prompt (box and/or clicks) into a mask with the round model."""
    predictor.set_image(image)

    def segment(prompt: Prompt) -> tuple[np.ndarray, float]:
        points = np.asarray(prompt.points, dtype=np.float64).reshape(-1, 2) if prompt.points else None
        labels = np.asarray(prompt.labels) if prompt.points else None
        box = np.asarray(prompt.box, dtype=np.float64) if prompt.box is not None else None
        single = box is not None or (points is not None and len(points) > 1)
        masks, scores, _ = predictor.predict(points, labels, box, multimask_output=not single)
        best = int(np.argmax(scores))
        return masks[best], float(scores[best])

    return segment


def _masks(record: dict) -> list[np.ndarray]:
    """The full-size bool masks of an SA-1B record's annotations."""
    height, width = record["image"]["height"], record["image"]["width"]
    return [coco_mask(a["segmentation"], height, width) for a in record["annotations"]]


def _review_result(review: Review, masks: dict[int, np.ndarray]) -> list[dict]:
    """A review as the result list a person submits in Label Studio (kept and corrected regions keep their ids)."""
    results = [ls.brush_result(masks[k], f"{ls.REGION_PREFIX}{k}") for k in review.kept]
    results += [ls.brush_result(mask, f"{ls.REGION_PREFIX}{k}") for k, mask in review.corrected.items()]
    results += [ls.brush_result(mask, f"new{n}") for n, mask in enumerate(review.added)]
    return results


def _work(review: Review) -> dict:
    return {"kept": len(review.kept), "corrected": len(review.corrected), "added": len(review.added),
            "deleted": len(review.deleted), "clicks": review.clicks, "painted": review.painted}


def _edit_json(edit: Edit) -> dict:
    return {"image": edit.image, "action": edit.action, "target": edit.target, "provenance": edit.provenance.as_json(),
            "rle": edit.rle, "prompt": None if edit.prompt is None else
            {"box": edit.prompt.box, "points": edit.prompt.points, "labels": edit.prompt.labels}}


def _file_time(path: Path) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(path.stat().st_mtime))


def _brief(outputs: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in outputs.items() if not isinstance(v, (list, dict)))


def _atomic_copy(src: Path, dst: Path) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def _crash_point(r: int, step: str, point: str) -> None:
    """Die by SIGKILL here if $SAM_TRAIN_ENGINE_CRASH names this point: how the tests prove resumability."""
    if os.environ.get(CRASH_ENV) == f"{r}:{step}:{point}":
        os.kill(os.getpid(), signal.SIGKILL)
