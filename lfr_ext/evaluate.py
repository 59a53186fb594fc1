"""``python -m lfr_ext.evaluate``: runs :func:`lfr_ext.cli.evaluate.main`."""

if __name__ == "__main__":
    from lfr_ext.cli.evaluate import main

    raise SystemExit(main())
