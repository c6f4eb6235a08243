from pixelwise.cli import main

raise SystemExit(main())
