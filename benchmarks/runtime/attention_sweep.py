"""The attention tile sweep's rows, shared by the GPU benchmark (bench_attention) and the CPU-side compile
report (sm90_report)."""

# Tile sweeps per head dim: (block_m, block_n, warps, stages[, pv, warp_specialize, emulate_exp2, kernel]).
# SageAttention's (128, 64, 8, 4) / (128, 64, 4, 3) included; 64-row tiles let 2-3 programs share an SM, so one's
# softmax overlaps another's matrix work. Then the key-loop schedules, not measured yet (sm90_report.py reads what
# they compile to): Triton's automatic warp specialization (4-warp tiles only; it gives two consumer warp groups
# that each compute the same tile), and half of exp2 on the FMA units.
_SCHEDULES = [(64, 128, 4, 3, "fp8", True), (128, 128, 8, 3, "fp8", False, True), (64, 128, 4, 3, "fp8", False, True),
              (64, 128, 4, 2, "fp8", False, True)]
SWEEPS = {128: [(128, 128, 8, 2), (128, 128, 8, 3), (128, 128, 8, 4), (128, 64, 8, 3), (128, 64, 8, 4),
                (64, 128, 4, 2), (64, 128, 4, 3), (64, 64, 4, 3)] + _SCHEDULES,
          64: [(128, 128, 8, 3), (128, 128, 4, 3), (128, 64, 4, 3), (64, 128, 4, 3)] + _SCHEDULES}
SWEEP_SHAPES = [1, 4]     # wan14b_self (d = 128), cogvideox2b_joint (d = 64)
TINY_SWEEPS = {64: [(32, 32, 4, 2), (16, 32, 4, 2), (32, 32, 4, 2, "fp8", True),     # block_n >= 32: fp8 P.V
                    (32, 32, 4, 2, "fp8", False, True)]}
# The Gluon kernel (softmax under the next block's Q.K product), rings of 2 and 3 K / V stages, 64 query rows (one
# warp group) or 128 (two, sharing each K / V tile: half the L2 traffic): a section of its own ("gluon", last),
# which run_gpu.sh leaves out unless the kernel's GPU parity test passed (it has never run on a GPU).
# With emulate_exp2 too: in this kernel the exponentials already run under the product, so whether moving half
# of them to the FMA units still pays is for the GPU to say.
GLUON_SWEEP = [(64, 128, 4, 2, "fp8", False, False, "gluon"), (64, 128, 4, 3, "fp8", False, False, "gluon"),
               (128, 128, 8, 2, "fp8", False, False, "gluon"), (128, 128, 8, 3, "fp8", False, False, "gluon"),
               (64, 128, 4, 2, "fp8", False, True, "gluon"), (128, 128, 8, 2, "fp8", False, True, "gluon"),
               (128, 128, 8, 2, "fp8", True, False, "gluon"), (128, 128, 8, 3, "fp8", True, False, "gluon")]
# the last two: attention_gluon_ws (a producer warp, each 64-row warp group a partition of its own)
# The fastest Gluon row per head dim of the H100 sweep (2026-12-05, RESULTS.md): 64 rows with a ring of 3 (d = 64),
# warp-specialized with a ring of 3 (d = 128). ``--gluon-shortlist`` sweeps only these before the whole-model columns.
GLUON_SHORTLIST = [GLUON_SWEEP[1], GLUON_SWEEP[7]]
