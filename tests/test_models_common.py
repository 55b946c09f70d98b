"""Shared model pieces against diffusers' definitions (in-process, no parallel state needed)."""
import pytest
import torch

from megatron_qvgen.models.common.embeddings import sinusoidal_timestep_embedding
from megatron_qvgen.models.common.pipeline import stage_layers
from megatron_qvgen.models.common.rope import apply_rotary, rope_3d, wan_axis_dims


@pytest.mark.parametrize("head_dim", [6, 8, 10, 128])
def test_wan_rope_tables_equal_diffusers(head_dim):
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    reference = WanRotaryPosEmbed(head_dim, (1, 2, 2), max_seq_len=64)
    latents = torch.zeros(1, 4, 3, 10, 6)
    ref_cos, ref_sin = reference(latents)  # [1, tokens, 1, head_dim]
    cos, sin = rope_3d([torch.arange(3), torch.arange(5), torch.arange(3)], wan_axis_dims(head_dim))
    assert torch.equal(cos, ref_cos[0, :, 0]) and torch.equal(sin, ref_sin[0, :, 0])


def test_rotary_leaves_leading_tokens_and_rotates_pairs():
    x = torch.randn(7, 2, 3, 8)
    cos, sin = rope_3d([torch.arange(1), torch.arange(2), torch.arange(2)], (4, 2, 2))
    out = apply_rotary(x, cos, sin)
    assert torch.equal(out[:3], x[:3])  # 7 tokens, 4 rotated: the first 3 pass through
    # a rotation keeps each pair's norm
    pairs = lambda t: t[3:].unflatten(-1, (-1, 2)).norm(dim=-1)  # noqa: E731
    torch.testing.assert_close(pairs(out), pairs(x))
    with pytest.raises(ValueError, match="rotary tables cover"):
        apply_rotary(x[:2], cos, sin)


@pytest.mark.parametrize("dim,flip,shift", [(256, True, 0), (10, True, 0), (64, False, 1)])
def test_sinusoidal_timestep_embedding_equals_diffusers(dim, flip, shift):
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0.0, 3.0, 777.5, 999.0])
    ours = sinusoidal_timestep_embedding(t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
    assert torch.equal(ours, get_timestep_embedding(t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift))


def test_stage_layers_follow_megatron_interleaving():
    assert [stage_layers(8, 2, p) for p in range(2)] == [(0, 4), (4, 8)]
    # 2 stages x 2 chunks of 2: chunk v of stage p holds run v * P + p
    assert [stage_layers(8, 2, p, 2, v) for v in range(2) for p in range(2)] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    with pytest.raises(ValueError, match="do not split"):
        stage_layers(6, 4, 0)
