"""Models shared by the trainer's tasks and their evaluation."""
