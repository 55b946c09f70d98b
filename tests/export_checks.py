"""What the Wan and CogVideoX export tests share: the trained student at TP=1 from its checkpoint, the runtime on
the same input, and the per-linear check that exported weight codes and runtime activation codes are the fake
quantizer's. Run inside a run_distributed child (the student is a megatron model)."""
import torch

from qvgen_kernels import codes
from qvgen_kernels.format import load_export


def load_student(cfg, ckpt):
    from megatron_qvgen.dist_ckpt import load_sharded
    from megatron_qvgen.models import build_model_chunks
    from megatron_qvgen.parallel import initialize_parallel
    from megatron_qvgen.quant.rank_decay import RankDecay, RankDecaySchedule
    from megatron_qvgen.training.checkpointing import holds_aux_factors

    initialize_parallel(cfg.parallel, seed=0)
    student = build_model_chunks(cfg.model, cfg.parallel, spec="qat", quant=cfg.quant)[0]
    RankDecay(student, RankDecaySchedule(cfg.quant, cfg.decay_phase_steps)).restore(holds_aux_factors(ckpt))
    student.load_state_dict(load_sharded({"model": student.sharded_state_dict()}, ckpt)["model"])
    return student


@torch.no_grad()
def student_outputs(student, *inputs):
    """(output, output with every unquantised tensor and bias rounded to bf16, as the export stores them)."""
    from megatron_qvgen.quant import quant_context, quant_linears

    with quant_context(aux_gate=1.0):
        y = student(*inputs)
        quant_params = {id(p) for l in quant_linears(student) for n, p in l.named_parameters() if n != "bias"}
        for p in student.parameters():
            if id(p) not in quant_params:
                p.copy_(p.bfloat16().float())
        return y, student(*inputs)


@torch.no_grad()
def runtime_outputs(runtime, *inputs):
    """(bf16 runtime output as float32, float32 runtime output)."""
    y = runtime(*inputs, return_dict=False)[0].float()
    return y, runtime.float()(*inputs, return_dict=False)[0]


def compare_codes(student, runtime, export_dir, quant, gen):
    """Per quantised linear: exported weight codes == fake quantizer's; runtime activation codes of a random
    [s=5, b=2, h] input with per-sample groups == fake quantizer's. Returns (same_weight, same_act, checked)."""
    from megatron_qvgen.quant import quant_linears

    export = load_export(export_dir)
    same_weight, same_act, checked = True, True, 0
    for layer in quant_linears(student):
        ex = export.linears[layer.quant_name]
        w_codes = codes.weight_codes(layer.weight, layer.weight_quantizer.scale.float(),
                                     layer.weight_quantizer.zero_point.float(), quant.weight_bits)
        same_weight &= torch.equal(codes.unpack_codes(ex.weight_codes, ex.in_features).float(), w_codes)
        x = torch.randn(5, 2, ex.in_features, generator=gen) * 3          # megatron's [s, b, h]
        groups = torch.tensor([17, 42])
        a_lo, a_hi = layer.act_quantizer.clip_factors(groups)
        lo, hi = codes.act_clip_range(x, quant.act_clip_ratio, a_lo, a_hi)
        s, z = codes.act_qparams(lo, hi, quant.act_bits)
        fake = codes.act_codes(x, s, z, quant.act_bits)
        rt = runtime.get_submodule(layer.quant_name)
        act = rt.quantize_input(x.transpose(0, 1).reshape(-1, ex.in_features), groups, 5, use_triton=False)
        same_act &= torch.equal(act.codes.float().reshape(2, 5, -1).transpose(0, 1), fake)
        checked += 1
    return same_weight, same_act, checked
