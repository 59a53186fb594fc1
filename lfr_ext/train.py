"""``python -m lfr_ext.train``: runs :func:`lfr_ext.cli.train.main`."""

from lfr_ext.cli.train import main  # (``from lfr_ext.train import main`` keeps working too)

if __name__ == "__main__":
    raise SystemExit(main())
