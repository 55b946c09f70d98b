"""The CPU shim: names it patches exist, megatron's parallel linears and RNG tracker work on gloo."""
import importlib

import pytest
import torch

from megatron_qvgen import cpu_shim
from megatron_qvgen.config import ParallelConfig
from multiproc import run_distributed
from numerics import assert_rel_close

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the shim is for machines without a GPU")


def test_patched_megatron_names_exist():
    for module_name, attr in cpu_shim.PATCHED_MEGATRON:
        assert hasattr(importlib.import_module(module_name), attr), f"{module_name}.{attr} is gone"
    for attr in cpu_shim.PATCHED_TORCH_CUDA:
        assert hasattr(torch.cuda, attr)
    assert cpu_shim.is_applied()


def test_cuda_requests_land_on_cpu():
    a = torch.zeros(3, device="cuda")
    assert a.device.type == "cpu"
    assert a.cuda().device.type == "cpu"
    assert a.to("cuda").device.type == "cpu"
    assert a.type() == "torch.cuda.FloatTensor"
    assert a.bfloat16().type() == "torch.cuda.BFloat16Tensor"
    assert torch.empty(2, device=torch.device("cuda", 0)).device.type == "cpu"


def _dropout_after_fork(rank, world):
    from megatron.core import tensor_parallel

    from megatron_qvgen.parallel import initialize_parallel

    initialize_parallel(ParallelConfig(tensor_parallel=world), seed=1234)
    x = torch.ones(4096)
    shared = torch.nn.functional.dropout(x, 0.5)
    with tensor_parallel.get_cuda_rng_tracker().fork():
        forked = torch.nn.functional.dropout(x, 0.5)
    after = torch.nn.functional.dropout(x, 0.5)
    return {"shared": shared, "forked": forked, "after": after}


def test_rng_fork_gives_tp_ranks_different_dropout():
    r0, r1 = run_distributed(_dropout_after_fork, 2)
    # Outside the fork every rank of the model-parallel group draws the same mask ...
    assert torch.equal(r0["shared"], r1["shared"])
    assert torch.equal(r0["after"], r1["after"])
    # ... inside it each TP rank has its own stream.
    assert not torch.equal(r0["forked"], r1["forked"])
    # and the fork does not advance the default stream differently across ranks.
    assert not torch.equal(r0["forked"], r0["after"])


def _column_row_pair(rank, world):
    from megatron.core import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from megatron_qvgen.parallel import initialize_parallel

    initialize_parallel(ParallelConfig(tensor_parallel=world), seed=7)
    cfg = ModelParallelConfig(tensor_model_parallel_size=world, use_cpu_initialization=True)
    init = torch.nn.init.normal_
    torch.manual_seed(0)
    col = ColumnParallelLinear(8, 16, config=cfg, init_method=init, bias=True, gather_output=False)
    row = RowParallelLinear(16, 8, config=cfg, init_method=init, bias=True, input_is_parallel=True,
                            skip_bias_add=False)
    x = torch.randn(5, 2, 8, generator=torch.Generator().manual_seed(3), requires_grad=True)
    h, _ = col(x)
    y, _ = row(torch.nn.functional.gelu(h))
    y.square().sum().backward()
    return {"y": y.detach(), "dx": x.grad, "col_w": col.weight.detach(), "col_dw": col.weight.grad}


def test_megatron_column_row_linears_match_across_tp():
    ref = run_distributed(_column_row_pair, 1)[0]
    out = run_distributed(_column_row_pair, 2)
    for r in out:
        assert_rel_close(r["y"], ref["y"], what="output")
        assert_rel_close(r["dx"], ref["dx"], what="input grad")
    assert_rel_close(torch.cat([r["col_dw"] for r in out]), ref["col_dw"], what="column weight grad")


def test_a_renamed_private_name_stops_the_shim_with_the_version_and_the_tested_ones():
    renamed = (("megatron.core.tensor_parallel.random", "_get_cuda_rng_state_v2"),)
    with pytest.raises(cpu_shim.MegatronVersionError) as err:
        cpu_shim.check_megatron(version="0.99.0", names=renamed)
    message = str(err.value)
    assert "megatron-core 0.99.0" in message
    assert "megatron.core.tensor_parallel.random._get_cuda_rng_state_v2" in message
    assert all(v in message for v in cpu_shim.TESTED_MEGATRON)
    gone = (("megatron.core.no_such_module", "_x"),)
    with pytest.raises(cpu_shim.MegatronVersionError, match="megatron.core.no_such_module._x"):
        cpu_shim.check_megatron(version="0.99.0", names=gone)


def test_the_installed_megatron_is_a_tested_version_and_an_untested_one_warns():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")   # a tested version passes silently
        assert cpu_shim.check_megatron() == cpu_shim.megatron_version()
    assert cpu_shim._release(cpu_shim.megatron_version()) in cpu_shim.TESTED_MEGATRON
    with pytest.warns(UserWarning, match=r"megatron-core 0\.17\.0rc1 has not been tested .*0\.16\.1"):
        cpu_shim.check_megatron(version="0.17.0rc1")
    assert cpu_shim._release("0.19.2+abc123") == "0.19.2"
