"""``python -m lfr_ext.demo``: runs :func:`lfr_ext.cli.demo.main`."""

from lfr_ext.cli.demo import main  # (``from lfr_ext.demo import main`` keeps working too)

if __name__ == "__main__":
    raise SystemExit(main())
