"""Identities are values: what a stage's fingerprint hashes, and the one place that says what it leaves out.

A stage's fingerprint is the hash of its spec's complete canonical form: every field, defaults included, nested
sections too, plus the schema version. A field is left out only where it is declared, beside the field, not to
change what a run computes (:func:`not_affecting`: an inference batch size, a label, a tracker), or to matter to
one training objective only (:func:`only_for`: the contrastive temperature in a distilled stage). So a field added
to the config later names the stages that read it, without anyone remembering to add it to a fingerprint.

>>> from pydantic import BaseModel
>>> class Spec(BaseModel):
...     lr: float = 1e-4
...     batch_size: int = not_affecting(32, "pairs per forward pass at inference")
>>> canonical(Spec(batch_size=8)) == canonical(Spec())
True
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field
from pydantic.fields import FieldInfo

# Bump when a change makes every earlier stage meaningless (it renames them all; they are computed once again).
SCHEMA_VERSION = 2

_AFFECTS = "affects_results"
_OBJECTIVES = "objectives"


def not_affecting(default: Any = ..., reason: str = "", **kwargs) -> Any:
    """A field that changes nothing a stage computes (declared here, beside the field, once): no fingerprint holds it.

    ``reason`` says why (it is kept in the field's JSON schema); ``kwargs`` go to :func:`pydantic.Field`.
    """
    if not reason:
        raise ValueError("say why the field does not affect results: not_affecting(default, reason='...')")
    extra = {_AFFECTS: False, "reason": reason}
    if "default_factory" in kwargs:
        return Field(json_schema_extra=extra, **kwargs)
    return Field(default, json_schema_extra=extra, **kwargs)


def only_for(objectives: tuple[str, ...], default: Any = ..., **kwargs) -> Any:
    """A training setting read by the listed objectives only (``("KD",)``): a stage of another objective's
    fingerprint leaves it out, so tuning the distillation temperature reuses every contrastive stage."""
    return Field(default, json_schema_extra={_OBJECTIVES: list(objectives)}, **kwargs)


def affects_results(info: FieldInfo, objective: str | None = None) -> bool:
    """Whether a field enters the fingerprint of a stage (of ``objective``, for fields declared with
    :func:`only_for`)."""
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    if extra.get(_AFFECTS, True) is False:
        return False
    return objective is None or _OBJECTIVES not in extra or objective in extra[_OBJECTIVES]


def canonical(value: Any, objective: str | None = None) -> Any:
    """``value`` as plain JSON-able data: models as mappings of every field that affects results (defaults
    included), floats normalised so that ``1`` and ``1.0`` of a float field are one value."""
    if isinstance(value, BaseModel):
        fields = type(value).model_fields
        return {name: canonical(getattr(value, name), objective) for name, info in fields.items()
                if affects_results(info, objective)}
    if isinstance(value, dict):
        return {str(k): canonical(v, objective) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [canonical(v, objective) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, Path):
        return str(value)
    return value


def digest(kind: str, form: Any) -> str:
    """The short hash of a canonical form, with the schema version and the kind of stage it names."""
    text = json.dumps([SCHEMA_VERSION, kind, form], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
