import sys

from services.evaluator.entry import main

sys.exit(main())
