"""SAM's mask decoder: 4 mask tokens (1 single + 3 nested multimask) and an IoU head."""

from __future__ import annotations

import torch
from torch import nn

from sam_train.model.common import MLP, LayerNorm2d
from sam_train.model.transformer import TwoWayTransformer


class MaskDecoder(nn.Module):
    """Predicts low-res mask logits and their IoU from image + prompt embeddings."""

    def __init__(
        self,
        transformer_dim: int,
        transformer: TwoWayTransformer,
        num_multimask_outputs: int = 3,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
    ) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer
        self.num_mask_tokens = num_multimask_outputs + 1
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth)

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
        image_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (N x K x 4h x 4w logits, N x K IoU) with K = 3 (multimask) or 1 (single mask)."""
        masks, iou_pred = self.predict_all_masks(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, image_index
        )
        keep = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, keep], iou_pred[:, keep]

    def predict_all_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        image_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All 4 mask tokens' outputs: N x 4 x 4h x 4w logits and N x 4 IoU.

        `image_embeddings` is B_img x C x h x w. The N prompts are decoded in one pass; prompt i
        reads image `image_index[i]`. Without `image_index`, a single image is shared by all
        prompts, or B_img == N pairs them one to one.
        """
        n = sparse_prompt_embeddings.shape[0]
        if image_index is not None:
            src = image_embeddings[image_index]
        elif image_embeddings.shape[0] == 1:
            src = image_embeddings.expand(n, -1, -1, -1)
        elif image_embeddings.shape[0] == n:
            src = image_embeddings
        else:
            raise ValueError(
                f"{image_embeddings.shape[0]} image embeddings for {n} prompts: pass image_index to say which is which"
            )
        src = src + dense_prompt_embeddings  # N x C x h x w
        pos_src = image_pe.expand(n, -1, -1, -1)

        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(n, -1, -1), sparse_prompt_embeddings], dim=1)

        hs, src = self.transformer(src, pos_src, tokens)
        iou_token_out = hs[:, 0]
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens]  # N x 4 x C

        b, c, h, w = pos_src.shape
        upscaled = self.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))  # N x C/8 x 4h x 4w
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )  # N x 4 x C/8
        b, c, h, w = upscaled.shape
        masks = (hyper_in @ upscaled.flatten(2)).view(b, -1, h, w)
        return masks, self.iou_prediction_head(iou_token_out)
