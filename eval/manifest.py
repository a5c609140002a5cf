"""[eval.model-args] The ``lmms_eval.models`` entry point: lmms-eval's model registry learns ``rerouting`` here.

lmms-eval (0.7) loads every entry point of the group at import and registers the manifests it returns;
the class itself is imported only when ``--model rerouting`` asks for it.
"""

from __future__ import annotations

CLASS_PATH = "rerouting.eval.model.Rerouting"


def manifests():
    """The ``rerouting`` model's manifest (a simple, i.e. non-chat, lmms-eval model)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id="rerouting", simple_class_path=CLASS_PATH)]
