"""The ``icemap train`` and ``icemap experiment`` commands (registered on :data:`icemap.cli.app`).

Kept apart from :mod:`icemap.cli` so the model commands can grow without touching the data
commands; torch is imported only when one of them runs.
"""

from __future__ import annotations
