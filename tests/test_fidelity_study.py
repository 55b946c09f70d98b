"""The fidelity study's own pieces: clips read back against their captions, the method presets it compares,
and the spectrum bookkeeping of the auxiliary module."""
import numpy as np
import pytest
import torch


def test_clips_are_read_back_as_their_captions_say():
    from megatron_qvgen.data.synthetic_scenes import (READ_ATTRIBUTES, caption_attributes, random_scene, read_clip,
                                                      render_scene)

    hits = {a: 0 for a in READ_ATTRIBUTES}
    for i in range(100):
        scene = random_scene(np.random.default_rng([3, i]), max_objects=1)
        expected, read = caption_attributes(scene.caption()), read_clip(render_scene(scene, 3, 16, 16))
        for a in READ_ATTRIBUTES:
            hits[a] += expected[a] == read[a]
    assert all(h >= 93 for h in hits.values()), hits
    two = ("a small red circle moving slowly up and a large blue square moving quickly to the left on a black "
           "background")
    assert caption_attributes(two) is None                    # only one-object captions are scored
    flat = np.full((3, 16, 16, 3), 0.45, dtype=np.float32)    # an empty gray clip: nothing to read but the background
    assert read_clip(flat) == {"background": "gray", "colour": None, "size": None, "direction": None}


def test_projection_latents_decode_back_to_the_rendered_colours():
    from megatron_qvgen.data.synthetic_scenes import random_scene, render_scene
    from megatron_qvgen.data.synthetic_shards import latent_to_rgb, project_to_latent

    video = render_scene(random_scene(np.random.default_rng(1)), 3, 16, 16)
    assert np.abs(latent_to_rgb(project_to_latent(video, 16)) - video).max() < 1e-5


@pytest.mark.parametrize("method,aux,decay,fraction", [("ptq", 0, False, 0.5), ("lsq", 0, False, 0.5),
                                                       ("qvgen_keep_aux", 16, False, 0.5), ("qvgen", 16, True, 0.5),
                                                       ("decay_all", 16, True, 1.0)])
def test_study_compares_the_paper_presets_at_the_recipe_rank(method, aux, decay, fraction):
    from megatron_qvgen.fidelity.study import study_config

    cfg = study_config("small_wan_cpu", method, "w3a3", 2, [("train.steps", "60")])
    q = cfg.quant
    assert (q.weight_bits, q.act_bits, cfg.train.seed, cfg.train.steps) == (3, 3, 2, 60)
    assert (q.aux_rank, q.rank_decay, q.decay_fraction) == (aux, decay, fraction)
    assert cfg.train.save_dir is None and cfg.train.tensorboard_dir is None


def test_spectrum_share_counts_small_and_removed_directions():
    from megatron_qvgen.fidelity.study import SpectrumLog

    log = SpectrumLog([torch.tensor([4.0, 2.0, 1.0, 0.5], dtype=torch.float64)] * 2)
    log.record(0, [torch.tensor([4.0, 2.0, 1.0, 0.5], dtype=torch.float64)] * 2)
    log.record(5, [torch.tensor([4.0, 0.2, 0.1, 0.0], dtype=torch.float64)] * 2)  # below 10 % of 4: three of four
    log.record(9, [])                                                             # rank 0: the module is gone
    assert log.share_small == [0.0, 0.75, 1.0] and log.steps == [0, 5, 9]
    assert log.mean_spectrum[1] == pytest.approx([1.0, 0.05, 0.025, 0.0])


@pytest.mark.parametrize("d_out,rank,d_in", [(48, 6, 80), (32, 8, 8), (64, 1, 16)])
def test_lowrank_singular_values_equal_those_of_the_product(d_out, rank, d_in):
    from megatron_qvgen.fidelity.study import lowrank_singular_values

    g = torch.Generator().manual_seed(d_out + rank)
    left = torch.randn(d_out, rank, generator=g, dtype=torch.float64)
    right = torch.randn(rank, d_in, generator=g, dtype=torch.float64) * torch.logspace(0, -3, rank)[:, None]
    expected = torch.linalg.svdvals(left @ right)[:rank]
    assert torch.allclose(lowrank_singular_values(left, right), expected, rtol=1e-10, atol=1e-12)
