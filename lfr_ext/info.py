"""``python -m lfr_ext.info``: runs :func:`lfr_ext.cli.info.main`."""

from lfr_ext.cli.info import main  # (``from lfr_ext.info import main`` keeps working too)

if __name__ == "__main__":
    raise SystemExit(main())
