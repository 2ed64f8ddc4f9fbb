"""SAM's two-way transformer: prompt tokens and image tokens attend to each other in turn."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over B x heads x N x d tensors.

    On a GPU, PyTorch's fused kernel. On a CPU, matmul-softmax-matmul (oneDNN runs the matmuls on
    the CPU's bf16 units; the fused CPU kernel's backward is ~5x slower in bf16 at the decoder's
    head width of 8-16), laid out so that the softmax never runs along a short row: image tokens
    attending to ~10 prompt tokens take their scores as keys x queries and normalise down the
    columns, which vectorises along the 256+ queries. A softmax along rows of 10 is ~10x slower
    on a CPU, and it made ~10% of a tiny training step (`scripts/bench_train.py --parts
    precision`).
    """
    if q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v)
    q = q * q.shape[-1] ** -0.5
    if k.shape[-2] < q.shape[-2]:
        return (k @ q.transpose(-1, -2)).softmax(-2).transpose(-1, -2) @ v
    return (q @ k.transpose(-1, -2)).softmax(-1) @ v


class Attention(nn.Module):
    """Multi-head attention whose q/k/v projections may shrink the width by `downsample_rate`."""

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        if self.internal_dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide the internal width {self.internal_dim}")
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.v_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)  # B x heads x N x c

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split_heads(self.q_proj(q)), self._split_heads(self.k_proj(k)), self._split_heads(self.v_proj(v))
        out = attention(q, k, v)
        b, _, n, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, self.internal_dim))

    # Many prompts on one image: the image side has L = 4096 tokens, the prompt side T ~ 7 per
    # prompt. Projecting L tokens costs L x C x D per prompt; the rewrites below reorder the same
    # products so that the per-prompt work is L x C x (heads x T) instead (56 vs 128 columns), and
    # an image shared by every prompt is projected once. Mathematically equal to `forward`.

    def _head_weights(self, proj: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
        """A projection's weight as heads x d x C and bias as heads x d."""
        return proj.weight.view(self.num_heads, -1, proj.in_features), proj.bias.view(self.num_heads, -1)

    def project_image(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (heads x d x L) and values (heads x L x d) of one image's L x C tokens, for `attend_to_image_heads`."""
        heads, d = self.num_heads, self.internal_dim // self.num_heads
        kh = self.k_proj(k).view(-1, heads, d).permute(1, 2, 0)
        vh = self.v_proj(v).view(-1, heads, d).transpose(0, 1)
        return kh, vh

    def project_image_queries(self, q: torch.Tensor) -> torch.Tensor:
        """Queries (heads x d x L) of one image's L x C tokens, for `attend_to_tokens_heads`."""
        return self.q_proj(q).view(-1, self.num_heads, self.internal_dim // self.num_heads).permute(1, 2, 0)

    def attend_to_image_heads(self, q: torch.Tensor, kh: torch.Tensor, vh: torch.Tensor) -> torch.Tensor:
        """`forward` for N x T x C prompt tokens attending to one image projected by `project_image`."""
        n, t, _ = q.shape
        heads, d = self.num_heads, self.internal_dim // self.num_heads
        qh = self.q_proj(q).view(n * t, heads, d).transpose(0, 1) * d**-0.5  # heads x NT x d
        p = torch.bmm(qh, kh).softmax(-1)  # heads x NT x L
        out = torch.bmm(p, vh).view(heads, n, t, d).permute(1, 2, 0, 3)
        return self.out_proj(out.reshape(n, t, self.internal_dim))

    def attend_to_image(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """`forward` for N x T x C prompt tokens attending to N x L x C image tokens, never projecting the image."""
        n, t, _ = q.shape
        heads, d = self.num_heads, self.internal_dim // self.num_heads
        qh = self._split_heads(self.q_proj(q)) * d**-0.5  # N x heads x T x d
        # Fold each head's query into the key weights; the key bias shifts a query's scores by a
        # constant, which softmax ignores.
        wk, _ = self._head_weights(self.k_proj)
        folded = torch.einsum("nhtd,hdc->nhtc", qh, wk).reshape(n, heads * t, -1)
        p = torch.bmm(folded, k.transpose(1, 2)).softmax(-1)  # N x (heads T) x L
        # Weight the image before projecting it; rows of p sum to 1, so the bias passes unchanged.
        wv, bv = self._head_weights(self.v_proj)
        pv = torch.bmm(p, v).view(n, heads, t, -1)  # N x heads x T x C
        out = torch.einsum("nhtc,hdc->nthd", pv, wv) + bv
        return self.out_proj(out.reshape(n, t, self.internal_dim))

    def attend_to_tokens_heads(
        self, qh: torch.Tensor, k: torch.Tensor, v: torch.Tensor, residual: torch.Tensor
    ) -> torch.Tensor:
        """`residual + forward(q, k, v)` for one image's tokens, projected by `project_image_queries`,
        attending to N x T x C prompt tokens: N x L x C."""
        n, t, _ = k.shape
        heads, d = self.num_heads, self.internal_dim // self.num_heads
        kh = self.k_proj(k).view(n * t, heads, d).transpose(0, 1) * d**-0.5  # heads x NT x d
        # Scores laid out N x heads x T x L: softmax over T then runs along contiguous L rows.
        p = torch.bmm(kh, qh).view(heads, n, t, -1).softmax(2).transpose(0, 1).reshape(n, heads * t, -1)
        return self._project_attended_tokens(p, v, residual)

    def attend_to_tokens(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """`residual + forward(q, k, v)` for N x L x C image tokens attending to N x T x C prompt tokens."""
        n, t, _ = k.shape
        heads, d = self.num_heads, self.internal_dim // self.num_heads
        kh = self._split_heads(self.k_proj(k)) * d**-0.5  # N x heads x T x d
        # Fold the keys into each head's query weights: (q W_q^T + b_q) k^T = q (W_q^T k^T) + b_q k^T.
        wq, bq = self._head_weights(self.q_proj)
        folded = torch.einsum("hdc,nhtd->nhtc", wq, kh).reshape(n, heads * t, -1)
        bias = torch.einsum("hd,nhtd->nht", bq, kh).reshape(n, heads * t, 1)
        scores = torch.baddbmm(bias, folded, q.transpose(1, 2))  # N x (heads T) x L
        p = scores.view(n, heads, t, -1).softmax(2).view(n, heads * t, -1)
        return self._project_attended_tokens(p, v, residual)

    def _project_attended_tokens(self, p: torch.Tensor, v: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual + out_proj(p^T v_proj(v)) for N x (heads T) x L attention `p` over N x T x C tokens.

        out_proj(p v) = p (v W_o^T) + b_o: project the T values, not the L outputs. Each image
        token's weights sum to 1 per head, so b_o / heads on every projected value adds b_o.
        """
        n, t, _ = v.shape
        heads, d = self.num_heads, self.internal_dim // self.num_heads
        vh = self._split_heads(self.v_proj(v))  # N x heads x T x d
        wo = self.out_proj.weight.view(-1, heads, d)  # C x heads x d
        values_out = torch.einsum("nhtd,chd->nhtc", vh, wo).reshape(n, heads * t, -1) + self.out_proj.bias / heads
        return torch.baddbmm(residual, p.transpose(1, 2), values_out)


class MLPBlock(nn.Module):
    """Two-layer MLP of the attention blocks (`lin1`/`lin2` as in Meta's checkpoints)."""

    def __init__(self, embedding_dim: int, mlp_dim: int) -> None:
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(F.relu(self.lin1(x)))


class TwoWayAttentionBlock(nn.Module):
    """Token self-attention, token->image cross-attention, token MLP, image->token cross-attention."""

    def __init__(
        self, embedding_dim: int, num_heads: int, mlp_dim: int, attention_downsample_rate: int, skip_first_layer_pe: bool
    ) -> None:
        super().__init__()
        self.self_attn = Attention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLPBlock(embedding_dim, mlp_dim)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(
        self, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor, key_pe: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        queries = self._attend_tokens_to_tokens(queries, query_pe)
        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))
        queries = self.norm3(queries + self.mlp(queries))

        q = queries + query_pe  # the image tokens have not changed since `k` was formed
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))
        return queries, keys

    def forward_one_image(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        query_pe: torch.Tensor,
        key_pe: torch.Tensor,
        image_heads: tuple[torch.Tensor, ...] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` for N prompts on one image, by `Attention`'s low-rank rewrites.

        With `image_heads` (from `project_image`), `keys` is the L x C image every prompt still
        shares (first block), and its projections are not recomputed.
        """
        queries = self._attend_tokens_to_tokens(queries, query_pe)
        q = queries + query_pe
        if image_heads is None:
            k = keys + key_pe
            queries = self.norm2(queries + self.cross_attn_token_to_image.attend_to_image(q, k, keys))
        else:
            queries = self.norm2(queries + self.cross_attn_token_to_image.attend_to_image_heads(q, *image_heads[:2]))
        queries = self.norm3(queries + self.mlp(queries))

        q = queries + query_pe  # the image tokens have not changed since `k` was formed
        if image_heads is None:
            keys = self.norm4(self.cross_attn_image_to_token.attend_to_tokens(k, q, queries, residual=keys))
        else:
            attended = self.cross_attn_image_to_token.attend_to_tokens_heads(image_heads[2], q, queries, residual=keys)
            keys = self.norm4(attended)
        return queries, keys

    def project_image(self, keys: torch.Tensor, key_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This block's projections of L x C image tokens that are the same for every prompt."""
        k = keys + key_pe
        keys_heads, values_heads = self.cross_attn_token_to_image.project_image(k, keys)
        return keys_heads, values_heads, self.cross_attn_image_to_token.project_image_queries(k)

    def _attend_tokens_to_tokens(self, queries: torch.Tensor, query_pe: torch.Tensor) -> torch.Tensor:
        # The first layer's queries *are* the prompt embeddings (PE included), so it replaces
        # rather than adds, exactly as SAM was trained.
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        return self.norm1(queries)


class TwoWayTransformer(nn.Module):
    """Stack of two-way blocks plus a final token->image attention."""

    def __init__(
        self, depth: int, embedding_dim: int, num_heads: int, mlp_dim: int, attention_downsample_rate: int = 2
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(embedding_dim, num_heads, mlp_dim, attention_downsample_rate, skip_first_layer_pe=i == 0)
            for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(
        self, image_embedding: torch.Tensor, image_pe: torch.Tensor, point_embedding: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """B x C x h x w image, its PE, B x N x C tokens -> (B x N x C tokens, B x hw x C image)."""
        keys = image_embedding.flatten(2).transpose(1, 2)
        key_pe = image_pe.flatten(2).transpose(1, 2)
        return self.forward_tokens(keys, key_pe, point_embedding)

    def forward_tokens(
        self, keys: torch.Tensor, key_pe: torch.Tensor, point_embedding: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` on image tokens already laid out B x hw x C (and their PE, B or 1 x hw x C)."""
        # Contiguous once: every projection and norm below reads rows of C, and would otherwise
        # copy a strided view each time (the numbers are the same). No copy if already so.
        keys, key_pe = keys.contiguous(), key_pe.contiguous()
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, point_embedding, key_pe)
        q, k = queries + point_embedding, keys + key_pe
        queries = self.norm_final_attn(queries + self.final_attn_token_to_image(q, k, keys))
        return queries, keys

    def prepare_one_image(self, image_embedding: torch.Tensor, image_pe: torch.Tensor) -> "SharedImage":
        """What decoding any prompt on one 1 x C x h x w image shares: its tokens and their first-block projections."""
        keys = image_embedding[0].flatten(1).t()  # L x C
        key_pe = image_pe[0].flatten(1).t()
        return SharedImage(keys, key_pe, self.layers[0].project_image(keys, key_pe), tuple(image_embedding.shape[2:]))

    def forward_one_image(self, image: "SharedImage", point_embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` for N prompts on one prepared image: (N x T x C tokens, N x L x C image tokens)."""
        queries, keys = point_embedding, image.keys
        for i, layer in enumerate(self.layers):
            heads = image.first_block_heads if i == 0 else None  # the first block sees the image unchanged
            queries, keys = layer.forward_one_image(queries, keys, point_embedding, image.key_pe, heads)
        q, k = queries + point_embedding, keys + image.key_pe
        queries = self.norm_final_attn(queries + self.final_attn_token_to_image.attend_to_image(q, k, keys))
        return queries, keys


@dataclass(frozen=True)
class SharedImage:
    """One image as every prompt decoded on it starts: computed once by `TwoWayTransformer.prepare_one_image`."""

    keys: torch.Tensor  # L x C image tokens (embedding + dense prompt)
    key_pe: torch.Tensor  # L x C
    first_block_heads: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # `TwoWayAttentionBlock.project_image`
    size: tuple[int, int]  # (h, w), L = h w
