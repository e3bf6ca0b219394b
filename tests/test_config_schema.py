"""The typed config (experiment/schema.py): ranges declared on the fields, every problem at once with its key path,
numbers written as text, and every shipped config meaning what it meant."""

import copy
import json
from pathlib import Path

import pytest

from pyterrier_kdcl.experiment.config import ConfigError, load_config
from pyterrier_kdcl.experiment.evidence import config_as_run

ROOT = Path(__file__).resolve().parent.parent
CONFIG = {
    "name": "ranges",
    "train": {"dataset": "irds:kdcl/manpages/train", "depth": 20},
    "validation": {"dataset": "irds:kdcl/manpages/dev", "depth": 20},
    "teacher": {"model": "minilm-l6"},
    "students": [{"name": "small", "model": "minilm-l3"}],
    "evaluation": {"in_domain": [{"dataset": "irds:kdcl/manpages/test", "depth": 20}]},
}


def problems(change) -> list[str]:
    cfg = copy.deepcopy(CONFIG)
    change(cfg)
    with pytest.raises(ConfigError) as err:
        load_config(cfg, check_environment=False)
    return err.value.problems


def test_the_base_config_is_valid():
    load_config(copy.deepcopy(CONFIG), check_environment=False)


@pytest.mark.parametrize("key, value, message", [
    ("learning_rate", 0, "training.learning_rate: must be a number > 0, got 0"),
    ("learning_rate", float("inf"), "training.learning_rate: must be a finite number, got Infinity"),
    ("learning_rate", float("nan"), "training.learning_rate: must be a number > 0, got NaN"),
    ("head_learning_rate", -1e-3, "training.head_learning_rate: must be a number > 0, got -0.001"),
    ("batch_size", 0, "training.batch_size: must be at least 1, got 0"),
    ("group_size", 1, "training.group_size: must be at least 2, got 1 (a group needs a positive and at least one "
                      "negative)"),
    ("epochs", 0, "training.epochs: must be at least 1, got 0"),
    ("max_grad_norm", 0.0, "training.max_grad_norm: must be a number > 0, got 0.0"),
    ("warmup_ratio", 1.5, "training.warmup_ratio: must be at most 1, got 1.5"),
    ("weight_decay", -0.1, "training.weight_decay: must be a number >= 0, got -0.1"),
    ("temperature", 0, "training.temperature: must be a number > 0, got 0"),
    ("student_temperature", -2, "training.student_temperature: must be a number > 0, got -2"),
    ("teacher_temperature", "hot", "training.teacher_temperature: expected a number or one of 'auto', got 'hot'"),
    ("teacher_temperature", 0, "training.teacher_temperature: must be a number > 0, got 0"),
    ("validate_every", 0, "training.validate_every: must be at least 1, got 0"),
    ("negatives_window", [1, 2, 3], "training.negatives_window: takes at most 2 item(s)"),
    ("negatives_window", [5, 2], "training.negatives_window: expected [first, last] ranks with first < last"),
    ("min_label", 0, "training.min_label: must be at least 1, got 0 (qrels labels at or above it are positives"),
    ("gradient_checkpointing", "yes", "training.gradient_checkpointing: expected true or false, got 'yes'"),
])
def test_every_training_number_is_range_checked(key, value, message):
    found = problems(lambda c: c.update(training={key: value}))
    assert any(p.startswith(message) for p in found), found


@pytest.mark.parametrize("change, message", [
    (lambda c: c["students"][0].update(max_length=8), "students[0].max_length: must be at least 16, got 8"),
    (lambda c: c["students"][0].update(batch_size=0), "students[0].batch_size: must be at least 1, got 0"),
    (lambda c: c["students"][0].update(dtype="int8"), "students[0].dtype: expected one of 'fp32', 'bf16', 'fp16'"),
    (lambda c: c["train"].update(depth=0), "train.depth: must be at least 1, got 0"),
    (lambda c: c["train"].update(queries=0), "train.queries: must be at least 1, got 0 (or null for all)"),
    (lambda c: c["evaluation"].update(measures=[]), "evaluation.measures: needs at least 1 item(s), got []"),
    (lambda c: c["evaluation"].update(alpha=1.5), "evaluation.alpha: must be < 1, got 1.5"),
    (lambda c: c.update(seeds=[-1]), "seeds[0]: must be at least 0, got -1"),
    (lambda c: c["teacher"].update(kind="fusion", grid_step=0, members=[{"name": "bm25", "kind": "first-stage"}]),
     "teacher.grid_step: must be a number > 0, got 0"),
    (lambda c: c["training"].update(negative_filter={"margin": -1}) if "training" in c
     else c.update(training={"negative_filter": {"margin": -1}}),
     "training.negative_filter.margin: must be a number >= 0, got -1"),
])
def test_other_ranges_are_declared_too(change, message):
    found = problems(change)
    assert any(p.startswith(message) for p in found), found


def test_every_problem_comes_at_once_with_its_key_path():
    def many(cfg):
        cfg["training"] = {"learning_rate": 0, "batch_size": "four", "epoch": 2}
        cfg["students"][0].update(max_length="long", objectivs=["KD"])
        cfg["evaluation"]["baseline"] = "nobody"  # checked beside the type errors, on what could be read
        del cfg["teacher"]

    found = problems(many)
    for expected in ("training.learning_rate: must be a number > 0", "training.batch_size: expected an integer",
                     "training.epoch: unknown training setting; did you mean 'epochs'?",
                     "students[0].max_length: expected an integer, got 'long'",
                     "students[0].objectivs: unknown key; did you mean 'objectives'?",
                     "teacher: required key is missing", "evaluation.baseline: 'nobody' is not a system"):
        assert any(p.startswith(expected) for p in found), (expected, found)


def test_numbers_written_as_text_are_numbers_and_other_text_is_not():
    cfg = copy.deepcopy(CONFIG)
    cfg["training"] = {"learning_rate": "3e-5", "teacher_temperature": "2", "max_grad_norm": 1}
    loaded = load_config(cfg, check_environment=False)
    args = loaded.training_args(loaded.students[0])
    assert args["learning_rate"] == 3e-5 and args["teacher_temperature"] == 2.0 and args["max_grad_norm"] == 1.0
    assert all(isinstance(args[k], float) for k in ("learning_rate", "teacher_temperature", "max_grad_norm"))
    found = problems(lambda c: c["train"].update(depth="20"))  # an integer is never read from text
    assert any(p.startswith("train.depth: expected an integer, got '20'") for p in found), found


def test_training_sections_override_in_order_and_write_back_only_what_was_given():
    cfg = copy.deepcopy(CONFIG)
    cfg["training"] = {"learning_rate": 1e-3, "epochs": 2}
    cfg["students"][0]["training"] = {"epochs": 3}
    loaded = load_config(cfg, check_environment=False)
    args = loaded.training_args(loaded.students[0])
    assert (args["learning_rate"], args["epochs"], args["batch_size"]) == (1e-3, 3, 4)
    dumped = loaded.to_dict()
    assert dumped["training"] == {"learning_rate": 1e-3, "epochs": 2} and dumped["students"][0]["training"] == \
        {"epochs": 3}
    again = load_config(json.loads(json.dumps(dumped)), check_environment=False)
    assert again.to_dict() == dumped and again.training_args(again.students[0]) == args


def test_one_spelling_per_dtype():
    cfg = copy.deepcopy(CONFIG)
    cfg["students"][0]["dtype"] = "bfloat16"
    assert load_config(cfg, check_environment=False).students[0].dtype == "bf16"


@pytest.mark.parametrize("path", sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs" / "results").glob(
    "*/config.json")))
def test_every_committed_config_as_run_loads_and_writes_back_what_it_said(path):
    """Each committed run's config.json reads back and writes every value it holds unchanged (keys added to the
    schema since are written at their defaults)."""
    directory = (ROOT / path).parent
    as_run = json.loads((directory / "config.json").read_text())
    as_run.pop("source", None)
    _same_where_given(as_run, config_as_run(directory).to_dict(), "")


def _same_where_given(old, new, path):
    if isinstance(old, dict):
        assert isinstance(new, dict), path
        for key, value in old.items():
            if key != "dtype" or value is None:  # config.json of earlier runs spells bfloat16 out; read as bf16
                _same_where_given(value, new[key], f"{path}.{key}")
    elif isinstance(old, list):
        assert isinstance(new, list) and len(new) == len(old), path
        for i, (a, b) in enumerate(zip(old, new)):
            _same_where_given(a, b, f"{path}[{i}]")
    else:
        assert old == new, (path, old, new)


# -- issue 23 item 24: values that passed --check and did harm late ---------------------------------------------
@pytest.mark.parametrize("change, message", [
    (lambda c: c.update(device="gpu0"), "device: expected cpu, cuda, cuda:N, mps or xpu, got 'gpu0'"),
    (lambda c: c["students"][0].update(lora={"rank": 4}),
     "students[0].lora: 'rank' is not a LoRA argument (peft.LoraConfig); e.g. r, lora_alpha"),
    (lambda c: c["students"][0].update(lora={"lora_alhpa": 4}), "did you mean 'lora_alpha'?"),
    (lambda c: c["students"][0].update(lora={"r": -1}), "students[0].lora: r must be a whole number >= 1, got -1"),
    (lambda c: c["students"][0].update(lora={"r": 8, "lora_dropout": 1.5}),
     "students[0].lora: lora_dropout must be a number in [0, 1), got 1.5"),
    (lambda c: c["teacher"].update(lora={"lora_alpha": float("nan")}), "teacher.lora: lora_alpha must be a number > 0"),
])
def test_devices_and_lora_arguments_are_checked(change, message):
    found = problems(change)
    assert any(message in p for p in found), found


def test_valid_devices_and_lora_arguments_pass():
    cfg = copy.deepcopy(CONFIG)
    cfg.update(device="cpu")
    cfg["students"][0].update(lora={"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["query"]})
    load_config(cfg, check_environment=False)


def test_a_cuda_device_this_machine_lacks_and_a_max_length_past_the_positions_fail_the_check(tiny_model, tmp_path):
    import torch

    bert = str(tiny_model("bert"))  # learned absolute positions: 512
    cfg = copy.deepcopy(CONFIG)
    cfg.update(device=f"cuda:{torch.cuda.device_count()}")
    cfg["students"][0].update(model=bert, max_length=4096)
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    found = "\n".join(err.value.problems)
    assert f"device: 'cuda:{torch.cuda.device_count()}', but this machine has {torch.cuda.device_count()}" in found
    assert f"students[0].max_length: 4096 is longer than the 512 positions {bert!r} can read; use 512" in found
    cfg["students"][0]["max_length"] = 512
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    assert not any("max_length" in p for p in err.value.problems)


def test_a_yaml_key_given_twice_is_refused_naming_both_lines(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("name: twice\ntraining:\n  epochs: 2\nseeds: [1]\ntraining:\n  batch_size: 2\n")
    with pytest.raises(ConfigError, match=r"key 'training' is given twice \(lines 2 and 5\)"):
        load_config(path, check_environment=False)


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path):
    import resource
    import time

    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]  # 10**10 values expanded
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    before, started = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
    with pytest.raises(ConfigError, match="more than 100,000 values once its YAML aliases"):
        load_config(path, check_environment=False)
    assert time.perf_counter() - started < 5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB: no gigabytes
