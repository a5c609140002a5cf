"""The architecture of ``rerouting audit`` (``--model``): an embedded config, a local checkpoint folder or a
``config.json``, built on the meta device; shapes read from the real modules. Errors are :class:`AuditError`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rerouting.reference.archs import ArchSpec, arch_names, load_arch
from rerouting.reference.schedule import RoutingError

from .image_size import vision_geometry
from .inputs import KV_DTYPES, AuditError


@dataclass(frozen=True)
class ModelInfo:
    """The architecture an audit is computed for.

    Attributes:
        name: display name (the embedded name, or the checkpoint folder's name).
        source: ``"embedded"`` or the absolute path of the ``config.json`` that was read.
        model_class: the ``transformers`` class built on the meta device to read the shapes.
        model_type: the config's ``model_type``.
        arch: the decoder shapes, read from the meta model's modules (``ArchSpec.from_model``).
        default_visual: visual tokens per image from the config (``image_seq_length``), if it has one.
        config_dtype: the checkpoint's dtype name (``float16``, ``bfloat16``...), if the config says.
        vision: the image-size rule and patch sizes ``--image-size`` uses (``image_size.vision_geometry``).
    """

    name: str
    source: str
    model_class: str
    model_type: str
    arch: ArchSpec
    default_visual: int | None
    config_dtype: str | None
    vision: dict | None = None

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "source": self.source,
            "model_class": self.model_class,
            "model_type": self.model_type,
            "arch": self.arch.to_dict(),
            "default_visual_tokens": self.default_visual,
            "config_dtype": self.config_dtype,
            "vision": self.vision,
        }


def _dtype_name(value: Any) -> str | None:
    if value is None:
        return None
    name = str(value).removeprefix("torch.")
    return name if name in KV_DTYPES else None


def _build_on_meta(config: Any, label: str) -> tuple[str, ArchSpec]:
    """[budget.flops.true] Instantiate the model class of ``config`` on the meta device; read its shapes."""
    from transformers import AutoModelForImageTextToText

    try:
        with torch.device("meta"):
            model = AutoModelForImageTextToText.from_config(config)
    except (ValueError, KeyError) as error:
        raise AuditError(
            f"--model {label}: model_type {getattr(config, 'model_type', None)!r} is not an image-text "
            f"model transformers can build ({str(error).splitlines()[0][:160]}); the audit supports LLaVA "
            "(llava, llava_next) and Qwen2-VL/Qwen2.5-VL checkpoints"
        ) from None
    try:
        arch = ArchSpec.from_model(model, name=label)
    except RoutingError as error:
        raise AuditError(f"--model {label}: {error}") from None
    return type(model).__name__, arch


def resolve_model(value: str) -> ModelInfo:
    """The architecture named by ``--model``: an embedded name, a checkpoint folder or a config.json file.

    Embedded configs live in ``reference/archs/`` (no weights). A folder must contain ``config.json``
    (``save_pretrained`` of a config is enough). The model is built on the meta device (no memory, no
    weights) and its decoder shapes read from its modules.
    """
    names = arch_names()
    if value in names:
        config, spec = load_arch(value)
        model_class, arch = _build_on_meta(config, value)
        if arch != spec:  # the config's numbers and the modules' shapes must agree
            raise AuditError(f"--model {value}: module shapes {arch} disagree with the config's {spec}")
        source = "embedded"
    else:
        path = Path(value).expanduser()
        if path.is_dir():
            path = path / "config.json"
            if not path.is_file():
                raise AuditError(
                    f"--model {value!r}: the folder has no config.json (a checkpoint folder, or "
                    f"save_pretrained of a config, is needed)"
                )
        elif not path.is_file():
            raise AuditError(
                f"--model {value!r} is neither an embedded architecture ({', '.join(names)}) nor an "
                "existing checkpoint folder or config.json file"
            )
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(str(path.resolve()), local_files_only=True)
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as error:
            raise AuditError(
                f"--model {value!r}: cannot read {path} as a transformers config: {error}"
            ) from None
        label = path.resolve().parent.name
        model_class, arch = _build_on_meta(config, label)
        source = str(path.resolve())
    text_dtype = getattr(getattr(config, "text_config", None), "dtype", None)
    seq = getattr(config, "image_seq_length", None)
    return ModelInfo(
        name=arch.name,
        source=source,
        model_class=model_class,
        model_type=str(getattr(config, "model_type", "")),
        arch=arch,
        default_visual=int(seq) if isinstance(seq, int) and seq > 0 else None,
        config_dtype=_dtype_name(getattr(config, "dtype", None)) or _dtype_name(text_dtype),
        vision=vision_geometry(config),
    )
