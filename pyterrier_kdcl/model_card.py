"""The model card of a saved reranker: ``README.md`` with Hugging Face metadata and what the reranker knows of its
training.

:meth:`CrossEncoder.save <pyterrier_kdcl.CrossEncoder.save>` writes it: YAML front matter the Hub reads
(``library_name``, ``base_model`` where known, tags, ``pipeline_tag: text-ranking``), then how to load the model,
its settings, and the facts a trainer's ``fit`` left in ``reranker.training_facts`` (objective and loss, teacher
and temperatures, training queries and steps, best validation metric, precision) and its LoRA settings.
:func:`set_results` adds a table of test results afterwards (the experiment runner's, or anyone's).

The card is for people and the Hub only: loading never reads it (``kdcl.json`` says how to rebuild the reranker),
so an edited, missing or broken README.md changes nothing.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

from pyterrier_kdcl import paths

CARD_FILE = "README.md"
LIBRARY = "pyterrier-kdcl"
RESULTS_TITLE = "Evaluation results"
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_OBJECTIVE_TAGS = {"distillation": "distillation", "contrastive": "contrastive"}


def write(folder: str | os.PathLike, reranker, name: str | None = None) -> Path:
    """Writes ``folder/README.md`` for ``reranker`` (called by ``save`` inside its temporary directory)."""
    path = Path(folder) / CARD_FILE
    path.write_text(render(reranker, name or Path(folder).name), encoding="utf-8")
    return path


def render(reranker, name: str) -> str:
    """The card's text: front matter, then the body."""
    from huggingface_hub import ModelCardData

    facts = reranker.training_facts or {}
    data = ModelCardData(library_name=LIBRARY, base_model=base_model(reranker.model_name), tags=_tags(reranker),
                         pipeline_tag="text-ranking")
    return f"---\n{data.to_yaml()}\n---\n\n" + _body(reranker, name, facts)


def base_model(model_name: str) -> str | None:
    """The Hugging Face id the weights started from: a hub id, or a packaged short name's source; None for a local
    directory (its name says nothing to the Hub)."""
    if os.path.exists(model_name):
        return None
    from pyterrier_kdcl.offline import packaged_models

    if packaged_models.is_offline_model(model_name):
        return packaged_models.OFFLINE_MODELS[model_name].hub_id
    return model_name if _HUB_ID.match(model_name) else None


def set_results(folder: str | os.PathLike, results, *, title: str = RESULTS_TITLE, dataset: str | None = None,
                note: str | None = None) -> Path:
    """Sets the section ``## {title}`` of a saved reranker's card to a table of ``results``, replacing a section
    of that title or appending one (several titles make several sections: in domain, out of domain, ...).

    ``results`` is a mapping of measure to value (``{"nDCG@10": 0.61}``) or a data frame (``pt.Experiment``'s
    table, one row a system). With a mapping and ``dataset`` (an ``irds:`` id or any name), the values also go
    into the card's ``model-index`` metadata, which the Hub shows as the model's evaluation results.

    Example::

        table = pt.Experiment([bm25, bm25 >> text >> reranker], test_topics, test_qrels, [nDCG @ 10])
        kdcl.model_card.set_results("my-reranker", table, title="Results on kdcl/manpages/test",
                                    note="BM25 top 100, reranked")
    """
    from huggingface_hub import EvalResult, ModelCard

    path = Path(folder) / CARD_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: set_results adds to the card CrossEncoder.save writes; "
                                f"save the reranker to {folder} first")
    card = ModelCard(path.read_text(encoding="utf-8"))
    section = f"## {title}\n\n" + (f"{note}\n\n" if note else "") + _table(results) + "\n"
    card.text = _replace_section(card.text, title, section)
    if dataset is not None and isinstance(results, Mapping):
        kept = [r for r in (card.data.eval_results or []) if r.dataset_name != dataset]
        card.data.eval_results = kept + [
            EvalResult(task_type="text-ranking", dataset_type=dataset, dataset_name=dataset, metric_type=str(k),
                       metric_value=float(v)) for k, v in results.items()]
        card.data.model_name = card.data.model_name or Path(folder).resolve().name
    paths.write_text_atomically(path, str(card))  # a reader sees the old card or the new one
    return path


# -- the body ----------------------------------------------------------------------------------------------------
def _tags(reranker) -> list[str]:
    tags = ["pyterrier", LIBRARY, "reranker", "cross-encoder", "text-ranking"]
    objective = (reranker.training_facts or {}).get("objective")
    if objective in _OBJECTIVE_TAGS:
        tags.append(_OBJECTIVE_TAGS[objective])
    if _has_lora(reranker):
        tags += ["peft", "lora"]
    elif reranker.ranker.pooling == "classifier":  # loads as it is in both, with the same raw scores
        tags += ["transformers", "sentence-transformers"]
    model_type = getattr(getattr(reranker.ranker.backbone, "config", None), "model_type", None)
    return tags + ([model_type] if model_type else [])


def _body(reranker, name: str, facts: dict) -> str:
    objective = facts.get("objective")
    what = {"distillation": f"trained by knowledge distillation from `{facts.get('teacher')}`",
            "contrastive": "trained by contrastive learning (InfoNCE over one positive and hard negatives)"}.get(
        objective, f"trained with `{facts.get('loss')}`" if facts else "as built or loaded (no training recorded)")
    training = _facts_table(_training_rows(facts)) if facts else (
        "These weights were not trained by a pyterrier-kdcl trainer (or were saved before one recorded its facts).\n")
    return "\n".join([f"# {name}\n",
                      f"A cross-encoder reranker saved by {LIBRARY} (PyTerrier), {what}. It scores each (query, "
                      "document) pair jointly; a higher score means more relevant.\n",
                      _usage(reranker), "## Model\n", _facts_table(_model_facts(reranker)), "## Training\n", training])


def _usage(reranker) -> str:
    text = ("## Usage\n\n```python\nimport pyterrier as pt, pyterrier_kdcl as kdcl\n\n"
            "reranker = kdcl.CrossEncoder.load(\"path/to/this/model\")\n"
            "pipeline = bm25 >> pt.text.get_text(dataset, \"text\") >> reranker\n```\n")
    if reranker.ranker.pooling == "classifier" and not _has_lora(reranker):
        text += ("\nThe directory is also an ordinary sentence-transformers `CrossEncoder` and transformers "
                 "`AutoModelForSequenceClassification` checkpoint. sentence-transformers applies a sigmoid to a "
                 "one-logit model by default; for the raw scores this reranker ranks by, ask for the identity:\n\n"
                 "```python\nimport torch\nfrom sentence_transformers import CrossEncoder\n\n"
                 f"model = CrossEncoder(\"path/to/this/model\", activation_fn=torch.nn.Identity(), "
                 f"max_length={reranker.max_length})\n"
                 "scores = model.predict([(query, document)])\n```\n")
    return text


def _has_lora(reranker) -> bool:
    from pyterrier_kdcl import models

    return models.has_lora(reranker.ranker)


def _model_facts(reranker) -> list[tuple[str, object]]:
    rows = [("base model", f"`{reranker.model_name}`"), ("pooling", reranker.ranker.pooling),
            ("max length", f"{reranker.max_length} tokens"), ("weights", str(reranker.dtype).replace("torch.", ""))]
    if reranker.template:
        rows.append(("input template", f"`{reranker.template}`"))
    if _has_lora(reranker):
        config = reranker.ranker.backbone.peft_config["default"]
        modules = config.target_modules
        modules = ", ".join(sorted(modules)) if isinstance(modules, (set, list, tuple)) else modules
        rows.append(("LoRA", f"r={config.r}, alpha={config.lora_alpha}, dropout={config.lora_dropout}, "
                             f"target modules: {modules} (adapter in `adapter/`, not merged)"))
    return rows


_TRAINING_ROWS = [  # fact key, label
    ("objective", "objective"), ("loss", "loss"), ("teacher", "teacher"),
    ("teacher_scores", "teacher score cache"),
    ("teacher_temperature", "teacher temperature"), ("student_temperature", "student temperature"),
    ("temperature", "InfoNCE temperature"), ("training_queries", "training queries (groups per epoch)"),
    ("queries", "queries in the training frame"), ("group_size", "group size (1 positive + negatives)"),
    ("epochs", "epochs"), ("steps", "optimizer steps"), ("pairs", "pairs scored in training"),
    ("batch_size", "batch size (queries)"), ("learning_rate", "learning rate"),
    ("head_learning_rate", "head learning rate"), ("negative_filter", "teacher-filtered negatives"),
    ("seed", "seed"), ("precision", "precision"),
    ("validation", "best validation"), ("seconds", "training time (s)"), ("continued_from", "continued from"),
]


def _training_rows(facts: dict) -> list[tuple[str, object]]:
    facts = dict(facts)
    if facts.get("best_validation") is not None:
        facts["validation"] = (f"{facts['metric']} {facts['best_validation']:.4f} at step {facts.get('best_step')}")
    previous = facts.get("continued_from")
    if isinstance(previous, dict):
        facts["continued_from"] = f"{previous.get('objective')} training, `{previous.get('loss')}`, " \
                                  f"{previous.get('steps')} steps"
    for key in ("loss", "teacher"):
        if facts.get(key) is not None:
            facts[key] = f"`{facts[key]}`"
    return [(label, facts[key]) for key, label in _TRAINING_ROWS if facts.get(key) is not None]


# -- tables and files ------------------------------------------------------------------------------------------
def _facts_table(rows: list[tuple[str, object]]) -> str:
    return "| | |\n| --- | --- |\n" + "".join(f"| {k} | {_cell(v)} |\n" for k, v in rows)


def _table(results) -> str:
    import pandas as pd

    if isinstance(results, Mapping):
        frame = pd.DataFrame([{"measure": k, "value": v} for k, v in results.items()])
    elif isinstance(results, pd.DataFrame):
        frame = results
    else:
        raise TypeError(f"results must be a mapping of measure to value or a data frame (pt.Experiment's table), "
                        f"got {type(results).__name__}")
    header = "| " + " | ".join(map(str, frame.columns)) + " |\n"
    rule = "| " + " | ".join("---" for _ in frame.columns) + " |\n"
    return header + rule + "".join("| " + " | ".join(map(_cell, row)) + " |\n"
                                   for row in frame.itertuples(index=False))


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e-3 and value != 0 else f"{value:.4f}".rstrip("0").rstrip(".")
    return str(value).replace("|", "\\|").replace("\n", " ")


def _replace_section(text: str, title: str, section: str) -> str:
    """``text`` with the ``## title`` section (up to the next ``## ``) replaced by ``section``, or with it appended."""
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == f"## {title}"), None)
    if start is None:
        return text.rstrip("\n") + "\n\n" + section
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    rest = "".join(lines[end:])
    return "".join(lines[:start]) + section + ("\n" + rest if rest else "")


