import sys

from spine_ml.cli import main

sys.exit(main())
