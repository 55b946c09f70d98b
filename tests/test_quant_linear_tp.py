"""QuantColumnParallelLinear -> QuantRowParallelLinear: identical numerics at TP = 1, 2, 4 (real gloo ranks)."""
import pytest
import torch

from megatron_qvgen.config import ParallelConfig, QuantConfig
from multiproc import run_distributed
from numerics import assert_rel_close

IN, MID, SEQ, BATCH = 24, 48, 8, 3
GROUPS = [3, 17, 49]


def build_pair(tp, quant, sequence_parallel=False, params_dtype=torch.float32):
    from megatron.core import ModelParallelConfig

    from megatron_qvgen.quant import QuantColumnParallelLinear, QuantRowParallelLinear

    cfg = ModelParallelConfig(tensor_model_parallel_size=tp, use_cpu_initialization=True,
                              sequence_parallel=sequence_parallel, params_dtype=params_dtype)
    torch.manual_seed(1234)  # cpu initialisation builds the full master weight: identical for every TP size
    init = lambda w: torch.nn.init.normal_(w, std=0.2)  # noqa: E731
    col = QuantColumnParallelLinear(IN, MID, config=cfg, init_method=init, bias=True, gather_output=False,
                                    quant=quant, name="blocks.0.ffn.net.0.proj")
    row = QuantRowParallelLinear(MID, IN, config=cfg, init_method=init, bias=True, input_is_parallel=True,
                                 skip_bias_add=False, quant=quant, name="blocks.0.ffn.net.2")
    with torch.no_grad():
        col.bias.normal_(std=0.1)  # cpu init zeroes biases; give them values (same slice per rank below)
    return col, row


def _pair_forward_backward(rank, world, quant, gate, sequence_parallel):
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

    from megatron_qvgen.parallel import initialize_parallel
    from megatron_qvgen.quant import initialize_quantizers, quant_context

    initialize_parallel(ParallelConfig(tensor_parallel=world, sequence_parallel=sequence_parallel and world > 1), seed=3)
    tp_rank = ps.get_tensor_model_parallel_rank()
    col, row = build_pair(world, quant, sequence_parallel and world > 1)
    with torch.no_grad():  # identical biases on every TP size: slice of one full vector
        full_bias = torch.linspace(-0.3, 0.3, MID)
        col.bias.copy_(full_bias.chunk(world)[tp_rank])
        row.bias.copy_(torch.linspace(0.2, -0.1, IN))
    assert initialize_quantizers([col, row]) == 2
    x_full = torch.randn(SEQ, BATCH, IN, generator=torch.Generator().manual_seed(5))
    if sequence_parallel and world > 1:
        x = x_full.chunk(world, dim=0)[tp_rank].clone().requires_grad_(True)
    else:
        x = x_full.clone().requires_grad_(True)
    with quant_context(timestep_groups=torch.tensor(GROUPS), aux_gate=gate):
        h, _ = col(x)
        y, _ = row(torch.nn.functional.gelu(h, approximate="tanh"))
    weights = torch.linspace(0.5, 1.5, y.numel()).reshape(y.shape) if not (sequence_parallel and world > 1) else \
        torch.linspace(0.5, 1.5, SEQ * BATCH * IN).reshape(SEQ, BATCH, IN).chunk(world, 0)[tp_rank]
    (y * weights).sum().backward()
    if sequence_parallel and world > 1:
        # what megatron's finalize_model_grads does for params tagged sequence_parallel (the row bias)
        for p in list(col.parameters()) + list(row.parameters()):
            if getattr(p, "sequence_parallel", False):
                torch.distributed.all_reduce(p.grad, group=ps.get_tensor_model_parallel_group())
    if sequence_parallel and world > 1:
        y = gather_from_sequence_parallel_region(y.detach(), tensor_parallel_output_grad=False)
        dx = gather_from_sequence_parallel_region(x.grad, tensor_parallel_output_grad=False)
    else:
        dx = x.grad
    out = {"y": y.detach(), "dx": dx}
    for tag, layer in (("col", col), ("row", row)):
        for pname, p in layer.named_parameters():
            out[f"{tag}.{pname}.grad"] = p.grad.detach().clone()
            out[f"{tag}.{pname}"] = p.detach().clone()
    return out


# how each parameter's local tensor is laid out across TP ranks: a split dim, or None (replicated)
SPLIT = {
    "col.weight": 0, "col.bias": 0, "col.weight_quantizer.scale": 0, "col.weight_quantizer.zero_point": 0,
    "col.aux_L": 0, "col.aux_R": None, "col.act_quantizer.clip_lower": None, "col.act_quantizer.clip_upper": None,
    "row.weight": 1, "row.bias": None, "row.weight_quantizer.scale": None, "row.weight_quantizer.zero_point": None,
    "row.aux_L": None, "row.aux_R": 1, "row.act_quantizer.clip_lower": None, "row.act_quantizer.clip_upper": None,
}


def _assemble(results, key, split):
    if split is None:
        for r in results[1:]:
            assert torch.equal(r[key], results[0][key]) or key.endswith(".grad"), f"{key} not replicated"
        return results[0][key]
    return torch.cat([r[key] for r in results], dim=split)


CASES = [
    pytest.param(QuantConfig.for_method("qvgen", "w4a4", aux_rank=8), 1.0, id="w4a4-full-rank"),
    pytest.param(QuantConfig.for_method("qvgen", "w4a4", aux_rank=8), 0.37, id="w4a4-mid-decay"),
    pytest.param(QuantConfig.for_method("qvgen", "w3a3", aux_rank=8), 0.62, id="w3a3-mid-decay"),
]


@pytest.mark.parametrize("quant,gate", CASES)
def test_column_row_pair_is_tp_invariant(quant, gate):
    ref = run_distributed(_pair_forward_backward, 1, quant, gate, False)[0]
    runs = {2: run_distributed(_pair_forward_backward, 2, quant, gate, False)}
    if quant.weight_bits == 4 and gate == 1.0:
        runs[4] = run_distributed(_pair_forward_backward, 4, quant, gate, False)
    if gate != 1.0 and quant.weight_bits == 4:
        runs["2+sp"] = run_distributed(_pair_forward_backward, 2, quant, gate, True)
    for tp, results in runs.items():
        for r in results:
            assert_rel_close(r["y"], ref["y"], what=f"TP={tp} output")
            assert_rel_close(r["dx"], ref["dx"], what=f"TP={tp} input grad")
        for key, split in SPLIT.items():
            assert_rel_close(_assemble(results, key, split), ref[key], 1e-6, what=f"TP={tp} {key}")
            grads = [r[key + ".grad"] for r in results]
            if split is None:  # a replicated parameter must end up with the same (full) gradient everywhere
                for g in grads:
                    assert_rel_close(g, ref[key + ".grad"], what=f"TP={tp} {key}.grad")
            else:
                assert_rel_close(torch.cat(grads, dim=split), ref[key + ".grad"], what=f"TP={tp} {key}.grad")
