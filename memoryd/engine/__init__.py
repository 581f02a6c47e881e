"""The engine: every session's model work, planned per tick and run as batched calls.

Modelled on vLLM v1's EngineCore: sessions submit typed work items (`work`) and
await their results; each tick the scheduler (`scheduler.schedule`, plain data in
and out) plans what runs under a token budget, the worker (`worker.execute`, the
only code that touches tensors, on one thread that owns the device) runs the plan
as batched model calls, and the update step (`core.Engine`) routes each result to
the call waiting for it, or keeps an unfinished append for the next tick.

Import what you need from the modules: `work` and `scheduler` are plain Python (the
middle layer imports them without pulling in torch); `core` and `worker` run the model.
"""
