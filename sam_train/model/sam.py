"""The Segment Anything network: image encoder + prompt encoder + mask decoder."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sam_train.model.mask_decoder import MaskDecoder
from sam_train.model.prompt_encoder import PromptEncoder

# ImageNet statistics in 0-255 pixel units, as every official SAM checkpoint was trained with.
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


class Sam(nn.Module):
    """SAM. The heavy `image_encoder` runs once per image; prompts are decoded cheaply many times."""

    mask_threshold: float = 0.0
    image_format: str = "RGB"

    def __init__(
        self, image_encoder: nn.Module, prompt_encoder: PromptEncoder, mask_decoder: MaskDecoder, image_size: int
    ) -> None:
        super().__init__()
        self.image_encoder = image_encoder  # a timm VisionTransformerSAM (patch embed ... neck)
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.image_size = image_size
        # Not persistent: official checkpoints do not carry them.
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(-1, 1, 1), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """B x 3 x h x w pixels (0-255, longest side <= image_size) -> normalised, padded to square."""
        images = (images - self.pixel_mean) / self.pixel_std
        h, w = images.shape[-2:]
        return F.pad(images, (0, self.image_size - w, 0, self.image_size - h))

    def normalize_canvas(self, images: torch.Tensor, content_sizes: torch.Tensor) -> torch.Tensor:
        """B x 3 x S x S uint8 canvases, image at the top-left -> normalised input with exact zeros in
        the padding (as `preprocess` pads); content_sizes (B x 2) gives each image's (h, w)."""
        x = (images.float() - self.pixel_mean) / self.pixel_std
        size = images.shape[-1]
        rows = torch.arange(size, device=images.device)
        inside = (rows[None, :, None] < content_sizes[:, 0, None, None]) & (rows[None, None, :] < content_sizes[:, 1, None, None])
        return x * inside[:, None]

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Preprocessed B x 3 x S x S images -> B x C x S/16 x S/16 embeddings."""
        return self.image_encoder.forward_features(images)

    def decode(
        self,
        image_embeddings: torch.Tensor,
        point_coords: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = True,
        image_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode prompts and decode masks: N x K x 4h x 4w low-res logits and N x K predicted IoU.

        Coordinates are in model-input pixels. See `MaskDecoder.predict_all_masks` for how
        `image_index` assigns prompts to images.
        """
        points = (point_coords, point_labels) if point_coords is not None else None
        sparse, dense = self.prompt_encoder(points=points, boxes=boxes, masks=mask_input)
        return self.mask_decoder(
            image_embeddings=image_embeddings,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
            image_index=image_index,
        )

    def postprocess_masks(
        self, masks: torch.Tensor, input_size: tuple[int, int], original_size: tuple[int, int]
    ) -> torch.Tensor:
        """Low-res logits -> logits at the original image size (upsample, crop padding, resize)."""
        masks = F.interpolate(masks, (self.image_size, self.image_size), mode="bilinear", align_corners=False)
        masks = masks[..., : input_size[0], : input_size[1]]
        return F.interpolate(masks, tuple(original_size), mode="bilinear", align_corners=False)
