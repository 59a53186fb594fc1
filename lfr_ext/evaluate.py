"""``python -m lfr_ext.evaluate``: runs :func:`lfr_ext.cli.evaluate.main`."""

from lfr_ext.cli.evaluate import main  # (``from lfr_ext.evaluate import main`` keeps working too)

if __name__ == "__main__":
    raise SystemExit(main())
