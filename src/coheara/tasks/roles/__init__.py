"""One module per task, each defining `TASK` (a `TaskSpec`); the registry finds them."""
