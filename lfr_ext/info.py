"""``python -m lfr_ext.info``: runs :func:`lfr_ext.cli.info.main`."""

if __name__ == "__main__":
    from lfr_ext.cli.info import main

    raise SystemExit(main())
