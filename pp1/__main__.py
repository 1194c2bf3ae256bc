from pp1.cli import main

raise SystemExit(main())
