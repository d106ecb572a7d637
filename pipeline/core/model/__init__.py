"""The model family every stage builds on: GPT-2 (gpt2.py, one file, no distributed code), task heads on
its trunk (heads.py), and checkpoints as files (checkpoints.py: our trainer's layout, and opening any
checkpoint --ckpt names). Training (train/) and evaluation (eval/) both import it; it imports neither.
"""
