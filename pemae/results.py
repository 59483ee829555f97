"""Rewrite README.md's claims block from results/claims.json:

    python -m pemae.results --readme

(`pemae.report.claims.update_readme`; the tables themselves are written by the pipeline's stages.)
"""

from __future__ import annotations

from pemae.report.claims import update_readme


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["--readme"]:
        raise SystemExit("usage: python -m pemae.results --readme   (rewrite README.md's claims block)")
    print("README.md " + ("updated" if update_readme() else "already matches results/claims.json"))
