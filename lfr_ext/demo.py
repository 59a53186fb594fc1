"""``python -m lfr_ext.demo``: runs :func:`lfr_ext.cli.demo.main`."""

if __name__ == "__main__":
    from lfr_ext.cli.demo import main

    raise SystemExit(main())
