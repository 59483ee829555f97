"""The studies outside the main pipeline: small data, and the pretraining-budget study."""
