"""The Gluon attention kernel run on the CPU by tests/gluon_emulator.py: the same output as the Triton kernel on the
same operands, no race, no hang; and the emulator's checks shown to fire on the bugs a Gluon kernel can have
(each a one-line mutation of the kernel's source).

The Triton reference runs in Triton's interpreter here (tests/test_kernels_interpreter.py) or on a GPU; the Gluon
kernel always runs in the emulator, on CPU copies of the operands.
"""
import importlib.util
import os
import re
import sys
from dataclasses import fields, replace
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # before the kernels are decorated

import pytest  # noqa: E402

from qvgen_kernels.triton_env import INTERPRETER_HINT, interpreter_active  # noqa: E402

if not torch.cuda.is_available() and not interpreter_active():
    pytest.skip(INTERPRETER_HINT, allow_module_level=True)

from qvgen_kernels import attention_gluon, attention_gluon_ws  # noqa: E402
from qvgen_kernels.attention import attention_float64  # noqa: E402
from qvgen_kernels.attention_triton import (LOG2_P_SCALE, AttentionConfig, attention_from_codes,  # noqa: E402
                                            quantize_qkv)
from tests.gluon_emulator import GluonEmulationError, emulate  # noqa: E402
from tests.numerics import max_rel_diff  # noqa: E402
from tests.test_attention import cosine, qkv  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_TILES = AttentionConfig(block_m=64, block_n=128, num_warps=4, num_stages=2)   # K in the Gluon kernel's blocks


def _operands(B, SQ, SK, H, D, seed):
    q, k, v = (t.to(DEVICE) for t in qkv(B, SQ, SK, H, D, seed=seed, scale=1.5))
    return q, k, v, quantize_qkv(q, k, v, config=TRITON_TILES)


def _emulated(module, codes, q, stages, block_m=64, emulate_exp2=False):
    cpu = replace(codes, **{f.name: getattr(codes, f.name).cpu() for f in fields(codes)
                            if isinstance(getattr(codes, f.name), torch.Tensor)})
    out = torch.full(q.shape, float("nan"), dtype=q.dtype)
    kernel, grid, args, constants = module.launch(cpu, out, stages, LOG2_P_SCALE, block_m, emulate_exp2)
    emulate(kernel, grid, *args, **constants)
    return out


@pytest.mark.parametrize("B, SQ, SK, H, D, stages", [
    (1, 100, 300, 2, 64, 2),      # partial last key block, d = 64
    (2, 70, 256, 2, 128, 3),      # whole key blocks, two samples
    (1, 50, 100, 1, 128, 3),      # one key block, fewer than the ring's slots
    (1, 130, 1000, 2, 128, 2),    # eight key blocks: the ring turns four times
    (1, 64, 512, 3, 64, 3),       # the text's 512 keys, one query tile
])
@pytest.mark.parametrize("block_m", [64, 128])      # one warp group, or two sharing the K / V tiles
def test_gluon_kernel_computes_what_the_triton_kernel_computes(B, SQ, SK, H, D, stages, block_m):
    q, k, v, codes = _operands(B, SQ, SK, H, D, seed=SK + D)
    ref = attention_from_codes(codes, torch.empty_like(q), TRITON_TILES).cpu()
    got = _emulated(attention_gluon, codes, q, stages, block_m)
    assert torch.isfinite(got).all(), "rows left unwritten"
    assert max_rel_diff(got, ref) <= 1e-5          # same operands, same math; float sums in another order
    assert cosine(got, attention_float64(q.cpu(), k.cpu(), v.cpu())) >= 0.999


@pytest.mark.parametrize("SK, block_m", [(300, 64), (1000, 128)])
def test_emulated_exp2_in_the_gluon_kernel_is_the_triton_kernels(SK, block_m):
    """emulate_exp2 (half the exponentials as a cubic on the FMA units) through the same Triton function in both
    kernels: the same output."""
    q, k, v, codes = _operands(1, 100, SK, 2, 128, seed=SK)
    cfg = AttentionConfig(block_m=64, block_n=128, num_warps=4, num_stages=2, emulate_exp2=True)
    ref = attention_from_codes(codes, torch.empty_like(q), cfg).cpu()
    got = _emulated(attention_gluon, codes, q, 2, block_m, emulate_exp2=True)
    plain = _emulated(attention_gluon, codes, q, 2, block_m)
    assert max_rel_diff(got, ref) <= 1e-5
    assert not torch.equal(got, plain), "emulate_exp2 changed nothing in the Gluon kernel"


# Each a bug the emulator must catch: what the mutation does -> ([(old text, new text), ...], the error it raises).
KERNEL_SOURCE = Path(attention_gluon.__file__).read_text()
_PV_WAIT = ("        pv = warpgroup_mma_wait(0, deps=[pv_tok])                                    "
            "# PV_j done: slot j is free\n")
_LOOP_ACC = "        acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1) + pv\n    p8, alpha"
_PV_WAIT_LAST = [(_PV_WAIT, ""), (_LOOP_ACC, _PV_WAIT + _LOOP_ACC)]     # the loop's P.V wait after the slot's release
MUTATIONS = {
    "phase parity off by one": ([("mbarrier.wait(k_bars.index(s), (blk // STAGES) & 1)",
                                  "mbarrier.wait(k_bars.index(s), (blk // STAGES + 1) & 1)")],
                                "reads .* while a TMA copy into it is in flight"),
    "slot refilled before its P.V is waited for": (_PV_WAIT_LAST,
                                                   "TMA copy into .* while an outstanding warpgroup_mma reads it"),
    "fence after the barrier init missing": ([("    fence_async_shared()\n", "\n")], "before fence_async_shared"),
    "prologue loads one block too few": ([("    for b in gl.static_range(STAGES):\n        _load_kv(",
                                           "    for b in gl.static_range(STAGES - 1):\n        _load_kv(")],
                                         "never returns"),
    "refill past the last key block": ([("j + STAGES < NBLK)", "j + STAGES <= NBLK)")],
                                       "invalidate of .* with 1 TMA copies"),
    "the last P.V used without its wait": (
        [("    pv = warpgroup_mma_wait(0, deps=[_issue_pv(p8, v_smem, v_bars, NBLK - 1, o_zero, STAGES)])",
          "    pv = _issue_pv(p8, v_smem, v_bars, NBLK - 1, o_zero, STAGES)")],
        "used before a warpgroup_mma_wait completed it"),
    "the refill's thread barrier dropped, two warp groups": (
        [("            gl.thread_barrier()      # every warp past its wait before the TMA overwrites the slot its "
          "products read\n", "")], "before a thread_barrier"),
    "output rows past SQ stored": ([("gl.store(o, out, mask=gl.expand_dims(rows < SQ, 1))", "gl.store(o, out)")],
                                   "out-of-bounds access through o_ptr"),
}
_modules = iter(range(10 ** 6))


def _load(tmp_path, gluon_edits=(), ws_edits=()):
    """attention_gluon (and attention_gluon_ws on top of it) with their sources edited, as fresh modules."""
    n = next(_modules)
    gluon_source, ws_source = KERNEL_SOURCE, WS_SOURCE
    for old, new in gluon_edits:
        assert gluon_source.count(old) == 1, f"{old!r} is no longer in attention_gluon.py once"
        gluon_source = gluon_source.replace(old, new)
    for old, new in ws_edits:
        assert ws_source.count(old) == 1, f"{old!r} is no longer in attention_gluon_ws.py once"
        ws_source = ws_source.replace(old, new)
    modules = []
    for name, source in ((f"mutant_gluon_{n}", gluon_source), (f"mutant_ws_{n}", ws_source)):
        path = tmp_path / f"{name}.py"
        path.write_text(source.replace("from .attention_triton", "from qvgen_kernels.attention_triton")
                        .replace("from .attention_gluon", f"from mutant_gluon_{n}"))
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        modules.append(module)
    return modules


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_the_emulator_catches_each_kind_of_bug(name, tmp_path):
    q, k, v, codes = _operands(1, 100, 600, 1, 128, seed=7)
    edits, match = MUTATIONS[name]
    block_m = 128 if "two warp groups" in name else 64
    with pytest.raises(GluonEmulationError, match=match):
        _emulated(_load(tmp_path, edits)[0], codes, q, stages=2, block_m=block_m)


# ---------------------------------------------------------------------------------- the warp-specialized kernel
WS_SOURCE = Path(attention_gluon_ws.__file__).read_text()


def _emulated_ws(codes, q, stages, seed, kernel=None):
    cpu = replace(codes, **{f.name: getattr(codes, f.name).cpu() for f in fields(codes)
                            if isinstance(getattr(codes, f.name), torch.Tensor)})
    out = torch.full(q.shape, float("nan"), dtype=q.dtype)
    default, grid, args, constants = attention_gluon.launch(cpu, out, stages, LOG2_P_SCALE, 128,
                                                            warp_specialize=True)
    emulate(kernel or default, grid, *args, seed=seed, **constants)
    return out


@pytest.mark.parametrize("B, SQ, SK, H, D, stages", [(1, 100, 300, 2, 64, 2), (2, 130, 1000, 2, 128, 3),
                                                     (1, 50, 100, 1, 128, 2), (1, 200, 700, 1, 128, 2)])
def test_warp_specialized_kernel_computes_what_the_triton_kernel_computes(B, SQ, SK, H, D, stages):
    """A producer warp and two consumer warp groups as three threads, under four interleavings each."""
    q, k, v, codes = _operands(B, SQ, SK, H, D, seed=SK + D)
    ref = attention_from_codes(codes, torch.empty_like(q), TRITON_TILES).cpu()
    for seed in range(4):
        got = _emulated_ws(codes, q, stages, seed)
        assert not got.isnan().any(), "rows left unwritten"
        assert max_rel_diff(got, ref) <= 1e-5, seed


# what a race between partitions shows as, depending on the interleaving: a copy over a slot a product reads, a
# product reading a slot before its copy landed, a barrier re-armed mid-phase, or a hang
_RACE = "while an outstanding warpgroup_mma reads it|copy into it is in flight|while another copy|re-armed|hang"
_ISSUE_QK = "        s_tok = _issue_qk(q_smem, k_smem, k_bars, j + 1, s_zero, STAGES)            # S_{j+1} runs ...\n"
WS_MUTATIONS = {   # the producer / consumer protocol, each rule broken: (edits of attention_gluon.py, of
    # attention_gluon_ws.py, the error)
    "producer waits on the wrong parity": ([], [("(blk // STAGES + 1) & 1, pred=blk >= STAGES)",
                                                 "(blk // STAGES) & 1, pred=blk >= STAGES)")], _RACE),
    "one consumer never releases its slots": (
        [("            mbarrier.arrive(empty_bars.index(j % STAGES))",
          "            mbarrier.arrive(empty_bars.index(j % STAGES), pred=row0 % 128 == 0)")], [],
        "hang: every partition"),
    "a slot released before its P.V is waited for": (_PV_WAIT_LAST, [],
                                                     "while an outstanding warpgroup_mma reads it"),
    "the slot freed on one consumer's release": ([], [("mbarrier.init(empty_bars.index(i), count=2)",
                                                       "mbarrier.init(empty_bars.index(i), count=1)")], _RACE),
    "one consumer reads K without its own wait": (
        [(_ISSUE_QK, "        if row0 % 128 == 0:\n    " + _ISSUE_QK + "        else:\n"
          "            s_tok = warpgroup_mma(q_smem, k_smem.index((j + 1) % STAGES).permute((1, 0)), s_zero, "
          "use_acc=False, is_async=True)\n")], [],
        "without having waited on|copy into it is in flight|which no TMA copy has filled"),
}


@pytest.mark.parametrize("name", list(WS_MUTATIONS))
def test_the_emulator_catches_each_broken_partition_protocol(name, tmp_path):
    """Races between partitions show under some interleavings only: each mutation must be caught under one of
    eight seeded schedules (in practice, most of them)."""
    gluon_edits, ws_edits, error = WS_MUTATIONS[name]
    mutant = _load(tmp_path, gluon_edits, ws_edits)[1]
    q, k, v, codes = _operands(1, 200, 700, 1, 128, seed=9)
    caught = []
    for seed in range(8):
        try:
            _emulated_ws(codes, q, 2, seed, kernel=mutant._attention_kernel_gluon_ws)
        except GluonEmulationError as e:
            caught.append(str(e))
    assert caught, f"{name}: no interleaving of eight caught it"
    assert all(re.search(error, c) for c in caught), caught
