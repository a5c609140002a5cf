"""rerouting: visual-token routing for vision-language models.

Sub-packages (each a top-level folder of the repository):

- ``rerouting.spec``: the normative rules (Markdown, one file per concern);
- ``rerouting.reference``: the executable spec, slow and obvious;
- ``rerouting.optimized``: the fast path on real Hugging Face models;
- ``rerouting.conformance``: the oracle suite and budget audits.
"""

__version__ = "0.1.0"
