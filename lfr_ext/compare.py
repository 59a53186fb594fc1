"""``python -m lfr_ext.compare``: runs :func:`lfr_ext.cli.compare.main`."""

if __name__ == "__main__":
    from lfr_ext.cli.compare import main

    raise SystemExit(main())
