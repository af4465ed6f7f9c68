"""One module per CLI command, each with ``run(args)``: the parsed arguments in, the exit code out.
``tpc/cli.py`` parses the arguments and imports the command's module through its ``COMMANDS``
table; a module here imports what its command needs at its top. ``arguments.py`` turns the
parsed flags into the keyword arguments of ``tpc.compile`` and the ``run_*`` functions."""
