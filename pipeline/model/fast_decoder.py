"""SAM's box decoder with its per-box work factored, for the exported CPU graphs.

SAM's mask decoder repeats the slice's 4096 image tokens for every box, so all of its large matrix products
run once per box. Two exact rewrites (up to float rounding) remove most of them:

* work that does not depend on the box runs once per call on the slice's tokens: in the first two-way
  block the keys are still the image embedding, so the token-to-image key/value projections and the
  image-to-token query projection are shared by all boxes (broadcast over the box batch);
* attention between 4096 image tokens and the 7 prompt tokens is reassociated so that no (4096 x 256) x
  (256 x 128) projection is applied per box: with ``a_h`` a head's token queries and ``K`` the image keys,
  ``a_h (K W_h + b_h)^T = (a_h W_h^T) K^T + const`` (the constant cancels in the softmax over image tokens),
  and a head's output ``A_h (K W_h + b_h) = (A_h K) W_h + b_h`` since softmax rows sum to one; image-to-token
  attention folds the query projection into the 7 keys and the output projection into the 7 values the
  same way.

Per box this takes the decoder from 3.6 to about 1.6 GFLOP; the upscaling convolutions (0.8 GFLOP) cannot
be factored. :class:`FactoredBoxDecoder` reads the weights of the loaded network (nothing is copied or
retrained) and is checked against the original modules in tests/test_fast_decoder.py and at every export
(pipeline/model/graph_export.py's parity check). Eager torch keeps running the original modules: it is the
reference.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class BoxDecoder(torch.nn.Module):
    """Prompt encoder + mask decoder of one slice as one graph: (embedding, boxes) -> (logits, IoU).

    ``embedding`` (1, 256, 64, 64); ``boxes`` (B, 1, 4) XYXY in the 256 frame. The dense positional encoding
    does not depend on the input, so it is stored as a constant.
    """

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.prompt_encoder = net.prompt_encoder
        self.mask_decoder = net.mask_decoder
        self.register_buffer("dense_pe", net.prompt_encoder.get_dense_pe().detach().clone())

    def forward(self, embedding: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sparse, dense = self.prompt_encoder(points=None, boxes=boxes, masks=None)
        return self.mask_decoder(
            image_embeddings=embedding,
            image_pe=self.dense_pe,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, n, c) -> (B, heads, n, c / heads)."""
    b, n, c = x.shape
    return x.reshape(b, n, heads, c // heads).transpose(1, 2)


def _recombine(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, n, d) -> (B, n, heads * d)."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def _per_head(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """A projection's (heads * d, C) weight as (heads, d, C)."""
    return weight.reshape(heads, weight.shape[0] // heads, weight.shape[1])


def tokens_to_image(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SAM's ``Attention(q=tokens (B, T, C), k=image (B|1, N, C), v=image)`` -> (B, T, C).

    Image tokens shared by all boxes (batch 1) are projected once and broadcast; box-dependent image tokens
    are never projected: the key projection moves onto the T queries and the value projection after the
    attention-weighted sum.
    """
    if k.shape[0] == 1:
        return attn(q=q, k=k, v=v)  # projections of the shared image tokens run once, broadcast over boxes
    heads = attn.num_heads
    qh = _heads(attn.q_proj(q), heads)  # (B, h, T, d)
    b, _, t, d = qh.shape
    u = (qh @ _per_head(attn.k_proj.weight, heads)).reshape(b, heads * t, -1) / math.sqrt(d)  # (B, hT, C)
    scores = u @ k.transpose(1, 2)  # (B, hT, N); the key bias shifts rows: cancels
    weights = torch.softmax(scores, dim=-1)
    pooled = (weights @ v).reshape(b, heads, t, -1)  # (B, h, T, C)
    wv = _per_head(attn.v_proj.weight, heads).transpose(1, 2)  # (h, C, d)
    out = pooled @ wv + attn.v_proj.bias.reshape(heads, 1, d)  # rows of the weights sum to one
    return attn.out_proj(_recombine(out))


def image_to_tokens(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SAM's ``Attention(q=image (B|1, N, C), k=tokens (B, T, C), v=tokens)`` -> (B, N, C).

    Shared image queries are projected once; box-dependent ones are multiplied by the query weights folded
    into the T keys. The output projection is folded into the T values, so the per-box product with the
    image tokens is (hT x C) x (C x N) and (N x hT) x (hT x C) with hT = 56, instead of C x C/2 twice.
    Scores are kept token-major, (B, h, T, N): the softmax over the 7 tokens then runs along an outer axis,
    across contiguous image tokens, which a runtime vectorises (a softmax over a last axis of 7 it does not).
    """
    heads = attn.num_heads
    kh = _heads(attn.k_proj(k), heads)  # (B, h, T, d)
    vh = _heads(attn.v_proj(v), heads)
    b, _, t, d = kh.shape
    n = q.shape[1]
    kh = kh / math.sqrt(d)  # the softmax scale, on the 7 keys rather than the N x 7 scores
    if q.shape[0] == 1:
        qh = _heads(attn.q_proj(q), heads)  # (1, h, N, d), once for all boxes
        scores = kh @ qh.transpose(2, 3)  # (B, h, T, N)
    else:
        folded = (kh @ _per_head(attn.q_proj.weight, heads)).reshape(b, heads * t, -1)  # (B, hT, C)
        bias = kh @ attn.q_proj.bias.reshape(heads, d, 1)  # (B, h, T, 1)
        scores = (folded @ q.transpose(1, 2)).reshape(b, heads, t, n) + bias
    weights = torch.softmax(scores, dim=2).reshape(b, heads * t, n)  # over the T tokens
    wo = _per_head(attn.out_proj.weight.t(), heads)  # (h, d, C)
    values = (vh @ wo).reshape(b, heads * t, -1)  # (B, hT, C): each head's values through its out_proj rows
    return weights.transpose(1, 2) @ values + attn.out_proj.bias


def upscaled_masks(
    upscaling: nn.Sequential, keys: torch.Tensor, hyper: torch.Tensor, height: int, width: int
) -> torch.Tensor:
    """SAM's ``output_upscaling`` (ConvT 2x2/2, LayerNorm2d, GELU, ConvT 2x2/2, GELU) and the dot product with
    the mask token's hypernetwork output, computed channels-last: keys (B, h*w, C) -> masks (B, 1, 4h, 4w).

    A 2x2 stride-2 transposed convolution is a per-pixel linear map to 2x2 output pixels, so both are matrix
    products on the token-major keys, and the 2x2 blocks are interleaved only on the one-channel masks.
    This spares the runtime two layout reorders of the largest tensors and lets LayerNorm2d run as a
    LayerNorm over the last axis (the same formula: biased variance, eps inside the square root). Each bias,
    repeated for the 2x2 outputs, is added straight to its product, so a runtime fuses it (and, after the
    second, the GELU) into the matrix product instead of a pass over the largest tensor.
    """
    up1, norm, act1, up2, act2 = upscaling
    b = keys.shape[0]
    c_in, c_mid = up1.weight.shape[:2]
    c_out = up2.weight.shape[1]
    x = keys @ up1.weight.permute(0, 2, 3, 1).reshape(c_in, 4 * c_mid) + up1.bias.repeat(4)  # (ki, kj, o)
    x = x.reshape(b, -1, c_mid)  # (B, N*4, c_mid)
    x = act1(F.layer_norm(x, (c_mid,), norm.weight, norm.bias, norm.eps))
    x = act2(x @ up2.weight.permute(0, 2, 3, 1).reshape(c_mid, 4 * c_out) + up2.bias.repeat(4))  # (li, lj, o)
    x = x.reshape(b, -1, c_out)  # (B, N*16, c_out)
    masks = x @ hyper.unsqueeze(2)  # (B, N*16, 1): pixel (i, j, ki, kj, li, lj)
    masks = masks.reshape(b, height, width, 2, 2, 2, 2).permute(0, 1, 3, 5, 2, 4, 6)
    return masks.reshape(b, 1, 4 * height, 4 * width)


class FactoredBoxDecoder(BoxDecoder):
    """Prompt encoder + mask decoder of one slice: (embedding (1, C, h, w), boxes (B, 1, 4)) -> low-res logits
    (B, 1, 4h, 4w) and IoU (B, 1), as :class:`BoxDecoder`, with the per-box work factored
    (module docstring). Single-mask output only (``multimask_output=False``), as the engine uses it."""

    def forward(self, embedding: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        decoder = self.mask_decoder
        transformer = decoder.transformer
        sparse, _ = self.prompt_encoder(points=None, boxes=boxes, masks=None)  # (B, 2, C)
        dense = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(sparse.shape[0], -1, -1), sparse], dim=1)
        _, _channels, height, width = embedding.shape
        keys = (embedding + dense).flatten(2).transpose(1, 2)  # (1, N, C): shared until the first update
        key_pe = self.dense_pe.flatten(2).transpose(1, 2)
        queries = tokens
        for layer in transformer.layers:
            if layer.skip_first_layer_pe:
                queries = layer.self_attn(q=queries, k=queries, v=queries)
            else:
                q = queries + tokens
                queries = queries + layer.self_attn(q=q, k=q, v=queries)
            queries = layer.norm1(queries)
            keyed = keys + key_pe  # both cross attentions of the block read it
            queries = layer.norm2(
                queries + tokens_to_image(layer.cross_attn_token_to_image, queries + tokens, keyed, keys)
            )
            queries = layer.norm3(queries + layer.mlp(queries))
            attn_out = image_to_tokens(layer.cross_attn_image_to_token, keyed, queries + tokens, queries)
            keys = layer.norm4(keys + attn_out)  # (B, N, C) from here on
        attn_out = tokens_to_image(
            transformer.final_attn_token_to_image, queries + tokens, keys + key_pe, keys
        )
        queries = transformer.norm_final_attn(queries + attn_out)
        hyper = decoder.output_hypernetworks_mlps[0](queries[:, 1])  # first mask token: single-mask output
        masks = upscaled_masks(decoder.output_upscaling, keys, hyper, height, width)
        iou = decoder.iou_prediction_head(queries[:, 0])[:, :1]
        return masks, iou
