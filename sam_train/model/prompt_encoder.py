"""SAM's prompt encoder: points, boxes and a dense mask prompt -> sparse and dense embeddings.

Parameter names follow Meta's checkpoint layout (`prompt_encoder.*`) so official weights load 1:1.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sam_train.model.common import LayerNorm2d

# Point labels. Meta's point path knows -1/0/1; 2/3 (box corners) let a batch carry boxes as
# point pairs, which embed exactly like `boxes` would.
PAD_LABEL, NEGATIVE_LABEL, POSITIVE_LABEL, BOX_TOP_LEFT_LABEL, BOX_BOTTOM_RIGHT_LABEL = -1, 0, 1, 2, 3


class PositionEmbeddingRandom(nn.Module):
    """Fourier features of (x, y) with a fixed random Gaussian frequency matrix."""

    def __init__(self, num_pos_feats: int) -> None:
        super().__init__()
        # Persistent: the frequencies are part of every official checkpoint.
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn(2, num_pos_feats))

    def _encode(self, coords: torch.Tensor) -> torch.Tensor:
        """Encode coordinates normalised to [0, 1] (... x 2) into ... x 2F features."""
        coords = (2 * coords - 1) @ self.positional_encoding_gaussian_matrix
        coords = 2 * math.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)

    def forward(self, size: tuple[int, int]) -> torch.Tensor:
        """Encoding of every cell centre of an h x w grid, as C x h x w."""
        h, w = size
        device = self.positional_encoding_gaussian_matrix.device
        ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
        xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # h x w x 2, (x, y)
        return self._encode(grid).permute(2, 0, 1)

    def forward_with_coords(self, coords: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """Encode pixel coordinates (B x N x 2, x then y) of an image of `image_size` = (H, W)."""
        scale = coords.new_tensor([image_size[1], image_size[0]])
        return self._encode(coords.float() / scale)


class PromptEncoder(nn.Module):
    """Embeds points, boxes and mask prompts for the mask decoder."""

    def __init__(
        self,
        embed_dim: int,
        image_embedding_size: tuple[int, int],
        input_image_size: tuple[int, int],
        mask_in_chans: int = 16,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.input_image_size = tuple(input_image_size)
        self.image_embedding_size = tuple(image_embedding_size)
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        # negative point, positive point, box top-left, box bottom-right
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_input_size = (4 * image_embedding_size[0], 4 * image_embedding_size[1])
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            nn.GELU(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            nn.GELU(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of the image embedding grid, 1 x C x h x w."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def embed_points(self, coords: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        """B x N x 2 pixel coordinates + B x N labels -> B x N(+1) x C.

        `pad` appends a not-a-point token, as Meta does when no box follows the points: the
        decoder was trained with it, so outputs differ without it.
        """
        coords = coords + 0.5  # pixel centres
        if pad:
            coords = torch.cat([coords, coords.new_zeros(coords.shape[0], 1, 2)], dim=1)
            labels = torch.cat([labels, labels.new_full((labels.shape[0], 1), PAD_LABEL)], dim=1)
        labels = labels.long()
        pe = self.pe_layer.forward_with_coords(coords, self.input_image_size)
        pe = torch.where((labels == PAD_LABEL).unsqueeze(-1), torch.zeros_like(pe), pe)
        table = torch.cat([self.not_a_point_embed.weight] + [e.weight for e in self.point_embeddings])
        return pe + table[labels + 1]  # label -1..3 -> row 0..4

    def embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """B x 4 XYXY pixel boxes -> B x 2 x C corner embeddings."""
        corners = boxes.reshape(-1, 2, 2)
        corner_labels = torch.tensor([BOX_TOP_LEFT_LABEL, BOX_BOTTOM_RIGHT_LABEL], device=boxes.device)
        return self.embed_points(corners, corner_labels.expand(corners.shape[0], 2), pad=False)

    def no_mask_dense(self, batch: int) -> torch.Tensor:
        """The dense embedding that stands for "no mask prompt": B x C x h x w."""
        h, w = self.image_embedding_size
        return self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(batch, -1, h, w)

    def embed_masks(self, masks: torch.Tensor) -> torch.Tensor:
        """B x 1 x 4h x 4w mask logits -> B x C x h x w, channels-last in memory."""
        *downscale, project = self.mask_downscaling
        x = masks
        for layer in downscale:
            x = layer(x)
        # The closing 1 x 1 convolution as one matrix product over pixels: its output is laid out
        # as the mask decoder's h w x C image tokens, which it is added to (no transposing copy
        # of B x C x h x w, forward or backward).
        x = F.linear(x.permute(0, 2, 3, 1), project.weight.flatten(1), project.bias)  # B x h x w x C
        return x.permute(0, 3, 1, 2)

    def forward(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return sparse (B x N x C) and dense (B x C x h x w) prompt embeddings."""
        batch = next((t.shape[0] for t in (points[0] if points else None, boxes, masks) if t is not None), 1)
        device = self.no_mask_embed.weight.device
        sparse = [torch.empty(batch, 0, self.embed_dim, device=device)]
        if points is not None:
            sparse.append(self.embed_points(points[0], points[1], pad=boxes is None))
        if boxes is not None:
            sparse.append(self.embed_boxes(boxes))
        dense = self.embed_masks(masks) if masks is not None else self.no_mask_dense(batch)
        return torch.cat(sparse, dim=1), dense
