from lbctl.cli.main import main

raise SystemExit(main())
