"""A Trainer callback that refuses a symbolic link planted in the job's directory before
anything is written there (workers.storage.refuse_links)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from workers.storage import refuse_links


class NoLinks(TrainerCallback):
    """Checks the job's directory for links at each step that saves a checkpoint (before
    the Trainer writes it: the flow callbacks have decided by on_step_end) and at the end of
    training (before the final model is saved). Raising stops the run: the attempt fails as
    an error of the job, never retried."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = directory

    def on_step_end(self, args: TrainingArguments, state: TrainerState,
                    control: TrainerControl, **kwargs: Any) -> None:
        if control.should_save:
            refuse_links(self.directory)

    def on_train_end(self, args: TrainingArguments, state: TrainerState,
                     control: TrainerControl, **kwargs: Any) -> None:
        refuse_links(self.directory)
