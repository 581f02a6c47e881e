"""The engine: every session's model work, planned and run as batched calls on two lanes.

Modelled on vLLM v1's EngineCore: sessions submit typed work items (`work`) and
await their results; whenever a lane is free the scheduler (`scheduler.schedule`,
plain data in and out) plans what it runs: the decode lane one batched forward, the
compute lane solo work (test-time steps) under a token budget.  The worker
(`worker.execute`, the only code that touches tensors, on each lane's own thread)
runs the plan as model calls, and the update step (`core.Engine`) routes each result
to the call waiting for it, or keeps an unfinished append for the next plan.

Import what you need from the modules: `work` and `scheduler` are plain Python (the
middle layer imports them without pulling in torch); `core` and `worker` run the model.
"""
