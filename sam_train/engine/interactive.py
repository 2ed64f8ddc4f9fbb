"""Answering a person's clicks in milliseconds: cached image embeddings and click-by-click refinement.

SAM's assisted-manual stage works because the heavy image encoder runs once per image and every
click after that costs only the prompt encoder and mask decoder. `InteractiveSegmenter` is that
tool, shared by the Label Studio ML backend (`sam_train.engine.mlbackend`) and the data engine's
simulated annotator in assisted rounds, so both answer a click the same way:

- `EmbeddingStore` keeps the embeddings of the last `capacity` images in memory (LRU) and every
  embedding on disk, keyed by the SHA-256 of the image's bytes under a folder named after the
  encoder's fingerprint (weights, input size, pixel statistics): a restarted backend, or another
  checkpoint's backend, never reuses an embedding it did not make. The disk cache may be bounded
  (`disk_limit_mb`): a long-running backend then deletes the least recently used embeddings,
  of any encoder, instead of filling the disk (a vit_h embedding is 4 MiB; a project, 100k images).
- Clicks on one object arrive as a growing list (Label Studio sends all of the region's points
  each time). When a request extends one answered before by a single click, the earlier
  answer's low-res logits are fed back as the mask prompt, as in SAM's interactive protocol.
- One positive point alone is ambiguous: the decoder's 3 nested masks are ranked by predicted
  IoU and the best is returned. With more prompts the single-mask output answers.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_safetensors

from sam_train.atomic_io import atomic_write_bytes
from sam_train.embed import encoder_fingerprint
from sam_train.engine.records import Prompt
from sam_train.model import Sam
from sam_train.predictor import SamPredictor

ImageLoader = Callable[[], tuple[np.ndarray, bytes]]  # -> (H x W x 3 uint8 RGB pixels, the file's bytes)


def check_prompt(prompt: Prompt, width: int, height: int) -> None:
    """Refuse a prompt the tool cannot answer: no positive input, or off a width x height image."""
    if len(prompt.points) != len(prompt.labels) or any(label not in (0, 1) for label in prompt.labels):
        raise ValueError(f"points need one label each, 1 (positive) or 0 (negative): {prompt.points}, {prompt.labels}")
    if prompt.box is None and 1 not in prompt.labels:
        raise ValueError("no positive point and no box: place a positive point or a box on the object first")
    for x, y in prompt.points:
        if not (0 <= x <= width and 0 <= y <= height):
            raise ValueError(f"point ({x:.1f}, {y:.1f}) lies outside the {width} x {height} image")
    if prompt.box is not None:
        x0, y0, x1, y1 = prompt.box
        if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
            raise ValueError(f"box {list(prompt.box)} is empty or outside the {width} x {height} image")


def prompt_key(prompt: Prompt) -> tuple:
    """Identity of a prompt, to 1/100 pixel (what the tool's percentages resolve to)."""
    return (tuple((round(x, 2), round(y, 2)) for x, y in prompt.points), tuple(prompt.labels),
            None if prompt.box is None else tuple(round(v, 2) for v in prompt.box))


def previous_prompt(prompt: Prompt) -> Prompt | None:
    """The same object's prompt one click earlier (None for its first prompt)."""
    if not prompt.points or (len(prompt.points) == 1 and prompt.box is None):
        return None
    return Prompt(prompt.box, prompt.points[:-1], prompt.labels[:-1])


@dataclass(frozen=True)
class Answer:
    """The tool's mask for a prompt, and what it cost."""

    mask: np.ndarray  # H x W bool at the image's size
    score: float  # the model's predicted IoU of `mask`
    encoded: bool  # this call ran the image encoder (the image's first click, with no cached embedding)
    refined: bool  # the previous click's logits were fed back as the mask prompt


class EmbeddingStore:
    """Image embeddings of one model: memory LRU first, then disk, else the encoder (and both are filled)."""

    def __init__(self, model: Sam, folder: str | os.PathLike | None = None, capacity: int = 16,
                 disk_limit_mb: float | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"the in-memory embedding cache holds at least 1 image, got capacity={capacity}")
        if disk_limit_mb is not None and disk_limit_mb <= 0:
            raise ValueError(f"disk_limit_mb must be positive (None: unbounded), got {disk_limit_mb}")
        self.predictor = SamPredictor(model)
        fingerprint = json.dumps(encoder_fingerprint(model), sort_keys=True).encode()
        self.encoder_id = hashlib.sha256(fingerprint).hexdigest()[:16]
        self.root = None if folder is None else Path(folder)  # every encoder's folder: what the disk limit covers
        self.folder = None if folder is None else self.root / self.encoder_id
        self.capacity = capacity
        self.disk_limit = None if disk_limit_mb is None else int(disk_limit_mb * 2**20)
        # The cache's size as last scanned plus what this store wrote since: other processes sharing
        # the folder (the engine's assisted rounds) are counted at the next scan.
        self._disk_bytes = sum(size for _, _, size in self._disk_files()) if self.disk_limit else 0
        self._memory: OrderedDict[str, tuple[torch.Tensor, tuple[int, int], tuple[int, int]]] = OrderedDict()
        self.encoded = 0  # how often the encoder ran: what a cache hit saves

    def embed(self, image_id: str, load: ImageLoader) -> bool:
        """Make `image_id`'s embedding the predictor's current one; True if the encoder had to run.

        `image_id` names the image for the memory cache (a task's image URL); `load` is called only
        on a memory miss, and the disk cache is keyed by the bytes it returns.
        """
        if image_id in self._memory:
            self._memory.move_to_end(image_id)
            self.predictor.set_embedding(*self._memory[image_id])
            return False
        pixels, data = load()
        path = None if self.folder is None else self.folder / f"{hashlib.sha256(data).hexdigest()}.safetensors"
        cached = self._read(path)
        encoded = cached is None
        if encoded:
            self.predictor.set_image(pixels)
            self.encoded += 1
            if path is not None:
                self._write(path)
        else:
            self.predictor.set_embedding(*cached)
        self._memory[image_id] = (self.predictor.features, self.predictor.original_size, self.predictor.input_size)
        if len(self._memory) > self.capacity:
            self._memory.popitem(last=False)
        return encoded

    def _read(self, path: Path | None) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]] | None:
        """The disk cache's entry at `path`, marked as just used; None if there is none."""
        if path is None:
            return None
        try:
            cached = _read_embedding(path)
            os.utime(path)  # the eviction order is the files' mtimes: least recently used first
        except FileNotFoundError:  # never written, or evicted by another process sharing the folder
            return None
        return cached

    def _write(self, path: Path) -> None:
        data = save_safetensors(
            {"embedding": self.predictor.features.detach().cpu().contiguous()},
            metadata={"original_size": json.dumps(self.predictor.original_size),
                      "input_size": json.dumps(self.predictor.input_size)},
        )
        atomic_write_bytes(path, data)
        self._disk_bytes += len(data)
        if self.disk_limit is not None and self._disk_bytes > self.disk_limit:
            self._evict(keep=path)

    def _disk_files(self) -> list[tuple[float, Path, int]]:
        """(mtime, path, size) of every cached embedding under the root, of any encoder."""
        files = []
        for path in self.root.glob("*/*.safetensors") if self.root is not None and self.root.is_dir() else ():
            try:
                stat = path.stat()
            except FileNotFoundError:  # evicted by another process while we looked
                continue
            files.append((stat.st_mtime, path, stat.st_size))
        return files

    def _evict(self, keep: Path) -> None:
        """Delete the least recently used embeddings until the cache fits its limit (never `keep`, just written)."""
        files = sorted(self._disk_files())
        total = sum(size for _, _, size in files)
        for _, path, size in files:
            if total <= self.disk_limit:
                break
            if path != keep:
                path.unlink(missing_ok=True)
                total -= size
        self._disk_bytes = total


def _read_embedding(path: Path) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """(embedding, original size, input size) from a disk-cache file; ValueError naming it if unreadable."""
    try:
        with safe_open(str(path), framework="pt") as f:
            sizes = f.metadata()
            return (f.get_tensor("embedding"), tuple(json.loads(sizes["original_size"])),
                    tuple(json.loads(sizes["input_size"])))
    except FileNotFoundError:
        raise
    except (KeyError, TypeError, ValueError, OSError, SafetensorError) as exc:
        raise ValueError(f"{path}: not an embedding written by sam-train serve ({exc}); delete it to recompute") from exc


class InteractiveSegmenter:
    """Prompt -> mask on an image, with the image's embedding cached and each click refining the last."""

    def __init__(self, store: EmbeddingStore, history: int = 4096) -> None:
        self.store = store
        self.history = history
        self._logits: OrderedDict[tuple, np.ndarray] = OrderedDict()  # (image, prompt key) -> 1 x h x w logits
        self.lock = threading.Lock()  # one model, many server threads: answers are computed one at a time

    @property
    def model(self) -> Sam:
        return self.store.predictor.model

    def segment(self, image_id: str, load: ImageLoader, prompt: Prompt) -> Answer:
        """The mask for `prompt` (original-image pixels) on image `image_id` (see `EmbeddingStore.embed` for `load`)."""
        with self.lock:
            encoded = self.store.embed(image_id, load)
            predictor = self.store.predictor
            height, width = predictor.original_size
            check_prompt(prompt, width, height)
            before = previous_prompt(prompt)
            mask_input = None if before is None else self._logits.get((image_id, prompt_key(before)))
            points = np.asarray(prompt.points, dtype=np.float64).reshape(-1, 2) if prompt.points else None
            labels = np.asarray(prompt.labels) if prompt.points else None
            box = None if prompt.box is None else np.asarray(prompt.box, dtype=np.float64)
            ambiguous = len(prompt.points) == 1 and prompt.box is None
            masks, scores, low_res = predictor.predict(points, labels, box, mask_input, multimask_output=ambiguous)
            best = int(np.argmax(scores))
            key = (image_id, prompt_key(prompt))
            self._logits[key] = low_res[best : best + 1]
            self._logits.move_to_end(key)
            if len(self._logits) > self.history:
                self._logits.popitem(last=False)
            return Answer(masks[best], float(scores[best]), encoded, mask_input is not None)

