"""The evaluations of a frozen encoder: k-NN and linear probes, and the dense probe."""
