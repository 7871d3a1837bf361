"""``python -m hevc_vit`` (and ``torchrun -m hevc_vit``) runs the command line."""

import sys

from hevc_vit.cli import main

sys.exit(main())
