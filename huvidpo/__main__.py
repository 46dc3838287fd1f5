from huvidpo.cli import main

raise SystemExit(main())
