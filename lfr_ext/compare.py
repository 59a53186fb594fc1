"""``python -m lfr_ext.compare``: runs :func:`lfr_ext.cli.compare.main`."""

from lfr_ext.cli.compare import main  # (``from lfr_ext.compare import main`` keeps working too)

if __name__ == "__main__":
    raise SystemExit(main())
