"""Training and evaluation of memoryd's TTT-E2E model and its baselines.

`python -m trainer prepare|train|eval` (see `trainer.cli`).  The trainer drives
`model/`'s functions (`model.sequence.run_sequence`) and never reimplements the
forward pass: the outer loss of meta-learning is exactly the loss the served
model computes, differentiated with `create_graph=True`.
"""
