"""Mask decoder: output shapes, batched decoding across images, and equality with Meta's module."""

from __future__ import annotations

import pytest
import torch

TOL = 1e-5


def _prompts(model, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    coords = torch.rand(n, 2, 2, generator=g) * model.image_size
    labels = torch.tensor([[1, 0]]).expand(n, 2)
    return model.prompt_encoder(points=(coords, labels), boxes=None, masks=None)


@pytest.mark.parametrize("multimask,k", [(True, 3), (False, 1)])
def test_output_shapes(tiny_pair, multimask, k):
    model = tiny_pair[0]
    embeddings = torch.randn(1, 128, 16, 16)
    sparse, dense = _prompts(model, n=6)
    masks, iou = model.mask_decoder(embeddings, model.prompt_encoder.get_dense_pe(), sparse, dense, multimask)
    assert masks.shape == (6, k, 64, 64)
    assert iou.shape == (6, k)
    all_masks, all_iou = model.mask_decoder.predict_all_masks(embeddings, model.prompt_encoder.get_dense_pe(), sparse, dense)
    assert all_masks.shape == (6, 4, 64, 64) and all_iou.shape == (6, 4)


@pytest.mark.parametrize("multimask", [True, False])
def test_matches_meta(tiny_pair, multimask):
    ours, meta = tiny_pair
    embeddings = torch.randn(1, 128, 16, 16)
    sparse, dense = _prompts(ours, n=3)
    pe = ours.prompt_encoder.get_dense_pe()
    got = ours.mask_decoder(embeddings, pe, sparse, dense, multimask)
    want = meta.mask_decoder(embeddings, pe, sparse, dense, multimask)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=TOL, rtol=0)


def test_one_pass_over_many_images_equals_per_image_decoding(tiny_pair):
    # Training decodes every mask of a batch at once, each prompt reading its own image.
    model = tiny_pair[0]
    embeddings = torch.randn(3, 128, 16, 16)
    image_index = torch.tensor([2, 0, 0, 1, 2])
    sparse, dense = _prompts(model, n=5)
    pe = model.prompt_encoder.get_dense_pe()
    together, iou_together = model.mask_decoder(embeddings, pe, sparse, dense, True, image_index=image_index)
    for i, img in enumerate(image_index.tolist()):
        alone, iou_alone = model.mask_decoder(embeddings[img : img + 1], pe, sparse[i : i + 1], dense[i : i + 1], True)
        assert torch.allclose(together[i], alone[0], atol=TOL)
        assert torch.allclose(iou_together[i], iou_alone[0], atol=TOL)


def test_ambiguous_image_count_is_refused(tiny_pair):
    model = tiny_pair[0]
    sparse, dense = _prompts(model, n=5)
    with pytest.raises(ValueError, match="2 image embeddings for 5 prompts"):
        model.mask_decoder(torch.randn(2, 128, 16, 16), model.prompt_encoder.get_dense_pe(), sparse, dense, True)


@pytest.mark.parametrize("multimask", [True, False])
def test_one_image_path_matches_meta(tiny_pair, multimask):
    # Automatic mask generation decodes many prompts on one image: no per-prompt copy of the
    # image, low-rank attention, masks for a corner of the grid only. Same numbers as Meta's.
    ours, meta = tiny_pair
    embeddings = torch.randn(1, 128, 16, 16)
    sparse, dense = _prompts(ours, n=5)
    pe = ours.prompt_encoder.get_dense_pe()
    want_masks, want_iou = meta.mask_decoder(embeddings, pe, sparse, dense, multimask)
    masks, iou = ours.mask_decoder.predict_one_image(embeddings, pe, sparse, dense[:1], multimask)
    torch.testing.assert_close(masks, want_masks, atol=TOL, rtol=0)
    torch.testing.assert_close(iou, want_iou, atol=TOL, rtol=0)
    corner, _ = ours.mask_decoder.predict_one_image(embeddings, pe, sparse, dense[:1], multimask, mask_size=(37, 50))
    torch.testing.assert_close(corner, want_masks[..., :37, :50], atol=TOL, rtol=0)


def test_low_rank_attention_equals_plain_attention(tiny_pair):
    attention = tiny_pair[0].mask_decoder.transformer.layers[1].cross_attn_image_to_token
    g = torch.Generator().manual_seed(1)
    tokens = torch.randn(4, 7, 128, generator=g)
    image, residual = torch.randn(4, 64, 128, generator=g), torch.randn(64, 128, generator=g)
    want_tokens, want_image = attention(tokens, image, image), residual + attention(image, tokens, tokens)
    torch.testing.assert_close(attention.attend_to_image(tokens, image, image), want_tokens, atol=TOL, rtol=0)
    torch.testing.assert_close(attention.attend_to_tokens(image, tokens, tokens, residual), want_image, atol=TOL, rtol=0)
    # One image shared by every prompt, projected once.
    shared = image[:1].expand(4, -1, -1)
    heads = attention.project_image(image[0], image[0])
    torch.testing.assert_close(attention.attend_to_image_heads(tokens, *heads), attention(tokens, shared, shared), atol=TOL, rtol=0)
    torch.testing.assert_close(
        attention.attend_to_tokens_heads(attention.project_image_queries(image[0]), tokens, tokens, residual),
        residual + attention(shared, tokens, tokens), atol=TOL, rtol=0,
    )


@pytest.mark.parametrize(
    "queries, keys", [(7, 256), (256, 7), (9, 9)], ids=["tokens-to-image", "image-to-tokens", "tokens"]
)
def test_cpu_attention_matches_the_fused_kernel_in_value_and_gradient(queries: int, keys: int):
    """The CPU's matmul-softmax path, in both of its layouts, gives what PyTorch's fused kernel gives in fp32."""
    from sam_train.model.transformer import attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 8, n, 8, generator=g, requires_grad=True) for n in (queries, keys, keys))
    fused = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    want_grads = torch.autograd.grad(fused.square().sum(), (q, k, v))
    exact = attention(q, k, v)
    torch.testing.assert_close(exact, fused, atol=1e-5, rtol=1e-5)
    for got, want in zip(torch.autograd.grad(exact.square().sum(), (q, k, v)), want_grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    half = [t.detach().bfloat16().requires_grad_() for t in (q, k, v)]
    ours = attention(*half)
    assert ours.dtype == torch.bfloat16
    grads = torch.autograd.grad(ours.float().square().sum(), half)
    # bf16 keeps 8 bits of mantissa: judged by the error's norm against the exact result's (a key's
    # gradient sums 256 queries' terms, so single entries can cancel to near zero).
    for got, want in zip((ours, *grads), (fused, *want_grads)):
        assert (got.float() - want).norm() < 0.02 * want.norm()
