"""``python -m tasks``: list names and presets, show a sampled batch, download or check datasets."""

import sys

from .cli import main

sys.exit(main())
