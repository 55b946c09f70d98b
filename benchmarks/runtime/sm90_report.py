"""What Triton makes of the attention kernel and the W4A4 GEMM for Hopper (sm_90a), read without a GPU.

Triton compiles for a named target without a driver, and its wheel carries ``ptxas`` and ``nvdisasm``: the cubin a
lent H100 / H200 would run (same Triton, same ptxas) can be built and read on the CPU. For each tile config and
key-loop schedule of the benchmark's sweep this reports
- registers a thread and spill bytes (``ptxas -v``), shared memory;
- whether Triton warp-specialized the key loop, and its partitions (warps, products, exponentials, TMA copies);
- in the key loop's SASS (the innermost loop holding both products): instructions, ``MUFU.EX2`` (exp2 on the
  special-function unit), ``FFMA``, the int8 Q.K and fp8 P.V tensor-core products (``IGMMA`` / ``QGMMA``), and how
  many exponentials are issued while a product is outstanding (0: the loop runs in lockstep).
For the GEMM (the runtime's default tiles at the Wan shapes, each fused epilogue): registers, spill bytes, and the
K loop's tensor-core wait (``gsb0, 0x1``: one group of products left in flight across iterations; ``0x0``: drained
every iteration). It says nothing about time: that needs the GPU (``bench_runtime.py --sections sweep``); it does
say which schedules compile to what they were written for, before device time is spent on them.

    python benchmarks/runtime/sm90_report.py [--json OUT] [--head-dims 128 64] [--kv-tokens 32760] [--all]
"""
from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "kernels"))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from qvgen_kernels.attention import LOG2_P_SCALE  # noqa: E402
from qvgen_kernels.attention_gluon import _attention_kernel_gluon, descriptor_layouts  # noqa: E402
from qvgen_kernels.attention_gluon_ws import _attention_kernel_gluon_ws  # noqa: E402
from qvgen_kernels.attention_triton import AttentionConfig, _attention_kernel, default_config  # noqa: E402
from qvgen_kernels.attention_triton import _QUANT_ROWS, _qk_pass_kernel, _rstd_kernel  # noqa: E402
from qvgen_kernels.qgemm import EPILOGUES  # noqa: E402
from qvgen_kernels.qgemm_gluon import _gemm_gluon_kernel  # noqa: E402
from qvgen_kernels.qgemm_gluon import tile_layouts as gemm_tile_layouts  # noqa: E402
from qvgen_kernels.qgemm_triton import _gemm_tma_kernel, _gemm_tma_persistent_kernel  # noqa: E402
from qvgen_kernels.qgemm_triton import GemmConfig  # noqa: E402
from qvgen_kernels.qgemm_triton import default_config as gemm_default_config  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)
_ALIGNED = ("q_scale_ptr", "k_scale_ptr", "v_scale_ptr", "o_ptr", "stride_ob", "stride_os", "stride_oh")


def toolchain() -> Dict[str, Path]:
    """ptxas and nvdisasm of Triton's NVIDIA backend (shipped in its wheel)."""
    from triton.backends import nvidia
    bin_dir = Path(nvidia.__file__).parent / "bin"
    tools = {name: bin_dir / name for name in ("ptxas", "nvdisasm")}
    missing = [str(p) for p in tools.values() if not p.exists()]
    if missing:
        raise FileNotFoundError(f"Triton's NVIDIA toolchain is not installed here: {', '.join(missing)}")
    return tools


def _compile(kernel, types: Dict[str, str], constants: Dict, aligned, options: Dict, source=ASTSource):
    """``kernel`` for sm_90a: run-time arguments typed by ``types``, the rest constexpr from ``constants``; the
    ``aligned`` arguments declared 16-divisible, as Triton's launcher specializes them on a GPU."""
    names = kernel.arg_names
    unknown = [n for n in names if n not in types and n not in constants]
    if unknown:
        raise KeyError(f"sm90_report does not know the arguments {unknown} of {kernel.__name__}")
    signature = {n: types.get(n, "constexpr") for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned if n in names}
    src = source(kernel, signature, constexprs={n: v for n, v in constants.items() if n in names}, attrs=attrs)
    return triton.compile(src, target=HOPPER, options=options)


def _desc(el: str, block, layout=None) -> str:
    """A tensor-descriptor argument's type; a Gluon kernel's descriptors carry their shared-memory layout."""
    return f"tensordesc<{el}[{block[0]}, {block[1]}]" + ("" if layout is None else f",{layout!r}") + ">"


# the attention kernels' arguments other than their descriptors
_ATTENTION_ARGS = {"q_scale_ptr": "*fp32", "k_scale_ptr": "*fp32", "v_scale_ptr": "*fp32", "o_ptr": "*bf16",
                   "SQ": "i32", "stride_ob": "i32", "stride_os": "i32", "stride_oh": "i32"}


def compile_attention(cfg: AttentionConfig, head_dim: int, kv_tokens: int, heads: int = 12):
    """The attention kernel as launched with ``cfg`` on [B, S, heads, head_dim] operands, compiled for sm_90a."""
    if cfg.kernel == "gluon":
        return compile_attention_gluon(cfg, head_dim, kv_tokens, heads)
    bm, bn, d = cfg.block_m, cfg.block_n, head_dim
    pv = "fp8e4nv" if cfg.pv == "fp8" else "fp16"
    types = {"q_desc": _desc("i8", [bm, d]), "k_desc": _desc("i8", [bn, d]), "v_desc": _desc(pv, [d, bn]),
             **_ATTENTION_ARGS}
    constants = dict(H=heads, SK=kv_tokens, D=d, BLOCK_M=bm, BLOCK_N=bn, PV_FP8=cfg.pv == "fp8",
                     LOG2_P=LOG2_P_SCALE, EXACT_FP8=False, WARP_SPECIALIZE=cfg.warp_specialize,
                     EMULATE_EXP2=cfg.emulate_exp2)
    return _compile(_attention_kernel, types, constants, _ALIGNED,
                    dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))


def compile_attention_gluon(cfg: AttentionConfig, head_dim: int, kv_tokens: int, heads: int = 12):
    """attention_gluon's kernel (attention_gluon_ws's with ``warp_specialize``) for sm_90a (its descriptors carry
    their shared-memory layouts)."""
    from triton.experimental.gluon._runtime import GluonASTSource
    d = head_dim
    q_rows = 64 if cfg.warp_specialize else cfg.block_m       # each consumer warp group loads its own Q rows
    layouts = descriptor_layouts(d, q_rows)
    types = {"q_desc": _desc("i8", [q_rows, d], layouts[0]), "k_desc": _desc("i8", [cfg.block_n, d], layouts[1]),
             "v_desc": _desc("fp8e4nv", [d, cfg.block_n], layouts[2]), **_ATTENTION_ARGS}
    constants = dict(H=heads, SK=kv_tokens, D=d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, STAGES=cfg.num_stages,
                     LOG2_P=LOG2_P_SCALE, EMULATE_EXP2=cfg.emulate_exp2)
    kernel = _attention_kernel_gluon_ws if cfg.warp_specialize else _attention_kernel_gluon
    return _compile(kernel, types, constants, _ALIGNED, dict(num_warps=4 if cfg.warp_specialize else cfg.num_warps),
                    source=GluonASTSource)


def compile_gemm(M: int, N: int, K: int, epilogue: Optional[str] = None, fp8: bool = False, gluon: bool = False,
                 config=None):
    """The runtime's W4A4 GEMM with its default tiles (or ``config``'s) for an M x K by K x N product, compiled for
    sm_90a; ``gluon``: the same tiles through qgemm_gluon's K loop (int8 only)."""
    cfg = config or gemm_default_config(M, N, K, "gluon" if gluon else None)
    if cfg.variant not in ("tma", "tma_persistent", "gluon"):
        raise ValueError(f"sm90_report reads the TMA GEMM variants only, the default here is {cfg.variant!r}")
    gluon = cfg.variant == "gluon"
    if gluon and fp8:
        raise ValueError("the Gluon GEMM takes int8 codes")
    kernel = {"tma_persistent": _gemm_tma_persistent_kernel, "tma": _gemm_tma_kernel,
              "gluon": _gemm_gluon_kernel}[cfg.variant]
    el = "fp8e4nv" if fp8 else "i8"
    layouts = gemm_tile_layouts(cfg.block_m, cfg.block_n, cfg.block_k) if gluon else (None, None)
    types = {"a_desc": _desc(el, [cfg.block_m, cfg.block_k], layouts[0]),
             "b_desc": _desc(el, [cfg.block_n, cfg.block_k], layouts[1]), "c_ptr": "*bf16",
             "a_scale_ptr": "*fp32", "a_zero_ptr": "*fp32", "a_rowsum_ptr": "*i32", "w_scale_ptr": "*fp32",
             "w_zero_ptr": "*fp32", "w_colsum_ptr": "*i32", "bias_ptr": "*bf16", "res_ptr": "*bf16",
             "gate_ptr": "*fp32", "stride_rm": "i32", "rows_per_sample": "i32", "M": "i32", "N": "i32",
             "stride_cm": "i32", "num_programs": "i32"}
    kind = 0 if epilogue is None else 1 + EPILOGUES.index(epilogue)
    constants = dict(K=K, HAS_BIAS=True, EPILOGUE=kind, HAS_GATE=epilogue == "residual", LIBDEVICE=True,
                     FP8=fp8, FP8_PROMOTE_EVERY=128 if fp8 else 0, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                     BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, STAGES=cfg.num_stages, WARPS=cfg.num_warps)
    aligned = [n for n in kernel.arg_names if n.endswith("_ptr") or n in ("N", "stride_cm", "stride_rm")]
    options = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=False)
    if gluon:
        from triton.experimental.gluon._runtime import GluonASTSource
        del options["num_stages"]
        return cfg, _compile(kernel, types, constants, aligned, options, source=GluonASTSource)
    return cfg, _compile(kernel, types, constants, aligned, options)


def gemm_report(name: str, M: int, N: int, K: int, epilogue: Optional[str], fp8: bool = False,
                gluon: bool = False, config=None) -> Dict:
    cfg, kernel = compile_gemm(M, N, K, epilogue, fp8, gluon, config)
    code = sass(kernel.asm["cubin"])
    loop = innermost_loop(code, lambda ops: any("GMMA" in o for o in ops))
    waits = sorted({e[2].strip(" ;") for e in loop if e[1].startswith("WARPGROUP.DEPBAR")})
    products = [e[0] for e in code if e[0] != "label" and "GMMA" in e[1]]
    spill_ops = [e for e in code if e[0] != "label" and e[1].startswith(("STL", "LDL"))]
    return dict(name=name, M=M, N=N, K=K, epilogue=epilogue or "none", codes="fp8" if fp8 else "int8",
                tile=f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k}, {cfg.num_warps} warps, {cfg.num_stages} stages, "
                     f"{cfg.variant}",
                **ptxas_usage(kernel.asm["ptx"]), k_loop_instructions=len(loop), k_loop_waits=waits,
                spill_instructions=len(spill_ops),
                spill_instructions_in_k_loop=sum(min(products) <= e[0] <= max(products) for e in spill_ops))


_QK_PASS_TYPES = {"x_ptr": "*bf16", "codes_ptr": "*i8", "scale_ptr": "*fp32", "mean_ptr": "*fp32", "colsum_ptr": "*fp32",
                  "rstd_ptr": "*fp32", "nw_ptr": "*fp32", "nb_ptr": "*fp32", "cos_ptr": "*fp32", "sin_ptr": "*fp32",
                  "S": "i32", "stride_b": "i32", "stride_s": "i32", "stride_h": "i32", "rope_start": "i32",
                  "eps": "fp32", "out_mult": "fp32"}


def qk_pass_loads(head_dim: int = 128, block_n: int = 128, heads: int = 40) -> Dict[str, Dict[str, int]]:
    """Global load and store instructions a thread issues in each Q / K pass with Wan's prep (RMSNorm over the
    token, RoPE), launched as ``quantize_q`` / ``quantize_k`` launch them: the Q pass, K's column sums, the K codes,
    and the rstd pass. The passes are memory-bound; a head's channels read as 128-bit loads or as 16-bit ones made
    them 3.5x apart on the H100 (RESULTS.md)."""
    aligned = [n for n in _QK_PASS_TYPES if n.endswith("_ptr")] + ["stride_b", "stride_s", "stride_h"]
    d2 = head_dim // 2
    out = {}
    for name, mode, blk, warps in (("q", 0, _QUANT_ROWS, 4), ("k_colsum", 2, block_n, 8), ("k_codes", 1, block_n, 8)):
        kernel = _compile(_qk_pass_kernel, _QK_PASS_TYPES, dict(D2=d2, BLK=blk, NORM=1, ROPE=True, MODE=mode),
                          aligned, dict(num_warps=warps, num_stages=1, enable_fp_fusion=False))
        out[name] = _memory_ops(kernel)
    types = {n: _QK_PASS_TYPES[n] for n in ("x_ptr", "rstd_ptr", "S", "stride_b", "stride_s", "stride_h", "eps")}
    kernel = _compile(_rstd_kernel, types, dict(H=heads, D2=d2, BLK=_QUANT_ROWS), aligned,
                      dict(num_warps=4, num_stages=1, enable_fp_fusion=False))
    out["rstd"] = _memory_ops(kernel)
    return out


def _memory_ops(kernel) -> Dict[str, int]:
    ops = collections.Counter(e[1] for e in sass(kernel.asm["cubin"]) if e[0] != "label")
    return {op: n for op, n in sorted(ops.items()) if op.startswith(("LDG", "STG"))}


def ptxas_usage(ptx: str) -> Dict[str, int]:
    out = subprocess.run([str(toolchain()["ptxas"]), "-arch=sm_90a", "-v", "-o", "/dev/null", "-"], input=ptx,
                         capture_output=True, text=True, check=True).stderr
    grab = lambda pattern: int(re.search(pattern, out).group(1))  # noqa: E731
    return dict(registers=grab(r"Used (\d+) registers"), spill_stores=grab(r"(\d+) bytes spill stores"),
                spill_loads=grab(r"(\d+) bytes spill loads"))


def sass(cubin: bytes) -> List[tuple]:
    """[(address, opcode, operands, predicate)] with ('label', name) entries where branches land."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(toolchain()["nvdisasm"]), "-c", f.name], capture_output=True, text=True,
                              check=True).stdout
    out = []
    for line in text.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]+)\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_.]+)(.*)", line)
        if m:
            out.append((int(m.group(1), 16), m.group(3), m.group(4), (m.group(2) or "").strip()))
        elif re.match(r"^\.L_x_\d+:", line):
            out.append(("label", line.strip().rstrip(":")))
    return out


def key_loop(code: List[tuple]) -> List[tuple]:
    """The innermost loop holding both tensor-core products (int8 Q.K and fp8 / fp16 P.V); [] if none."""
    return innermost_loop(code, lambda ops: any(o.startswith("IGMMA") for o in ops)
                          and any(o.startswith(("QGMMA", "HGMMA")) for o in ops))


def innermost_loop(code: List[tuple], wanted) -> List[tuple]:
    """The shortest loop whose opcodes satisfy ``wanted``. A loop ends in a conditional backward branch: the
    unconditional ones are the out-of-line retry stubs of the barrier waits jumping back."""
    where, best = {}, []
    for i, entry in enumerate(code):
        if entry[0] == "label":
            nxt = next((e for e in code[i + 1:] if e[0] != "label"), None)
            if nxt:
                where[entry[1]] = nxt[0]
    body = [e for e in code if e[0] != "label"]
    for addr, op, rest, predicate in body:
        target = re.search(r"\((\.L_x_\d+)\)", rest) if op == "BRA" and predicate else None
        if target and where.get(target.group(1), addr + 1) < addr:
            loop = [e for e in body if where[target.group(1)] <= e[0] <= addr]
            if wanted([e[1] for e in loop]) and (not best or len(loop) < len(best)):
                best = loop
    return best


def loop_stats(loop: List[tuple]) -> Dict[str, int]:
    ops = [e[1] for e in loop]
    count = lambda prefix: sum(o.startswith(prefix) for o in ops)  # noqa: E731
    return dict(instructions=len(ops), mufu_ex2=count("MUFU.EX2"), ffma=count("FFMA"), igmma=count("IGMMA"),
                qgmma=count("QGMMA") + count("HGMMA"), bar_sync=count("BAR.SYNC"),
                exp2_in_flight=exp2_in_flight(loop),
                local_memory=count("STL") + count("LDL"))


_NO_REGISTER_WRITE = ("ST", "BAR", "BRA", "WARPGROUP", "SYNCS", "UTMA", "RED", "ATOM", "EXIT", "NOP", "BSYNC", "BSSY")


def register_operand_overwrites(code: List[tuple]) -> int:
    """Instructions that write a register a tensor-core product reads its A operand from (P of the P.V product)
    before the next ``WARPGROUP.DEPBAR``: undefined behaviour in PTX (the product reads its registers while it
    runs). Gluon cannot name 8-bit P as a dependency of its wait, so this is checked on the binary instead."""
    body = [e for e in code if e[0] != "label"]
    hazards = 0
    for i, (_, op, rest, _) in enumerate(body):
        m = re.search(r"\sR\d+,\s*R(\d+),", rest) if "GMMA" in op else None
        if not m:
            continue
        operand = {f"R{int(m.group(1)) + r}" for r in range(4)}       # 16 bytes of A a thread, k = 32 (8-bit)
        for _, op2, rest2, _ in body[i + 1:]:
            if op2.startswith("WARPGROUP.DEPBAR"):
                break
            if "GMMA" in op2 or op2.startswith(_NO_REGISTER_WRITE):
                continue
            dst = re.match(r"\s*(R\d+)", rest2)
            hazards += bool(dst and dst.group(1) in operand)
    return hazards


def exp2_in_flight(loop: List[tuple]) -> int:
    """MUFU.EX2 issued while a tensor-core product is outstanding, in the loop's steady state: a GMMA that commits
    (``gsb0``) adds a pending group, ``WARPGROUP.DEPBAR.LE gsb0, N`` leaves at most N, and an exp2 between the
    GMMAs of one product also runs under it. Walks the loop twice (what is pending at its end is pending at its
    start) and counts on the second pass."""
    pending, open_product, count = 0, False, 0
    for lap in range(2):
        for _, op, rest, _ in loop:
            if "GMMA" in op:
                open_product = "gsb0" not in rest
                pending += "gsb0" in rest
            elif op.startswith("WARPGROUP.DEPBAR"):
                m = re.search(r"gsb0,\s*(0x[0-9a-f]+|\d+)", rest)
                pending = min(pending, int(m.group(1), 0) if m else 0)
            elif op == "MUFU.EX2" and lap == 1 and (pending or open_product):
                count += 1
    return count


def warp_partitions(ttgir: str) -> Optional[List[Dict[str, int]]]:
    """Triton's warp specialization of the kernel: the default region and each partition; None if not specialized."""
    if "ttg.warp_specialize(" not in ttgir:
        return None
    rest = ttgir[ttgir.index("ttg.warp_specialize("):]
    pieces = re.split(r"\n\s*partition\d+\(", rest)
    out = []
    for i, piece in enumerate(pieces):
        warps = re.search(r"num_warps\((\d+)\)", piece) if i else None
        out.append(dict(name="default" if i == 0 else f"partition{i - 1}", warps=int(warps.group(1)) if warps else 0,
                        products=piece.count("warp_group_dot "), exp2=piece.count("math.exp2"),
                        tma_copies=piece.count("async_tma_copy_global_to_local")))
    return out


@dataclass
class KernelReport:
    config: Dict
    head_dim: int
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    shared_bytes: int = 0
    partitions: Optional[List[Dict[str, int]]] = None
    key_loop: Dict[str, int] = field(default_factory=dict)
    register_operand_overwrites: int = 0
    error: Optional[str] = None


def report(cfg: AttentionConfig, head_dim: int, kv_tokens: int) -> KernelReport:
    rep = KernelReport(config=asdict(cfg), head_dim=head_dim)
    try:
        kernel = compile_attention(cfg, head_dim, kv_tokens)
    except Exception as exc:     # a config Triton cannot build for Hopper is a result, not a crash
        rep.error = repr(exc)[:300]
        return rep
    rep.__dict__.update(ptxas_usage(kernel.asm["ptx"]))
    rep.shared_bytes = kernel.metadata.shared
    rep.partitions = warp_partitions(kernel.asm["ttgir"])
    code = sass(kernel.asm["cubin"])
    rep.key_loop = loop_stats(key_loop(code))
    rep.register_operand_overwrites = register_operand_overwrites(code)
    return rep


# (name, N, K, fused epilogues the runtime uses there): Wan-14B and Wan-1.3B linears at 32,760 tokens
# (fp8 codes, Gluon K loop, tiles: None = the default's): Triton int8 and fp8, then qgemm_gluon at the default
# tiles and at 128 x 128 x 128 with 8 warps (half the accumulator a thread: no epilogue spills)
GEMM_VARIANTS = [(False, False, None), (True, False, None), (False, True, None),
                 (False, True, GemmConfig(128, 128, 128, 8, 8, 4, "gluon"))]
GEMM_SHAPES = [("Wan-14B attention 5120x5120", 5120, 5120, (None, "residual")),
               ("Wan-14B FFN up", 13824, 5120, ("gelu_tanh",)), ("Wan-14B FFN down", 5120, 13824, ("residual",)),
               ("Wan-1.3B attention 1536x1536", 1536, 1536, (None,)), ("Wan-1.3B FFN up", 8960, 1536, ("gelu_tanh",))]


def sweep_configs(head_dim: int, everything: bool) -> List[AttentionConfig]:
    sys.path.insert(0, str(Path(__file__).parent))
    from attention_sweep import GLUON_SWEEP, SWEEPS
    rows = (SWEEPS[head_dim] if everything else [t for t in SWEEPS[head_dim] if len(t) > 4]) + GLUON_SWEEP
    configs = [default_config(head_dim)] + [AttentionConfig(*t) for t in rows]
    return list(dict.fromkeys(configs))


def row(rep: KernelReport) -> str:
    c = rep.config
    name = (f"{c['block_m']}x{c['block_n']}, {c['num_warps']} warps, {c['num_stages']} stages"
            + (", warp_specialize" if c["warp_specialize"] else "") + (", emulate_exp2" if c["emulate_exp2"] else "")
            + (", Gluon" if c["kernel"] == "gluon" else ""))
    if rep.error:
        return f"| d={rep.head_dim} {name} | error: {rep.error} |||||"
    parts = ("no" if rep.partitions is None else
             " + ".join(f"{p['name']}({p['warps']}w: {p['products']} mma, {p['exp2']} exp2, {p['tma_copies']} tma)"
                        for p in rep.partitions))
    k = rep.key_loop
    return (f"| d={rep.head_dim} {name} | {rep.registers} / {rep.spill_stores} B | {rep.shared_bytes // 1024} KiB | "
            f"{parts} | {k.get('instructions')} instr, {k.get('mufu_ex2')} MUFU.EX2, {k.get('ffma')} FFMA, "
            f"{k.get('igmma')} IGMMA + {k.get('qgmma')} QGMMA, {k.get('bar_sync')} BAR.SYNC | "
            f"{k.get('exp2_in_flight')} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--head-dims", type=int, nargs="+", default=[128, 64])
    p.add_argument("--kv-tokens", type=int, default=32760)
    p.add_argument("--all", action="store_true", help="every row of the sweep, not only the default and the schedules")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    from qvgen_kernels.triton_env import interpreter_active
    if interpreter_active():
        p.error("TRITON_INTERPRET is set: the kernels are decorated for the interpreter and cannot be compiled")
    print(f"triton {triton.__version__}, target sm_90a, {args.kv_tokens} keys")
    print("| kernel | registers / spill | shared | warp specialization | key loop (per thread) "
          "| exp2 issued under a product |\n|---|---|---|---|---|---|")
    reports = []
    for d in args.head_dims:
        for cfg in sweep_configs(d, args.all):
            reports.append(report(cfg, d, args.kv_tokens))
            print(row(reports[-1]), flush=True)
    print("\n| GEMM (M = 32760) | epilogue | codes | tile | registers / spill | K-loop wait | spill instructions "
          "(in the K loop) |\n|---|---|---|---|---|---|---|")
    gemms = []
    for name, N, K, epilogues in GEMM_SHAPES:
        for epilogue in epilogues:
            for fp8, gluon, config in GEMM_VARIANTS:
                g = gemm_report(name, 32760, N, K, epilogue, fp8, gluon, config)
                gemms.append(g)
                print(f"| {name} | {g['epilogue']} | {g['codes']} | {g['tile']} | {g['registers']} / "
                      f"{g['spill_stores']} B | {', '.join(g['k_loop_waits'])} | {g['spill_instructions']} "
                      f"({g['spill_instructions_in_k_loop']}) |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(triton=triton.__version__, target="sm_90a",
                                                   kv_tokens=args.kv_tokens, kernels=[asdict(r) for r in reports],
                                                   gemms=gemms), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
