"""Tiny random models and data, built from configs (no downloads), for the tests and the documentation's examples.

- ``blipfast.testing.data``: PNG images of coloured shapes with captions, JSONL files, a tiny vision tower folder;
- ``blipfast.testing.blip2``: tiny BLIP-2 / InstructBLIP models, tokenizers and image processors
  (``python -m blipfast.testing.blip2 OUT`` writes the demo folders of the stage-2 and generation examples);
- ``blipfast.testing.blip``: tiny BLIP (v1) captioner and filter with a web set
  (``python -m blipfast.testing.blip OUT`` writes the CapFilt example's inputs);
- ``blipfast.testing.retrieval``: tiny BLIP-2 retrieval models, a BERT tokenizer and a gallery
  (``python -m blipfast.testing.retrieval OUT`` writes the retrieval example's inputs).

Their weights are random: the outputs exercise the code paths, not a trained model's quality.
"""
