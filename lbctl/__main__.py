from lbctl.cli import main

raise SystemExit(main())
