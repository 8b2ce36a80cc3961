"""python -m spotwise.worker.agent: the node agent."""

import sys

from spotwise.worker.agent.cli import main

sys.exit(main())
