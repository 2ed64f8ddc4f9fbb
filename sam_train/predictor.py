"""Interactive prediction with a cached image embedding, with Meta's `SamPredictor` interface.

`set_image` runs the heavy encoder once; every `predict` afterwards runs only the prompt encoder
and mask decoder, which is what makes clicking in a labelling tool answer in milliseconds.
"""

from __future__ import annotations

import numpy as np
import torch

from sam_train.geometry import resize_longest_side, scale_boxes, scale_coords
from sam_train.model import Sam


class SamPredictor:
    """Set an image once, then predict masks for any number of prompts on it."""

    def __init__(self, model: Sam) -> None:
        self.model = model.eval()  # SAM has no batch norm; eval only disables drop path
        self.reset_image()

    @property
    def device(self) -> torch.device:
        return self.model.device

    def reset_image(self) -> None:
        """Forget the current image and its embedding."""
        self.features: torch.Tensor | None = None  # 1 x C x h x w
        self.original_size: tuple[int, int] | None = None
        self.input_size: tuple[int, int] | None = None
        self.is_image_set = False

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """Compute and cache the embedding of an H x W x 3 uint8 image."""
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
        if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            desc = f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
            raise ValueError(f"set_image expects an H x W x 3 uint8 array, got {desc}")
        if image_format != self.model.image_format:
            image = image[..., ::-1]
        resized = resize_longest_side(np.ascontiguousarray(image), self.model.image_size)
        tensor = torch.as_tensor(resized, device=self.device).permute(2, 0, 1).contiguous()[None]
        self.set_torch_image(tensor, image.shape[:2])

    @torch.no_grad()
    def set_torch_image(self, transformed_image: torch.Tensor, original_image_size: tuple[int, ...]) -> None:
        """Cache the embedding of a 1 x 3 x h x w image already resized to the model's longest side."""
        size = self.model.image_size
        if transformed_image.ndim != 4 or transformed_image.shape[1] != 3 or max(transformed_image.shape[2:]) != size:
            raise ValueError(
                f"set_torch_image expects B x 3 x H x W with longest side {size}, got {tuple(transformed_image.shape)}"
            )
        self.reset_image()
        self.original_size = (int(original_image_size[0]), int(original_image_size[1]))
        self.input_size = (int(transformed_image.shape[2]), int(transformed_image.shape[3]))
        self.features = self.model.encode_image(self.model.preprocess(transformed_image.float()))
        self.is_image_set = True

    def set_embedding(self, features: torch.Tensor, original_size: tuple[int, int], input_size: tuple[int, int]) -> None:
        """Use an embedding computed earlier (a cache) for the image of `original_size`, resized to `input_size`."""
        expected = (1, self.model.prompt_encoder.embed_dim, *self.model.prompt_encoder.image_embedding_size)
        if tuple(features.shape) != expected:
            raise ValueError(f"an embedding for this model is {expected}, got {tuple(features.shape)}")
        self.reset_image()
        self.original_size = (int(original_size[0]), int(original_size[1]))
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.features = features.to(self.device, torch.float32)
        self.is_image_set = True

    def get_image_embedding(self) -> torch.Tensor:
        """The cached 1 x C x h x w embedding of the current image."""
        self._require_image()
        return self.features

    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Prompts in original-image pixels -> (C x H x W masks, C IoU predictions, C x h x w low-res logits).

        `point_coords` is N x 2 (x, y) with `point_labels` N (1 positive, 0 negative); `box` is XYXY;
        `mask_input` is 1 x 4h x 4w logits, typically a previous call's low-res output.
        """
        self._require_image()
        coords = labels = boxes = masks = None
        if point_coords is not None:
            if point_labels is None:
                raise ValueError("point_labels must be given with point_coords")
            point_coords, point_labels = np.asarray(point_coords), np.asarray(point_labels)
            if point_coords.ndim != 2 or point_coords.shape[1] != 2 or point_labels.shape != point_coords.shape[:1]:
                raise ValueError(
                    f"point_coords must be N x 2 and point_labels N, got {point_coords.shape} and {point_labels.shape}"
                )
            coords = torch.as_tensor(
                scale_coords(point_coords, self.original_size, self.model.image_size), dtype=torch.float, device=self.device
            )[None]
            labels = torch.as_tensor(point_labels, dtype=torch.int, device=self.device)[None]
        if box is not None:
            box = np.asarray(box)
            if box.size != 4:
                raise ValueError(f"box must be 4 numbers XYXY, got shape {box.shape}")
            boxes = torch.as_tensor(
                scale_boxes(box, self.original_size, self.model.image_size), dtype=torch.float, device=self.device
            )
        if mask_input is not None:
            masks = torch.as_tensor(mask_input, dtype=torch.float, device=self.device)[None]
        out = self.predict_torch(coords, labels, boxes, masks, multimask_output, return_logits)
        return tuple(t[0].detach().cpu().numpy() for t in out)

    @torch.no_grad()
    def predict_torch(
        self,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Batched prompts already in model-input pixels -> (B x C x H x W masks, B x C IoU, B x C x h x w logits).

        `point_coords` B x N x 2, `point_labels` B x N, `boxes` B x 4, `mask_input` B x 1 x 4h x 4w.
        """
        self._require_image()
        expected_mask = tuple(self.model.prompt_encoder.mask_input_size)
        if mask_input is not None and (mask_input.ndim != 4 or tuple(mask_input.shape[-2:]) != expected_mask):
            raise ValueError(f"mask_input must be B x 1 x {expected_mask[0]} x {expected_mask[1]}, got {tuple(mask_input.shape)}")
        low_res, iou = self.model.decode(
            self.features,
            point_coords=point_coords,
            point_labels=point_labels,
            boxes=boxes,
            mask_input=mask_input,
            multimask_output=multimask_output,
        )
        masks = self.model.postprocess_masks(low_res, self.input_size, self.original_size)
        if not return_logits:
            masks = masks > self.model.mask_threshold
        return masks, iou, low_res

    def _require_image(self) -> None:
        if not self.is_image_set:
            raise RuntimeError("set an image with set_image(...) before predicting")
