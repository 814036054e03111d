"""Ray entry points: thin wrappers that parse a config, build from registries and call the engine.

- `trainables.train_worker`: the Ray Train per-worker function (`train_loop_per_worker`).
- `trainables.train_fold`: the driver for one fold (`build_trainer`, `run_fold`).

Modules import Ray lazily where they can, so importing this package stays cheap.
"""
