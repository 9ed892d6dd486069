from qsearch.cli import main

raise SystemExit(main())
