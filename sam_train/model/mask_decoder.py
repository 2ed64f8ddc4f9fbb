"""SAM's mask decoder: 4 mask tokens (1 single + 3 nested multimask) and an IoU head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sam_train.model.common import MLP, LayerNorm2d
from sam_train.model.transformer import SharedImage, TwoWayTransformer

# Prompts decoded together on one image (`predict_one_image`): a prompt's image tokens and
# upscaled features are 4-12 MB (vit_b), so a few prompts' stay in cache, and under glibc's 32 MB
# mmap threshold, so buffers are reused rather than page-faulted in afresh; on 2 CPU cores this
# decodes ~1.5x faster than 32 prompts at once.
PROMPTS_PER_PASS = 4


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
        keep = self._mask_slice(multimask_output)
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
        b, c, h, w = image_embeddings.shape
        # Image tokens laid out hw x C once per image, before they are copied per prompt: the
        # transformer's projections and norms read rows of C, and the upscaling stays channels-last.
        images = image_embeddings.flatten(2).transpose(1, 2).contiguous()  # B_img x hw x C
        dense = dense_prompt_embeddings.flatten(2).transpose(1, 2)  # N x hw x C
        if image_index is not None:
            src = images.index_select(0, image_index).add_(dense)  # the per-prompt copy takes the sum
        elif b == 1 or b == n:
            src = images + dense
        else:
            raise ValueError(f"{b} image embeddings for {n} prompts: pass image_index to say which is which")
        pos_src = image_pe.flatten(2).transpose(1, 2)  # 1 x hw x C, the same for every prompt

        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(n, -1, -1), sparse_prompt_embeddings], dim=1)

        hs, src = self.transformer.forward_tokens(src, pos_src, tokens)
        masks = self._masks(hs, src.view(n, h, w, c), range(self.num_mask_tokens), None)
        return masks, self.iou_prediction_head(hs[:, 0])

    def predict_one_image(
        self,
        image_embedding: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embedding: torch.Tensor,
        multimask_output: bool,
        mask_size: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` for N prompts on one image with one dense prompt (e.g. the point grid of
        automatic mask generation), a few times cheaper: N x K x h' x w' logits and N x K IoU.

        `image_embedding` and `dense_prompt_embedding` are 1 x C x h x w. `mask_size` (h', w')
        asks for the top-left corner of the 4h x 4w low-res grid only (the rest covers padding).
        Equal to `forward` up to float rounding. The steps are public so that a caller can drop
        prompts by their predicted IoU before paying for their masks.
        """
        image = self.prepare_one_image(image_embedding, image_pe, dense_prompt_embedding)
        masks, iou = [], []
        for start in range(0, sparse_prompt_embeddings.shape[0], PROMPTS_PER_PASS):
            tokens, image_tokens = self.attend_one_image(image, sparse_prompt_embeddings[start : start + PROMPTS_PER_PASS])
            masks.append(self.masks_from_tokens(tokens, image_tokens, multimask_output, mask_size))
            iou.append(self.iou_from_tokens(tokens, multimask_output))
        return torch.cat(masks), torch.cat(iou)

    def prepare_one_image(
        self, image_embedding: torch.Tensor, image_pe: torch.Tensor, dense_prompt_embedding: torch.Tensor
    ) -> SharedImage:
        """What decoding every prompt on one image shares (1 x C x h x w embedding and dense prompt), computed once."""
        return self.transformer.prepare_one_image(image_embedding + dense_prompt_embedding, image_pe)

    def attend_one_image(
        self, image: SharedImage, sparse_prompt_embeddings: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The two-way transformer for N prompts on a prepared image: (N x T x C tokens, N x h x w x C image tokens)."""
        n = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(n, -1, -1), sparse_prompt_embeddings], dim=1)
        tokens, image_tokens = self.transformer.forward_one_image(image, tokens)
        return tokens, image_tokens.view(n, *image.size, -1)

    def iou_from_tokens(self, tokens: torch.Tensor, multimask_output: bool) -> torch.Tensor:
        """N x K predicted IoU from `attend_one_image`'s output tokens."""
        return self.iou_prediction_head(tokens[:, 0])[:, self._mask_slice(multimask_output)]

    def masks_from_tokens(
        self,
        tokens: torch.Tensor,
        image_tokens: torch.Tensor,
        multimask_output: bool,
        mask_size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """N x K x h' x w' low-res logits from `attend_one_image`'s output (see `predict_one_image`)."""
        kept = range(self.num_mask_tokens)[self._mask_slice(multimask_output)]
        return self._masks(tokens, image_tokens, kept, mask_size)

    def _masks(
        self, tokens: torch.Tensor, image_tokens: torch.Tensor, kept: range, mask_size: tuple[int, int] | None
    ) -> torch.Tensor:
        """N x len(kept) x h' x w' logits of mask tokens `kept` (0..3) from N x T x C tokens, N x h x w x C image tokens."""
        n, h, w, _ = image_tokens.shape
        out_h, out_w = mask_size if mask_size is not None else (4 * h, 4 * w)
        # Upscaling is 4 x 4 per embedding cell and never mixes cells: upscale only the cells
        # under the requested corner.
        rows, cols = -(-out_h // 4), -(-out_w // 4)
        hyper_in = torch.stack([self.output_hypernetworks_mlps[i](tokens[:, 1 + i]) for i in kept], dim=1)  # N x K x C/8
        pixels = self._upscale_channels_last(image_tokens[:, :rows, :cols])  # N x rows x cols x 2 x 2 x 2 x 2 x C/8
        masks = torch.bmm(pixels.view(n, -1, pixels.shape[-1]), hyper_in.transpose(1, 2))  # N x pixels x K
        # Sub-pixel (a, b) of cell (i, j) then (a2, b2) of that: row 4i + 2a + a2, column 4j + 2b + b2.
        masks = masks.view(n, rows, cols, 2, 2, 2, 2, len(kept)).permute(0, 7, 1, 3, 5, 2, 4, 6)
        return masks.reshape(n, len(kept), 4 * rows, 4 * cols)[..., :out_h, :out_w]

    @staticmethod
    def _mask_slice(multimask_output: bool) -> slice:
        # Token 0 is the single-mask output; tokens 1..3 the three nested ones.
        return slice(1, None) if multimask_output else slice(0, 1)

    def _upscale_channels_last(self, cells: torch.Tensor) -> torch.Tensor:
        """`output_upscaling` on N x r x c x C cells, kept channels-last: each stride-2 2 x 2
        transposed convolution is one matrix product and the norm is a single `layer_norm` over
        the last axis, instead of convolutions with layout changes and a multi-pass norm."""
        up1, norm, _, up2, _ = self.output_upscaling
        mid, out = up1.out_channels, up2.out_channels
        # ConvTranspose2d weight: C_in x C_out x 2 x 2 -> C_in x (2 x 2 x C_out), bias per sub-pixel.
        w1 = up1.weight.permute(0, 2, 3, 1).reshape(up1.in_channels, 4 * mid)
        x = torch.addmm(up1.bias.repeat(4), cells.reshape(-1, cells.shape[-1]), w1)
        x = F.gelu(F.layer_norm(x.view(-1, mid), (mid,), norm.weight, norm.bias, norm.eps))
        w2 = up2.weight.permute(0, 2, 3, 1).reshape(mid, 4 * out)
        x = F.gelu(torch.addmm(up2.bias.repeat(4), x, w2))
        return x.view(*cells.shape[:3], 2, 2, 2, 2, out)
