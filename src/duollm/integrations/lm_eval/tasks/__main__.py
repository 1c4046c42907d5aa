"""`python -m duollm.integrations.lm_eval.tasks` prints the folder to pass to lm_eval as --include_path."""

from . import TASKS_DIR

print(TASKS_DIR)
