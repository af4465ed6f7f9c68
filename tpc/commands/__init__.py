"""The CLI verbs whose work is more than argument parsing: ``bench.py`` (``tpc bench``) and
``eval.py`` (``tpc eval``). ``tpc/cli.py`` parses the arguments and calls them; ``tpc tune``
lives in :mod:`tpc.tune`, ``tpc visualize`` in :mod:`tpc.visualize`."""
