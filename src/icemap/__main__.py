"""``python -m icemap``: the same command line as the ``icemap`` script."""

from icemap.cli import main

main()
