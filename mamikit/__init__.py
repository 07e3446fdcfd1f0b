"""mamikit: multi-modal, multi-task meme classification for SemEval-2022 Task 5 (MAMI).

Reproduces the "Codec" system: frozen CLIP / DETR / BERT backbones, shared or
per-modality transformer encoders, a class-query transformer decoder and MLP
heads, trained on several datasets at once with auxiliary losses.
"""

__version__ = "0.1.0"
