"""Image-conditioned generation with a BLIP-2 / InstructBLIP model on blipfast's Q-Former: the engine behind
``blipfast caption`` (:mod:`.caption`) and ``blipfast vqa`` (:mod:`.vqa`).

``Generator(model_dir)`` loads an HF ``Blip2ForConditionalGeneration`` / ``InstructBlipForConditionalGeneration``
folder with its tokenizer and image processor (and, for InstructBLIP, the ``qformer_tokenizer`` subfolder that
``InstructBlipProcessor`` writes), swaps in blipfast's Q-Former and generates with transformers' ``generate``.
"""
from .engine import Generator, read_items, run_task

__all__ = ["Generator", "read_items", "run_task"]
