"""The configuration: typed dataclasses, presets, and reading params.yaml."""
