"""The model card a saved reranker carries (issue 26 item 2): Hugging Face metadata and the facts of its training,
results added later, and a load that never reads it."""

import json

import numpy as np
import pandas as pd
import pytest
from huggingface_hub import ModelCard
from training_data import CountingTeacher, training_frames

import pyterrier_kdcl as kdcl
from pyterrier_kdcl import model_card
from pyterrier_kdcl.training.precision import resolve as resolve_precision

pytestmark = pytest.mark.usefixtures("one_thread")


def student(tiny_model, **kw):
    return kdcl.CrossEncoder(tiny_model("bert"), verbose=False, max_length=32, **kw)


def card(path) -> ModelCard:
    return ModelCard((path / "README.md").read_text())


@pytest.fixture(scope="module")
def distilled(tiny_model, tmp_path_factory):
    """A student distilled for 6 steps with validation, saved by the trainer."""
    res, qrels = training_frames(n_queries=12)
    kd = kdcl.DistillationTrainer(student(tiny_model), CountingTeacher(), teacher_temperature=3.0,
                                  student_temperature=1.5, group_size=4, batch_size=4, epochs=2, verbose=False,
                                  metric="RR@10", output_dir=tmp_path_factory.mktemp("kd"),
                                  teacher_cache_key="counting")
    kd.fit(res, qrels, res, qrels)
    path = tmp_path_factory.mktemp("saved") / "my-kd-reranker"
    kd.save(path)
    return kd, path


def test_a_distilled_reranker_card_has_hub_metadata_and_its_training(distilled):
    kd, path = distilled
    data, text = card(path).data, card(path).text
    assert data.library_name == "pyterrier-kdcl" and data.pipeline_tag == "text-ranking"
    assert {"reranker", "cross-encoder", "pyterrier", "distillation", "bert"} <= set(data.tags)
    assert "contrastive" not in data.tags
    assert data.base_model is None  # a local directory means nothing to the Hub
    assert text.lstrip().startswith("# my-kd-reranker\n")
    facts = kd.reranker.training_facts
    assert facts["objective"] == "distillation" and facts["teacher"] == "CountingTeacher()"
    assert facts["teacher_temperature"] == 3.0 and facts["student_temperature"] == 1.5
    assert facts["training_queries"] == 12 and facts["steps"] == 6 and facts["epochs"] == 2
    assert facts["metric"] == "RR@10" and facts["best_step"] in (3, 6) and 0 <= facts["best_validation"] <= 1
    precision = resolve_precision("auto", "cpu")  # bf16 on a CPU with native bfloat16
    assert facts["precision"] == precision and len(facts["teacher_scores"]) == 16
    for line in ["| objective | distillation |", "| teacher | `CountingTeacher()` |", "| teacher temperature | 3 |",
                 "| student temperature | 1.5 |", "| training queries (groups per epoch) | 12 |",
                 "| optimizer steps | 6 |", f"| best validation | RR@10 {facts['best_validation']:.4f} at step "
                 f"{facts['best_step']} |", f"| precision | {precision} |",
                 "| loss | `KLDistillation(teacher_temperature=3.0, student_temperature=1.5)` |"]:
        assert line in text, line
    assert "activation_fn=torch.nn.Identity()" in text  # how to get the raw scores in sentence-transformers


def test_the_trainer_output_dir_model_has_the_card_too(distilled):
    kd, _ = distilled
    assert "distillation" in card(kd.output_dir / "model").data.tags


def test_facts_survive_load_and_save_but_never_change_the_fingerprint(distilled, tmp_path):
    kd, path = distilled
    loaded = kdcl.CrossEncoder.load(path, verbose=False)
    assert loaded.training_facts == kd.reranker.training_facts
    assert json.loads((path / "kdcl.json").read_text())["training"] == kd.reranker.training_facts
    assert loaded.fingerprint() == kd.reranker.fingerprint()
    fingerprint = loaded.fingerprint()
    loaded.training_facts = {"objective": "something else"}
    assert loaded.fingerprint() == fingerprint  # teacher caches of a trained teacher stay valid
    loaded.training_facts = kd.reranker.training_facts
    loaded.save(tmp_path / "again")
    assert "| teacher | `CountingTeacher()` |" in card(tmp_path / "again").text


def test_a_contrastive_fit_is_tagged_contrastive_and_a_second_fit_names_the_first(distilled, tmp_path):
    kd, path = distilled
    res, qrels = training_frames(n_queries=8)
    cl = kdcl.ContrastiveTrainer(kdcl.CrossEncoder.load(path, verbose=False), temperature=0.5, group_size=4,
                                 batch_size=4, verbose=False)
    cl.fit(res, qrels)
    cl.save(tmp_path / "cl")
    data, text = card(tmp_path / "cl").data, card(tmp_path / "cl").text
    assert "contrastive" in data.tags and "distillation" not in data.tags
    assert "| InfoNCE temperature | 0.5 |" in text and "| training queries (groups per epoch) | 8 |" in text
    assert "| best validation |" not in text and "| teacher |" not in text
    assert "| continued from | distillation training" in text


def test_an_unfitted_trainer_refuses_to_save(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="has not been fitted.*call fit"):
        kdcl.ContrastiveTrainer(student(tiny_model), verbose=False).save(tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_an_untrained_reranker_card_says_so_and_names_lora(tiny_model, tmp_path):
    ce = student(tiny_model, lora={"r": 4, "lora_alpha": 8})
    ce.save(tmp_path / "lora")
    data, text = card(tmp_path / "lora").data, card(tmp_path / "lora").text
    assert {"peft", "lora"} <= set(data.tags) and "sentence-transformers" not in data.tags
    assert "| LoRA | r=4, alpha=8, dropout=0.1, target modules: " in text
    assert "not trained by a pyterrier-kdcl trainer" in text
    assert "distillation" not in data.tags and "contrastive" not in data.tags


def test_base_model_is_a_hub_id_or_a_packaged_models_source():
    assert model_card.base_model("minilm-l6") == "sentence-transformers/all-MiniLM-L6-v2"
    assert model_card.base_model("gemma3-270m") == "google/gemma-3-270m"
    assert model_card.base_model("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
    assert model_card.base_model("/no/such/local/dir") is None


def test_loading_never_reads_the_card(tiny_model, tmp_path):
    ce = student(tiny_model)
    ce.save(tmp_path / "m")
    expected = ce.score_pairs(["read file"], ["read from a file descriptor"])
    (tmp_path / "m" / "README.md").write_bytes(b"---\n: [broken yaml\n\xff\xfe")
    broken = kdcl.CrossEncoder.load(tmp_path / "m", verbose=False)
    (tmp_path / "m" / "README.md").unlink()
    missing = kdcl.CrossEncoder.load(tmp_path / "m", verbose=False)
    for loaded in (broken, missing):
        np.testing.assert_allclose(loaded.score_pairs(["read file"], ["read from a file descriptor"]), expected,
                                   atol=1e-6)


def test_set_results_sets_a_section_per_title_and_the_hub_metadata(tiny_model, tmp_path):
    student(tiny_model).save(tmp_path / "m")
    model_card.set_results(tmp_path / "m", {"nDCG@10": 0.5}, dataset="irds:kdcl/manpages/test")
    model_card.set_results(tmp_path / "m", {"nDCG@10": 0.61234, "RR@10": 0.7}, dataset="irds:kdcl/manpages/test",
                           note="BM25 top 100, reranked")
    table = pd.DataFrame({"name": ["BM25", "BM25 >> reranker"], "nDCG@10": [0.5, 0.6], "nDCG@10 p-value": [None, 3e-5]})
    model_card.set_results(tmp_path / "m", table, title="Out of domain")
    written = card(tmp_path / "m")
    assert written.text.count("## Evaluation results") == 1 and written.text.count("## Out of domain") == 1
    assert "| nDCG@10 | 0.6123 |" in written.text and "| nDCG@10 | 0.5 |" not in written.text
    assert "BM25 top 100, reranked" in written.text
    assert "| BM25 >> reranker | 0.6 | 3e-05 |" in written.text
    assert written.text.index("## Training") < written.text.index("## Evaluation results") \
        < written.text.index("## Out of domain")
    results = {(r.dataset_name, r.metric_type): r.metric_value for r in written.data.eval_results}
    assert results == {("irds:kdcl/manpages/test", "nDCG@10"): 0.61234, ("irds:kdcl/manpages/test", "RR@10"): 0.7}
    assert written.data.pipeline_tag == "text-ranking"  # the rest of the metadata is kept
    assert kdcl.CrossEncoder.load(tmp_path / "m", verbose=False) is not None


def test_set_results_needs_a_saved_card(tmp_path):
    assert kdcl.model_card is model_card  # a public module, like kdcl.losses
    with pytest.raises(FileNotFoundError, match="save the reranker to .* first"):
        model_card.set_results(tmp_path, {"nDCG@10": 0.5})
    with pytest.raises(TypeError, match="mapping of measure to value or a data frame"):
        (tmp_path / "README.md").write_text("# x\n")
        model_card.set_results(tmp_path, [0.5])
