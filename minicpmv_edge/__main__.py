from minicpmv_edge.cli import main

raise SystemExit(main())
