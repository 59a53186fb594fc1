"""``python -m lfr_ext.train``: runs :func:`lfr_ext.cli.train.main`."""

if __name__ == "__main__":
    from lfr_ext.cli.train import main

    raise SystemExit(main())
