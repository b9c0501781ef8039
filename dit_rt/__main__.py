import sys

from dit_rt.cli import main

sys.exit(main())
