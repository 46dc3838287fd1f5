import sys

from services.trainer.entry import main

sys.exit(main())
