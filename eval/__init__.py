"""``rerouting.eval``: evaluate routed LLaVA-1.5 and Qwen2.5-VL with lmms-eval (``pip install 'rerouting[eval]'``).

lmms-eval finds the ``rerouting`` model through the entry point group ``lmms_eval.models``
(pyproject.toml; :mod:`rerouting.eval.manifest`), so ``lmms-eval --model rerouting`` works once the package
is installed. Modules: ``model`` (the lmms-eval model), ``options`` (its model arguments), ``inputs``
(prompts and tensors as lmms-eval's own models write them), ``grounding`` (the release's prompt styles and
box parsers; no lmms-eval import), ``budgets`` (per-sample budgets in lmms-eval's logs) and ``tiny``
(tiny saved checkpoints and a tiny local task for the tests). See docs/evaluate.md.
"""
