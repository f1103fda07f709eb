from bigtrain.cli import main

raise SystemExit(main())
