"""The attention kernel as Triton builds it for Hopper (sm_90a), compiled and disassembled on the CPU with the
toolchain in Triton's wheel (benchmarks/runtime/sm90_report.py): the default tiles fit in registers without spilling
and their key loop holds the products and exponentials the code asks for; ``emulate_exp2`` moves half of the
exponentials off the special-function unit. No GPU needed: the cubin is the one a lent H100 / H200 would run."""
import pytest

from triton.runtime.jit import JITFunction

from qvgen_kernels.attention_triton import _attention_kernel
from tests.scripts import load_script

if not isinstance(_attention_kernel, JITFunction):   # decorated for the interpreter: tests/test_kernels_sm90_child.py
    pytest.skip("the kernels are decorated for Triton's interpreter in this process: nothing to compile",
                allow_module_level=True)
report = load_script("benchmarks/runtime/sm90_report.py")
try:
    report.toolchain()
except FileNotFoundError as exc:          # a Triton wheel without its NVIDIA backend
    pytest.skip(str(exc), allow_module_level=True)

from qvgen_kernels.attention_triton import AttentionConfig, default_config  # noqa: E402


def _exp2_per_thread(cfg):
    return cfg.block_m * cfg.block_n // (32 * cfg.num_warps)


@pytest.mark.parametrize("head_dim", [128, 64])
def test_default_tiles_build_for_hopper_without_spills(head_dim):
    cfg = default_config(head_dim)
    rep = report.report(cfg, head_dim, kv_tokens=32760)
    assert rep.error is None, rep.error
    assert rep.spill_stores == 0 and rep.spill_loads == 0, f"{rep.registers} registers, spills {rep.spill_stores} B"
    loop = rep.key_loop
    assert loop["igmma"] == head_dim // 32 and loop["qgmma"] == cfg.block_n // 32, loop   # Q.K int8, P.V fp8, K = 32
    # one exp2 per logit of the thread's share, plus the running-max rescale of its rows
    assert _exp2_per_thread(cfg) <= loop["mufu_ex2"] <= _exp2_per_thread(cfg) + 4, loop
    assert loop["local_memory"] == 0


def test_emulated_exp2_moves_half_the_exponentials_to_the_fma_units():
    base = report.report(AttentionConfig(64, 128, 4, 3), 128, kv_tokens=32760)
    emulated = report.report(AttentionConfig(64, 128, 4, 3, emulate_exp2=True), 128, kv_tokens=32760)
    assert emulated.error is None and emulated.spill_stores == 0
    half = _exp2_per_thread(AttentionConfig(64, 128, 4, 3)) // 2
    assert emulated.key_loop["mufu_ex2"] == base.key_loop["mufu_ex2"] - half
    assert emulated.key_loop["ffma"] >= base.key_loop["ffma"] + 3 * half        # the cubic: three FMAs an element


@pytest.mark.parametrize("N,K,epilogue", [(1536, 1536, None), (8960, 1536, "gelu_tanh")])
def test_default_int8_gemm_builds_for_hopper_without_spills_in_its_k_loop(N, K, epilogue):
    g = report.gemm_report("wan1.3b", 32760, N, K, epilogue)
    assert g["k_loop_instructions"] > 0 and g["spill_instructions_in_k_loop"] == 0, g


def test_warp_specialized_gluon_kernel_builds_a_producer_warp_and_two_consumer_groups():
    """attention_gluon_ws: the default partition and a 4-warp worker each run the key loop of 64 rows (both
    products, the exponentials under the next Q.K), a 1-warp worker issues the K / V copies; no spills."""
    rep = report.report(AttentionConfig.gluon(2, 128, warp_specialize=True), 128, kv_tokens=32760)
    assert rep.error is None, rep.error
    assert rep.spill_stores == 0 and rep.spill_loads == 0 and rep.register_operand_overwrites == 0, rep
    default, consumer, producer = rep.partitions
    assert default["products"] == consumer["products"] == 4 and consumer["warps"] == 4, rep.partitions
    assert producer["warps"] == 1 and producer["products"] == 0 and producer["tma_copies"] == 2, rep.partitions
    loop = rep.key_loop
    assert loop["igmma"] == 4 and loop["qgmma"] == 4 and loop["local_memory"] == 0, loop
    assert loop["exp2_in_flight"] == loop["mufu_ex2"] == 66, loop


def test_gluon_kernel_with_emulated_exp2_moves_half_the_exponentials_and_keeps_them_under_the_product():
    plain = report.report(AttentionConfig.gluon(2, 128), 128, kv_tokens=32760)
    emulated = report.report(AttentionConfig.gluon(2, 128, emulate_exp2=True), 128, kv_tokens=32760)
    assert emulated.error is None and emulated.spill_stores == 0 and emulated.register_operand_overwrites == 0
    assert emulated.key_loop["mufu_ex2"] == plain.key_loop["mufu_ex2"] - 32, emulated.key_loop
    assert emulated.key_loop["exp2_in_flight"] == emulated.key_loop["mufu_ex2"], emulated.key_loop


@pytest.mark.parametrize("N,K,epilogue", [(5120, 5120, "residual"), (1536, 1536, None)])
def test_gluon_gemm_keeps_a_product_in_flight_across_k_steps(N, K, epilogue):
    """qgemm_gluon at the default tiles (128 x 256 at Wan-14B, 256 x 128 at Wan-1.3B): its K loop waits with one
    product group outstanding (``0x1``), where the Triton kernel drains (``0x0``); no spill inside the loop."""
    triton_k = report.gemm_report("wan", 32760, N, K, epilogue)
    gluon_k = report.gemm_report("wan", 32760, N, K, epilogue, gluon=True)
    assert triton_k["k_loop_waits"] == ["gsb0, 0x0"], triton_k
    assert gluon_k["k_loop_waits"] == ["gsb0, 0x1"], gluon_k
    assert gluon_k["k_loop_instructions"] > 0 and gluon_k["spill_instructions_in_k_loop"] == 0, gluon_k


@pytest.mark.parametrize("head_dim,kv_tokens,stages,block_m", [
    (128, 32760, 2, 64), (128, 32760, 3, 64), (128, 512, 2, 64), (64, 17776, 2, 64), (128, 100, 3, 64),
    (128, 32760, 2, 128), (64, 17776, 3, 128)])
def test_gluon_kernel_builds_and_issues_the_softmax_under_the_next_product(head_dim, kv_tokens, stages, block_m):
    """attention_gluon at Wan self-attention (a partial last key block), the 512 text keys, CogVideoX's d = 64, and
    fewer keys than ring slots, with one warp group or two: no spills; at d = 128 every exp2 of the key loop is
    issued while the next block's Q.K product runs (the Triton kernel: none)."""
    cfg = AttentionConfig.gluon(stages, block_m)
    rep = report.report(cfg, head_dim, kv_tokens=kv_tokens)
    assert rep.error is None, rep.error
    assert rep.spill_stores == 0 and rep.spill_loads == 0, rep
    # P is the register A operand of the asynchronous P.V product: nothing may overwrite it before the wait
    assert rep.register_operand_overwrites == 0, rep
    if kv_tokens <= 128:             # one key block: no loop
        return
    loop = rep.key_loop
    assert loop["igmma"] == head_dim // 32 and loop["qgmma"] == 4 and loop["local_memory"] == 0, loop
    if head_dim == 128 and kv_tokens > 1024:
        assert loop["exp2_in_flight"] >= 0.85 * loop["mufu_ex2"], loop
    assert loop["exp2_in_flight"] > 0, loop


def test_triton_kernel_issues_no_exp2_under_a_product():
    """The reference point of the test above: the default Triton kernel waits for each product before its softmax."""
    assert report.report(default_config(128), 128, kv_tokens=32760).key_loop["exp2_in_flight"] == 0


def test_register_operand_check_sees_an_overwrite_before_the_wait():
    """The hazard check of the test above on hand-made SASS: a write to P's registers while P.V runs counts, one
    after the wait does not."""
    product = (0x10, "QGMMA.64", "x128x32.F32.E4M3.E4M3 R24, R152, gdesc[UR4], R24, gsb0 ;", "")
    wait = (0x30, "WARPGROUP.DEPBAR.LE", " gsb0, 0x0 ;", "")
    write = lambda addr: (addr, "FFMA", " R153, R1, R2, R3 ;", "")  # noqa: E731
    assert report.register_operand_overwrites([product, write(0x20), wait]) == 1
    assert report.register_operand_overwrites([product, wait, write(0x40)]) == 0


def test_qk_passes_read_a_heads_channels_with_128_bit_loads():
    """The Q / K passes (Wan's RMSNorm + RoPE fused) are memory-bound: every pass reads the head's bf16 channels as
    128-bit loads, never one 16-bit value at a time (as the strided even / odd loads did: 3.5x slower on the H100)."""
    loads = report.qk_pass_loads(head_dim=128, block_n=128)
    for name, ops in loads.items():
        assert not any(op.startswith("LDG.E.U16") for op in ops), (name, ops)
    # BLK tokens x 128 bf16 channels over the program's threads, 16 bytes a load
    assert loads["q"].get("LDG.E.128", 0) >= 64 * 128 * 2 // (16 * 128), loads["q"]
    assert loads["k_codes"].get("LDG.E.128", 0) >= 128 * 128 * 2 // (16 * 256), loads["k_codes"]
    assert loads["rstd"].get("LDG.E.128", 0) >= 64 * 128 * 2 // (16 * 128), loads["rstd"]
