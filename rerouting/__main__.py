from rerouting.cli import main

raise SystemExit(main())
