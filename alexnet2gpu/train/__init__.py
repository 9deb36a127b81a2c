"""Training: :mod:`.loop` runs a run on every process of a job; :mod:`.checkpointing`
says what a checkpoint holds beyond the weights."""
