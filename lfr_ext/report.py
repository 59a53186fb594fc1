"""``python -m lfr_ext.report``: runs :func:`lfr_ext.cli.report.main`."""

from lfr_ext.cli.report import main  # (``from lfr_ext.report import main`` keeps working too)

if __name__ == "__main__":
    raise SystemExit(main())
