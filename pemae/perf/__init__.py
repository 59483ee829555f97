"""Performance: the step cost per method, the peer benchmark, the GPU check and smoke run."""
