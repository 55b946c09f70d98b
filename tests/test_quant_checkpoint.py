"""QAT tensors in megatron dist checkpoints: save at TP=2, load at TP=1 and TP=4, nothing lost."""
import os

import pytest
import torch

from megatron_qvgen.config import ParallelConfig, QuantConfig
from multiproc import run_distributed
from test_quant_linear_tp import SPLIT, build_pair

QUANT = QuantConfig.for_method("qvgen", "w4a4", aux_rank=8)


def _pair_module(world, quant=QUANT):
    from megatron.core.transformer.module import MegatronModule
    from megatron.core import ModelParallelConfig

    class Pair(MegatronModule):
        def __init__(self):
            super().__init__(config=ModelParallelConfig(tensor_model_parallel_size=world))
            self.col, self.row = build_pair(world, quant)

        def forward(self, x):
            return self.row(torch.nn.functional.gelu(self.col(x)[0]))[0]

    return Pair()


def _x():
    return torch.randn(6, 3, 24, generator=torch.Generator().manual_seed(21))


def _local_params(pair):
    return {f"{tag}.{n}": p.detach().clone() for tag, layer in (("col", pair.col), ("row", pair.row))
            for n, p in layer.named_parameters()}


def _save_trained(rank, world, path):
    from megatron_qvgen.dist_ckpt import save_sharded
    from megatron_qvgen.parallel import initialize_parallel
    from megatron_qvgen.quant import initialize_quantizers, quant_context
    from megatron_qvgen.quant.rank_decay import RankDecay, RankDecaySchedule, TorchOptimizerAdapter

    initialize_parallel(ParallelConfig(tensor_parallel=world), seed=1)
    pair = _pair_module(world)
    initialize_quantizers(pair)
    opt = torch.optim.AdamW(pair.parameters(), lr=1e-2)
    decay = RankDecay(pair, RankDecaySchedule(QUANT, phase_steps=2), TorchOptimizerAdapter(opt))
    for step in range(3):  # crosses the first boundary: rank 8 -> 4
        gate = decay.on_step(step)
        opt.zero_grad()
        with quant_context(timestep_groups=torch.tensor([5, 6, 7]), aux_gate=gate):
            pair(_x()).square().mean().backward()
        opt.step()
    save_sharded(pair.sharded_state_dict(), path)
    with quant_context(timestep_groups=torch.tensor([5, 6, 7]), aux_gate=decay.schedule.gate_at(3)):
        y = pair(_x()).detach()
    return {"params": _local_params(pair), "y": y, "rank": torch.tensor(pair.col.aux_rank)}


def _active_ranks(pair):
    return torch.tensor([pair.col.aux_rank, pair.row.aux_rank])


def _load_and_compare(rank, world, path, full_params, gate):
    from megatron.core import parallel_state as ps

    from megatron_qvgen.dist_ckpt import load_sharded
    from megatron_qvgen.parallel import initialize_parallel
    from megatron_qvgen.quant import quant_context
    from megatron_qvgen.quant.rank_decay import RankDecay, RankDecaySchedule

    initialize_parallel(ParallelConfig(tensor_parallel=world), seed=99)
    tp = ps.get_tensor_model_parallel_rank()
    loaded = _pair_module(world)
    RankDecay(loaded, RankDecaySchedule(QUANT, phase_steps=2)).restore(aux_in_checkpoint=True)
    loaded.load_state_dict(load_sharded(loaded.sharded_state_dict(), path))
    # the same values written straight into a fresh model of this TP size
    direct = _pair_module(world)
    RankDecay(direct, RankDecaySchedule(QUANT, phase_steps=2)).restore(aux_in_checkpoint=True)
    with torch.no_grad():
        for name, p in _local_params_refs(direct).items():
            split = SPLIT[name]
            full = full_params[name]
            p.copy_(full if split is None else full.chunk(world, dim=split)[tp])
        for layer in (direct.col, direct.row):
            layer.mark_initialized()
            layer.set_active_rank(4)
    with quant_context(timestep_groups=torch.tensor([5, 6, 7]), aux_gate=gate):
        y_loaded, y_direct = loaded(_x()).detach(), direct(_x()).detach()
    return {"params": _local_params(loaded), "y_loaded": y_loaded, "y_direct": y_direct,
            "ranks": _active_ranks(loaded)}


def _local_params_refs(pair):
    return {f"{tag}.{n}": p for tag, layer in (("col", pair.col), ("row", pair.row)) for n, p in layer.named_parameters()}


def _assemble(results, name):
    split = SPLIT[name]
    return results[0]["params"][name] if split is None else torch.cat([r["params"][name] for r in results], dim=split)


def test_save_tp2_load_tp1_and_tp4_bit_identical(tmp_path):
    path = str(tmp_path / "ckpt")
    saved = run_distributed(_save_trained, 2, path)
    assert int(saved[0]["rank"]) == 4
    full = {name: _assemble(saved, name) for name in saved[0]["params"]}
    gate = 0.5  # step 3 is half way through the second phase (T = 2): cosine gate 0.5
    for world in (1, 4):
        results = run_distributed(_load_and_compare, world, path, full, gate)
        for name in full:
            assert torch.equal(_assemble(results, name), full[name]), f"TP={world}: {name} changed in the round trip"
        for r in results:
            assert r["ranks"].tolist() == [4, 4], "the active rank did not come back from the checkpoint"
            assert torch.equal(r["y_loaded"], r["y_direct"]), f"TP={world}: loaded model's output differs"
        torch.testing.assert_close(results[0]["y_loaded"], saved[0]["y"], rtol=1e-5, atol=1e-6)


def _load_into(rank, world, path, quant):
    from megatron_qvgen.dist_ckpt import load_sharded
    from megatron_qvgen.parallel import initialize_parallel

    initialize_parallel(ParallelConfig(tensor_parallel=world))
    pair = _pair_module(world, quant)
    pair.load_state_dict(load_sharded(pair.sharded_state_dict(), path))
    return {}


def test_bad_checkpoints_give_clear_errors(tmp_path):
    from multiproc import DistributedTestError

    with pytest.raises(DistributedTestError, match="no checkpoint directory at"):
        run_distributed(_load_into, 1, str(tmp_path / "missing"), QUANT)
    incomplete = tmp_path / "half"
    incomplete.mkdir()
    (incomplete / "metadata.json").write_text("{}")
    with pytest.raises(DistributedTestError, match="not a complete qvgen checkpoint"):
        run_distributed(_load_into, 1, str(incomplete), QUANT)
    path = str(tmp_path / "ckpt")
    run_distributed(_save_trained, 1, path)  # r0 = 8 storage
    # a model built with another r0 does not match
    with pytest.raises(DistributedTestError, match="does not match the model.*shape mismatch.*aux_L"):
        run_distributed(_load_into, 1, path, QuantConfig.for_method("qvgen", "w4a4", aux_rank=16))
    assert os.path.isdir(path), "a failed load must not touch the checkpoint"
