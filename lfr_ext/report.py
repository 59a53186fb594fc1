"""``python -m lfr_ext.report``: runs :func:`lfr_ext.cli.report.main`."""

if __name__ == "__main__":
    from lfr_ext.cli.report import main

    raise SystemExit(main())
