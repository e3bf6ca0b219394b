"""``precision="auto"``: bf16 autocast wherever bfloat16 is native (issue 24 item 2), float32 elsewhere, and what it
resolved to named in the fit's facts and in the experiment stage's identity."""

from __future__ import annotations

import pytest
import torch
from training_data import training_frames

import pyterrier_kdcl as kdcl
import pyterrier_kdcl.fast
from pyterrier_kdcl.training.precision import resolve


@pytest.fixture
def native(monkeypatch):
    """``native(True|False)`` makes this CPU one with (or without) native bfloat16."""
    return lambda value: monkeypatch.setattr(pyterrier_kdcl.fast, "native_bfloat16", lambda: value)


def test_auto_is_bf16_where_the_cpu_has_native_bfloat16_and_fp32_elsewhere(native):
    native(True)
    assert resolve("auto", "cpu") == "bf16"
    native(False)
    assert resolve("auto", "cpu") == "fp32"
    assert resolve("auto", "cpu", torch.bfloat16) == "bf16"  # weights held in a half precision compute in it
    assert resolve("auto", "cpu", torch.float16) == "fp16"
    assert [resolve(p, "cpu") for p in ("fp32", "no", "bf16", "fp16")] == ["fp32", "fp32", "bf16", "fp16"]
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16, fp16"):
        resolve("fp8", "cpu")


def test_an_instruction_set_capped_below_bfloat16_is_not_native(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    assert pyterrier_kdcl.fast.native_bfloat16()
    for name, value in [("ONEDNN_MAX_CPU_ISA", "AVX2"), ("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_VNNI"),
                        ("ATEN_CPU_CAPABILITY", "avx2")]:
        monkeypatch.setenv(name, value)
        assert not pyterrier_kdcl.fast.native_bfloat16(), (name, value)
        monkeypatch.delenv(name)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert pyterrier_kdcl.fast.native_bfloat16()
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert not pyterrier_kdcl.fast.native_bfloat16()


@pytest.mark.parametrize("has_bf16", [True, False])
def test_a_fit_at_auto_computes_and_reports_what_auto_resolved_to(tiny_model, native, has_bf16):
    native(has_bf16)
    res, qrels = training_frames(4)
    trainer = kdcl.ContrastiveTrainer(kdcl.CrossEncoder(tiny_model("bert"), max_length=32, verbose=False),
                                      group_size=4, batch_size=2, verbose=False)
    seen = []
    original = torch.autocast.__init__

    def spy(self, device_type, *args, **kwargs):  # what Accelerate's autocast computes in
        seen.append(kwargs.get("dtype"))
        original(self, device_type, *args, **kwargs)

    torch.autocast.__init__ = spy
    try:
        trainer.fit(res, qrels)
    finally:
        torch.autocast.__init__ = original
    assert trainer.reranker.training_facts["precision"] == ("bf16" if has_bf16 else "fp32")
    assert (torch.bfloat16 in seen) == has_bf16
    assert trainer.reranker.dtype == torch.float32  # master weights stay float32; the model serves as it was


def test_the_stage_names_the_resolved_precision_so_an_fp32_stage_is_not_reused_as_bf16(native):
    from pyterrier_kdcl.experiment.runner import ExperimentRunner
    from pyterrier_kdcl.experiment.schema import ExperimentConfig

    def student_fingerprint(precision: str | None, has_bf16: bool) -> tuple[str, str]:
        native(has_bf16)
        training = {"precision": precision} if precision else {}
        config = ExperimentConfig.model_validate({
            "name": "p", "seeds": [1], "train": {"dataset": "irds:kdcl/manpages/train"},
            "training": training, "teacher": {"model": "minilm-l6"},
            "students": [{"name": "s", "model": "minilm-l6"}],
            "evaluation": {"in_domain": [{"dataset": "irds:kdcl/manpages/test"}]}})
        runner = ExperimentRunner.__new__(ExperimentRunner)  # the spec builders need only the config and the device
        runner.config, runner.device = config, "cpu"
        spec = runner.student_spec(config.students[0], "CL", 1, None)
        return spec.training.precision, spec.fingerprint()

    (auto_bf16, bf16_stage), (auto_fp32, fp32_stage) = student_fingerprint(None, True), student_fingerprint(None, False)
    assert (auto_bf16, auto_fp32) == ("bf16", "fp32") and bf16_stage != fp32_stage
    assert student_fingerprint("bf16", False)[1] == bf16_stage  # named or resolved, one computation, one stage
    assert student_fingerprint("fp32", True)[1] == fp32_stage
