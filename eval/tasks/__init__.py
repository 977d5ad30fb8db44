"""Static lm-eval task YAMLs (``--include_path eval/tasks``) and the Python hooks they call."""
