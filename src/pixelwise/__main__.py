from pixelwise.launch import main

raise SystemExit(main())
