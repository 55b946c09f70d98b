"""The Gluon W4A4 GEMM (qgemm_gluon: the K loop with one product group in flight) against the Triton GEMM.

CPU: the Gluon kernel runs in tests/gluon_emulator.py, the Triton kernel in Triton's interpreter
(tests/test_kernels_interpreter.py), on the same prepared launch (``qgemm_triton.prepare_gemm``): outputs
bit-identical, epilogues included. GPU (Hopper, marked ``gpu``): both compiled, at Wan shapes.
"""
import os
from dataclasses import replace

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # before the kernels are decorated

import pytest  # noqa: E402

from qvgen_kernels.triton_env import INTERPRETER_HINT, interpreter_active  # noqa: E402

if not torch.cuda.is_available() and not interpreter_active():
    pytest.skip(INTERPRETER_HINT, allow_module_level=True)

from qvgen_kernels import qgemm_gluon  # noqa: E402
from qvgen_kernels.qgemm import Epilogue  # noqa: E402
from qvgen_kernels.qgemm_triton import GemmConfig, prepare_gemm, quant_matmul_triton, unpack_weight  # noqa: E402
from qvgen_kernels.reference import dequant_matmul_float64  # noqa: E402
from tests.gluon_emulator import GluonEmulationError, emulate  # noqa: E402
from tests.numerics import assert_rel_close  # noqa: E402
from tests.test_kernels_gemm import _problem  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _epilogue(kind, M, N, samples=2):
    gen = torch.Generator().manual_seed(5)
    if kind is None:
        return None
    if kind == "gelu_tanh":
        return Epilogue("gelu_tanh")
    residual = torch.randn(M, N, generator=gen).to(torch.bfloat16).to(DEVICE)
    samples = samples if M % samples == 0 else 1
    gate = torch.randn(samples, N, generator=gen).to(DEVICE)
    return Epilogue("residual", residual=residual, gate=gate, rows_per_sample=M // samples)


def _emulated(act, weight, bias, config, epilogue, module=qgemm_gluon):
    cpu = lambda t: t.cpu() if isinstance(t, torch.Tensor) else t  # noqa: E731
    w8 = unpack_weight(weight).cpu()
    act = replace(act, codes=act.codes.cpu(), scale=act.scale.cpu(), zero=act.zero.cpu(), rowsum=act.rowsum.cpu())
    weight = replace(weight, packed=weight.packed.cpu(), scale=weight.scale.cpu(), zero=weight.zero.cpu(),
                     colsum=weight.colsum.cpu())
    if epilogue is not None:
        epilogue = replace(epilogue, residual=cpu(epilogue.residual), gate=cpu(epilogue.gate))
    call = prepare_gemm(act, weight, w8, cpu(bias), torch.bfloat16, config, 0, epilogue)
    call.meta["LIBDEVICE"] = False            # the emulator has no libdevice: _epilogue's portable tanh
    call.out.fill_(float("nan"))
    kernel, grid, args, constants = module.launch(call.a, call.b, call.out, call.epilogue_args, call.meta, config)
    emulate(kernel, grid, *args, **constants)
    return call.out


TILES = dict(block_m=64, block_n=32, block_k=32, group_m=2, num_warps=4)


@pytest.mark.parametrize("M, N, K, stages", [(100, 72, 256, 3),     # 8 K steps through a ring of 3; M, N tails
                                             (64, 64, 64, 4),       # fewer K steps than the ring's prologue
                                             (45, 40, 96, 2),       # the Triton GEMM tests' odd shape
                                             (70, 48, 112, 2)])     # K not a multiple of block_k: a zero tail
@pytest.mark.parametrize("epilogue", [None, "gelu_tanh", "residual"])
def test_gluon_gemm_equals_the_triton_gemm(M, N, K, stages, epilogue):
    act, weight, bias = _problem(M, N, K, 4, seed=M + K)
    epi = _epilogue(epilogue, M, N)
    config = GemmConfig(variant="tma", num_stages=stages, **TILES)
    ref = quant_matmul_triton(act, weight, unpack_weight(weight), bias, torch.bfloat16, config, epilogue=epi)
    got = _emulated(act, weight, bias, replace(config, variant="gluon"), epi)
    assert not got.isnan().any(), "output elements left unwritten"
    assert torch.equal(got, ref.cpu()), (got.float() - ref.cpu().float()).abs().max()
    if epilogue is None:
        assert_rel_close(got, dequant_matmul_float64(act, weight, bias).cpu(), rel=8e-3, what="vs float64")


@pytest.mark.parametrize("block_n, epilogue", [(128, None), (256, "residual"), (256, "gelu_tanh")])
def test_two_warp_groups_and_wide_tiles(block_n, epilogue):
    """8 warps (two warp groups of m64 rows), 128- and 256-wide tiles (the latter's epilogue a half of the columns
    at a time): the layouts only matter on the GPU, but the ring, the tile order, the halves and the masks are the
    same code."""
    act, weight, bias = _problem(200, 300, 160, 3, seed=3)
    epi = _epilogue(epilogue, 200, 300)
    config = GemmConfig(block_m=128, block_n=block_n, block_k=32, group_m=2, num_warps=8, num_stages=3,
                        variant="tma")
    ref = quant_matmul_triton(act, weight, unpack_weight(weight), bias, torch.bfloat16, config, epilogue=epi)
    got = _emulated(act, weight, bias, replace(config, variant="gluon"), epi)
    assert torch.equal(got, ref.cpu())


def test_refusals():
    with pytest.raises(ValueError, match="one warp group a 64 rows"):
        GemmConfig(block_m=64, num_warps=8, variant="gluon")
    if torch.cuda.is_available():
        return
    act, weight, bias = _problem(45, 40, 96, 4, seed=1)
    with pytest.raises(ValueError, match=r"Hopper GPU \(sm_90\) only"):
        quant_matmul_triton(act, weight, unpack_weight(weight), bias, config=GemmConfig(variant="gluon", **TILES))


MUTATIONS = {   # the K loop's ordering rules, each broken: (old text, new text, warps, the error)
    "slot refilled before its product is waited for": ("acc = warpgroup_mma_wait(1, deps=[acc])", "pass", 4,
                                                       "while an outstanding warpgroup_mma reads it"),
    "refill without the thread barrier, two warp groups": (
        "        gl.thread_barrier()                          # every warp group past that wait before the slot is "
        "refilled\n", "", 8, "before a thread_barrier"),
}


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_the_emulator_catches_each_broken_ordering_rule(name, tmp_path):
    import importlib.util
    from pathlib import Path
    old, new, warps, error = MUTATIONS[name]
    source = Path(qgemm_gluon.__file__).read_text()
    assert source.count(old) == 1, f"mutation {name!r} no longer applies to qgemm_gluon.py"
    path = tmp_path / "qgemm_gluon_mutant.py"
    path.write_text(source.replace(old, new).replace("from .qgemm_triton", "from qvgen_kernels.qgemm_triton"))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mutant = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mutant)
    act, weight, bias = _problem(130, 32, 256, 4, seed=2)
    config = GemmConfig(variant="gluon", num_stages=2, **{**TILES, "num_warps": warps, "block_m": 16 * warps})
    with pytest.raises(GluonEmulationError, match=error):
        _emulated(act, weight, bias, config, None, module=mutant)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                    reason="needs a Hopper GPU (sm_90)")
@pytest.mark.parametrize("K, N, epilogue", [(5120, 5120, "residual"), (5120, 13824, "gelu_tanh"),
                                            (1536, 1536, None), (1536, 8960, "gelu_tanh")])
@pytest.mark.parametrize("tiles", ["default", (128, 128, 128, 8, 4)])
def test_gluon_gemm_on_hopper_equals_the_triton_gemm(K, N, epilogue, tiles):
    from qvgen_kernels.qgemm_triton import default_config
    M = 4096 + 37
    act, weight, bias = _problem(M, N, K, 4, seed=K)
    epi = _epilogue(epilogue, M, N, samples=1)
    base = default_config(M, N, K)
    if tiles != "default":
        base = replace(base, block_m=tiles[0], block_n=tiles[1], block_k=tiles[2], num_warps=tiles[3],
                       num_stages=tiles[4])
    w8 = unpack_weight(weight)
    ref = quant_matmul_triton(act, weight, w8, bias, torch.bfloat16, replace(base, variant="tma"), epilogue=epi)
    got = quant_matmul_triton(act, weight, w8, bias, torch.bfloat16, replace(base, variant="gluon"), epilogue=epi)
    torch.cuda.synchronize()
    assert torch.equal(got, ref), (got.float() - ref.float()).abs().max()
