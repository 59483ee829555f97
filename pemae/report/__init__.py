"""The reports: reading the per-seed results, the verdict rule, tables, claims and figures."""
