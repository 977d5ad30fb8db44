"""``python -m riemann_zero.train RECIPE.yaml [dotted.key=value ...]``."""

import sys

from riemann_zero.train.cli import cli

sys.exit(cli())
