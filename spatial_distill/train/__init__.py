"""The train stage (DESIGN.md §1): `trainer.train_and_evaluate(config, workdir)`; the loss and
steps in `step`, Orbax checkpoints in `checkpoint`, JSONL/TensorBoard metrics and MFU in `metrics`."""
